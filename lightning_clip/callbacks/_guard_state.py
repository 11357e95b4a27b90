"""`ExplosionGuard`'s own saved state (`GuardStateMixin`): its counters, ``lr_scale``, the spike rule, the
divergence detector and the run identity, as plain values in checkpoints; and their reading on a resume,
also when the guard's ``state_key`` changed since.

The state holds only plain values (it loads with ``torch.load(weights_only=True)``), and every key is read
with a default, so a checkpoint of an older version loads too. What the guard writes next to it in a
checkpoint (``RUN_KEY``, the refusal of a non-finite state) stays in its ``on_save_checkpoint``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_utilities.core.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_clip.callbacks._base import LightningClipCallback
from lightning_clip.exceptions import LightningClipWarning
from lightning_clip.functional.divergence import DivergenceDetector
from lightning_clip.functional.thresholds import MeanThreshold
from lightning_clip.guard.rollback.read import moved_guard_state
from lightning_clip.guard.rollback.sources import RUN_KEY
from lightning_clip.guard.rollback.validate import valid_lr_scale

if TYPE_CHECKING:
    from lightning_clip._compat import LightningModule, Trainer

__all__ = ["GuardStateMixin"]


class GuardStateMixin(LightningClipCallback):
    """The saved state of `ExplosionGuard`, a base of it (it reads and sets the guard's attributes,
    declared below, and makes the spike rule with the guard's ``_make_spike_rule``)."""

    events: int
    rollbacks: int
    skipped_steps: int
    lr_scale: float
    _skip_remaining: int
    _overflow_streak: int
    _spike: MeanThreshold | None
    _detector: DivergenceDetector
    _check_level: bool
    _run_id: str

    if TYPE_CHECKING:

        def _make_spike_rule(self) -> MeanThreshold | None: ...

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
            "check_level": self._check_level,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = int(state_dict.get("events", 0))
        self.rollbacks = int(state_dict.get("rollbacks", 0))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        lr_scale = state_dict.get("lr_scale", 1.0)
        if not valid_lr_scale(lr_scale):
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
        self._check_level = bool(state_dict.get("check_level", False))
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
        old_key, own = moved_guard_state(checkpoint, self.state_key)
        if old_key is not None:
            rank_zero_warn(
                f"ExplosionGuard: the checkpoint holds the guard's state under {old_key!r}, this guard is"
                f" {self.state_key!r} (its `action` or `spike_factor` changed); its counters (rollbacks count"
                " toward `max_rollbacks`), `lr_scale`, divergence detector and run identity are carried over.",
                category=LightningClipWarning,
            )
            self.load_state_dict(own)
