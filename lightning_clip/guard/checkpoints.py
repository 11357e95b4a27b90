"""Checkpoint files as rollback sources for `ExplosionGuard`: find, read, rewrite.

* `checkpoint_candidates`: the files the Trainer's ``ModelCheckpoint`` callbacks wrote, newest first.
* `read_state`: one file as a `TrainingState`.
* `CheckpointFiles`: the newest readable, finite file newer than a given step; files found
  unreadable or non-finite are remembered (by path and modification time) and not read again.
* `write_state`: put the live (restored) state into a checkpoint dict about to be written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn

from lightning_clip import _compat
from lightning_clip.exceptions import LightningClipWarning
from lightning_clip.guard.snapshot import TrainingState

__all__ = ["CheckpointFiles", "checkpoint_candidates", "read_state", "write_state"]


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
            extension = getattr(cb, "FILE_EXTENSION", ".ckpt")
            paths.update(os.path.join(dirpath, f) for f in os.listdir(dirpath) if f.endswith(extension))
    return sorted((p for p in paths if os.path.isfile(p)), key=lambda p: (_mtime(p), p), reverse=True)


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def read_state(trainer: pl.Trainer, path: str, own_state_key: str | None = None) -> TrainingState:
    """Read a checkpoint file into a `TrainingState` (raises if unreadable or incomplete).

    ``own_state_key``: the guard's ``state_key``; its saved ``lr_scale`` tells how far the file's learning
    rates were already lowered.
    """
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
        precision=ckpt.get(_compat.precision_checkpoint_key(trainer)),
        callbacks=callbacks,
        lr_scale=float(own.get("lr_scale", 1.0)) if isinstance(own, dict) else 1.0,
        path=os.fspath(path),
    )


class CheckpointFiles:
    """The Trainer's checkpoint files as rollback sources, with a memory of the bad ones."""

    def __init__(self) -> None:
        self._bad: set[tuple[str, int]] = set()

    def reset(self) -> None:
        """Forget the files found bad (a new fit)."""
        self._bad = set()

    def newest_good(self, trainer: pl.Trainer, newer_than: int, own_state_key: str) -> TrainingState | None:
        """The newest readable, finite state saved after step ``newer_than`` and at or before the current
        ``global_step`` (a file from another run into the same folder is passed over), or None.

        A file that cannot be read, is incomplete or holds non-finite values gives a warning (once) and the
        next older file is tried.
        """
        for path in checkpoint_candidates(trainer):
            key = (path, _mtime(path))
            if key[1] < 0 or key in self._bad:
                continue
            try:
                state = read_state(trainer, path, own_state_key)
            except Exception as err:  # unreadable, truncated, incomplete: fall back to an older state
                self._refuse(key, f"is unreadable ({type(err).__name__}: {err})")
                continue
            if state.step > trainer.global_step:
                continue
            if state.step <= newer_than:
                return None
            if not state.finite():
                self._refuse(key, "holds non-finite values")
                continue
            return state
        return None

    def _refuse(self, key: tuple[str, int], why: str) -> None:
        self._bad.add(key)
        rank_zero_warn(
            f"ExplosionGuard: checkpoint {key[0]!r} {why}; falling back to an older good state.",
            category=LightningClipWarning,
        )


def write_state(checkpoint: dict[str, Any], trainer: pl.Trainer, callbacks: Sequence[Any]) -> None:
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
