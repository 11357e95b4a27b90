"""Known-good training states for `ExplosionGuard`: capture, check, restore.

Reading a state from a checkpoint file is `lightning_clip.guard.checkpoints`.

A `TrainingState` holds everything a rollback puts back: the model's ``state_dict``, every
optimizer's and every LR scheduler's ``state_dict``, the precision plugin's state (the GradScaler under
16-mixed) and the ``state_dict`` of the other lightning-clip callbacks. It comes either from the live
Trainer (an in-memory snapshot: every tensor is *copied* to the CPU, so later steps cannot change it)
or from a checkpoint file written by the Trainer's ``ModelCheckpoint``.

Restoring always loads from a fresh copy: ``Optimizer.load_state_dict`` and
``LRScheduler.load_state_dict`` keep references to the tensors they are given.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_clip import _compat
from lightning_clip.functional import norms

__all__ = [
    "TrainingState",
    "all_finite",
    "capture",
    "copy_to_cpu",
    "float_tensors",
    "nonfinite_names",
    "restore",
    "scale_learning_rates",
]


def copy_to_cpu(obj: Any) -> Any:
    """A deep copy of ``obj`` (nested collections) whose tensors are new CPU tensors (``tensor.to("cpu")`` of
    a CPU tensor would be an alias)."""
    return apply_to_collection(obj, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))


def float_tensors(obj: Any) -> list[torch.Tensor]:
    """Every real floating-point tensor inside ``obj`` (nested collections), in order."""
    found: list[torch.Tensor] = []
    apply_to_collection(obj, torch.Tensor, lambda t: found.append(t) if t.is_floating_point() else None)
    return found


def all_finite(obj: Any) -> bool:
    """True when no floating-point tensor inside ``obj`` holds a NaN or Inf (one fused pass)."""
    tensors = float_tensors(obj)
    return bool(norms.all_finite(tensors)) if tensors else True


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]], limit: int = 5) -> list[str]:
    """The first ``limit`` names whose tensor holds a NaN or Inf (event path only)."""
    out = []
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            out.append(name)
            if len(out) >= limit:
                break
    return out


@dataclass
class TrainingState:
    """One known-good state. ``step`` is the ``global_step`` it was taken (or saved) at."""

    step: int
    source: str  # "snapshot" | "checkpoint"
    model: dict[str, Any]
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]
    precision: dict[str, Any] | None
    callbacks: dict[str, Any]
    lr_scale: float = 1.0
    path: str | None = None

    def finite(self) -> bool:
        """No NaN/Inf in the weights nor in the optimizer states."""
        return all_finite(self.model) and all_finite(self.optimizers)


def capture(trainer: pl.Trainer, callbacks: Sequence[Any] = (), lr_scale: float = 1.0) -> TrainingState:
    """Copy the live training state to the CPU, with the ``state_dict`` of ``callbacks`` (by ``state_key``)."""
    module = trainer.lightning_module
    saved_callbacks = {cb.state_key: copy_to_cpu(cb.state_dict()) for cb in callbacks}
    precision = trainer.precision_plugin.state_dict()
    return TrainingState(
        step=trainer.global_step,
        source="snapshot",
        model=copy_to_cpu(module.state_dict()),
        optimizers=[copy_to_cpu(opt.state_dict()) for opt in trainer.optimizers],
        schedulers=[copy_to_cpu(cfg.scheduler.state_dict()) for cfg in trainer.lr_scheduler_configs],
        precision=copy_to_cpu(precision) if precision else None,
        callbacks=saved_callbacks,
        lr_scale=lr_scale,
    )


def restore(trainer: pl.Trainer, state: TrainingState, callbacks: Sequence[Any] = ()) -> None:
    """Load ``state`` into the live Trainer: model, optimizers, schedulers, precision plugin, ``callbacks``.

    Every piece is loaded from a fresh copy, so ``state`` stays valid for a later rollback.
    """
    strategy = trainer.strategy
    strategy.load_model_state_dict({"state_dict": state.model}, strict=True)  # copies into the parameters
    if len(state.optimizers) != len(trainer.optimizers):
        raise ValueError(
            f"the saved state has {len(state.optimizers)} optimizer(s), the Trainer {len(trainer.optimizers)}"
        )
    for opt, saved in zip(trainer.optimizers, state.optimizers, strict=True):
        opt.load_state_dict(copy_to_cpu(saved))  # casts the state to each parameter's device and dtype
    for cfg, saved in zip(trainer.lr_scheduler_configs, state.schedulers, strict=True):
        cfg.scheduler.load_state_dict(copy_to_cpu(saved))
    if state.precision:
        trainer.precision_plugin.load_state_dict(copy_to_cpu(state.precision))
    for cb in callbacks:
        saved_cb = state.callbacks.get(cb.state_key)
        if saved_cb is not None:
            cb.load_state_dict(copy_to_cpu(saved_cb))


def scale_learning_rates(trainer: pl.Trainer, factor: float) -> None:
    """Multiply every learning rate by ``factor``: the optimizers' param groups (``lr`` and the schedule
    anchors ``initial_lr``, ``max_lr``, ``min_lr``) and the schedulers' ``base_lrs``, so a schedule goes on
    from the lowered value."""
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
        _compat.sync_scheduler_last_lr(sched)
