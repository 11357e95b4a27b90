"""ExplosionGuard: detect NaN/Inf, finite divergence (and optional spikes) and roll back to the last
known-good state.

The hooks only gather and route. What a step's observations mean is decided by the pure
`lightning_clip.guard.decision.decide`; known-good states, checkpoint files and the event log live in
`lightning_clip.guard`; the guard's own saved state in `lightning_clip.callbacks._guard_state`.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from lightning_clip import _compat
from lightning_clip._validation import check_bool, check_choice, check_int, check_number
from lightning_clip.callbacks._guard_state import GuardStateMixin
from lightning_clip.functional.divergence import DIVERGED, DivergenceDetector
from lightning_clip.functional.thresholds import MeanThreshold
from lightning_clip.guard import decision as D
from lightning_clip.guard import observe
from lightning_clip.guard.events import EventRecord, events_path
from lightning_clip.guard.known_good import KnownGoodStates
from lightning_clip.guard.logged import LoggedWindow
from lightning_clip.guard.recorder import EventRecorder
from lightning_clip.guard.recovery import RecoveryMixin
from lightning_clip.guard.rollback import sources
from lightning_clip.guard.rollback.sources import RUN_KEY, RunIdentity
from lightning_clip.step import LOSS_RIDER, LossWindow, StepState

if TYPE_CHECKING:
    from lightning_clip._compat import LightningModule, Trainer

__all__ = ["ExplosionGuard"]

log = logging.getLogger(__name__)

ACTIONS = ("rollback", "skip", "raise")
SCHEDULES = ("fast_forward", "restore")
GUARD_FLAGS = "ExplosionGuard.flags"
"""The guard's per-rank flags in the step's one all-reduce (`StepTracker.contribute`)."""


class ExplosionGuard(RecoveryMixin, GuardStateMixin):  # type: ignore[misc, unused-ignore]
    r"""Detect exploding training (NaN/Inf, finite divergence, optional spikes) and skip the update or roll back.

    Detection, in ``on_before_optimizer_step`` (gradients accumulated and AMP-unscaled; the bad update is
    never applied, its gradients are set to ``None``): a non-finite total gradient norm (shared with
    `AdaptiveGradientClipping`); a non-finite training loss; a finite **divergence**
    (`lightning_clip.functional.divergence.DivergenceDetector`: the smoothed norm 1,000× its own level; or
    the loss, averaged over the ranks, 4× its healthy level and above where training started, *confirmed*
    by the norm 10× its level, and compounding (×2 within 20 steps) or 100× up: a loss that rises by
    design, with calm gradients or in one jump, is no event; ``detect_divergence=False`` turns it off); with ``spike_factor``, a norm above
    ``spike_factor`` × the running mean of recent finite norms; non-finite weights (checked on snapshot
    steps, on every event, at the end of training and before every checkpoint is written).

    Actions: ``"skip"`` drops the update (weights and optimizer state bit-identical); it cannot repair a
    state that is already bad (non-finite weights, collapsed loss scale, a divergence), which raises.
    ``"rollback"`` drops it, and in ``on_train_batch_end`` (before ``ModelCheckpoint``) the model, every
    optimizer and LR scheduler, the GradScaler and the other lightning-clip callbacks go back to the newest
    known-good state: the in-memory snapshot (taken at train start and at every multiple of
    ``snapshot_every_n_steps`` of ``global_step``, while training is healthy) or this run's own newest
    checkpoint file, whichever holds the higher step. Files are ordered by the step they hold, read with
    ``weights_only=True`` within a memory bound, agreed on by every rank, and validated against the live
    run before anything is touched; a bad file is a warning and the next older state is tried (see
    ``docs/reliability.md``, "What the guard trusts"). Then the learning rates are multiplied by
    ``lr_factor``, step-interval schedulers are fast-forwarded (``schedulers_after_rollback``), and the next
    ``skip_batches`` batches are not learned from. Loop counters do not go back. ``"raise"``:
    `GradientExplosionError` at the first event. A NaN state never reaches a checkpoint file.

    Args:
        action: ``"rollback"`` | ``"skip"`` | ``"raise"``.
        spike_factor: also an event: gradient norm ``> spike_factor`` × running mean (``> 1``; None: off).
        snapshot_every_n_steps: in-memory snapshot at every multiple of N of ``global_step`` (``≥ 0``; a
            resumed run snapshots the same steps as an uninterrupted one); 0: checkpoint files only (needs a
            ``ModelCheckpoint`` writing to a local folder; checked at setup).
        max_rollbacks: rollbacks allowed in the whole run, resumes included (``≥ 0``); one more is an error.
        skip_batches: after a rollback, the next N batches are not learned from (``≥ 0``; PaLM, Chowdhery
            et al. 2022).
        lr_factor: after a rollback, multiply every learning rate by this (in ``(0, 1]``; cumulative; OPT,
            Zhang et al. 2022).
        trust_checkpoints: read checkpoint files with ``weights_only=False`` (any pickled object, so
            arbitrary code: only for files you trust). Default False.
        schedulers_after_rollback: ``"fast_forward"`` (default): after a rollback each step-interval LR
            scheduler steps again as often as it had since the restored state, so the schedule stays tied to
            ``global_step`` and ends on time (``lr_factor`` kept); ``"restore"``: they keep the restored
            state (the schedule then lags ``global_step``). Epoch-interval and ``ReduceLROnPlateau``
            schedulers always keep their restored state.
        detect_divergence: the finite-divergence check (default True). False: only NaN/Inf (and
            ``spike_factor``) are events, for a run whose loss and gradients may rise far by design.

    Raises:
        ValueError / TypeError: at construction, for an argument out of range or of the wrong type.
        ValueError: at setup, ``snapshot_every_n_steps=0`` without a ``ModelCheckpoint`` in a local folder.
        GradientExplosionError: ``action="raise"`` at the first event; ``max_rollbacks`` spent; no
            known-good state; ``action="skip"`` facing a state a skip cannot repair. The message says what
            happened, where, which parameters went bad first and what to try.

    Logged keys (through ``pl_module.log``, cumulative counts):

    | key | meaning |
    |---|---|
    | ``explosion/events`` | events detected (every kind) |
    | ``explosion/rollbacks`` | rollbacks done |
    | ``explosion/skipped_steps`` | optimizer steps not applied (events and ``skip_batches``) |

    Each event is also one JSON line (rank zero) in ``lightning_clip_events.jsonl`` in the run's own
    directory (`lightning_clip.guard.events.run_log_dir`, `lightning_clip.guard.events.EventRecord`); a
    failed write is a warning. A step not applied because of an event leaves the epoch aggregates of what
    the user logs (`lightning_clip.guard.logged.LoggedWindow`; ``drop_logged_values = False`` keeps them).

    Notes:
        16-mixed: a non-finite gradient norm is the GradScaler's calibration, not an event; what triggers
        there: a non-finite loss, non-finite weights, the scale below ``min_loss_scale`` (2⁻⁸), or
        ``overflow_patience`` (20) overflow steps in a row. DDP: one small all-reduce per optimizer step
        makes every rank take the same decision. FSDP2 (``ModelParallelStrategy``): global norms, each rank
        snapshots its own shards, and distributed checkpoint directories are rollback sources. DeepSpeed,
        FSDP1 and XLA are refused at setup. Remote checkpoint folders (``s3://``...) are not rollback
        sources (a warning at setup). The hooks gather; `decide` is the pure decision.

    Examples:
        >>> import pytorch_lightning as pl
        >>> from lightning_clip import ExplosionGuard
        >>> guard = ExplosionGuard(action="rollback", snapshot_every_n_steps=50, lr_factor=0.5, skip_batches=2)
        >>> trainer = pl.Trainer(callbacks=[guard], logger=False)
    """

    spike_decay: float = 0.97
    spike_warmup_steps: int = 10
    overflow_patience: int = 20
    min_loss_scale: float = 2.0**-8
    drop_logged_values: bool = True  # False: a dropped step's logged values stay in the epoch aggregates

    def __init__(
        self,
        action: str = "rollback",
        spike_factor: float | None = None,
        snapshot_every_n_steps: int = 50,
        max_rollbacks: int = 5,
        skip_batches: int = 0,
        lr_factor: float = 1.0,
        trust_checkpoints: bool = False,
        schedulers_after_rollback: str = "fast_forward",
        detect_divergence: bool = True,
    ) -> None:
        super().__init__()
        self.action = check_choice("action", action, ACTIONS)
        if spike_factor is not None:
            if isinstance(spike_factor, bool) or not isinstance(spike_factor, (int, float)):
                raise TypeError(f"`spike_factor` must be a real number > 1 or None, got {spike_factor!r}.")
            spike_factor = check_number("spike_factor", spike_factor, low=1.0, low_inclusive=False)
        self.spike_factor = spike_factor
        self.snapshot_every_n_steps = check_int("snapshot_every_n_steps", snapshot_every_n_steps, low=0)
        self.max_rollbacks = check_int("max_rollbacks", max_rollbacks, low=0)
        self.skip_batches = check_int("skip_batches", skip_batches, low=0)
        self.lr_factor = check_number("lr_factor", lr_factor, low=0.0, high=1.0, low_inclusive=False)
        self.trust_checkpoints = check_bool("trust_checkpoints", trust_checkpoints)
        self.detect_divergence = check_bool("detect_divergence", detect_divergence)
        self.schedulers_after_rollback = check_choice(
            "schedulers_after_rollback", schedulers_after_rollback, SCHEDULES
        )
        # counters (saved)
        self.events = 0
        self.rollbacks = 0
        self.skipped_steps = 0
        self.lr_scale = 1.0
        self._skip_remaining = 0
        self._overflow_streak = 0
        self._spike = self._make_spike_rule()
        self._detector = DivergenceDetector()
        self._check_level = False  # the next loss is a restored known-good state's (`_check_new_level`)
        self._run_id = ""  # this run's identity, kept across resumes (saved); set at setup
        # transient
        self._identity = RunIdentity("", "", 0)
        self._known_good = KnownGoodStates(self.snapshot_every_n_steps, trust=self.trust_checkpoints)
        self._events = EventRecorder()
        self._losses = LossWindow()
        self._logged = LoggedWindow()  # the epoch's logged values at the start of this step's window
        self._pending: EventRecord | None = None  # a rollback due at the end of the batch
        self._stepped = False
        self._tainted = False
        self._batch_idx = -1
        self._has_scaler = False
        self._signals: tuple[StepState, D.LocalSignals] | None = None  # this step's local signals

    def _make_spike_rule(self) -> MeanThreshold | None:
        if self.spike_factor is None:
            return None
        return MeanThreshold(
            factor=self.spike_factor, decay=self.spike_decay, warmup_steps=self.spike_warmup_steps
        )

    def _state_key_args(self) -> dict[str, Any]:
        return dict(action=self.action, spike_factor=self.spike_factor)

    @property
    def snapshot_nbytes(self) -> int:
        """CPU bytes of model and optimizer state the in-memory snapshot holds on this rank (0 without one).
        Under FSDP2 each rank holds only its own shards."""
        snapshot = self._known_good.snapshot
        return snapshot.nbytes() if snapshot is not None else 0

    @property
    def events_path(self) -> str | None:
        """Path of ``lightning_clip_events.jsonl`` (known from setup on)."""
        return self._events.path

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every event of this run as written to the event log (also on ranks that do not write the file)."""
        return self._events.records

    @property
    def run_id(self) -> str:
        """This run's identity (set at setup, kept across resumes): only files carrying it are restored."""
        return self._run_id

    # ----------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.action == "rollback":
            sources.check_folders(trainer, self.snapshot_every_n_steps)
        self._events.path = events_path(trainer)  # collective: this run's own directory
        # one identity for every rank (the subprocess DDP launcher builds one guard per rank)
        run_id, fit_id = trainer.strategy.broadcast((self._run_id or uuid.uuid4().hex, uuid.uuid4().hex))
        self._run_id, self._identity = run_id, RunIdentity(run_id, fit_id, 0)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._events.names = {id(p): name for name, p in pl_module.named_parameters()}
        self._pending, self._tainted, self._signals = None, False, None
        scaler = _compat.gradient_scaler(trainer)
        self._has_scaler = scaler is not None
        self._losses.clear()
        self._losses.scale = None if scaler is None else (lambda: _compat.loss_scale_tensor(scaler))
        self._known_good.reset()
        self._logged.reset()
        self._identity = RunIdentity(self._run_id, self._identity.fit_id, trainer.global_step)
        # the state a fit starts (or resumes) from is known-good, whatever the restored detector says:
        # the in-memory snapshots of the interrupted run are gone
        if self._snapshots_on:
            self._take_snapshot(trainer)

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx
        self._stepped = False
        self._logged.start_batch(trainer)
        if self._skip_remaining > 0:
            self._tainted = True
            self._skip_remaining -= 1

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self._losses.add(loss)
        if self.step_tracker is not None:
            self.step_tracker.ride_along(LOSS_RIDER, self._losses.unscaled_mean)
            self.step_tracker.contribute(GUARD_FLAGS, lambda state: self._local_signals(state).flags())

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._stepped = True
        state = self.step_state(_compat.unwrap_optimizer(optimizer), trainer.global_step)
        measurement = state.measure(2.0)
        local = self._local_signals(state)
        reduced = state.summed(GUARD_FLAGS)  # the step's one all-reduce (with the loss), whoever asked first
        if reduced is None:  # no backward registered the flags (e.g. a step without one): reduce them apart
            reduced = [float(v) for v in self._sum_over_ranks(trainer, local.flags())]
        mean_loss = state.mean_loss
        self._losses.clear()
        scaler = _compat.gradient_scaler(trainer)
        any_overflow = scaler is not None and reduced[-1] > 0
        self._check_new_level(trainer, mean_loss)
        reading = observe.divergence_reading(self._detector, state, reduced, mean_loss)
        obs = D.Observation.from_flags(
            reduced,
            local,
            loss_scale=float(scaler.get_scale()) if any_overflow else math.inf,
            overflow_streak=self._overflow_streak,
            tainted=self._tainted,
            rollback_pending=self._pending is not None,
            divergence=self.detect_divergence and reading is not None and reading.verdict == DIVERGED,
        )
        decision = self.decide(obs)
        if decision.applied and reading is not None:
            self._detector.update(mean_loss, measurement.total_norm)
        self._act_on_step(trainer, pl_module, state, decision, mean_loss, scaler, reading)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._logged.end_batch(trainer, self._stepped)  # a dropped step leaves the epoch's logged values
        if self._pending is not None:
            record, self._pending = self._pending, None
            self._rollback(trainer, record)
        elif self._stepped and self._known_good.snapshot_due(trainer.global_step):
            self._snapshot_step(trainer, pl_module)
        if self._stepped:
            self._tainted = False
        if _compat.should_update_logs(trainer):
            pl_module.log_dict(
                {
                    "explosion/events": float(self.events),
                    "explosion/rollbacks": float(self.rollbacks),
                    "explosion/skipped_steps": float(self.skipped_steps),
                },
                on_step=True,
                on_epoch=False,
            )

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._weights_bad(trainer, pl_module):
            self._act(trainer, self._weights_record(trainer, pl_module.named_parameters()), deferred=False)

    @override
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._known_good.last_checkpoint_step = trainer.global_step
        checkpoint[RUN_KEY] = {
            "run_id": self._run_id,
            "fit_id": self._identity.fit_id,
            "step": trainer.global_step,
        }
        self._refuse_nonfinite_checkpoint(trainer, checkpoint)

    # -------------------------------------------------------------------------------- decision
    def decide(self, obs: D.Observation) -> D.Decision:
        """What to do with a step, from its all-reduced `Observation`
        (pure: see `lightning_clip.guard.decision.decide`)."""
        rules = D.GuardRules(overflow_patience=self.overflow_patience, min_loss_scale=self.min_loss_scale)
        return D.decide(obs, rules, self.action)

    def _local_signals(self, state: StepState) -> D.LocalSignals:
        """What this rank saw at the step (once per step: the all-reduce and the hook share it)."""
        if self._signals is None or self._signals[0] is not state:
            self._signals = (state, observe.local_signals(state, self._losses, self._spike, self._has_scaler))
        return self._signals[1]
