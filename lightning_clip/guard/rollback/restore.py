"""Stage 5 of a rollback: put a validated state into the live run, then lower the learning rates and
bring step-interval LR schedulers back to where the run is.

`restore` loads the model, every optimizer, every LR scheduler, the precision plugin (GradScaler) and
the other lightning-clip callbacks; `scale_learning_rates` multiplies every learning rate (``lr_factor``);
`schedule_positions` / `fast_forward` step each step-interval scheduler (not ``ReduceLROnPlateau``) as many
times as it had stepped since the restored state was taken, so the schedule ends on time. `write_state`
puts the live state into a checkpoint about to be written.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lightning_clip import _compat
from lightning_clip.guard.snapshot import TrainingState, copy_to_cpu, materialize

if TYPE_CHECKING:
    from lightning_clip._compat import Trainer

__all__ = ["fast_forward", "restore", "scale_learning_rates", "schedule_positions", "write_state"]


def restore(trainer: Trainer, state: TrainingState, callbacks: Sequence[Any] = ()) -> None:
    """Load ``state`` into the live Trainer: model, optimizers, schedulers, precision plugin, ``callbacks``.

    Every piece is loaded from a fresh copy, so ``state`` stays valid for a later rollback (``Optimizer`` and
    ``LRScheduler.load_state_dict`` keep references to the tensors they are given).
    """
    strategy = trainer.strategy
    device = strategy.root_device
    if state.sharded:  # ModelParallelStrategy.load_model_state_dict is a no-op: load into the module
        trainer.lightning_module.load_state_dict(materialize(state.model, device), strict=True)
    else:
        strategy.load_model_state_dict({"state_dict": state.model}, strict=True)  # copies into the parameters
    for opt, saved in zip(trainer.optimizers, state.optimizers, strict=True):
        opt.load_state_dict(
            materialize(saved, device)
        )  # casts the state to each parameter's device and dtype
    configs: list[Any] = list(trainer.lr_scheduler_configs)
    for cfg, saved in zip(configs, state.schedulers, strict=True):
        cfg.scheduler.load_state_dict(copy_to_cpu(saved))
    if state.precision:
        trainer.precision_plugin.load_state_dict(copy_to_cpu(state.precision))
    for cb in callbacks:
        saved_cb = state.callbacks.get(cb.state_key)
        if saved_cb is not None:
            cb.load_state_dict(copy_to_cpu(saved_cb))


def _schedulers(sched: Any) -> list[Any]:
    """``sched`` and the schedulers it drives (``SequentialLR``, ``ChainedScheduler``)."""
    return [sched, *(s for child in _compat.child_schedulers(sched) for s in _schedulers(child))]


def scale_learning_rates(trainer: Trainer, factor: float) -> None:
    """Multiply every learning rate by ``factor``: the optimizers' param groups (``lr`` and the schedule
    anchors ``initial_lr``, ``max_lr``, ``min_lr``) and the schedulers' ``base_lrs`` (those of the schedulers
    a ``SequentialLR`` drives too), so a schedule goes on from the lowered value."""
    if factor == 1.0:
        return
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                if key in group:
                    value = group[key]
                    group[key] = value.mul_(factor) if isinstance(value, torch.Tensor) else value * factor
    for cfg in trainer.lr_scheduler_configs:
        for sched in _schedulers(cfg.scheduler):
            if hasattr(sched, "base_lrs"):
                sched.base_lrs = [b * factor for b in sched.base_lrs]
            _compat.sync_scheduler_last_lr(sched)


def _steppable(cfg: Any) -> bool:
    return cfg.interval == "step" and not cfg.reduce_on_plateau and hasattr(cfg.scheduler, "last_epoch")


def schedule_positions(trainer: Trainer) -> list[int | None]:
    """How many times each step-interval LR scheduler has stepped (None for the others)."""
    return [
        int(cfg.scheduler.last_epoch) if _steppable(cfg) else None for cfg in trainer.lr_scheduler_configs
    ]


def fast_forward(trainer: Trainer, positions: Sequence[int | None]) -> int:
    """Step each step-interval scheduler until it is back at its position in ``positions`` (taken just
    before the restore); epoch-interval and ``ReduceLROnPlateau`` schedulers keep their restored state.
    Returns the number of scheduler steps taken."""
    taken = 0
    with warnings.catch_warnings():
        # torch warns when a scheduler steps before its optimizer did (a rollback at the first steps)
        warnings.filterwarnings("ignore", message=r".*lr_scheduler\.step\(\)", category=UserWarning)
        configs: list[Any] = list(trainer.lr_scheduler_configs)
        for cfg, target in zip(configs, positions, strict=True):
            if target is None or not _steppable(cfg):
                continue
            for _ in range(max(0, target - int(cfg.scheduler.last_epoch))):
                cfg.scheduler.step()
                taken += 1
    return taken


def write_state(checkpoint: dict[str, Any], trainer: Trainer, callbacks: Sequence[Any]) -> None:
    """Overwrite the training state inside ``checkpoint`` (about to be written by the Trainer) with the live
    one: model, and when the checkpoint holds them, optimizers, schedulers, precision plugin and the
    ``state_dict`` of ``callbacks``."""
    checkpoint["state_dict"] = trainer.strategy.lightning_module_state_dict()
    if "optimizer_states" in checkpoint:
        checkpoint["optimizer_states"] = [trainer.strategy.optimizer_state(o) for o in trainer.optimizers]
        checkpoint["lr_schedulers"] = [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs]
        precision = trainer.precision_plugin.state_dict()
        if precision:
            checkpoint[_compat.precision_checkpoint_key(trainer)] = precision
    if "callbacks" in checkpoint:
        for cb in callbacks:
            checkpoint["callbacks"][cb.state_key] = cb.state_dict()
