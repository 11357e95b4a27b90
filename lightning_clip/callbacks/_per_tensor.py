"""The per-tensor modes of `AdaptiveGradientClipping` (``mode="adagc"`` and ``mode="mean_per_tensor"``):
what its hooks route to when each parameter tensor gets its own threshold.

Per optimizer step (see :mod:`lightning_clip.step` for the step's lifecycle):

1. **Plan.** From the step's shared measurement (the per-tensor norms of the same ``_foreach_norm`` pass
   the total norm comes from), the optimizer's rule (`~lightning_clip.functional.per_tensor`) computes
   the per-tensor coefficients on the device. The plan is made once per step, by whichever comes first:
   this callback's hook, or the step's host transfer (below).
2. **Ride.** Four scalars of the plan (how many tensors are clipped, which one most, its coefficient, the
   total norm after clipping) ride on the step's one device-to-host transfer with the norm: registered in
   ``on_before_backward`` (so they ride even when `ExplosionGuard` reads the norm first) or, failing that,
   added to the step before its transfer.
3. **Act.** When a tensor needs clipping (and the step is finite and not skipped) the gradients are
   scaled by their coefficients in one fused multiply; nothing is written otherwise.
4. **Commit.** Once the step's fate is known, an applied step with a finite norm enters the statistics
   (on the device; no host read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lightning_clip import _compat
from lightning_clip.functional.per_tensor import (
    SUMMARY,
    PerTensorPlan,
    PerTensorRule,
    PerTensorScaler,
    make_per_tensor_rule,
)
from lightning_clip.step import GradMeasurement, StepState, StepTracker, optimizer_params

if TYPE_CHECKING:
    from lightning_clip._compat import LightningModule, Trainer

__all__ = ["PerTensorClipping", "PerTensorFigures"]


@dataclass
class PerTensorFigures:
    """One optimizer step's per-tensor figures (also the logged values).

    Attributes:
        norm: the pre-clip total norm.
        clipped_total: the total norm after clipping (``norm`` when nothing was clipped).
        clipped_fraction: the fraction of the tensors with a gradient that were clipped.
        most_clipped: the name of the most clipped tensor (None when none was).
        min_coef: its coefficient (1.0 when none was clipped).
    """

    norm: float
    clipped_total: float
    clipped_fraction: float
    most_clipped: str | None
    min_coef: float

    @property
    def coef(self) -> float:
        """The factor the total norm was scaled by (``≤ 1``)."""
        if not math.isfinite(self.norm) or self.norm <= 0.0 or self.clipped_fraction == 0.0:
            return 1.0
        return min(1.0, self.clipped_total / self.norm)


class PerTensorClipping:
    """Per-tensor clipping for one `AdaptiveGradientClipping`: one rule per optimizer index."""

    def __init__(
        self,
        mode: str,
        factor: float,
        decay: float,
        warmup_steps: int | None,
        max_norm: float | None,
        norm_type: float,
    ) -> None:
        self._arguments = (mode, factor, decay, warmup_steps, max_norm, norm_type)
        self.norm_type = norm_type
        make_per_tensor_rule(*self._arguments)  # validates
        self._rules: dict[int, PerTensorRule] = {}
        self._saved: dict[int, dict[str, Any]] = {}
        self._plans: dict[int, tuple[StepState, GradMeasurement, PerTensorPlan | None]] = {}
        self._uncommitted: dict[int, tuple[GradMeasurement, PerTensorPlan]] = {}
        self._positions: dict[int, tuple[int, dict[int, int]]] = {}
        self._scaler = PerTensorScaler()
        self._names: dict[int, str] = {}
        self._keys = tuple(f"per_tensor/{id(self)}/{name}" for name in SUMMARY)
        #: figures of the last step, per optimizer index
        self.last: dict[int, PerTensorFigures] = {}

    # ----------------------------------------------------------------------------------------- state
    def rule(self, index: int = 0) -> PerTensorRule:
        """The per-tensor statistics of optimizer ``index`` (created on first use)."""
        found = self._rules.get(index)
        if found is None:
            found = make_per_tensor_rule(*self._arguments)
            if index in self._saved:
                found.load_state_dict(self._saved.pop(index))
            self._rules[index] = found
        return found

    def state_dict(self) -> dict[str, Any]:
        self.commit()
        rules = {str(i): r.state_dict() for i, r in self._rules.items()}
        rules.update({str(i): s for i, s in self._saved.items() if str(i) not in rules})
        return {"version": 1, "rules": rules}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._uncommitted, self._plans, self._rules = {}, {}, {}
        self._saved = {int(i): s for i, s in state_dict.get("rules", {}).items()}

    # ----------------------------------------------------------------------------------------- hooks
    def on_fit_start(self, pl_module: LightningModule) -> None:
        self._names = {id(p): name for name, p in pl_module.named_parameters()}
        self._positions = {}
        self._scaler = PerTensorScaler()

    def ride_next_step(self, trainer: Trainer, tracker: StepTracker) -> None:
        """Ask for the next step's summary to ride on its host transfer (from ``on_before_backward``)."""
        for k, key in enumerate(self._keys):
            tracker.ride_along(key, self._provider(trainer, tracker, k))

    def _provider(self, trainer: Trainer, tracker: StepTracker, k: int) -> Any:
        def provide() -> torch.Tensor | None:
            state = tracker.current
            if state is None:
                return None
            plan = self._plan(state, _compat.optimizer_index(trainer, state.optimizer))
            return None if plan is None else plan.summary[k]

        return provide

    def step(
        self, trainer: Trainer, state: StepState, tracker: StepTracker, index: int
    ) -> PerTensorFigures | None:
        """Plan, clip and record optimizer ``index``'s step (the hook ``on_before_optimizer_step``)."""
        plan = self._plan(state, index)
        measurement = state.measure(self.norm_type)
        if plan is None:  # no gradient at all
            return None
        for k, key in enumerate(self._keys):
            state.ride(key, self._provider(trainer, tracker, k))
        norm = measurement.total_norm  # the step's one host transfer; the summary rides along
        rode = [state.fetched_rider(key) for key in self._keys]
        values = [v for v in rode if v is not None]
        if len(values) < len(rode):  # the transfer happened before the summary could ride
            values = [float(v) for v in plan.summary.tolist()]
        clipped, most, min_coef, clipped_total = values
        if clipped > 0 and math.isfinite(norm) and not state.skipped:
            coefs = plan.coefs if state.scale == 1.0 else torch.clamp(plan.coefs / state.scale, max=1.0)
            self._scaler.scale_(measurement.grads, coefs)
        self._uncommitted[index] = (measurement, plan)
        name = None
        if clipped > 0:
            param = measurement.params[int(most)]
            name = self._names.get(id(param), f"param[{int(most)}]")
        figures = PerTensorFigures(
            norm=norm,
            clipped_total=clipped_total if clipped > 0 else norm,
            clipped_fraction=clipped / len(measurement.params),
            most_clipped=name,
            min_coef=min_coef if clipped > 0 else 1.0,
        )
        self.last[index] = figures
        return figures

    def log(
        self, trainer: Trainer, pl_module: LightningModule, figures: PerTensorFigures, suffix: str
    ) -> None:
        """Log one step's figures (see `AdaptiveGradientClipping`'s table of keys).

        The most clipped tensor's key names it, so it changes from step to step: it goes to the loggers
        directly (``Logger.log_metrics``, rank zero), as ``pl_module.log`` would log every name seen in
        the epoch again at each step with its old value."""
        metrics = {
            f"grad/norm{suffix}": figures.norm,
            f"grad/clip_coef{suffix}": figures.coef,
            f"grad/clipped_fraction{suffix}": figures.clipped_fraction,
        }
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        if figures.most_clipped is not None:
            named = {f"grad/most_clipped{suffix}/{figures.most_clipped}": figures.min_coef}
            for logger in trainer.loggers:
                logger.log_metrics(named, step=trainer.global_step)

    # ----------------------------------------------------------------------------------------- steps
    def _plan(self, state: StepState, index: int) -> PerTensorPlan | None:
        """This step's plan for optimizer ``index`` (made once per step)."""
        cached = self._plans.get(index)
        if cached is not None and cached[0] is state:
            return cached[2]
        self.commit(index)  # the previous step's fate is known now
        measurement = state.measure(self.norm_type)
        plan = None
        if measurement.params:
            size, positions = self._positions_of(state.optimizer, measurement, index)
            plan = self.rule(index).plan(measurement.per_param, measurement.total, positions, size)
        self._plans[index] = (state, measurement, plan)
        return plan

    def _positions_of(
        self, optimizer: torch.optim.Optimizer, measurement: GradMeasurement, index: int
    ) -> tuple[int, torch.Tensor | None]:
        """``(how many parameters the optimizer has, the positions of those with a gradient)``; None
        positions when every parameter has one (the common case: no lookup)."""
        params = optimizer_params(optimizer)
        if len(measurement.params) == len(params):
            return len(params), None
        known = self._positions.get(index)
        if known is None or known[0] != len(params):
            known = (len(params), {id(p): i for i, p in enumerate(params)})
            self._positions[index] = known
        where = [known[1][id(p)] for p in measurement.params]
        return len(params), torch.tensor(where, dtype=torch.long, device=measurement.per_param.device)

    def commit(self, index: int | None = None) -> None:
        """Feed the finished steps whose update was applied into the statistics."""
        for i in [index] if index is not None else list(self._uncommitted):
            pending = self._uncommitted.pop(i, None)
            self._plans.pop(i, None)  # holds the step's gradients
            if pending is not None and not pending[0].skipped:
                measurement, plan = pending
                norm = measurement.total_norm  # read at the step: no transfer here
                self.rule(i).commit(plan, math.isfinite(norm), norm)
