"""Where a rollback goes back to: the in-memory snapshot and this run's checkpoint files.

`KnownGoodStates` keeps the newest valid in-memory snapshot (a CPU copy, see `snapshot`), when the next
one is due (at multiples of ``every_n_steps`` of ``global_step``, so a resumed run takes the same snapshots
as an uninterrupted one), and the step of the newest checkpoint file this run wrote; `KnownGoodStates.newest`
picks whichever of the snapshot and the files (`lightning_clip.guard.rollback`) holds the higher step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from lightning_utilities.core.rank_zero import rank_zero_warn

from lightning_clip.exceptions import LightningClipWarning
from lightning_clip.guard.rollback import FileSources, validate
from lightning_clip.guard.rollback.sources import RunIdentity
from lightning_clip.guard.snapshot import TrainingState, capture

if TYPE_CHECKING:
    from lightning_clip._compat import Trainer

__all__ = ["KnownGoodStates"]

Agree = Callable[[list[int]], list[int]]
"""Sums integer flags over the ranks (identity on one process)."""


class KnownGoodStates:
    """The rollback targets of one fit.

    Args:
        every_n_steps: a snapshot at every multiple of N of ``global_step`` (0: checkpoint files only).
        trust: read checkpoint files with ``weights_only=False`` (see `FileSources`).
    """

    def __init__(self, every_n_steps: int, trust: bool = False) -> None:
        self.every_n_steps = every_n_steps
        self.snapshot: TrainingState | None = None
        self.next_snapshot_step = 0
        self.last_checkpoint_step = -1
        self.files = FileSources(trust=trust)
        self._warned = False  # a refused snapshot is a warning once per fit

    def reset(self) -> None:
        """A new fit: no snapshot, no file written yet, no file known."""
        self.snapshot = None
        self.next_snapshot_step = 0
        self.last_checkpoint_step = -1
        self.files.reset()
        self._warned = False

    def snapshot_due(self, step: int) -> bool:
        return self.every_n_steps > 0 and step >= self.next_snapshot_step

    def postpone(self, step: int) -> None:
        """No snapshot before the next multiple of ``every_n_steps`` after ``step``."""
        if self.every_n_steps > 0:
            self.next_snapshot_step = (step // self.every_n_steps + 1) * self.every_n_steps

    def take(
        self,
        trainer: Trainer,
        callbacks: Sequence[Any],
        lr_scale: float,
        label: int | None = None,
        agree: Agree | None = None,
        guard: dict[str, Any] | None = None,
    ) -> None:
        """Snapshot the live state (kept only when valid: finite weights, optimizer states and numbers).
        ``label``: the step the content is from, after a rollback (the restored state becomes the new
        snapshot). ``agree`` sums flags over the ranks (a sharded state is checked shard by shard).
        ``guard``: the guard's own state (its divergence detector), kept with the snapshot."""
        state = capture(trainer, callbacks, lr_scale=lr_scale, guard=guard)
        if label is not None:
            state.step = label
        problem = validate.problem(state, trainer, callbacks)
        bad = problem is not None
        if state.sharded and agree is not None:
            bad = bool(agree([int(bad)])[0])
        if not bad:
            self.snapshot = state
        elif problem is not None and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"ExplosionGuard: the live state at step {trainer.global_step} is not kept as a snapshot: {problem}"
                " (the previous known-good state stays the rollback target).",
                category=LightningClipWarning,
            )
        self.postpone(trainer.global_step)

    def newest(
        self, trainer: Trainer, identity: RunIdentity, state_key: str, siblings: Sequence[Any]
    ) -> TrainingState | None:
        """The snapshot or the newest valid checkpoint file of this run, whichever holds the higher step
        (None: neither). Collective (see `FileSources.newest`)."""
        snap = self.snapshot
        best = snap.step if snap is not None else -1
        if snap is not None and self.last_checkpoint_step <= best:
            return snap  # no file newer than the snapshot was written by this run
        return self.files.newest(trainer, identity, state_key, best, siblings) or snap
