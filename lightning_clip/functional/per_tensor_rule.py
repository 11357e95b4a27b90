"""What every per-tensor rule shares: the plan of a step (`PerTensorPlan`) and the base class over one
stacked statistics tensor (`PerTensorRule`). Imports torch only.

`PerTensorRule.plan` turns the per-tensor norms of one fused ``_foreach_norm`` pass into a `PerTensorPlan`
(the per-tensor coefficients, the statistics and limits the step would leave, and the `SUMMARY` scalars a
step brings to the host) with no state change and no host read; `PerTensorRule.commit` keeps those
statistics once the step's fate is known; `PerTensorRule.state_dict` saves them as one CPU tensor. A
subclass gives its limits (``_limits_of``), its decision (``_decide``) and its thresholds: the rules,
`AdaGCRule` and `MeanPerTensorRule`, are in `lightning_clip.functional.per_tensor`, which re-exports
everything here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["SUMMARY", "PerTensorPlan", "PerTensorRule"]

SUMMARY = ("clipped", "most_clipped", "min_coef", "clipped_total")
"""The entries of `PerTensorPlan.summary`, the few scalars a step brings to the host."""


@dataclass
class PerTensorPlan:
    """One step's per-tensor decision, on the gradients' device (nothing read on the host).

    Attributes:
        coefs: float32 ``(m,)``, the coefficient of each tensor that has a gradient (``≤ 1``; 1 where not
            clipped, everywhere when the total norm is not finite).
        new_stats: float32 ``(2, m)``, the statistics of these tensors once the step counts (`commit`;
            meaningless for a step whose total norm is not finite, which `commit` ignores).
        positions: long ``(m,)``, the tensors' positions among the optimizer's ``size`` parameters, or
            None when every parameter has a gradient (positions ``0 … size−1``).
        summary: float32 ``(4,)``: how many tensors are clipped, the index (into the ``m``) of the most
            clipped one, its coefficient, and the total norm after clipping (see `SUMMARY`).
        total: the pre-clip total norm (0-d float32).
        warmup_threshold: the host threshold of the warm-up's global clip (``mode="adagc"`` only, else None).
        next_limits: the per-tensor limits of ``new_stats`` (`PerTensorRule.limits`), made while the
            step's small vectors are still in cache, so that `commit` only swaps tensors (None when the step
            covers some of the parameters only: the limits are then made again at the next plan).
    """

    coefs: torch.Tensor
    new_stats: torch.Tensor
    positions: torch.Tensor | None
    summary: torch.Tensor
    total: torch.Tensor
    warmup_threshold: float | None = None
    next_limits: torch.Tensor | None = None


class PerTensorRule:
    """Base class: per-tensor thresholds of one optimizer, one stacked statistics tensor.

    `plan` is pure (no state change); `commit` feeds a planned step into the statistics. A caller that
    learns only later whether the step's update was applied calls `commit` only for an applied step.

    Attributes:
        stats: float32 ``(2, size)`` on the gradients' device (None before the first step): row 0 each
            tensor's running statistic, row 1 the steps it has counted.
        steps: the steps committed with a finite total norm.
    """

    norm_type: float = 2.0
    max_norm: float | None

    def __init__(self) -> None:
        self.stats: torch.Tensor | None = None
        self.steps = 0
        self._saved: torch.Tensor | None = None  # loaded statistics, moved to the device at first use
        # (the statistics they were made from, the per-tensor limits of the next step): see `limits`
        self._limits: tuple[torch.Tensor, torch.Tensor] | None = None
        self._counted_all = False  # every tensor has counted a step (known on the host, never read back)

    # ------------------------------------------------------------------------------------ statistics
    def _stats(self, size: int, device: torch.device) -> torch.Tensor:
        """The statistics tensor for ``size`` parameters on ``device`` (grown with zeros for new ones)."""
        if self._saved is not None:
            self.stats, self._saved = self._saved.to(device, torch.float32), None
        stats = self.stats
        if stats is None or stats.shape[1] < size or stats.device != device:
            grown = torch.zeros(2, max(size, 0 if stats is None else stats.shape[1]), device=device)
            if stats is not None:
                grown[:, : stats.shape[1]] = stats.to(device)
            if stats is None or stats.shape[1] < size:
                self._counted_all = False  # new tensors, not counted yet
            self.stats = stats = grown
        return stats

    def _held(self) -> torch.Tensor | None:
        """The statistics, live or loaded and not yet moved to the device (None before any step)."""
        return self._saved if self.stats is None else self.stats

    @staticmethod
    def _take(stats: torch.Tensor, positions: torch.Tensor | None, size: int) -> torch.Tensor:
        if positions is None:
            return stats if stats.shape[1] == size else stats[:, :size]
        return stats.index_select(1, positions)

    def limits(self) -> torch.Tensor | None:
        """The per-tensor limits the next step's norms meet (`_limits_of` the statistics; None before
        the first step), kept from the plan of the step that made the statistics: the same values made
        again would cost the step about ten small vector operations after its gradient pass."""
        stats = self.stats
        if stats is None:
            return None
        if self._limits is None or self._limits[0] is not stats:
            self._limits = (stats, self._limits_of(stats))
        return self._limits[1]

    def _limits_of(self, stats: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The per-tensor limits of ``stats`` (float32 ``(n,)``), as `_decide` reads them."""
        raise NotImplementedError

    def plan(
        self,
        per_tensor: torch.Tensor,
        total: torch.Tensor,
        positions: torch.Tensor | None = None,
        size: int | None = None,
    ) -> PerTensorPlan:
        """The coefficients of one step (no state change, no host read).

        Args:
            per_tensor: float32 ``(m,)``, the pre-clip norms of the tensors that have a gradient.
            total: their total norm (0-d; a NaN or Inf there means nothing is clipped).
            positions: those tensors' positions among the optimizer's parameters (None: ``0 … m−1``).
            size: how many parameters the optimizer has (None: ``m``).
        """
        m = len(per_tensor)
        size = m if size is None else size
        stats = self._stats(size, per_tensor.device)
        whole = positions is None and stats.shape[1] == m  # the step covers every parameter
        current = self._take(stats, positions, m)
        limits = self.limits()
        assert limits is not None
        limits = limits if whole else self._take(limits.unsqueeze(0), positions, m)[0]
        coefs, applied, new_stats, warmup_threshold = self._decide(per_tensor, total, current, limits)
        coefs = torch.where(torch.isfinite(total), coefs, 1.0)
        summary = _summary(coefs, applied, self.norm_type)
        next_limits = self._limits_of(new_stats) if whole else None
        return PerTensorPlan(coefs, new_stats, positions, summary, total, warmup_threshold, next_limits)

    def _decide(
        self, norms: torch.Tensor, total: torch.Tensor, current: torch.Tensor, limits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float | None]:  # pragma: no cover - abstract
        """``(coefs, norms as clipped, new statistics, warm-up threshold)`` for finite norms."""
        raise NotImplementedError

    def commit(self, plan: PerTensorPlan, finite: bool, total_norm: float | None = None) -> None:
        """Feed an applied step into the statistics. ``finite``: its total norm was finite (known on the
        host from the step's transfer); a non-finite step changes nothing. ``total_norm``: the host value
        (needed by the warm-up rule of ``mode="adagc"`` without ``max_norm``)."""
        if not finite or self.stats is None:
            return
        if plan.next_limits is not None and plan.new_stats.shape == self.stats.shape:
            self.stats = plan.new_stats  # the step's own tensors: nothing to copy or make again
            self._limits = (plan.new_stats, plan.next_limits)
            self._counted_all = True  # a whole step: AdaGC has counted every tensor (unused by the mean rule)
        elif plan.positions is None:
            self.stats[:, : plan.new_stats.shape[1]] = plan.new_stats
            self._limits = None
        else:
            self.stats.index_copy_(1, plan.positions, plan.new_stats)
            self._limits = None
        self.steps += 1

    def thresholds(self) -> torch.Tensor:  # pragma: no cover - abstract
        """The threshold each tensor's norm meets at the next step (∞ where none), float32 ``(size,)``."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Plain values and one CPU tensor (loadable with ``torch.load(weights_only=True)``)."""
        stats = self._held()
        return {
            "steps": self.steps,
            "stats": None if stats is None else stats.detach().to("cpu", copy=True),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        saved = state.get("stats")
        self.stats, self._limits = None, None
        self._saved = None if saved is None else saved.detach().to("cpu", torch.float32, copy=True)
        self._counted_all = self._saved is not None and bool((self._saved[1] > 0).all())


def _summary(coefs: torch.Tensor, applied: torch.Tensor, norm_type: float) -> torch.Tensor:
    """``[clipped count, argmin index, min coef, total after clipping]`` as one float32 tensor
    (``applied``: the norms as clipped)."""
    smallest, most = torch.min(coefs, dim=0)  # (indexing with a tensor would read it on the host)
    clipped_total = torch.linalg.vector_norm(applied, norm_type)
    return torch.stack([(coefs < 1.0).sum(), most, smallest, clipped_total]).float()  # promotes to float
