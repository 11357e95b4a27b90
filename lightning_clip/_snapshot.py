"""Known-good training states for :class:`~lightning_clip.ExplosionGuard`: capture, check, restore.

A :class:`TrainingState` holds everything a rollback puts back: the model's ``state_dict``, every
optimizer's and every LR scheduler's ``state_dict``, the precision plugin's state (the GradScaler under
16-mixed) and the ``state_dict`` of the other lightning-clip callbacks. It comes either from the live
Trainer (an in-memory snapshot: every tensor is *copied* to the CPU, so later steps cannot change it)
or from a checkpoint file written by the Trainer's ``ModelCheckpoint``.

Restoring always loads from a fresh copy: ``Optimizer.load_state_dict`` and
``LRScheduler.load_state_dict`` keep references to the tensors they are given.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_clip import functional as F
from lightning_clip.callbacks._base import LightningClipCallback

__all__ = ["TrainingState", "capture", "checkpoint_candidates", "from_checkpoint", "restore"]


def copy_to_cpu(obj: Any) -> Any:
    """A deep copy of ``obj`` (nested dicts, lists, tuples) whose tensors are new CPU tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: copy_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [copy_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(copy_to_cpu(v) for v in obj)
    return obj  # numbers, strings, None: immutable


def _float_tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _float_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _float_tensors(v)


def all_finite(obj: Any) -> bool:
    """True when no floating-point tensor inside ``obj`` holds a NaN or Inf (one fused pass)."""
    tensors = [t for t in _float_tensors(obj) if not t.is_complex()]
    return bool(F.all_finite(tensors)) if tensors else True


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
    extra: dict[str, Any] = field(default_factory=dict)

    def finite(self) -> bool:
        """No NaN/Inf in the weights nor in the optimizer states."""
        return all_finite(self.model) and all_finite(self.optimizers)


def _lc_callbacks(trainer: pl.Trainer, exclude: Any) -> list[LightningClipCallback]:
    return [cb for cb in trainer.callbacks if isinstance(cb, LightningClipCallback) and cb is not exclude]  # type: ignore[attr-defined]


def capture(trainer: pl.Trainer, exclude: Any = None, lr_scale: float = 1.0) -> TrainingState:
    """Copy the live training state to the CPU (``exclude``: the calling callback, not snapshotted)."""
    module = trainer.lightning_module
    callbacks = {cb.state_key: copy_to_cpu(cb.state_dict()) for cb in _lc_callbacks(trainer, exclude)}
    precision = trainer.precision_plugin.state_dict()
    return TrainingState(
        step=trainer.global_step,
        source="snapshot",
        model=copy_to_cpu(module.state_dict()),
        optimizers=[copy_to_cpu(opt.state_dict()) for opt in trainer.optimizers],
        schedulers=[copy_to_cpu(cfg.scheduler.state_dict()) for cfg in trainer.lr_scheduler_configs],
        precision=copy_to_cpu(precision) if precision else None,
        callbacks=callbacks,
        lr_scale=lr_scale,
    )


def from_checkpoint(trainer: pl.Trainer, path: str, own_state_key: str | None = None) -> TrainingState:
    """Read a checkpoint file into a :class:`TrainingState` (raises if unreadable or incomplete)."""
    ckpt = trainer.strategy.load_checkpoint(path, weights_only=False)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "optimizer_states" not in ckpt:
        raise ValueError(f"{path} holds no full training state (saved with `save_weights_only=True`?)")
    callbacks = dict(ckpt.get("callbacks", {}))
    own = callbacks.get(own_state_key, {}) if own_state_key is not None else {}
    return TrainingState(
        step=int(ckpt.get("global_step", -1)),
        source="checkpoint",
        model=ckpt["state_dict"],
        optimizers=list(ckpt["optimizer_states"]),
        schedulers=list(ckpt.get("lr_schedulers", [])),
        precision=ckpt.get(type(trainer.precision_plugin).__qualname__),
        callbacks=callbacks,
        lr_scale=float(own.get("lr_scale", 1.0)) if isinstance(own, dict) else 1.0,
        path=os.fspath(path),
    )


def restore(trainer: pl.Trainer, state: TrainingState, exclude: Any = None) -> None:
    """Load ``state`` into the live Trainer: model, optimizers, schedulers, precision plugin, callbacks.

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
    for cb in _lc_callbacks(trainer, exclude):
        saved_cb = state.callbacks.get(cb.state_key)
        if saved_cb is not None:
            cb.load_state_dict(copy_to_cpu(saved_cb))


def checkpoint_candidates(trainer: pl.Trainer) -> list[str]:
    """Checkpoint files of the Trainer's ``ModelCheckpoint`` callbacks, newest (by mtime) first."""
    paths: set[str] = set()
    for cb in trainer.checkpoint_callbacks:
        for attr in ("best_model_path", "last_model_path"):
            p = getattr(cb, attr, "")
            if p:
                paths.add(os.fspath(p))
        paths.update(os.fspath(p) for p in getattr(cb, "best_k_models", {}))
        dirpath = getattr(cb, "dirpath", None)
        if dirpath and os.path.isdir(dirpath):
            paths.update(
                os.path.join(dirpath, f)
                for f in os.listdir(dirpath)
                if f.endswith(getattr(cb, "FILE_EXTENSION", ".ckpt"))
            )
    existing = [p for p in paths if os.path.isfile(p)]

    def mtime(p: str) -> int:
        try:
            return os.stat(p).st_mtime_ns
        except OSError:
            return -1

    return sorted(existing, key=lambda p: (mtime(p), p), reverse=True)
