"""Per-tensor clipping thresholds: AdaGC and a per-tensor ``mean`` rule. Imports torch only.

Each parameter tensor is clipped to a threshold learned from its own recent norms, instead of the total
norm to one threshold: one exploding tensor (an embedding, a QK projection) no longer drags every other
tensor's step down, and a quiet tensor's spike is no longer hidden inside a large total (AdaGC, Wang et
al. 2025, "AdaGC: Improving Training Stability for Large Language Model Pretraining", arXiv 2502.11034).

Everything stays on the gradients' device: a rule turns the per-tensor norms of one fused
``_foreach_norm`` pass (`~lightning_clip.functional.norms.grad_norms`) into per-tensor coefficients
(`PerTensorRule.plan`, a few vector operations, no host read; it also makes the statistics and the
per-tensor limits the step would leave), `PerTensorScaler` (`lightning_clip.functional.clipping`,
re-exported here) applies them in one fused multiply, and `PerTensorRule.commit` keeps those statistics
once the step's fate is known (no device operation when the step covers every parameter). The
statistics of an optimizer are one stacked float32 tensor (`PerTensorRule.stats`, shape ``(2, n)``:
row 0 the running statistic of each tensor, row 1 how many steps each tensor has counted), plus a host
count of the steps applied. That shared mechanism (`PerTensorPlan`, `PerTensorRule`) is in
`lightning_clip.functional.per_tensor_rule`, re-exported here.

* `AdaGCRule` (``mode="adagc"``) reproduces ``pytorch_optimizer.AdaGC`` 4.1.0's clipping: during the
  warm-up a global clip to ``max_norm`` (AdaGC's ``lambda_abs``), each tensor's ``γ`` the minimum of its
  clipped norms; afterwards each tensor is clipped to ``factor · γ`` (``lambda_rel``), ``γ`` an EMA
  (``decay``, AdaGC's ``beta``) of the tensor's clipped norms.
* `MeanPerTensorRule` (``mode="mean_per_tensor"``): the ``mean`` rule of
  `~lightning_clip.functional.thresholds.MeanThreshold`, one per tensor: ``factor ×`` the bias-corrected
  EMA of the tensor's norms as applied; no absolute threshold unless ``max_norm`` is given (then a cap on
  the total norm after the per-tensor clip).

In both, a step whose total norm is not finite is not clipped and changes nothing, and `commit` is simply
not called for a step whose update was dropped: NaN/Inf never enters the statistics, a skipped step
never counts.

Examples:
    >>> import torch
    >>> rule = MeanPerTensorRule(factor=2.0, decay=0.5)
    >>> def step(norms):
    ...     per_tensor = torch.tensor(norms)
    ...     plan = rule.plan(per_tensor, torch.linalg.vector_norm(per_tensor), size=2)
    ...     rule.commit(plan, finite=True)
    ...     return [round(c, 4) for c in plan.coefs.tolist()]
    >>> step([1.0, 4.0])  # first step: nothing known, nothing clipped
    [1.0, 1.0]
    >>> step([10.0, 4.0])  # tensor 0 spikes alone: clipped to 2 × 1.0, tensor 1 untouched
    [0.2, 1.0]
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_clip.functional.clipping import EPS, PerTensorScaler
from lightning_clip.functional.per_tensor_rule import SUMMARY as SUMMARY
from lightning_clip.functional.per_tensor_rule import PerTensorPlan, PerTensorRule
from lightning_clip.functional.thresholds import MeanThreshold, check_max_norm

__all__ = [
    "ADAGC_EPS",
    "PER_TENSOR_MODES",
    "AdaGCRule",
    "MeanPerTensorRule",
    "PerTensorPlan",
    "PerTensorRule",
    "PerTensorScaler",
    "make_per_tensor_rule",
]

PER_TENSOR_MODES = ("adagc", "mean_per_tensor")
"""The modes of `AdaptiveGradientClipping` that clip each parameter tensor to its own threshold."""

ADAGC_EPS = 1e-8
"""AdaGC's ``eps`` (its default): the warm-up coefficient is ``max_norm / (total + eps)``, the per-tensor
one ``factor · max(γ, eps) / max(norm, eps)``."""

ADAGC_WARMUP_STEPS = 99
"""``mode="adagc"``'s warm-up when ``warmup_steps`` is None: that of AdaGC's default ``warmup_steps=100``
(AdaGC counts its steps from 1 and its 100th step already uses the per-tensor rule)."""


class AdaGCRule(PerTensorRule):
    """AdaGC's clipping (Wang et al. 2025), as ``pytorch_optimizer.AdaGC`` 4.1.0 applies it.

    With ``S`` the steps applied so far and ``n_i`` tensor ``i``'s norm:

    * warm-up (``S < warmup_steps``, or a tensor that has never had a gradient): every tensor is scaled by
      the global coefficient ``w = min(1, max_norm / (total + eps))`` and ``γ_i ← min(γ_i, w·n_i)``
      (``w·n_i`` for a new tensor);
    * afterwards ``h_i = min(1, factor · max(γ_i, eps) / max(n_i, eps))`` and
      ``γ_i ← γ_i + (1 − decay)·(h_i·n_i − γ_i)`` (``torch.lerp``).

    ``eps`` is `ADAGC_EPS`. Without ``max_norm`` the warm-up's global clip follows the plain ``mean`` rule
    (`MeanThreshold` with the same factor and decay, from the second step on; AdaGC always has a
    ``lambda_abs``). Differences from AdaGC, on purpose: a step whose total norm is NaN/Inf is not clipped
    and leaves ``γ`` and the step count as they were (AdaGC's ``γ`` and weights turn NaN for good), and
    ``factor > 1`` (with ``lambda_rel ≤ 1`` every ``γ`` could only fall). AdaGC's ``warmup_steps=W``
    counts from 1 and applies the per-tensor rule from its step ``W``: it is ``warmup_steps=max(W − 1, 1)``
    here.

    Examples:
        >>> rule = AdaGCRule(factor=1.05, decay=0.98, warmup_steps=1, max_norm=1.0)
        >>> norms = torch.tensor([3.0, 4.0])
        >>> plan = rule.plan(norms, torch.linalg.vector_norm(norms))
        >>> [round(c, 4) for c in plan.coefs.tolist()]  # warm-up: total 5 clipped to 1
        [0.2, 0.2]
        >>> rule.commit(plan, finite=True)
        >>> [round(t, 4) for t in rule.thresholds().tolist()]  # 1.05 × γ, γ = [0.6, 0.8]
        [0.63, 0.84]
    """

    def __init__(
        self,
        factor: float = 1.05,
        decay: float = 0.98,
        warmup_steps: int = ADAGC_WARMUP_STEPS,
        max_norm: float | None = 1.0,
        norm_type: float = 2.0,
    ) -> None:
        super().__init__()
        self._warmup_rule = MeanThreshold(factor, decay, 1, None)  # validates factor and decay
        self.factor, self.decay = float(factor), float(decay)
        self.warmup_steps = int(warmup_steps)
        self.max_norm = check_max_norm(max_norm)
        self.norm_type = float(norm_type)

    def _warmup_threshold(self) -> float:
        return self.max_norm if self.max_norm is not None else self._warmup_rule.current()

    def _limits_of(self, stats: torch.Tensor) -> torch.Tensor:
        return stats[0].clamp_min(ADAGC_EPS).mul_(self.factor)  # factor · max(γ, eps)

    def _decide(
        self, norms: torch.Tensor, total: torch.Tensor, current: torch.Tensor, limits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float | None]:
        gamma, count = current.unbind()
        threshold = self._warmup_threshold()
        rel = torch.div(limits, norms.clamp_min(ADAGC_EPS)).clamp_max_(1.0)
        rel_norms = rel * norms
        rel_gamma = torch.lerp(gamma, rel_norms, 1.0 - self.decay)
        if self.steps >= self.warmup_steps and self._counted_all:  # the steady state: no tensor is new
            return rel, rel_norms, torch.stack([rel_gamma, count + 1.0]), threshold
        warm_coef = torch.clamp(threshold / (total + ADAGC_EPS), max=1.0)
        warm_norms = norms * warm_coef
        new = count == 0
        warm = new if self.steps >= self.warmup_steps else torch.ones_like(new)
        coefs = torch.where(warm, warm_coef.expand_as(norms), rel)
        warm_gamma = torch.where(new, warm_norms, torch.minimum(gamma, warm_norms))
        new_stats = torch.stack([torch.where(warm, warm_gamma, rel_gamma), count + 1.0])
        return coefs, coefs * norms, new_stats, threshold

    def commit(self, plan: PerTensorPlan, finite: bool, total_norm: float | None = None) -> None:
        warming = self.max_norm is None and self.steps < self.warmup_steps
        if finite and warming and total_norm is not None and plan.warmup_threshold is not None:
            self._warmup_rule.update(total_norm, plan.warmup_threshold)
        super().commit(plan, finite, total_norm)

    def thresholds(self) -> torch.Tensor:
        stats = self._held()
        if stats is None:
            return torch.zeros(0)
        if self.steps < self.warmup_steps:
            return torch.full_like(stats[0], math.inf)
        return torch.where(stats[1] == 0, math.inf, self._limits_of(stats))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "warmup_rule": self._warmup_rule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._warmup_rule.load_state_dict(state.get("warmup_rule", {}))


class MeanPerTensorRule(PerTensorRule):
    """The ``mean`` rule, one per tensor: ``threshold_i = factor · μ̂_i``, no absolute threshold.

    ``m_i ← decay·m_i + (1 − decay)·a_i`` and ``μ̂_i = m_i / (1 − decay^{k_i})``, where ``a_i`` is tensor
    ``i``'s norm as applied (``c_i · n_i``, so a spike never inflates its own statistics) and ``k_i`` the
    steps it has counted: applied steps with a finite total norm on which it had a non-zero gradient (a
    zero norm carries no scale, a tensor without a gradient is not measured). A tensor is clipped from its
    ``warmup_steps + 1``-th counted step on: ``c_i = min(1, threshold_i / (n_i + eps))`` (``eps`` as in
    ``clip_grad_norm_``). ``max_norm`` (optional) then caps the total norm after the per-tensor clip.

    Examples:
        >>> rule = MeanPerTensorRule(factor=1.5, decay=0.9, max_norm=2.0)
        >>> norms = torch.tensor([3.0, 4.0])
        >>> plan = rule.plan(norms, torch.linalg.vector_norm(norms))
        >>> [round(c, 4) for c in plan.coefs.tolist()]  # warm-up: only the cap applies (5 -> 2)
        [0.4, 0.4]
    """

    def __init__(
        self,
        factor: float = 1.5,
        decay: float = 0.97,
        warmup_steps: int = 1,
        max_norm: float | None = None,
        norm_type: float = 2.0,
    ) -> None:
        super().__init__()
        MeanThreshold(factor, decay, warmup_steps, max_norm)  # validates every argument
        self.factor, self.decay = float(factor), float(decay)
        self.warmup_steps = int(warmup_steps)
        self.max_norm = check_max_norm(max_norm)
        self.norm_type = float(norm_type)

    def _limits_of(self, stats: torch.Tensor) -> torch.Tensor:
        ema, count = stats.unbind()
        corrected = torch.pow(self.decay, count).neg_().add_(1.0).clamp_min_(torch.finfo(torch.float32).tiny)
        return torch.where(count >= self.warmup_steps, torch.div(ema, corrected).mul_(self.factor), math.inf)

    def _decide(
        self, norms: torch.Tensor, total: torch.Tensor, current: torch.Tensor, limits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float | None]:
        ema, count = current.unbind()
        coefs = torch.div(limits, norms + EPS).clamp_max_(1.0)
        applied = coefs * norms
        if self.max_norm is not None:
            cap = torch.clamp(
                self.max_norm / (torch.linalg.vector_norm(applied, self.norm_type) + EPS), max=1.0
            )
            coefs = coefs * cap
            applied = coefs * norms
        counted = norms > 0.0  # a tensor with a zero norm (or none) keeps its EMA: weight 0
        fed = applied.clamp_max(torch.finfo(torch.float32).max)
        new_ema = torch.lerp(ema, fed, counted * (1.0 - self.decay))
        return coefs, applied, torch.stack([new_ema, count + counted]), None

    def thresholds(self) -> torch.Tensor:
        stats = self._held()
        return torch.zeros(0) if stats is None else self._limits_of(stats)


def make_per_tensor_rule(
    mode: str,
    factor: float,
    decay: float,
    warmup_steps: int | None,
    max_norm: float | None,
    norm_type: float = 2.0,
) -> PerTensorRule:
    """The rule of a per-tensor ``mode`` (`PER_TENSOR_MODES`) from `AdaptiveGradientClipping`'s
    arguments; ``warmup_steps=None``: `ADAGC_WARMUP_STEPS` for ``"adagc"``, 1 for ``"mean_per_tensor"``.

    Examples:
        >>> make_per_tensor_rule("adagc", 1.05, 0.98, None, 1.0).warmup_steps
        99
    """
    if mode == "adagc":
        steps = ADAGC_WARMUP_STEPS if warmup_steps is None else warmup_steps
        return AdaGCRule(factor, decay, steps, max_norm, norm_type)
    if mode == "mean_per_tensor":
        return MeanPerTensorRule(
            factor, decay, 1 if warmup_steps is None else warmup_steps, max_norm, norm_type
        )
    raise ValueError(f"`mode` must be one of {' | '.join(map(repr, PER_TENSOR_MODES))}, got {mode!r}.")
