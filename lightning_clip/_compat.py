"""The only place lightning-clip touches private attributes of Lightning or torch.

Each function wraps one private access, and ``tests/callbacks/test_compat.py`` checks every one of them
against the installed versions, so an upgrade that moves an attribute breaks one small, tested module.
Importing this module imports no Lightning (``functional`` uses it too): the Lightning namespaces are
resolved on first use, and the Trainer and its parts are
reached through the objects passed in.

Which Lightning namespace (and which strategy) is in use is :mod:`lightning_clip._namespace`'s job: it reads
only public Lightning names.
"""

from __future__ import annotations

import functools
import importlib
import io
import os
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import TypeAlias

    import lightning.pytorch as L
    import pytorch_lightning as pl

    # what the hooks are annotated with: either namespace's Trainer / LightningModule (a hook of a callback
    # deriving from both namespaces' Callback must accept both)
    Trainer: TypeAlias = "pl.Trainer | L.Trainer"
    LightningModule: TypeAlias = "pl.LightningModule | L.LightningModule"

__all__ = [
    "channel_first_modules",
    "child_schedulers",
    "dcp_is_checkpoint_dir",
    "dcp_load",
    "dcp_metadata_filename",
    "epoch_logged_values",
    "force_scaler_skip",
    "gradient_scaler",
    "group_tensors_by_device_and_dtype",
    "is_dtensor",
    "local_tensor",
    "log_dir",
    "logger_step",
    "loss_scale_tensor",
    "norm_modules",
    "optimizer_index",
    "precision_checkpoint_key",
    "replication",
    "restore_epoch_logged_values",
    "saved_tensor",
    "saved_value",
    "should_update_logs",
    "steps_inside_amp_scaling",
    "sync_scheduler_last_lr",
    "unsafe_globals",
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


def child_schedulers(scheduler: Any) -> list[Any]:
    """The schedulers a ``SequentialLR`` or ``ChainedScheduler`` drives (``_schedulers``); empty for others."""
    children = getattr(scheduler, "_schedulers", None)
    return list(children) if isinstance(children, (list, tuple)) else []


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


def logger_step(trainer: Any) -> int:
    """The step the loggers write this training batch's metrics under (``metrics.csv``'s ``step``): the fit
    loop's count of batches that stepped (``_batches_that_stepped``; it counts batches, not optimizer
    steps), else ``global_step``."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    value = getattr(loop, "_batches_that_stepped", None)
    return int(value) if isinstance(value, int) else int(trainer.global_step)


def _epoch_results(trainer: Any) -> dict[str, Any]:
    """The training epoch's logged-value collection (``fit_loop.epoch_loop._results``: key ->
    ``_ResultMetric``), only its tensor values logged with ``on_epoch=True`` (a ``torchmetrics.Metric``
    logged as such keeps its own state)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    results = getattr(loop, "_results", None)
    if results is None:
        return {}
    return {k: m for k, m in results.items() if getattr(m, "is_tensor", False) and m.meta.on_epoch}


def epoch_logged_values(trainer: Any) -> dict[str, tuple[Any, Any]]:
    """What the training epoch has accumulated so far of each tensor value logged with ``on_epoch=True``:
    key -> ``(value, cumulated_batch_size)`` (a mean: the weighted sum and the count; max, min, sum: the
    running value and None). The tensors are referenced, not copied: Lightning's ``_ResultMetric.update``
    replaces them at every ``self.log``, never writes into them."""
    return {
        k: (m.value, getattr(m, "cumulated_batch_size", None)) for k, m in _epoch_results(trainer).items()
    }


def restore_epoch_logged_values(trainer: Any, saved: dict[str, tuple[Any, Any]]) -> list[str]:
    """Put the epoch accumulation of the logged values back to ``saved`` (from `epoch_logged_values`): what
    was logged since no longer counts in the ``on_epoch`` aggregates. A key first logged since goes back to
    its initial state (it stays listed: a later ``self.log`` accumulates from there). The values logged for
    the step itself (``on_step``) are untouched. Returns the names (as logged) put back."""
    restored = []
    for key, metric in _epoch_results(trainer).items():
        if key in saved:
            value, count = saved[key]
            if metric.value is value and (count is None or metric.cumulated_batch_size is count):
                continue  # nothing logged since
            metric.value = value
            if count is not None:
                metric.cumulated_batch_size = count
        else:
            metric.reset()
            metric.has_reset = False  # reset() hides the key from this step's logging too: keep it listed
        metric._computed = None
        restored.append(str(metric.meta.name))
    return restored


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


def loss_scale_tensor(scaler: Any) -> torch.Tensor | None:
    """The GradScaler's current scale as the device tensor it keeps (``_scale``; no host transfer, unlike
    ``get_scale()``), or None before its first ``scale()`` or without a scaler."""
    scale = getattr(scaler, "_scale", None) if scaler is not None else None
    return scale if isinstance(scale, torch.Tensor) else None


def precision_checkpoint_key(trainer: Any) -> str:
    """The key under which Lightning saves the precision plugin's state in a checkpoint (its class name,
    as ``_CheckpointConnector`` writes it)."""
    return type(trainer.precision_plugin).__qualname__


# ------------------------------------------------------------------------------------------ DTensor
def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (a shard of a parameter or gradient under FSDP2 /
    tensor parallelism)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


@functools.cache
def _dtensor_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (the local tensor of a DTensor, sharing its storage), else ``t``.

    Reads ``DTensor._local_tensor``: ``to_local()`` is an autograd function, about 20 µs a call, which adds
    up over hundreds of gradients every step (the result is the same tensor outside autograd)."""
    if not is_dtensor(t):
        return t
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t.to_local()  # type: ignore[attr-defined]


def replication(t: torch.Tensor, world_size: int) -> int | None:
    """How many ranks of the world hold a copy of ``t``'s local part: the ranks outside its device mesh
    times the sizes of the mesh dimensions it is replicated on (``world_size`` for a plain tensor). None
    when a placement is ``Partial`` (the local part is a pending sum, its norm means nothing)."""
    if not is_dtensor(t):
        return world_size
    mesh, placements = t.device_mesh, t.placements  # type: ignore[attr-defined]
    key = (tuple(mesh.shape), tuple(placements), world_size)  # all the answer depends on
    found = _REPLICATION.get(key, -1)
    if found != -1:
        return found
    copies: int | None = world_size // mesh.size()
    for dim, placement in enumerate(placements):
        if placement.is_partial():
            copies = None
            break
        if placement.is_replicate():
            copies = int(copies or 0) * mesh.size(dim)
    _REPLICATION[key] = copies
    return copies


# (mesh shape, placements, world size) -> copies: a model has a handful of distinct layouts
_REPLICATION: dict[tuple[tuple[int, ...], tuple[Any, ...], int], int | None] = {}


# ------------------------------------------------------------------------- safe checkpoint reading
def unsafe_globals(path: str) -> list[str]:
    """The globals a ``torch.save`` file needs beyond torch's ``weights_only`` allowlist (names only;
    nothing is unpickled). Empty when they cannot be listed."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        return []


def dcp_load(
    state: dict[str, Any],
    path: str,
    weights_only: bool = True,
    read_metadata: Callable[[str], Any] | None = None,
) -> None:
    """``torch.distributed.checkpoint.load(state, checkpoint_id=path)`` (in place into ``state``; collective),
    reading with ``weights_only`` semantics unless told otherwise: the ``.metadata`` file through
    ``read_metadata(path)`` (the guard's exact-allowlist reader, which also checks the shard paths; required
    with ``weights_only``), and non-tensor values (e.g. optimizer ``param_groups``) with
    ``torch.load(weights_only=True)``. torch's own reader unpickles both without restriction.

    Raises:
        RuntimeError: on every rank, when any rank failed to read its part (torch raises its
            ``CheckpointException``, a ``BaseException``, on every rank; it is turned into an ``Exception``).
    """
    from torch.distributed.checkpoint.api import CheckpointException

    if weights_only and read_metadata is None:
        raise ValueError("a weights_only read of a distributed checkpoint needs a metadata reader")
    try:
        _dcp_load(state, path, weights_only, read_metadata)
    except CheckpointException as err:  # a BaseException: make it an error a caller can catch as such
        raise RuntimeError(f"reading the distributed checkpoint {path!r} failed: {err}") from err


def _dcp_load(
    state: dict[str, Any], path: str, weights_only: bool, read_metadata: Callable[[str], Any] | None
) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    if not weights_only:
        dcp.load(state, checkpoint_id=path)
        return

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            assert read_metadata is not None  # checked by dcp_load
            metadata = read_metadata(path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    dcp.load(state, storage_reader=SafeReader(path), planner=SafePlanner())


def dcp_is_checkpoint_dir(path: str) -> bool:
    """True for a directory written by ``ModelParallelStrategy.save_checkpoint`` (a distributed checkpoint
    with Lightning's metadata file next to the shards)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, dcp_metadata_filename()))


def dcp_metadata_filename() -> str:
    """The name of the file holding the non-tensor part of a distributed Lightning checkpoint (``meta.pt``)."""
    for ns in ("lightning_fabric", "lightning.fabric"):
        try:
            return str(importlib.import_module(f"{ns}.utilities.load")._METADATA_FILENAME)
        except (ImportError, AttributeError):
            continue
    return "meta.pt"
