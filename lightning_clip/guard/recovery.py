"""What `ExplosionGuard` does about an event: skip it, roll back, or raise; and the known-good states it
keeps for that (`RecoveryMixin`).

The hooks of the guard gather and decide (`lightning_clip.guard.decision`); this mixin acts: a rollback
calls the pipeline of `lightning_clip.guard.rollback` once (list, choose, read, validate through
`KnownGoodStates.newest`; restore through `rollback.apply`), then writes the event.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NoReturn

from lightning_utilities.core.rank_zero import rank_zero_warn

from lightning_clip import _compat
from lightning_clip.exceptions import GradientExplosionError, LightningClipWarning
from lightning_clip.functional.divergence import DivergenceDetector, Reading
from lightning_clip.functional.thresholds import MeanThreshold
from lightning_clip.guard import decision as D
from lightning_clip.guard import rollback
from lightning_clip.guard.events import EventRecord, Remedies
from lightning_clip.guard.known_good import KnownGoodStates
from lightning_clip.guard.logged import LoggedWindow
from lightning_clip.guard.recorder import EventRecorder
from lightning_clip.guard.rollback.restore import write_state
from lightning_clip.guard.rollback.sources import RunIdentity
from lightning_clip.guard.snapshot import all_finite
from lightning_clip.step import StepState

if TYPE_CHECKING:
    from lightning_clip._compat import LightningModule, Trainer

__all__ = ["RecoveryMixin"]


class RecoveryMixin:
    """The acting half of `ExplosionGuard` (a mixin: it reads and updates the guard's own attributes,
    declared below)."""

    action: str
    max_rollbacks: int
    skip_batches: int
    lr_factor: float
    detect_divergence: bool
    snapshot_every_n_steps: int
    schedulers_after_rollback: str
    drop_logged_values: bool
    events: int
    rollbacks: int
    lr_scale: float
    _skip_remaining: int
    _overflow_streak: int
    _spike: MeanThreshold | None
    skipped_steps: int
    _batch_idx: int
    _detector: DivergenceDetector
    _known_good: KnownGoodStates
    _events: EventRecorder
    _logged: LoggedWindow
    _identity: RunIdentity
    _pending: EventRecord | None
    _check_level: bool

    if TYPE_CHECKING:
        state_key: str

        @staticmethod
        def _sum_over_ranks(trainer: Trainer, flags: list[int]) -> list[int]: ...

    def _take_snapshot(self, trainer: Trainer) -> None:
        """Take the current state as the newest known-good one (with the guard's own state)."""
        self._known_good.take(
            trainer,
            self._siblings(trainer),
            self.lr_scale,
            agree=self._agree(trainer),
            guard=self._own_state(),
        )

    def _own_state(self) -> dict[str, Any]:
        """What of the guard's own state a known-good state keeps: its divergence detector (rewound by a
        rollback, so the restored state starts from the healthy band it was taken in)."""
        return {"divergence": self._detector.state_dict(), "healthy": self._detector.snapshot_ok}

    def _snapshot_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A snapshot step: check the weights (every rank joins this all-reduce: the branch depends only on
        values identical on all ranks), then snapshot, unless in the middle of a run of fp16 overflows."""
        if self._weights_bad(trainer, pl_module):
            self._act(trainer, self._weights_record(trainer, pl_module.named_parameters()), deferred=False)
        elif self._overflow_streak > 0:
            pass  # retry next step
        elif self._snapshots_on:
            if self._detector.snapshot_ok:  # never a state taken during a runaway: retry next step
                self._take_snapshot(trainer)
        else:
            self._known_good.postpone(trainer.global_step)

    def _act(self, trainer: Trainer, record: EventRecord, deferred: bool) -> None:
        """Apply the action to an event: raise, skip (the update is already dropped) or roll back.

        ``deferred``: called from ``on_before_optimizer_step``, the rollback waits for ``on_train_batch_end``.
        """
        action = D.action_for(tuple(record.kinds), self.action)
        if action == "raise":
            self._fail(trainer, record, "`action='raise'` stops training at the first event.")
        if action == "error":
            self._fail(
                trainer,
                record,
                "`action='skip'` cannot repair this: skipping an update does not fix a state that is already"
                " bad. Use `action='rollback'` to go back to the last good state.",
            )
        if action == "skip":
            self._write(trainer, record)
        elif deferred:
            self._pending = record
        else:
            self._rollback(trainer, record)

    def _rollback(self, trainer: Trainer, record: EventRecord) -> None:
        if self.rollbacks >= self.max_rollbacks:
            self._fail(
                trainer,
                record,
                f"The rollback budget is spent: {self.rollbacks} rollback(s) already done"
                f" (max_rollbacks={self.max_rollbacks}, counted across resumes).",
            )
        siblings = self._siblings(trainer)
        state = self._known_good.newest(trainer, self._identity, self.state_key, siblings)
        if state is None:
            self._fail(
                trainer,
                record,
                "There is no known-good state to go back to: no valid in-memory snapshot and no readable, valid"
                " checkpoint file of this run at or before this step.",
            )
        self.rollbacks += 1
        self.lr_scale *= self.lr_factor
        fast_forward = self.schedulers_after_rollback == "fast_forward"
        rollback.apply(
            trainer, state, siblings, self.lr_scale / state.lr_scale, tuple(record.kinds), fast_forward
        )
        self._detector = DivergenceDetector()  # rewound with the state (fresh when the state has none)
        if state.guard is not None:
            self._detector.load_state_dict(state.guard.get("divergence", {}))
        self._check_level = D.DIVERGENCE in record.kinds  # the next loss is the known-good weights'
        self._skip_remaining = self.skip_batches
        self._overflow_streak = 0
        record.restored = {"source": state.source, "step": state.step, "path": state.path}
        self._write(trainer, record)
        if (
            self._snapshots_on
        ):  # the restored state (LRs lowered) is the new snapshot; its step is the content's
            agree = self._agree(trainer)
            self._known_good.take(
                trainer, siblings, self.lr_scale, label=state.step, agree=agree, guard=self._own_state()
            )

    def _check_new_level(self, trainer: Trainer, mean_loss: float | None) -> None:
        """The first step after a rollback for a divergence: when the restored, known-good weights see a
        loss at a new level (`DivergenceDetector.new_level`), the rise is in the data, not in the steps
        taken: the divergence check starts again from that level (a fresh detector), with a warning.
        ``mean_loss`` is the same on every rank, and so is the decision."""
        if not self._check_level:
            return
        self._check_level = False
        reference = self._detector.loss.reference
        if reference is None or not self._detector.new_level(mean_loss):
            return
        self._detector = DivergenceDetector()
        for cb in self._siblings(trainer):  # e.g. the clipper undoes its cuts and its tightening
            cb.on_new_level()
        ratio = (mean_loss or math.nan) / math.exp(reference)
        rank_zero_warn(
            f"ExplosionGuard: the known-good state restored at step {trainer.global_step} sees a loss of"
            f" {mean_loss:.4g}, {ratio:.3g}x its healthy level, on the current batches: the rise is in the"
            " data, not in the steps taken (a loss that rises by design: a harder stage, rescaled targets)."
            " The divergence check starts again from this level; pass `detect_divergence=False` if the loss"
            " is meant to jump.",
            category=LightningClipWarning,
        )

    @property
    def _snapshots_on(self) -> bool:
        return self.action == "rollback" and self.snapshot_every_n_steps > 0

    def _agree(self, trainer: Trainer) -> Any:
        """Sums integer flags over the ranks (the decisions that rest on each rank's shards)."""
        return lambda flags: self._sum_over_ranks(trainer, flags)

    def _siblings(self, trainer: Trainer) -> list[Any]:
        """The other lightning-clip callbacks: their state is snapshotted and restored with the model's."""
        from lightning_clip.callbacks._base import LightningClipCallback

        return [cb for cb in trainer.callbacks if isinstance(cb, LightningClipCallback) and cb is not self]  # type: ignore[attr-defined, union-attr, unused-ignore]

    def _weights_bad(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        local = not all_finite([p.detach() for p in pl_module.parameters()])
        return bool(self._sum_over_ranks(trainer, [int(local)])[0])

    def _record(
        self, trainer: Trainer, kinds: list[str], norm: float | None, loss: float | None
    ) -> EventRecord:
        self.events += 1
        return self._events.new(trainer, kinds, self.action, self._batch_idx, norm, loss)

    def _weights_record(self, trainer: Trainer, named: Any) -> EventRecord:
        return self._events.bad_weights(self._record(trainer, [D.NONFINITE_WEIGHTS], None, None), named)

    def _write(self, trainer: Trainer, record: EventRecord) -> None:
        self._events.write(trainer, record, self.rollbacks, self.lr_scale)

    def _fail(self, trainer: Trainer, record: EventRecord, reason: str) -> NoReturn:
        record.action = "raise" if self.action == "raise" else "error"
        self._write(trainer, record)
        remedies = Remedies(
            clipper=any(cb.clips for cb in self._siblings(trainer)),
            lr_factor=self.lr_factor,
            skip_batches=self.skip_batches,
            fp16=_compat.gradient_scaler(trainer) is not None,
            detect_divergence=self.detect_divergence,
        )
        raise GradientExplosionError(self._events.failure(record, reason, remedies))

    def _act_on_step(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        state: StepState,
        decision: D.Decision,
        loss: float | None,
        scaler: Any,
        reading: Reading | None = None,
    ) -> None:
        """Carry out the step's decision: the GradScaler, the spike statistics, the skip, the event."""
        measurement = state.measure(2.0)
        if decision.force_scaler_skip:
            _compat.force_scaler_skip(scaler, state.optimizer)
        if decision.scaler_skips:
            state.skipped = True
        self._overflow_streak = decision.overflow_streak
        if decision.feed_spike_rule and self._spike is not None:
            self._spike.step(measurement.total_norm)  # the same finite norm on every rank
        if not decision.skip:
            return
        state.skip()
        self.skipped_steps += 1
        if not decision.kinds:
            return
        if self.drop_logged_values:
            self._logged.drop()  # the step's logged values leave the epoch aggregates at the batch end
        record = self._record(trainer, list(decision.kinds), measurement.total_norm, loss)
        if D.DIVERGENCE in decision.kinds and reading is not None:
            record.loss_ratio, record.norm_ratio = reading.loss_ratio, reading.norm_ratio
        record.params = self._events.grad_params(measurement, decision.kinds)
        record.optimizer = _compat.optimizer_index(trainer, state.optimizer)
        if self._weights_bad(trainer, pl_module):
            record.kinds = list(decision.with_kind(D.NONFINITE_WEIGHTS, self.action).kinds)
            self._events.bad_weights(record, pl_module.named_parameters())
        self._act(trainer, record, deferred=True)

    def _refuse_nonfinite_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        """A checkpoint about to be written with non-finite weights or optimizer state (on any rank): act on
        it (raises unless rolled back) and write the restored state into it instead."""
        local_bad = not (
            all_finite(checkpoint.get("state_dict", {}))
            and all_finite(checkpoint.get("optimizer_states", []))
        )
        if not self._sum_over_ranks(trainer, [int(local_bad)])[0]:
            return
        record = self._weights_record(trainer, checkpoint.get("state_dict", {}).items())
        record.checkpoint_refused = True
        self._act(trainer, record, deferred=False)
        write_state(
            checkpoint, trainer, [self, *self._siblings(trainer)]
        )  # the restored state, not the bad one
