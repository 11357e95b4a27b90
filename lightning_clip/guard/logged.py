"""Keep a skipped or rolled-back update out of what the user logs for the epoch.

A step `ExplosionGuard` does not apply (an event: NaN loss, NaN gradients, divergence...) has usually
already been logged by the user's ``training_step`` (``self.log("train_loss", loss, on_epoch=True)``):
Lightning adds it to the epoch's running mean, so the epoch value (``train_loss_epoch``) is NaN, and an
``EarlyStopping`` watching it stops a run that the guard recovered. `LoggedWindow` remembers the epoch
accumulation at the start of each optimizer step's window (its first batch; with gradient accumulation the
window spans several batches) and puts it back at the end of the window when the step was dropped, so the
epoch aggregates count only the updates that were applied. The values logged for the step itself (the
``_step`` keys, ``on_step=True``) are left as they were: they show what happened.

The private access is in `lightning_clip._compat` (`epoch_logged_values`,
`restore_epoch_logged_values`). No state worth saving: a window never spans a checkpoint.
"""

from __future__ import annotations

from typing import Any

from lightning_clip import _compat

__all__ = ["LoggedWindow"]


class LoggedWindow:
    """The epoch accumulation of logged values at the start of the current optimizer step's window.

    Lifecycle: `start_batch` at every ``on_train_batch_start`` (opens a window if none is open),
    `drop` when the window's update is not applied, `end_batch` at every ``on_train_batch_end`` (closes
    the window after a batch that stepped, restoring the accumulation first if the update was dropped).
    """

    def __init__(self) -> None:
        self._saved: dict[str, tuple[Any, Any]] | None = None
        self._drop = False
        #: the logged names whose epoch accumulation was put back, per dropped window: ``(global_step, names)``
        self.dropped: list[tuple[int, list[str]]] = []

    def start_batch(self, trainer: Any) -> None:
        if self._saved is None:
            self._saved = _compat.epoch_logged_values(trainer)

    def drop(self) -> None:
        """The current window's update is not applied: its logged values leave the epoch aggregates."""
        self._drop = True

    def end_batch(self, trainer: Any, stepped: bool) -> None:
        if not stepped:
            return  # accumulating: the window goes on
        if self._drop and self._saved is not None:
            keys = _compat.restore_epoch_logged_values(trainer, self._saved)
            self.dropped.append((int(trainer.global_step), keys))
        self.reset()

    def reset(self) -> None:
        self._saved, self._drop = None, False
