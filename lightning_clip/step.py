"""The explicit per-step object that every lightning-clip callback of a Trainer shares. No Lightning import.

Lifecycle, for each optimizer step (``on_before_optimizer_step`` of one optimizer):

1. **Riders** (before the step). A callback that needs a scalar on the host at this step (the step's
   training loss) registers it with `StepTracker.ride_along` from an earlier hook
   (``on_before_backward``); it waits for the next step. A callback whose decision needs values summed
   over the DDP ranks registers them with `StepTracker.contribute` the same way.
2. **Begin.** The first lightning-clip callback whose hook runs calls `StepTracker.begin` with the
   optimizer and ``global_step``; it creates the `StepState`. Every later call for the same
   optimizer and step returns the same object, whatever the callbacks' order.
3. **Measure.** `StepState.measure` reads the gradients once per norm type (one fused
   ``_foreach_norm`` pass) and returns a `GradMeasurement`; every callback sees the pre-clip
   figures. The first host read (`GradMeasurement.total_norm`) brings the norm and every rider to
   the host in one device-to-host transfer.
4. **Reduce.** The first read of `StepState.mean_loss` or `StepState.summed` does the step's
   one all-reduce (only under DDP): the local loss and every contribution, summed over the ranks in one
   collective, so the loss-aware threshold and the guard's decision are the same on every rank.
5. **Act.** Clipping callbacks call `GradMeasurement.clip_`: gradients are scaled only as far as the
   tightest bound asks. A callback that drops the update calls `StepState.skip` (the step's fate).
6. **Fate.** The step is over at ``on_train_batch_end`` (or when the next step begins). Statistics that
   must only count applied updates read `StepState.skipped` then.

`StepState.divergence` carries `ExplosionGuard`'s reading of the step (healthy / elevated /
diverged, with the loss's and the norm's excess over their healthy levels) for the other callbacks.

`LossWindow` (`lightning_clip.loss_window`, re-exported here) keeps the losses behind the loss rider.

The tracker holds no state worth saving: nothing of it goes into checkpoints.

Examples:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> model(torch.ones(1, 2)).sum().backward()
    >>> tracker = StepTracker()
    >>> tracker.ride_along("loss", lambda: torch.tensor(0.5))
    >>> state = tracker.begin(opt, step=0)
    >>> m = state.measure(2.0)
    >>> round(m.total_norm, 4), state.rider("loss")
    (1.7321, 0.5)
    >>> tracker.begin(opt, step=0) is state
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_clip.functional.clipping import EPS, scale_grads_
from lightning_clip.functional.norms import grad_norms
from lightning_clip.loss_window import LossWindow

__all__ = [
    "LOSS_RIDER",
    "Contributor",
    "GradMeasurement",
    "LossWindow",
    "Reducer",
    "StepState",
    "StepTracker",
    "optimizer_params",
    "share_step_tracker",
]

LOSS_RIDER = "loss"
"""The rider key of the step's mean training loss, unscaled under 16-mixed (registered by `ExplosionGuard`
and by `AdaptiveGradientClipping` in ``mode="mean"``, read by the monitor too)."""

Provider = Callable[[], "torch.Tensor | None"]
"""Returns a 0-d tensor to bring to the host with the step's norm, or None for nothing."""

Contributor = Callable[["StepState"], "Sequence[float]"]
"""Returns this rank's values to be summed over the ranks at the step (the same length on every rank)."""

Reducer = Callable[["list[float]"], "list[float]"]
"""Sums a list of floats over the ranks (one collective); None on a single process."""


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter of ``optimizer``, in param-group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


@dataclass
class GradMeasurement:
    """The gradients of one optimizer at one step and their pre-clip p-norms (one norm type).

    Attributes:
        state: the step it belongs to (its fate, its riders, the scale applied so far).
        params: the optimizer's parameters that have a gradient, in order.
        grads: their gradients (the same tensors the optimizer will read).
        total: float32 0-d tensor, the total p-norm (on the gradients' device).
        per_param: float32 1-D tensor, one p-norm per entry of ``params``.
        norm_type: the p.
    """

    state: StepState
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    total: torch.Tensor
    per_param: torch.Tensor
    norm_type: float
    _host_total: float | None = field(default=None, repr=False)

    @property
    def total_norm(self) -> float:
        """The total norm as a Python float, cached. The step's first host read also brings every rider."""
        if self._host_total is None:
            self._host_total = self.state._fetch(self.total)
        return self._host_total

    @property
    def fetched_total_norm(self) -> float | None:
        """The total norm on the host if some callback already read it at this step, else None (never
        triggers a transfer: for a callback that only wants the value when it is free).

        Examples:
            >>> p = torch.nn.Parameter(torch.ones(4))
            >>> p.grad = torch.full((4,), 0.5)
            >>> m = StepTracker().begin(torch.optim.SGD([p], lr=0.1), step=0).measure()
            >>> m.fetched_total_norm is None, m.total_norm, m.fetched_total_norm
            (True, 1.0, 1.0)
        """
        return self._host_total

    @property
    def finite(self) -> bool:
        return math.isfinite(self.total_norm)

    @property
    def skipped(self) -> bool:
        """The step's fate: True once a callback dropped the update (see `StepState.skip`)."""
        return self.state.skipped

    def clip_(self, max_norm: float, eps: float = EPS) -> float:
        """Bring the gradients' total norm down to ``max_norm`` if their pre-clip norm exceeds it.

        Writes the gradients only when the bound is tighter than every bound applied before at this step
        (one fused multiply per device and dtype); nothing is written when the norm is not finite or the
        step is skipped. So the final norm is the smallest bound whatever the callbacks' order.

        Returns:
            ``min(1, max_norm / (norm + eps))``, the coefficient this bound asks for relative to the
            pre-clip norm (``1.0`` when nothing needs clipping, the norm is not finite or the step is skipped).
        """
        norm = self.total_norm
        if self.skipped or not math.isfinite(norm) or norm <= max_norm:
            return 1.0
        coef = max_norm / (norm + eps)
        if coef >= 1.0:
            return 1.0
        current = self.state.scale
        if coef < current:
            scale_grads_(self.grads, coef / current)
            self.state.scale = coef
        return coef

    def nonfinite_indices(self) -> list[int]:
        """Indices into ``params`` whose gradient holds a NaN or Inf (only call when not ``finite``)."""
        return torch.nonzero(~torch.isfinite(self.per_param)).flatten().tolist()


@dataclass
class StepState:
    """One optimizer step as every lightning-clip callback sees it (see the module docstring).

    Attributes:
        optimizer: the torch optimizer about to step.
        step: the Trainer's ``global_step`` at this step.
        riders: scalars to bring to the host with the first norm read (key -> provider).
        scale: the factor the gradients have been scaled by so far (1.0: untouched).
        skipped: the update will not be applied.
        contributors: values to sum over the ranks in the step's one all-reduce (key -> contributor).
        reducer: the sum over the ranks (None: one process, nothing to reduce).
        divergence: `ExplosionGuard`'s `lightning_clip.functional.divergence.Reading` of this
            step (None until the guard judged it, or without a guard): its ``verdict`` (``"healthy"``,
            ``"elevated"``, ``"diverged"``) and ``loss_excess`` / ``norm_excess``, the log of the smoothed
            loss (norm) over its healthy level.
    """

    optimizer: torch.optim.Optimizer
    step: int
    riders: dict[str, Provider] = field(default_factory=dict)
    scale: float = 1.0
    skipped: bool = False
    contributors: dict[str, Contributor] = field(default_factory=dict, repr=False)
    reducer: Reducer | None = field(default=None, repr=False)
    divergence: Any = None
    measurements: dict[float, GradMeasurement] = field(default_factory=dict, repr=False)
    _rider_values: dict[str, float] | None = field(default=None, repr=False)
    _summed: dict[str, list[float]] | None = field(default=None, repr=False)

    def measure(self, norm_type: float = 2.0) -> GradMeasurement:
        """The measurement of the gradients with ``norm_type`` (one fused pass per distinct p, cached)."""
        found = self.measurements.get(norm_type)
        if found is None:
            params = [p for p in optimizer_params(self.optimizer) if p.grad is not None]
            grads = [p.grad for p in params if p.grad is not None]
            total, per_param = grad_norms(grads, norm_type)
            if self.scale != 1.0:  # measured after a clip at this step: report the pre-clip figures
                total, per_param = total / self.scale, per_param / self.scale
            found = GradMeasurement(self, params, grads, total, per_param, norm_type)
            self.measurements[norm_type] = found
        return found

    def rider(self, key: str) -> float | None:
        """The host value of the rider ``key``, or None when it was not registered before this step (or its
        provider gave None). Triggers the step's transfer if no norm was read yet."""
        if self._rider_values is None:
            first = next(iter(self.measurements.values()), None) or self.measure(2.0)
            _ = first.total_norm
        return (self._rider_values or {}).get(key)

    def ride(self, key: str, provider: Provider) -> bool:
        """Add a rider to this step if its host transfer has not happened yet (True), else do nothing
        (False): for a callback whose rider could not be registered before the step began."""
        if self._rider_values is not None:
            return False
        self.riders[key] = provider
        return True

    def fetched_rider(self, key: str) -> float | None:
        """The host value of the rider ``key`` if the step's transfer already happened, else None (never
        triggers it).

        Examples:
            >>> p = torch.nn.Parameter(torch.ones(1))
            >>> p.grad = torch.ones(1)
            >>> tracker = StepTracker()
            >>> tracker.ride_along("loss", lambda: torch.tensor(2.5))
            >>> state = tracker.begin(torch.optim.SGD([p], lr=0.1), step=0)
            >>> state.fetched_rider("loss"), state.rider("loss"), state.fetched_rider("loss")
            (None, 2.5, 2.5)
        """
        return (self._rider_values or {}).get(key)

    @property
    def mean_loss(self) -> float | None:
        """The step's training loss (the mean of the losses back-propagated since the last step, rider
        `LOSS_RIDER`), averaged over the ranks: the same value on every rank. Under DDP the first read
        does the step's one all-reduce (see `summed`); None when no loss was registered on any rank.

        Examples:
            >>> p = torch.nn.Parameter(torch.ones(1))
            >>> p.grad = torch.ones(1)
            >>> tracker = StepTracker()
            >>> tracker.ride_along(LOSS_RIDER, lambda: torch.tensor(0.25))
            >>> tracker.begin(torch.optim.SGD([p], lr=0.1), step=0).mean_loss
            0.25
        """
        total, count = self._reduce()["__loss__"]
        return total / count if count > 0 else None

    def summed(self, key: str) -> list[float] | None:
        """The values the contributor ``key`` gave, summed over the ranks (rides on the step's one
        all-reduce, with the loss); None when ``key`` was not registered for this step.

        Examples:
            >>> p = torch.nn.Parameter(torch.ones(1))
            >>> p.grad = torch.ones(1)
            >>> tracker = StepTracker()
            >>> tracker.contribute("flags", lambda state: [1.0, 0.0])
            >>> tracker.begin(torch.optim.SGD([p], lr=0.1), step=0).summed("flags")
            [1.0, 0.0]
        """
        return self._reduce().get(key)

    def _reduce(self) -> dict[str, list[float]]:
        """Gather the local loss and every contribution, sum them over the ranks in one collective (none on
        a single process), once per step."""
        if self._summed is None:
            loss = self.rider(LOSS_RIDER)
            values = {"__loss__": [0.0, 0.0] if loss is None else [float(loss), 1.0]}
            for key, contributor in self.contributors.items():
                values[key] = [float(v) for v in contributor(self)]
            if self.reducer is not None:
                flat = [v for vs in values.values() for v in vs]
                summed = self.reducer(flat)
                out, i = {}, 0
                for key, vs in values.items():
                    out[key] = [float(v) for v in summed[i : i + len(vs)]]
                    i += len(vs)
                values = out
            self._summed = values
        return self._summed

    def skip(self) -> None:
        """Drop the update: every gradient of the optimizer is set to None (parameters and optimizer state
        stay bit-identical), and the step is marked skipped for every callback."""
        for p in optimizer_params(self.optimizer):
            p.grad = None
        self.skipped = True

    def _fetch(self, total: torch.Tensor) -> float:
        """Bring ``total`` to the host, with the riders on the first call: one transfer for all of them."""
        if self._rider_values is not None or not self.riders:
            if self._rider_values is None:
                self._rider_values = {}
            return float(total.item())
        keys, tensors = [], [total.float().reshape(())]
        for key, provider in self.riders.items():
            t = provider()
            if t is not None:
                keys.append(key)
                tensors.append(t.detach().float().reshape(()).to(total.device))
        values = torch.stack(tensors).tolist()
        self._rider_values = dict(zip(keys, values[1:], strict=True))
        return float(values[0])


class StepTracker:
    """Hands every lightning-clip callback of one Trainer the same `StepState` for each step.

    The callbacks' shared base attaches one tracker to all of them at ``setup`` (see
    `LightningClipCallback`), so no state is hidden in module
    globals and two Trainers never share one.
    """

    def __init__(self) -> None:
        self.current: StepState | None = None
        self.reducer: Reducer | None = None
        self._waiting: dict[str, Provider] = {}
        self._contributors: dict[str, Contributor] = {}

    def ride_along(self, key: str, provider: Provider) -> None:
        """Ask for a scalar to come to the host with the next step's norm (one transfer for both).

        ``provider`` is called at the transfer (so it sees in-place changes made until then).
        """
        self._waiting[key] = provider

    def contribute(self, key: str, contributor: Contributor) -> None:
        """Ask for values to be summed over the ranks at the next step, in the step's one all-reduce
        (read them with `StepState.summed`). ``contributor`` is called with the `StepState` when the
        reduction happens."""
        self._contributors[key] = contributor

    def begin(self, optimizer: torch.optim.Optimizer, step: int) -> StepState:
        """The `StepState` of ``optimizer`` at ``step``: new for a new step, else the same object."""
        current = self.current
        if current is None or current.optimizer is not optimizer or current.step != step:
            current = StepState(
                optimizer, step, riders=self._waiting, contributors=self._contributors, reducer=self.reducer
            )
            self._waiting, self._contributors = {}, {}
            self.current = current
        return current

    def __getstate__(self) -> dict[str, object]:
        return {}  # transient: a pickled callback (ddp_spawn) starts with a fresh tracker

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__()  # type: ignore[misc]


def share_step_tracker(callbacks: Sequence[Any], tracker: StepTracker | None = None) -> StepTracker:
    """Give every one of ``callbacks`` (lightning-clip callbacks) the same `StepTracker` (a new one
    unless ``tracker`` is given), so they measure each step once. The callbacks' ``setup`` does this for
    the callbacks the Trainer lists; a wrapper that drives lightning-clip callbacks itself (as
    ``benchmarks/overhead.py`` does) calls it once for each set."""
    shared = tracker if tracker is not None else StepTracker()
    for cb in callbacks:
        cb.step_tracker = shared
    return shared
