"""Shared base of lightning-clip's callbacks: the namespace base, the cached ``state_key``, the shared step
tracker and the strategy check."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from lightning_clip import _namespace
from lightning_clip.step import Reducer, StepState, StepTracker, share_step_tracker


def _rank_sum(trainer: Any) -> Reducer | None:
    """The sum of a list of floats over the Trainer's ranks, in one collective (None on one process)."""
    if trainer.world_size <= 1:
        return None

    def reduce(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float32, device=trainer.strategy.root_device)
        return [float(v) for v in trainer.strategy.reduce(t, reduce_op="sum").tolist()]

    return reduce


if (
    TYPE_CHECKING
):  # what type checkers see: a Callback of both namespaces (as at run time with both installed)
    import lightning.pytorch as L
    import pytorch_lightning as pl

    from lightning_clip._compat import LightningModule, Trainer

    class CallbackBase(pl.Callback, L.Callback):  # type: ignore[misc, unused-ignore]
        """``Callback`` of every installed Lightning namespace."""

else:
    CallbackBase = _namespace.callback_base()


class LightningClipCallback(CallbackBase):
    """Base of every lightning-clip callback.

    * It is a genuine ``Callback`` of every installed Lightning namespace (``pytorch_lightning`` and
      ``lightning.pytorch``), so either namespace's ``Trainer`` and ``LightningCLI`` accept it.
    * At ``setup`` it refuses a strategy whose gradients it cannot measure
      (`lightning_clip._namespace.strategy_problem`): DeepSpeed, FSDP1's ``FSDPStrategy``, XLA; and a
      layout it cannot measure (`lightning_clip._namespace.sparse_problem`): a sparse parameter, sparse
      gradients under ``ModelParallelStrategy``.
    * `ExplosionGuard` snapshots and restores the ``state_dict`` of every other
      callback of this type, so a rollback also rewinds e.g. the clipping statistics.
    * At ``setup`` the lightning-clip callbacks of a Trainer are handed one
      `StepTracker` (`step_tracker`), so each optimizer step is measured once
      and every callback sees the same `StepState`. Subclasses that override
      ``setup`` call ``super().setup(...)`` first.
    * ``state_key`` is built once from `_state_key_args` and cached: Lightning reads it on every
      hook call (it names the profiler action), and the arguments that define behaviour do not change
      after construction.
    """

    _lc_state_key: str | None = None
    clips: bool = False
    """True for a callback that clips the gradients (`ExplosionGuard`'s advice depends on it)."""
    #: the tracker shared with the other lightning-clip callbacks of the Trainer (set at ``setup``)
    step_tracker: StepTracker | None = None
    _tracker_of: int | None = None  # id() of the Trainer the tracker was attached for

    def _state_key_args(self) -> dict[str, Any]:
        """The arguments that define this callback's behaviour (they name its saved state)."""
        return {}

    @property
    @override
    def state_key(self) -> str:
        if self._lc_state_key is None:
            self._lc_state_key = self._generate_state_key(**self._state_key_args())
        return self._lc_state_key

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        problem = _namespace.strategy_problem(trainer.strategy) or _namespace.sparse_problem(
            trainer.strategy, pl_module
        )
        if problem is not None:
            raise ValueError(f"{type(self).__name__}: {problem}")
        siblings = [cb for cb in trainer.callbacks if isinstance(cb, LightningClipCallback)]  # type: ignore[attr-defined, union-attr, unused-ignore]
        if self not in siblings:  # driven by a wrapper callback: keep the tracker it was given
            if self.step_tracker is None:
                self.step_tracker = StepTracker()
            return
        current = [cb.step_tracker for cb in siblings if cb._tracker_of == id(trainer)]
        tracker = share_step_tracker(siblings, next((t for t in current if t is not None), None))
        tracker.reducer = _rank_sum(trainer)
        for cb in siblings:
            cb._tracker_of = id(trainer)

    def step_state(self, optimizer: Any, step: int) -> StepState:
        """The shared `StepState` of ``optimizer`` (a torch optimizer) at ``step``."""
        if self.step_tracker is None:  # hooks driven without `setup` (e.g. a test calling a hook directly)
            self.step_tracker = StepTracker()
        return self.step_tracker.begin(optimizer, step)

    def before_rollback(self) -> Any:
        """Called by `ExplosionGuard` just before it restores a known-good state into this callback
        (whose ``state_dict`` it also restores): whatever the callback wants to carry across the rollback."""
        return None

    def state_problem(self, state: Any) -> str | None:
        """Why ``state`` (a saved ``state_dict`` of this callback) must not be restored by a rollback (None:
        it may). `ExplosionGuard` asks before anything is restored; the default accepts any state."""
        return None

    def after_rollback(self, memo: Any, kinds: Sequence[str]) -> None:
        """Called by `ExplosionGuard` after the rollback, with `before_rollback`'s ``memo`` and the
        event's kinds (e.g. ``"divergence"``), before the restored state is snapshotted again."""

    def on_new_level(self) -> None:
        """Called by `ExplosionGuard` on the first step after a rollback for a divergence, when the restored,
        known-good state sees the loss at the same new level: the rise is in the data (by design), not in the
        steps; what the callback tightened for it may be undone."""

    @staticmethod
    def _sum_over_ranks(trainer: Trainer, flags: list[int]) -> list[int]:
        """Sum integer ``flags`` over the ranks (one small all-reduce, the same as the step's, `_rank_sum`;
        nothing on a single process), so a decision taken from them is the same on every rank."""
        reduce = _rank_sum(trainer)
        return flags if reduce is None else [round(v) for v in reduce([float(f) for f in flags])]
