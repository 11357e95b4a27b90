"""The only place lightning-clip touches private attributes of Lightning or torch.

Each function wraps one private access, and ``tests/callbacks/test_compat.py`` checks every one of them
against the installed versions, so an upgrade that moves an attribute breaks one small, tested module.
This module imports no Lightning at run time (``functional`` uses it too); the Trainer and its parts are
reached through the objects passed in.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "channel_first_modules",
    "force_scaler_skip",
    "gradient_scaler",
    "group_tensors_by_device_and_dtype",
    "log_dir",
    "norm_modules",
    "optimizer_index",
    "precision_checkpoint_key",
    "saved_tensor",
    "saved_value",
    "should_update_logs",
    "steps_inside_amp_scaling",
    "sync_scheduler_last_lr",
    "unwrap_optimizer",
]


# --------------------------------------------------------------------------------------------- torch
def group_tensors_by_device_and_dtype(
    tensors: Sequence[torch.Tensor], with_indices: bool = False
) -> dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[int]]]:
    """``(device, dtype) -> (tensors, their indices in the input)``, in one C++ pass (torch's own helper
    behind the ``foreach`` paths of ``clip_grad_norm_``). Indices are empty unless ``with_indices``."""
    grouped = _group_tensors_by_device_and_dtype([list(tensors)], with_indices=with_indices)
    return {
        key: ([t for t in group if t is not None], list(indices or []))
        for key, ([group], indices) in grouped.items()
    }


def steps_inside_amp_scaling(optimizer: torch.optim.Optimizer) -> bool:
    """True for an optimizer that unscales its gradients inside ``step()`` (fused AdamW/SGD): under a
    GradScaler its gradients are still scaled in ``on_before_optimizer_step``."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def sync_scheduler_last_lr(scheduler: Any) -> None:
    """Make ``scheduler.get_last_lr()`` report the learning rates its optimizer holds now (after the
    learning rates were changed by hand, e.g. multiplied at a rollback)."""
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def force_scaler_skip(scaler: Any, optimizer: Any) -> None:
    """Make ``scaler`` treat this step of ``optimizer`` as an overflow: ``scaler.step`` skips it and
    ``scaler.update`` lowers the scale, exactly as on a rank whose gradients overflowed (DDP: keeps the
    ranks' GradScalers identical when only another rank saw the overflow). Call after ``unscale_``."""
    state = scaler._per_optimizer_states[id(optimizer)]
    for found_inf in state["found_inf_per_device"].values():
        found_inf.fill_(1.0)


def saved_tensor(node: Any, attr: str) -> torch.Tensor | None:
    """The tensor an autograd node saved for backward (``node._saved_result``, ``node._saved_self``), or
    None when it is not there, already freed, or changed in place since the forward."""
    try:
        value = getattr(node, attr)
    except (RuntimeError, AttributeError):
        return None
    return value if isinstance(value, torch.Tensor) else None


def saved_value(node: Any, attr: str, default: float) -> float:
    """A scalar argument an autograd node saved (``node._saved_negative_slope``), or ``default``."""
    try:
        value = getattr(node, attr)
    except (RuntimeError, AttributeError):
        return default
    return float(value) if isinstance(value, (int, float)) else default


def norm_modules() -> tuple[type[torch.nn.Module], ...]:
    """The normalisation layers: every BatchNorm / InstanceNorm (their private base ``_NormBase``),
    LayerNorm, GroupNorm, LocalResponseNorm and RMSNorm."""
    nn = torch.nn
    found: tuple[type[torch.nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    return (*found, nn.LocalResponseNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def channel_first_modules() -> tuple[type[torch.nn.Module], ...]:
    """Layers whose output units sit in dim 1: every convolution (private base ``_ConvNd``),
    BatchNorm / InstanceNorm and GroupNorm."""
    nn = torch.nn
    return (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)


# ----------------------------------------------------------------------------------------- Lightning
def should_update_logs(trainer: Any) -> bool:
    """True on the steps where the Trainer writes logged metrics (``log_every_n_steps``)."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None:
        return True
    return bool(connector.should_update_logs)


def log_dir(trainer: Any) -> str:
    """The run's log directory (the first logger's, else ``default_root_dir``); call on every rank."""
    path = trainer.log_dir
    return os.fspath(path if path is not None else trainer.default_root_dir)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a ``LightningOptimizer`` (manual optimization hands out the wrapper)."""
    return getattr(optimizer, "_optimizer", optimizer)


def optimizer_index(trainer: Any, optimizer: Any) -> int:
    """Index of ``optimizer`` in ``trainer.optimizers`` (unwrapping ``LightningOptimizer``)."""
    raw = unwrap_optimizer(optimizer)
    for i, opt in enumerate(trainer.optimizers):
        if opt is raw:
            return i
    return 0


def gradient_scaler(trainer: Any) -> Any:
    """The precision plugin's ``GradScaler`` (16-mixed), or None."""
    return getattr(trainer.precision_plugin, "scaler", None)


def precision_checkpoint_key(trainer: Any) -> str:
    """The key under which Lightning saves the precision plugin's state in a checkpoint (its class name,
    as ``_CheckpointConnector`` writes it)."""
    return type(trainer.precision_plugin).__qualname__
