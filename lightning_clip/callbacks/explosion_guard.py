"""ExplosionGuard: detect NaN/Inf, finite divergence (and optional spikes) and roll back to the last
known-good state.

The hooks only gather and route. What a step's observations mean is decided by the pure
`lightning_clip.guard.decision.decide`; known-good states, checkpoint files and the event log live in
`lightning_clip.guard`.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_clip import _compat
from lightning_clip._validation import check_bool, check_choice, check_int, check_number
from lightning_clip.callbacks._base import LightningClipCallback
from lightning_clip.exceptions import GradientExplosionError, LightningClipWarning
from lightning_clip.functional.divergence import DIVERGED, DivergenceDetector, Reading
from lightning_clip.functional.thresholds import MeanThreshold
from lightning_clip.guard import decision as D
from lightning_clip.guard import rollback
from lightning_clip.guard.events import EVENTS_FILENAME, EventRecord
from lightning_clip.guard.known_good import KnownGoodStates
from lightning_clip.guard.recorder import EventRecorder
from lightning_clip.guard.rollback.read import guard_state
from lightning_clip.guard.rollback.restore import write_state
from lightning_clip.guard.rollback.sources import RUN_KEY, RunIdentity, is_remote
from lightning_clip.guard.snapshot import all_finite
from lightning_clip.step import LOSS_RIDER, GradMeasurement, LossWindow, StepState

if TYPE_CHECKING:
    from lightning_clip._compat import LightningModule, Trainer

__all__ = ["ExplosionGuard"]

log = logging.getLogger(__name__)

ACTIONS = ("rollback", "skip", "raise")
SCHEDULES = ("fast_forward", "restore")
GUARD_FLAGS = "ExplosionGuard.flags"
"""The guard's per-rank flags in the step's one all-reduce (`StepTracker.contribute`)."""


class ExplosionGuard(LightningClipCallback):
    r"""Detect exploding training (NaN/Inf, finite divergence, optional spikes) and skip the update or roll back.

    Detection (the bad update is never applied: decided in ``on_before_optimizer_step``, where the
    gradients are accumulated and AMP-unscaled, its gradients are then set to ``None``):

    * a non-finite total gradient norm (measured once per step, shared with
      `AdaptiveGradientClipping`);
    * a non-finite training loss (the tensor handed to ``backward``, captured in ``on_before_backward``;
      automatic and manual optimization, every micro-batch of an accumulation window);
    * a finite **divergence** (kind ``"divergence"``): the step's training loss, averaged over the ranks,
      smoothed to more than 4 times its healthy level, or the gradient norm to more than 1,000 times its
      own (`lightning_clip.functional.divergence.DivergenceDetector`; one high batch is no divergence, a
      loss that stays up is);
    * with ``spike_factor``: a norm above ``spike_factor`` × the bias-corrected running mean of the recent
      finite, non-spike norms (EMA decay ``spike_decay`` = 0.97, after ``spike_warmup_steps`` = 10 steps);
    * non-finite weights (or optimizer state): checked every ``snapshot_every_n_steps`` steps, before a
      snapshot is taken, on every event, at the end of training, and in ``on_save_checkpoint`` before a
      checkpoint is written.

    Actions:

    * ``"skip"``: the update is not applied; weights and optimizer state stay bit-identical. The LR
      scheduler and ``global_step`` still advance (the schedule stays tied to ``global_step``). A skip
      cannot repair a state that is already bad (non-finite weights, collapsed loss scale, a divergence):
      those raise `GradientExplosionError`.
    * ``"rollback"``: the update is not applied, and in ``on_train_batch_end`` (before ``ModelCheckpoint``
      runs) the model, every optimizer, every LR scheduler, the precision plugin (GradScaler) and the
      state of the other lightning-clip callbacks go back to the newest known-good state: the in-memory
      snapshot (taken at train start and every ``snapshot_every_n_steps`` good steps, copied to the CPU) or
      this run's newest own file in the Trainer's ``ModelCheckpoint`` folders, whichever holds the higher
      ``global_step`` (files are ordered by the step they hold, never by modification time; another run's
      files are never used; under DDP every rank restores the same step: see ``docs/reliability.md``,
      "What the guard trusts"). Everything restored is validated first (names and shapes against the live
      model, finite weights, optimizer state, learning rates, loss scale, scheduler numbers); an
      unreadable, invalid or mismatched file gives a warning and the next older state is tried. Files are
      read with ``weights_only=True``; one that needs more (pickled objects, e.g. in its hyper-parameters)
      gives a warning naming the types and is skipped, unless ``trust_checkpoints=True``. Remote folders
      (``s3://``...) are not rollback sources. A state taken during a runaway is never a known-good
      state: a snapshot is taken only after 10 healthy steps in a row (the loss at most twice its healthy
      level, or every step since the start), otherwise it waits for them, and a checkpoint file written
      while training was not healthy is passed over. The divergence detector is rewound with the state;
      after a ``divergence`` rollback `AdaptiveGradientClipping` (``mode="mean"``) halves the
      threshold it was at (its ceiling), so training resumes with a tighter clip. Then every learning rate
      is multiplied by ``lr_factor`` (param groups and the schedulers' ``base_lrs``), step-interval LR
      schedulers are fast-forwarded back to where they were (``schedulers_after_rollback``), and the next
      ``skip_batches`` batches are not learned from. Loop counters (``global_step``, epoch, batch) do not
      go back.
    * ``"raise"``: `GradientExplosionError` at the first event.

    A NaN state never reaches a checkpoint file: in ``on_save_checkpoint`` the checkpoint's weights are
    checked; with ``"rollback"`` the live state is rolled back and the checkpoint is rewritten from the
    restored state, otherwise `GradientExplosionError` is raised before the file is
    written.

    Args:
        action: ``"rollback"`` | ``"skip"`` | ``"raise"``.
        spike_factor: also an event: gradient norm ``> spike_factor`` × running mean (``> 1``; None: off).
        snapshot_every_n_steps: in-memory snapshot at every multiple of N of ``global_step`` (``≥ 0``; a
            resumed run snapshots the same steps as an uninterrupted one); 0: roll back to checkpoint files
            only (needs a local ``ModelCheckpoint`` folder; checked at setup).
        max_rollbacks: rollbacks allowed in the whole run, resumes included (``≥ 0``); one more is an error.
        skip_batches: after a rollback, the next N batches are not learned from (``≥ 0``): every optimizer
            step whose gradients include one of them is not applied (PaLM, Chowdhery et al. 2022).
        lr_factor: after a rollback, multiply every learning rate by this (in ``(0, 1]``; OPT, Zhang et al.
            2022). Cumulative: after ``k`` rollbacks the learning rates are ``lr_factor**k`` × the original.
        trust_checkpoints: read checkpoint files as rollback sources with ``weights_only=False`` (any pickled
            object, so arbitrary code: only for files you trust). Default False: ``weights_only=True``,
            which loads everything Lightning itself writes.
        schedulers_after_rollback: ``"fast_forward"`` (default): after a rollback, every step-interval LR
            scheduler steps again as often as it had since the restored state, so the schedule stays tied
            to ``global_step`` and ends on time (keeping ``lr_factor``); ``"restore"``: schedulers keep the
            restored state (the schedule then lags ``global_step`` by the steps rolled back).
            Epoch-interval schedulers and ``ReduceLROnPlateau`` always keep their restored state.

    Raises:
        ValueError / TypeError: at construction, for an argument out of range or of the wrong type.
        ValueError: at setup, for ``snapshot_every_n_steps=0`` without a ``ModelCheckpoint`` writing to a
            local folder.
        GradientExplosionError: ``action="raise"`` at the first event; ``max_rollbacks`` spent; no
            known-good state; ``action="skip"`` facing a state a skip cannot repair. The message says what
            happened, at which step, which parameters went bad first and what to try.

    Logged keys (through ``pl_module.log``, cumulative counts, on the Trainer's logging steps):

    | key | meaning |
    |---|---|
    | ``explosion/events`` | events detected (every kind) |
    | ``explosion/rollbacks`` | rollbacks done |
    | ``explosion/skipped_steps`` | optimizer steps not applied (events and ``skip_batches``) |

    Each event is also written (rank zero) as one JSON line to ``lightning_clip_events.jsonl`` in the run's
    log directory (the first logger's ``log_dir``, else ``default_root_dir``): ``step``, ``epoch``,
    ``batch``, ``optimizer``, ``kind``, ``kinds``, ``norm``, ``loss``, ``params`` (the first parameters whose
    gradients, or weights, went bad; for a divergence or a spike the largest), ``action``, ``restored``
    (``source``, ``step``, ``path``), ``rollbacks``, ``lr_scale``, and for a divergence ``loss_ratio`` /
    ``norm_ratio`` (the smoothed loss and norm as multiples of their healthy levels). Non-finite numbers
    are the strings ``"nan"``, ``"inf"``, ``"-inf"``.

    Notes:
        16-mixed: a non-finite gradient norm is the GradScaler's normal loss-scale calibration (it skips
        that step and halves its scale), so it is not an event. What triggers there: a non-finite loss,
        non-finite weights, the scale falling below ``min_loss_scale`` (2⁻⁸), or ``overflow_patience`` (20)
        consecutive overflow steps. Under bf16-mixed and fp32 a non-finite norm is an event.
        DDP: the kinds seen on each rank are summed in one small all-reduce per optimizer step (the loss's
        mean over the ranks rides on it, for the divergence detector and the clipper), so every
        rank takes the same decision (a fault on one rank makes all of them skip or roll back) and after a
        rollback every rank holds the same weights. Under 16-mixed the same all-reduce says whether any
        rank's GradScaler overflowed; if so every rank's scaler skips the step and lowers its scale alike.
        FSDP2 / tensor parallelism (``ModelParallelStrategy``): the norm is the global one (the same on every
        rank; one more small all-reduce per step), a fault on one rank's shards makes every rank take the
        same action, each rank snapshots only its own shards (about ``(1 + k) / shards`` × the parameter
        bytes of CPU memory per rank, ``k`` optimizer state tensors per parameter: 2 for Adam), and rollback
        also reads the distributed checkpoint directories ``ModelCheckpoint`` writes there. DeepSpeed,
        FSDP1 (``FSDPStrategy``) and XLA are refused at setup.
        Structure: the hooks only gather and route; `decide` turns a step's observation into a
        `Decision` (pure, testable on its own).
        Memory: a snapshot is a CPU copy of the model and optimizer states (of this rank's shards when sharded).

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
        self._run_id = ""  # this run's identity, kept across resumes (saved); set at setup
        # transient
        self._identity = RunIdentity("", "", 0)
        self._known_good = KnownGoodStates(self.snapshot_every_n_steps, trust=self.trust_checkpoints)
        self._events = EventRecorder()
        self._losses = LossWindow()
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

    # ----------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 2,
            "events": self.events,
            "rollbacks": self.rollbacks,
            "skipped_steps": self.skipped_steps,
            "lr_scale": self.lr_scale,
            "skip_remaining": self._skip_remaining,
            "overflow_streak": self._overflow_streak,
            "spike": None if self._spike is None else self._spike.state_dict(),
            "divergence": self._detector.state_dict(),
            "healthy": self._detector.snapshot_ok,
            "run_id": self._run_id,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = int(state_dict.get("events", 0))
        self.rollbacks = int(state_dict.get("rollbacks", 0))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        lr_scale = state_dict.get("lr_scale", 1.0)
        if (
            isinstance(lr_scale, bool)
            or not isinstance(lr_scale, (int, float))
            or not 0 < lr_scale < math.inf
        ):
            rank_zero_warn(
                f"ExplosionGuard: the saved `lr_scale` is {lr_scale!r} (must be finite and > 0); using 1.0.",
                category=LightningClipWarning,
            )
            lr_scale = 1.0
        self.lr_scale = float(lr_scale)
        self._skip_remaining = int(state_dict.get("skip_remaining", 0))
        self._overflow_streak = int(state_dict.get("overflow_streak", 0))
        self._spike = self._make_spike_rule()
        spike = state_dict.get("spike")
        if self._spike is not None and spike:
            self._spike.load_state_dict(spike)
        self._detector = DivergenceDetector()
        self._detector.load_state_dict(state_dict.get("divergence", {}))
        run_id = state_dict.get("run_id")
        self._run_id = run_id if isinstance(run_id, str) and run_id else self._run_id

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A resume: adopt the run identity the checkpoint carries; when the guard's arguments changed since
        (another ``state_key``), carry its saved state over from the one other ``ExplosionGuard`` entry."""
        saved = checkpoint.get(RUN_KEY)
        if isinstance(saved, dict) and isinstance(saved.get("run_id"), str):
            self._run_id = saved["run_id"]
        callbacks = checkpoint.get("callbacks", {})
        if self.state_key in callbacks:
            return
        own = guard_state(checkpoint, self.state_key)
        if own:
            old = next(k for k in callbacks if callbacks[k] is own)
            rank_zero_warn(
                f"ExplosionGuard: the checkpoint holds the guard's state under {old!r}, this guard is"
                f" {self.state_key!r} (its `action` or `spike_factor` changed); its counters (rollbacks count"
                " toward `max_rollbacks`), `lr_scale`, divergence detector and run identity are carried over.",
                category=LightningClipWarning,
            )
            self.load_state_dict(own)

    # ----------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.action == "rollback":
            self._check_folders(trainer)
        self._events.path = os.path.join(_compat.log_dir(trainer), EVENTS_FILENAME)
        # one identity for every rank (the subprocess DDP launcher builds one guard per rank)
        run_id, fit_id = trainer.strategy.broadcast((self._run_id or uuid.uuid4().hex, uuid.uuid4().hex))
        self._run_id, self._identity = run_id, RunIdentity(run_id, fit_id, 0)

    def _check_folders(self, trainer: Trainer) -> None:
        folders = [
            os.fspath(getattr(cb, "dirpath", None) or trainer.default_root_dir)
            for cb in trainer.checkpoint_callbacks
        ]
        remote = [f for f in folders if is_remote(f)]
        if self.snapshot_every_n_steps == 0 and len(remote) == len(folders):
            raise ValueError(
                "ExplosionGuard(snapshot_every_n_steps=0) rolls back to checkpoint files only, but the Trainer"
                " has no ModelCheckpoint writing to a local folder"
                + (f" (remote folders are not rollback sources: {', '.join(remote)})" if remote else "")
                + ". Add `ModelCheckpoint(dirpath=<local folder>, every_n_train_steps=...)` to `callbacks`, or"
                " set `snapshot_every_n_steps` > 0 to keep an in-memory snapshot."
            )
        if remote:
            rank_zero_warn(
                f"ExplosionGuard: checkpoint files in remote folders ({', '.join(remote)}) are not rollback"
                " sources; rollbacks use the in-memory snapshot (`snapshot_every_n_steps`) and local folders.",
                category=LightningClipWarning,
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._events.names = {id(p): name for name, p in pl_module.named_parameters()}
        self._pending, self._tainted, self._signals = None, False, None
        scaler = _compat.gradient_scaler(trainer)
        self._has_scaler = scaler is not None
        self._losses.clear()
        self._losses.scale = None if scaler is None else (lambda: _compat.loss_scale_tensor(scaler))
        self._known_good.reset()
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
        reading = self._divergence_reading(state, reduced, local, mean_loss)
        obs = D.Observation.from_flags(
            reduced,
            local,
            loss_scale=float(scaler.get_scale()) if any_overflow else math.inf,
            overflow_streak=self._overflow_streak,
            tainted=self._tainted,
            rollback_pending=self._pending is not None,
            divergence=reading is not None and reading.verdict == DIVERGED,
        )
        decision = self.decide(obs)
        if decision.applied and reading is not None:
            self._detector.update(mean_loss, measurement.total_norm)
        self._act_on_step(trainer, pl_module, state, decision, mean_loss, scaler, reading)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
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
        local_bad = not (
            all_finite(checkpoint.get("state_dict", {}))
            and all_finite(checkpoint.get("optimizer_states", []))
        )
        if not self._sum_over_ranks(trainer, [int(local_bad)])[0]:
            return
        record = self._weights_record(trainer, checkpoint.get("state_dict", {}).items())
        record.checkpoint_refused = True
        self._act(trainer, record, deferred=False)  # raises unless rolled back
        write_state(
            checkpoint, trainer, [self, *self._siblings(trainer)]
        )  # the restored state, not the bad one

    # -------------------------------------------------------------------------------- decision
    def decide(self, obs: D.Observation) -> D.Decision:
        """What to do with a step, from its all-reduced `Observation`
        (pure: see `lightning_clip.guard.decision.decide`)."""
        rules = D.GuardRules(overflow_patience=self.overflow_patience, min_loss_scale=self.min_loss_scale)
        return D.decide(obs, rules, self.action)

    def _local_signals(self, state: StepState) -> D.LocalSignals:
        """What this rank saw at the step (computed once per step: the all-reduce contribution and the
        hook use the same object)."""
        if self._signals is None or self._signals[0] is not state:
            measurement = state.measure(2.0)
            loss = state.rider(LOSS_RIDER)
            if loss is None:  # the loss was registered after the step's transfer: fetch it apart
                mean = self._losses.unscaled_mean()
                loss = None if mean is None else float(mean.item())
            signals = D.LocalSignals(
                nonfinite_loss=loss is not None and not math.isfinite(loss),
                nonfinite_norm=not measurement.finite,
                spike=self._is_spike(measurement),
                has_scaler=self._has_scaler,
            )
            self._signals = (state, signals)
        return self._signals[1]

    def _divergence_reading(
        self, state: StepState, reduced: list[float], local: D.LocalSignals, mean_loss: float | None
    ) -> Reading | None:
        """The divergence detector's view of the step, from values identical on every rank (the loss's mean
        over the ranks, the all-reduced gradients' norm); None when the step is not judged (a non-finite
        loss or norm anywhere: another kind covers it). Shared with the other callbacks as
        ``StepState.divergence``."""
        norm = state.measure(2.0).total_norm
        if any(v > 0 for v in reduced) or not math.isfinite(norm):
            return None
        if mean_loss is not None and not math.isfinite(mean_loss):
            return None
        reading = self._detector.peek(mean_loss, norm)
        state.divergence = reading
        return reading

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
        record = self._record(trainer, list(decision.kinds), measurement.total_norm, loss)
        if D.DIVERGENCE in decision.kinds and reading is not None:
            record.loss_ratio, record.norm_ratio = reading.loss_ratio, reading.norm_ratio
        record.params = self._events.grad_params(measurement, decision.kinds)
        record.optimizer = _compat.optimizer_index(trainer, state.optimizer)
        if self._weights_bad(trainer, pl_module):
            record.kinds = list(decision.with_kind(D.NONFINITE_WEIGHTS, self.action).kinds)
            self._events.bad_weights(record, pl_module.named_parameters())
        self._act(trainer, record, deferred=True)

    def _is_spike(self, m: GradMeasurement) -> bool:
        return m.finite and self._spike is not None and m.total_norm > self._spike.current()

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

    # --------------------------------------------------------------------------------- actions
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

    @property
    def _snapshots_on(self) -> bool:
        return self.action == "rollback" and self.snapshot_every_n_steps > 0

    def _agree(self, trainer: Trainer) -> Any:
        """Sums integer flags over the ranks (the decisions that rest on each rank's shards)."""
        return lambda flags: self._sum_over_ranks(trainer, flags)

    def _siblings(self, trainer: Trainer) -> list[LightningClipCallback]:
        """The other lightning-clip callbacks: their state is snapshotted and restored with the model's."""
        return [cb for cb in trainer.callbacks if isinstance(cb, LightningClipCallback) and cb is not self]  # type: ignore[attr-defined, union-attr, unused-ignore]

    # ------------------------------------------------------------------------------- gathering
    def _weights_bad(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        local = not all_finite([p.detach() for p in pl_module.parameters()])
        return bool(self._sum_over_ranks(trainer, [int(local)])[0])

    # --------------------------------------------------------------------------------- records
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
        raise GradientExplosionError(self._events.failure(record, reason))
