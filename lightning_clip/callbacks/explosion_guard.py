"""ExplosionGuard: detect NaN/Inf (and optional spikes) and roll back to the last known-good state."""

from __future__ import annotations

import logging
import math
import os
from typing import Any, NoReturn

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from lightning_clip import _trainer
from lightning_clip._events import EVENTS_FILENAME, EventLog, json_number
from lightning_clip._measure import mark_skipped, measure_step, optimizer_params, ride_along
from lightning_clip._snapshot import (
    TrainingState,
    all_finite,
    capture,
    checkpoint_candidates,
    from_checkpoint,
    nonfinite_names,
    restore,
)
from lightning_clip._validation import check_choice, check_int, check_number
from lightning_clip.callbacks._base import LightningClipCallback
from lightning_clip.exceptions import GradientExplosionError, LightningClipWarning
from lightning_clip.statistics import MeanThreshold

__all__ = ["ExplosionGuard"]

log = logging.getLogger(__name__)

ACTIONS = ("rollback", "skip", "raise")
_LOSS_RIDER = "ExplosionGuard.loss"

# Event kinds, in the order of precedence used when several happen in one step.
NONFINITE_WEIGHTS = "nonfinite_weights"
NONFINITE_LOSS = "nonfinite_loss"
NONFINITE_GRAD = "nonfinite_grad"
SCALE_COLLAPSE = "scale_collapse"
PERSISTENT_OVERFLOW = "persistent_overflow"
SPIKE = "spike"
KINDS = (NONFINITE_WEIGHTS, NONFINITE_LOSS, NONFINITE_GRAD, SCALE_COLLAPSE, PERSISTENT_OVERFLOW, SPIKE)
_STEP_KINDS = (NONFINITE_LOSS, NONFINITE_GRAD, SCALE_COLLAPSE, PERSISTENT_OVERFLOW, SPIKE)
# a skip cannot repair these: the state itself is bad
_NEEDS_STATE = (NONFINITE_WEIGHTS, SCALE_COLLAPSE, PERSISTENT_OVERFLOW)

_KIND_TEXT = {
    NONFINITE_WEIGHTS: "non-finite weights",
    NONFINITE_LOSS: "non-finite training loss",
    NONFINITE_GRAD: "non-finite gradient norm",
    SCALE_COLLAPSE: "GradScaler loss scale collapsed",
    PERSISTENT_OVERFLOW: "persistent fp16 gradient overflow",
    SPIKE: "gradient-norm spike",
}


class ExplosionGuard(LightningClipCallback):
    r"""Detect exploding training (NaN/Inf, optional spikes) and skip the update or roll back.

    Detection (the bad update is never applied: decided in ``on_before_optimizer_step``, where the
    gradients are accumulated and AMP-unscaled, its gradients are then set to ``None``):

    * a non-finite total gradient norm (measured once per step, shared with
      :class:`~lightning_clip.AdaptiveGradientClipping`);
    * a non-finite training loss (the tensor handed to ``backward``, captured in ``on_before_backward``;
      automatic and manual optimization, every micro-batch of an accumulation window);
    * with ``spike_factor``: a norm above ``spike_factor`` × the bias-corrected running mean of the recent
      finite, non-spike norms (EMA decay ``spike_decay`` = 0.97, after ``spike_warmup_steps`` = 10 steps);
    * non-finite weights (or optimizer state): checked every ``snapshot_every_n_steps`` steps, before a
      snapshot is taken, on every event, at the end of training, and in ``on_save_checkpoint`` before a
      checkpoint is written.

    Actions:

    * ``"skip"``: the update is not applied; weights and optimizer state stay bit-identical. The LR
      scheduler and ``global_step`` still advance (the schedule stays tied to ``global_step``). A skip
      cannot repair a state that is already bad (non-finite weights, collapsed loss scale): those raise
      :class:`~lightning_clip.GradientExplosionError`.
    * ``"rollback"``: the update is not applied, and in ``on_train_batch_end`` (before ``ModelCheckpoint``
      runs) the model, every optimizer, every LR scheduler, the precision plugin (GradScaler) and the
      state of the other lightning-clip callbacks go back to the newest known-good state: the in-memory
      snapshot (taken at train start and every ``snapshot_every_n_steps`` good steps, copied to the CPU) or
      the newest file of the Trainer's ``ModelCheckpoint``, whichever has the higher ``global_step``. A
      state with non-finite weights or optimizer state is never used; an unreadable or truncated file gives
      a warning and the next older state is tried. Then every learning rate is multiplied by
      ``lr_factor`` (param groups and the schedulers' ``base_lrs``, so the schedule continues from the
      lowered value) and the next ``skip_batches`` batches are not learned from. Loop counters
      (``global_step``, epoch, batch) do not go back.
    * ``"raise"``: :class:`~lightning_clip.GradientExplosionError` at the first event.

    A NaN state never reaches a checkpoint file: in ``on_save_checkpoint`` the checkpoint's weights are
    checked; with ``"rollback"`` the live state is rolled back and the checkpoint is rewritten from the
    restored state, otherwise :class:`~lightning_clip.GradientExplosionError` is raised before the file is
    written.

    Args:
        action: ``"rollback"`` | ``"skip"`` | ``"raise"``.
        spike_factor: also an event: gradient norm ``> spike_factor`` × running mean (``> 1``; None: off).
        snapshot_every_n_steps: in-memory snapshot every N good optimizer steps (``≥ 0``); 0: roll back to
            checkpoint files only (needs a ``ModelCheckpoint``; checked at setup).
        max_rollbacks: rollbacks allowed in the whole run, resumes included (``≥ 0``); one more is an error.
        skip_batches: after a rollback, the next N batches are not learned from (``≥ 0``): every optimizer
            step whose gradients include one of them is not applied (PaLM, Chowdhery et al. 2022).
        lr_factor: after a rollback, multiply every learning rate by this (in ``(0, 1]``; OPT, Zhang et al.
            2022). Cumulative: after ``k`` rollbacks the learning rates are ``lr_factor**k`` × the original.

    Raises:
        ValueError / TypeError: at construction, for an argument out of range or of the wrong type.
        ValueError: at setup, for ``snapshot_every_n_steps=0`` without a ``ModelCheckpoint``.
        GradientExplosionError: ``action="raise"`` at the first event; ``max_rollbacks`` spent; no
            known-good state; ``action="skip"`` facing a state a skip cannot repair. The message says what
            happened, at which step, which parameters went bad first and what to try.

    Logged keys (through ``pl_module.log``, cumulative counts, on the Trainer's logging steps):

    ===========================  ====================================================================
    key                          meaning
    ===========================  ====================================================================
    ``explosion/events``         events detected (every kind)
    ``explosion/rollbacks``      rollbacks done
    ``explosion/skipped_steps``  optimizer steps not applied (events and ``skip_batches``)
    ===========================  ====================================================================

    Each event is also written (rank zero) as one JSON line to ``lightning_clip_events.jsonl`` in the run's
    log directory (the first logger's ``log_dir``, else ``default_root_dir``): ``step``, ``epoch``,
    ``batch``, ``optimizer``, ``kind``, ``kinds``, ``norm``, ``loss``, ``params`` (the first parameters whose
    gradients, or weights, went bad), ``action``, ``restored`` (``source``, ``step``, ``path``), ``rollbacks``,
    ``lr_scale``. Non-finite numbers are the strings ``"nan"``, ``"inf"``, ``"-inf"``.

    Notes:
        16-mixed: a non-finite gradient norm is the GradScaler's normal loss-scale calibration (it skips
        that step and halves its scale), so it is not an event. What triggers there: a non-finite loss,
        non-finite weights, the scale falling below ``min_loss_scale`` (2⁻⁸), or ``overflow_patience`` (20)
        consecutive overflow steps. Under bf16-mixed and fp32 a non-finite norm is an event.
        DDP: the kinds seen on each rank are summed in one small all-reduce per optimizer step, so every
        rank takes the same decision (a fault on one rank makes all of them skip or roll back) and after a
        rollback every rank holds the same weights. Under 16-mixed the same all-reduce says whether any
        rank's GradScaler overflowed; if so every rank's scaler skips the step and lowers its scale alike.
        Sharded strategies (FSDP, DeepSpeed) are not supported.
        Memory: a snapshot is a CPU copy of the model and optimizer states.

    Example:
        >>> import pytorch_lightning as pl
        >>> from lightning_clip import ExplosionGuard
        >>> guard = ExplosionGuard(action="rollback", snapshot_every_n_steps=50, lr_factor=0.5, skip_batches=2)
        >>> trainer = pl.Trainer(callbacks=[guard], logger=False)
    """

    spike_decay: float = 0.97
    spike_warmup_steps: int = 10
    overflow_patience: int = 20
    min_loss_scale: float = 2.0**-8
    max_param_names: int = 5

    def __init__(
        self,
        action: str = "rollback",
        spike_factor: float | None = None,
        snapshot_every_n_steps: int = 50,
        max_rollbacks: int = 5,
        skip_batches: int = 0,
        lr_factor: float = 1.0,
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
        # counters (saved)
        self.events = 0
        self.rollbacks = 0
        self.skipped_steps = 0
        self.lr_scale = 1.0
        self._skip_remaining = 0
        self._overflow_streak = 0
        self._spike = self._make_spike_rule()
        # transient
        self._snapshot: TrainingState | None = None
        self._next_snapshot_step = 0
        self._last_ckpt_step = -1
        self._bad_files: set[tuple[str, int]] = set()
        self._losses: list[torch.Tensor] = []
        self._pending: dict[str, Any] | None = None
        self._stepped = False
        self._tainted = False
        self._batch_idx = -1
        self._names: dict[int, str] = {}
        self._events_path: str | None = None
        #: every record written this run (also on ranks that do not write the file)
        self.records: list[dict[str, Any]] = []

    def _make_spike_rule(self) -> MeanThreshold | None:
        if self.spike_factor is None:
            return None
        return MeanThreshold(
            factor=self.spike_factor, decay=self.spike_decay, warmup_steps=self.spike_warmup_steps
        )

    def _state_key_args(self) -> dict[str, Any]:
        return dict(action=self.action, spike_factor=self.spike_factor)

    @property
    def events_path(self) -> str | None:
        """Path of ``lightning_clip_events.jsonl`` (known from setup on)."""
        return self._events_path

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "events": self.events,
            "rollbacks": self.rollbacks,
            "skipped_steps": self.skipped_steps,
            "lr_scale": self.lr_scale,
            "skip_remaining": self._skip_remaining,
            "overflow_streak": self._overflow_streak,
            "spike": None if self._spike is None else self._spike.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = int(state_dict.get("events", 0))
        self.rollbacks = int(state_dict.get("rollbacks", 0))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.lr_scale = float(state_dict.get("lr_scale", 1.0))
        self._skip_remaining = int(state_dict.get("skip_remaining", 0))
        self._overflow_streak = int(state_dict.get("overflow_streak", 0))
        self._spike = self._make_spike_rule()
        spike = state_dict.get("spike")
        if self._spike is not None and spike:
            self._spike.load_state_dict(spike)

    # ----------------------------------------------------------------------------------------- setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if (
            self.action == "rollback"
            and self.snapshot_every_n_steps == 0
            and not trainer.checkpoint_callbacks
        ):
            raise ValueError(
                "ExplosionGuard(snapshot_every_n_steps=0) rolls back to checkpoint files only, but the Trainer"
                " has no ModelCheckpoint. Add `ModelCheckpoint(every_n_train_steps=...)` to `callbacks`, or set"
                " `snapshot_every_n_steps` > 0 to keep an in-memory snapshot."
            )
        self._events_path = os.path.join(_trainer.log_dir(trainer), EVENTS_FILENAME)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._names = {id(p): name for name, p in pl_module.named_parameters()}
        self._snapshot = None
        self._pending = None
        self._losses = []
        self._tainted = False
        self._bad_files = set()
        self._last_ckpt_step = -1
        if self._snapshots_on:
            self._take_snapshot(trainer)

    @property
    def _snapshots_on(self) -> bool:
        return self.action == "rollback" and self.snapshot_every_n_steps > 0

    # ----------------------------------------------------------------------------------------- hooks
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx
        self._stepped = False
        if self._skip_remaining > 0:
            self._tainted = True
            self._skip_remaining -= 1

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self._losses.append(loss.detach())  # shares storage: sees in-place changes made after this hook
        ride_along(trainer, _LOSS_RIDER, self._loss_mean)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._stepped = True
        step = trainer.global_step
        m = measure_step(trainer, optimizer, step, 2.0)
        loss = self._take_loss(m)
        norm = m.total_norm
        scaler = _trainer.gradient_scaler(trainer)
        flags = dict.fromkeys(_STEP_KINDS, 0)
        if loss is not None and not math.isfinite(loss):
            flags[NONFINITE_LOSS] = 1
        if not m.finite and scaler is None:
            flags[NONFINITE_GRAD] = 1
        if m.finite and self._spike is not None and norm > self._spike.current():
            flags[SPIKE] = 1
        local_overflow = int(scaler is not None and not m.finite)
        # one all-reduce: the kinds seen on any rank, and whether any rank's GradScaler overflowed
        *reduced, overflows = self._reduce(trainer, [*(flags[k] for k in _STEP_KINDS), local_overflow])
        kinds = [k for k, v in zip(_STEP_KINDS, reduced, strict=True) if v > 0]
        if scaler is not None:
            if overflows:  # loss-scale calibration: every rank's GradScaler skips the step, halves its scale
                if not local_overflow:  # an overflow on another rank only: skip here the same way
                    _trainer.force_scaler_skip(scaler, optimizer)
                mark_skipped(trainer, optimizer, step)
                self._overflow_streak += 1
                if self._overflow_streak >= self.overflow_patience:
                    kinds.append(PERSISTENT_OVERFLOW)
                if float(scaler.get_scale()) < self.min_loss_scale:
                    kinds.append(SCALE_COLLAPSE)
            else:
                self._overflow_streak = 0
        kinds.sort(key=_STEP_KINDS.index)
        if not kinds and not overflows and self._spike is not None:
            self._spike.step(norm)  # the same finite norm on every rank (all-reduced gradients)
        if not kinds and not self._tainted and self._pending is None:
            return
        # the update of this step is not applied
        for p in optimizer_params(optimizer):
            p.grad = None
        mark_skipped(trainer, optimizer, step)
        self.skipped_steps += 1
        if not kinds or self._pending is not None:
            return
        if PERSISTENT_OVERFLOW in kinds or SCALE_COLLAPSE in kinds:
            self._overflow_streak = 0
        loss_value = (
            None if loss is None else (loss / float(scaler.get_scale()) if scaler is not None else loss)
        )
        params = self._grad_param_names(m, kinds)
        record = self._record(
            trainer, kinds, norm, loss_value, params, _trainer.optimizer_index(trainer, optimizer)
        )
        if self._weights_bad(trainer, pl_module):
            record["kinds"].insert(0, NONFINITE_WEIGHTS)
            record["kind"] = NONFINITE_WEIGHTS
            record["params"] = nonfinite_names(pl_module.named_parameters(), self.max_param_names)
        self._act(trainer, record, deferred=True)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            record, self._pending = self._pending, None
            self._rollback(trainer, record)
        elif (
            self._stepped
            and self.snapshot_every_n_steps > 0
            and trainer.global_step >= self._next_snapshot_step
        ):
            # every rank joins this all-reduce: the branch depends only on values identical on all ranks
            # (the overflow streak too: it counts overflows seen on any rank, from the step's reduced decision)
            if self._weights_bad(trainer, pl_module):
                record = self._record(trainer, [NONFINITE_WEIGHTS], None, None, [])
                record["params"] = nonfinite_names(pl_module.named_parameters(), self.max_param_names)
                self._act(trainer, record, deferred=False)
            elif self._overflow_streak > 0:
                pass  # never snapshot in the middle of a run of fp16 overflows: retry next step
            elif self._snapshots_on:
                self._take_snapshot(trainer)
            else:
                self._next_snapshot_step = trainer.global_step + self.snapshot_every_n_steps
        if self._stepped:
            self._tainted = False
        if _trainer.should_update_logs(trainer):
            pl_module.log_dict(
                {
                    "explosion/events": float(self.events),
                    "explosion/rollbacks": float(self.rollbacks),
                    "explosion/skipped_steps": float(self.skipped_steps),
                },
                on_step=True,
                on_epoch=False,
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._weights_bad(trainer, pl_module):
            record = self._record(trainer, [NONFINITE_WEIGHTS], None, None, [])
            record["params"] = nonfinite_names(pl_module.named_parameters(), self.max_param_names)
            self._act(trainer, record, deferred=False)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._last_ckpt_step = trainer.global_step
        local_bad = not (
            all_finite(checkpoint.get("state_dict", {}))
            and all_finite(checkpoint.get("optimizer_states", []))
        )
        if not self._reduce(trainer, [int(local_bad)])[0]:
            return
        record = self._record(trainer, [NONFINITE_WEIGHTS], None, None, [])
        record["params"] = nonfinite_names(checkpoint.get("state_dict", {}).items(), self.max_param_names)
        record["checkpoint_refused"] = True
        self._act(trainer, record, deferred=False)  # raises unless rolled back
        # rolled back: write the restored state instead of the bad one
        checkpoint["state_dict"] = trainer.strategy.lightning_module_state_dict()
        if "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = [trainer.strategy.optimizer_state(o) for o in trainer.optimizers]
            checkpoint["lr_schedulers"] = [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs]
            precision = trainer.precision_plugin.state_dict()
            if precision:
                checkpoint[type(trainer.precision_plugin).__qualname__] = precision
        if "callbacks" in checkpoint:
            for cb in trainer.callbacks:  # type: ignore[attr-defined]
                if isinstance(cb, LightningClipCallback):
                    checkpoint["callbacks"][cb.state_key] = cb.state_dict()

    # ----------------------------------------------------------------------------------------- logic
    def _loss_mean(self) -> torch.Tensor | None:
        """Mean of the losses back-propagated since the last step (a 0-d tensor; no host transfer)."""
        if not self._losses:
            return None
        device = self._losses[0].device
        return torch.stack([t.float().mean().to(device) for t in self._losses]).mean()

    def _take_loss(self, m: Any) -> float | None:
        """The mean loss since the last step, brought to the host with the norm in one transfer."""
        value = m.rider(_LOSS_RIDER)
        if value is None and self._losses:  # measured before the loss was registered: fetch it apart
            mean = self._loss_mean()
            value = None if mean is None else float(mean.item())
        self._losses = []
        return value

    def _reduce(self, trainer: pl.Trainer, flags: list[int]) -> list[int]:
        """Sum ``flags`` over the ranks (one all-reduce; nothing on a single process)."""
        if trainer.world_size <= 1:
            return flags
        t = torch.tensor(flags, dtype=torch.int32, device=trainer.strategy.root_device)
        t = trainer.strategy.reduce(t, reduce_op="sum")
        return [int(v) for v in t.tolist()]

    def _weights_bad(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        local = not all_finite([p.detach() for p in pl_module.parameters()])
        return bool(self._reduce(trainer, [int(local)])[0])

    def _grad_param_names(self, m: Any, kinds: list[str]) -> list[str]:
        if not m.finite:
            idx = m.nonfinite_indices()
        elif SPIKE in kinds and len(m.params):
            k = min(self.max_param_names, len(m.params))
            idx = torch.topk(m.per_param, k).indices.tolist()
        else:
            return []
        return [self._names.get(id(m.params[i]), f"param[{i}]") for i in idx[: self.max_param_names]]

    def _record(
        self,
        trainer: pl.Trainer,
        kinds: list[str],
        norm: float | None,
        loss: float | None,
        params: list[str],
        optimizer: int = 0,
    ) -> dict[str, Any]:
        kinds = sorted(kinds, key=KINDS.index)
        self.events += 1
        return {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "batch": self._batch_idx,
            "optimizer": optimizer,
            "kind": kinds[0],
            "kinds": kinds,
            "norm": json_number(norm),
            "loss": json_number(loss),
            "params": params,
            "action": self.action,
            "restored": None,
        }

    def _write(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        record = dict(record, rollbacks=self.rollbacks, lr_scale=self.lr_scale)
        self.records.append(record)
        log.info("ExplosionGuard event: %s", record)
        if trainer.is_global_zero and self._events_path is not None:
            EventLog(self._events_path).write(record)

    def _act(self, trainer: pl.Trainer, record: dict[str, Any], deferred: bool) -> None:
        """Apply the action to an event: raise, skip (already done by the caller) or roll back.

        ``deferred``: called from ``on_before_optimizer_step``, the rollback waits for ``on_train_batch_end``.
        """
        if self.action == "raise":
            self._fail(trainer, record, "`action='raise'` stops training at the first event.")
        if self.action == "skip":
            if record["kind"] in _NEEDS_STATE:
                self._fail(
                    trainer,
                    record,
                    "`action='skip'` cannot repair this: skipping an update does not fix a state that is already"
                    " bad. Use `action='rollback'` to go back to the last good state.",
                )
            self._write(trainer, record)
            return
        if deferred:
            self._pending = record
        else:
            self._rollback(trainer, record)

    def _rollback(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        if self.rollbacks >= self.max_rollbacks:
            self._fail(
                trainer,
                record,
                f"The rollback budget is spent: {self.rollbacks} rollback(s) already done"
                f" (max_rollbacks={self.max_rollbacks}, counted across resumes).",
            )
        state = self._newest_good_state(trainer)
        if state is None:
            self._fail(
                trainer,
                record,
                "There is no known-good state to go back to: no finite in-memory snapshot and no readable,"
                " finite checkpoint file at or before this step.",
            )
        restore(trainer, state, exclude=self)
        self.rollbacks += 1
        self.lr_scale *= self.lr_factor
        self._scale_lrs(trainer, self.lr_scale / state.lr_scale)
        self._skip_remaining = self.skip_batches
        self._overflow_streak = 0
        record["restored"] = {"source": state.source, "step": state.step, "path": state.path}
        self._write(trainer, record)
        if (
            self._snapshots_on
        ):  # the restored state (LRs lowered) is the new snapshot; its step is the content's
            self._take_snapshot(trainer, label=state.step)

    def _newest_good_state(self, trainer: pl.Trainer) -> TrainingState | None:
        snap = self._snapshot
        best = snap.step if snap is not None else -1
        if snap is not None and self._last_ckpt_step <= best:
            return snap  # no file newer than the snapshot was written by this run
        for path in checkpoint_candidates(trainer):
            try:
                key = (path, os.stat(path).st_mtime_ns)
            except OSError:
                continue
            if key in self._bad_files:
                continue
            try:
                state = from_checkpoint(trainer, path, self.state_key)
            except Exception as err:  # unreadable, truncated, incomplete: fall back to an older state
                self._bad_files.add(key)
                rank_zero_warn(
                    f"ExplosionGuard: checkpoint {path!r} is unreadable ({type(err).__name__}: {err}); falling back"
                    " to an older good state.",
                    category=LightningClipWarning,
                )
                continue
            if state.step > trainer.global_step:
                continue  # written by another run into the same folder
            if state.step <= best:
                break
            if not state.finite():
                self._bad_files.add(key)
                rank_zero_warn(
                    f"ExplosionGuard: checkpoint {path!r} holds non-finite values; falling back to an older good state.",
                    category=LightningClipWarning,
                )
                continue
            return state
        return snap

    def _take_snapshot(self, trainer: pl.Trainer, label: int | None = None) -> None:
        state = capture(trainer, exclude=self, lr_scale=self.lr_scale)
        if label is not None:
            state.step = label
        if state.finite():
            self._snapshot = state
        self._next_snapshot_step = trainer.global_step + self.snapshot_every_n_steps

    @staticmethod
    def _scale_lrs(trainer: pl.Trainer, factor: float) -> None:
        if factor == 1.0:
            return
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                    if key in group:
                        value = group[key]
                        group[key] = value.mul_(factor) if isinstance(value, torch.Tensor) else value * factor
        for cfg in trainer.lr_scheduler_configs:
            sched = cfg.scheduler
            if hasattr(sched, "base_lrs"):
                sched.base_lrs = [b * factor for b in sched.base_lrs]
            if hasattr(sched, "_last_lr"):
                sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]

    def _fail(self, trainer: pl.Trainer, record: dict[str, Any], reason: str) -> NoReturn:
        record = dict(record, action="error" if self.action != "raise" else "raise")
        self._write(trainer, record)
        raise GradientExplosionError(self._message(record, reason))

    def _message(self, record: dict[str, Any], reason: str) -> str:
        params = ", ".join(record["params"]) if record["params"] else "none identified"
        where = "weights" if record["kind"] == NONFINITE_WEIGHTS else "gradients"
        return (
            f"ExplosionGuard: {_KIND_TEXT[record['kind']]} at step {record['step']} (epoch {record['epoch']},"
            f" batch {record['batch']}); gradient norm {record['norm']}, loss {record['loss']}.\n"
            f"Parameters whose {where} went bad first: {params}.\n"
            f"{reason}\n"
            "What to try: lower the learning rate (or pass `lr_factor` < 1, e.g. 0.5, to lower it at every"
            " rollback); attach AdaptiveGradientClipping; skip the data that triggers it (`skip_batches`) or"
            f" inspect the batches listed in {self._events_path or EVENTS_FILENAME}; prefer bf16-mixed to"
            " 16-mixed; raise `max_rollbacks` to allow more recoveries."
        )
