"""Where a rollback goes back to: the in-memory snapshot and the Trainer's checkpoint files.

`KnownGoodStates` keeps the newest finite in-memory snapshot (a CPU copy, see
`snapshot`), when the next one is due, and the step of the newest checkpoint
file this run wrote; `KnownGoodStates.newest` picks whichever of the snapshot and the files is
newer (`checkpoints`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lightning_clip.guard.checkpoints import Agree, CheckpointFiles
from lightning_clip.guard.snapshot import TrainingState, capture

if TYPE_CHECKING:
    from lightning_clip._compat import Trainer

__all__ = ["KnownGoodStates"]


class KnownGoodStates:
    """The rollback targets of one fit.

    Args:
        every_n_steps: a snapshot every N optimizer steps (0: checkpoint files only).
        trust: read checkpoint files with ``weights_only=False`` (see `CheckpointFiles`).
    """

    def __init__(self, every_n_steps: int, trust: bool = False) -> None:
        self.every_n_steps = every_n_steps
        self.snapshot: TrainingState | None = None
        self.next_snapshot_step = 0
        self.last_checkpoint_step = -1
        self.files = CheckpointFiles(trust=trust)

    def reset(self) -> None:
        """A new fit: no snapshot, no file written yet, no file known bad."""
        self.snapshot = None
        self.next_snapshot_step = 0
        self.last_checkpoint_step = -1
        self.files.reset()

    def snapshot_due(self, step: int) -> bool:
        return self.every_n_steps > 0 and step >= self.next_snapshot_step

    def postpone(self, step: int) -> None:
        """No snapshot now (the weights were checked only): the next one is due ``every_n_steps`` later."""
        self.next_snapshot_step = step + self.every_n_steps

    def take(
        self,
        trainer: Trainer,
        callbacks: Sequence[Any],
        lr_scale: float,
        label: int | None = None,
        agree: Agree | None = None,
        guard: dict[str, Any] | None = None,
    ) -> None:
        """Snapshot the live state (kept only when finite). ``label``: the step the content is from, after
        a rollback (the restored state becomes the new snapshot). ``agree`` sums flags over the ranks: a
        sharded state is checked shard by shard, so the ranks agree before keeping it. ``guard``: the
        guard's own state (its divergence detector), kept with the snapshot."""
        state = capture(trainer, callbacks, lr_scale=lr_scale, guard=guard)
        if label is not None:
            state.step = label
        bad = not state.finite()
        if state.sharded and agree is not None:
            bad = bool(agree([int(bad)])[0])
        if not bad:
            self.snapshot = state
        self.postpone(trainer.global_step)

    def newest(
        self, trainer: Trainer, own_state_key: str, agree: Agree | None = None
    ) -> TrainingState | None:
        """The snapshot or the newest good checkpoint file, whichever is newer (None: neither). ``agree``:
        see `CheckpointFiles.newest_good`."""
        snap = self.snapshot
        best = snap.step if snap is not None else -1
        if snap is not None and self.last_checkpoint_step <= best:
            return snap  # no file newer than the snapshot was written by this run
        return self.files.newest_good(trainer, best, own_state_key, agree) or snap
