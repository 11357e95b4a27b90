"""The only place lightning-clip touches the Trainer's private attributes (tested in
``tests/callbacks/test_trainer_access.py``), so a Lightning upgrade breaks one small module."""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl


def should_update_logs(trainer: pl.Trainer) -> bool:
    """True on the steps where the Trainer writes logged metrics (``log_every_n_steps``)."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None:
        return True
    return bool(connector.should_update_logs)


def log_dir(trainer: pl.Trainer) -> str:
    """The run's log directory (the first logger's, else ``default_root_dir``); call on every rank."""
    path = trainer.log_dir
    return os.fspath(path if path is not None else trainer.default_root_dir)


def optimizer_index(trainer: pl.Trainer, optimizer: Any) -> int:
    """Index of ``optimizer`` in ``trainer.optimizers`` (unwrapping ``LightningOptimizer``)."""
    raw = getattr(optimizer, "_optimizer", optimizer)
    for i, opt in enumerate(trainer.optimizers):
        if opt is raw:
            return i
    return 0


def gradient_scaler(trainer: pl.Trainer) -> Any:
    """The precision plugin's ``GradScaler`` (16-mixed), or None."""
    return getattr(trainer.precision_plugin, "scaler", None)


def force_scaler_skip(scaler: Any, optimizer: Any) -> None:
    """Make ``scaler`` treat this step of ``optimizer`` as an overflow: ``scaler.step`` skips it and
    ``scaler.update`` lowers the scale, exactly as on a rank whose gradients overflowed (DDP: keeps the
    ranks' GradScalers identical when only another rank saw the overflow). Call after ``unscale_``."""
    state = scaler._per_optimizer_states[id(optimizer)]
    for found_inf in state["found_inf_per_device"].values():
        found_inf.fill_(1.0)
