"""The only place lightning-clip touches private attributes of Lightning or torch.

Each function wraps one private access, and ``tests/callbacks/test_compat.py`` checks every one of them
against the installed versions, so an upgrade that moves an attribute breaks one small, tested module.
Importing this module imports no Lightning (``functional`` uses it too): the Lightning namespaces are
resolved on first use (:func:`lightning_namespaces`, once per process), and the Trainer and its parts are
reached through the objects passed in.

Both Lightning namespaces are supported: ``pytorch_lightning`` and ``lightning.pytorch`` (``import lightning
as L``). They are two separate class hierarchies (``lightning`` ≥ 2.4 also installs ``pytorch-lightning``),
so lightning-clip's callbacks derive from the ``Callback`` of *every* installed namespace
(:func:`callback_base`) and every ``isinstance`` against a Lightning class checks each namespace's class
(:func:`lightning_classes`).
"""

from __future__ import annotations

import functools
import importlib
import io
import os
import pickle
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import TypeAlias

    import lightning.pytorch as L
    import pytorch_lightning as pl

    # what the hooks are annotated with: either namespace's Trainer / LightningModule (a hook of a callback
    # deriving from both namespaces' Callback must accept both)
    Trainer: TypeAlias = "pl.Trainer | L.Trainer"
    LightningModule: TypeAlias = "pl.LightningModule | L.LightningModule"

__all__ = [
    "NAMESPACES",
    "callback_base",
    "channel_first_modules",
    "dcp_is_checkpoint_dir",
    "dcp_load",
    "dcp_metadata_filename",
    "force_scaler_skip",
    "gradient_scaler",
    "group_tensors_by_device_and_dtype",
    "is_dtensor",
    "is_tensorboard_logger",
    "lightning_classes",
    "lightning_namespaces",
    "local_tensor",
    "log_dir",
    "norm_modules",
    "optimizer_index",
    "precision_checkpoint_key",
    "replication",
    "saved_tensor",
    "saved_value",
    "should_update_logs",
    "steps_inside_amp_scaling",
    "strategy_problem",
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


# ------------------------------------------------------------------------------ Lightning namespaces
NAMESPACES = ("pytorch_lightning", "lightning.pytorch")
"""The Lightning namespaces lightning-clip works with, in the order their classes are combined."""

MISSING_LIGHTNING = (
    "lightning-clip needs Lightning, and neither `lightning` (import lightning as L) nor `pytorch-lightning`"
    " (import pytorch_lightning as pl) can be imported. Install the one you use, e.g."
    " `pip install 'lightning-clip[lightning]'` or `pip install 'lightning-clip[pytorch-lightning]'`."
)


@functools.cache
def lightning_namespaces() -> dict[str, Any]:
    """The Lightning namespaces that import here (module name -> module), resolved once per process.

    Raises:
        ImportError: neither ``pytorch_lightning`` nor ``lightning.pytorch`` imports; the message names the
            extras to install.
    """
    found: dict[str, Any] = {}
    for name in NAMESPACES:
        try:
            found[name] = importlib.import_module(name)
        except ImportError:
            continue
    if not found:
        raise ImportError(MISSING_LIGHTNING)
    return found


@functools.cache
def callback_base() -> type:
    """The base class of lightning-clip's callbacks: the ``Callback`` of every installed namespace.

    With both namespaces installed it is a class deriving from ``pytorch_lightning.Callback`` *and*
    ``lightning.pytorch.Callback``, so a callback is a genuine ``Callback`` for either namespace's
    ``Trainer`` (2.5.x needs ``isinstance`` to find a parent class), for ``LightningCLI``'s ``class_path``
    checks and for type checkers; with one installed it is that one's ``Callback``.
    """
    bases = tuple(module.Callback for module in lightning_namespaces().values())
    if len(bases) == 1:
        return bases[0]
    return type(
        "CallbackBase",
        bases,
        {"__module__": __name__, "__doc__": "``Callback`` of every installed Lightning namespace."},
    )


@functools.cache
def lightning_classes(path: str) -> tuple[type, ...]:
    """The class at ``path`` (relative to a namespace, e.g. ``"loggers.TensorBoardLogger"``) in every
    installed namespace that has it, for ``isinstance`` checks across namespaces."""
    module_path, _, name = path.rpartition(".")
    found = []
    for ns in lightning_namespaces():
        try:
            cls = getattr(importlib.import_module(f"{ns}.{module_path}"), name)
        except (ImportError, AttributeError):
            continue
        found.append(cls)
    return tuple(found)


def is_tensorboard_logger(logger: Any) -> bool:
    """True for a ``TensorBoardLogger`` of either namespace."""
    return isinstance(logger, lightning_classes("loggers.TensorBoardLogger"))


# ---------------------------------------------------------------------------------------- strategies
# Strategies are told apart by the class names in their MRO: namespace-free, and optional classes
# (DeepSpeed, XLA) need not import. Refused first: DeepSpeedStrategy and XLAStrategy are DDPStrategy subclasses.
_REFUSED_STRATEGIES = {
    "DeepSpeedStrategy": (
        "DeepSpeed owns the optimizer step and, from ZeRO stage 2 on, partitions the gradients outside"
        " `param.grad`, so the callbacks cannot measure or skip the update"
    ),
    "FSDPStrategy": (
        "FSDP1 keeps each rank's shard of flattened parameters, so the gradient norms the callbacks would"
        " read are one shard's, not the model's"
    ),
    "XLAFSDPStrategy": "sharded XLA gradients are not measured (and no TPU test covers them)",
    "XLAStrategy": "no TPU test covers lightning-clip on XLA devices",
}
_SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy", "ModelParallelStrategy")


def strategy_problem(strategy: Any) -> str | None:
    """Why lightning-clip cannot run under ``strategy``, or None when it can (single device, DDP and its
    spawn/fork variants, ``ModelParallelStrategy`` with FSDP2 / tensor parallelism).

    The message names the strategy and what to use instead.
    """
    names = [cls.__name__ for cls in type(strategy).__mro__]
    used = type(strategy).__name__
    advice = (
        " Use `ModelParallelStrategy` with FSDP2 (`torch.distributed.fsdp.fully_shard` in `configure_model`)"
        " for sharded training, or DDP (`strategy='ddp'`)."
    )
    for name, why in _REFUSED_STRATEGIES.items():
        if name in names:
            return f"lightning-clip does not support `{used}`: {why}.{advice}"
    if not any(name in names for name in _SUPPORTED_STRATEGIES):
        return (
            f"lightning-clip does not support `{used}`: it measures gradients under SingleDeviceStrategy,"
            f" DDPStrategy and ModelParallelStrategy only (and their subclasses).{advice}"
        )
    return None


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


# What the `.metadata` file of a torch.distributed.checkpoint directory holds (torch 2.13): DCP's own
# dataclasses, torch.Size, dtypes, layouts by name, and the path of the files. Nothing else is unpickled.
_DCP_METADATA_GLOBALS = {
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}
_DCP_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file, refusing every global outside :data:`_DCP_METADATA_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS or module in _DCP_METADATA_MODULES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"weights_only reading refused `{module}.{name}` in a distributed checkpoint's metadata (outside"
            " what such metadata holds)"
        )


def dcp_load(state: dict[str, Any], path: str, weights_only: bool = True) -> None:
    """``torch.distributed.checkpoint.load(state, checkpoint_id=path)`` (in place into ``state``; collective),
    reading with ``weights_only`` semantics unless told otherwise: the ``.metadata`` file through an
    unpickler limited to DCP's own metadata types, and non-tensor values (e.g. optimizer ``param_groups``)
    with ``torch.load(weights_only=True)``. torch's own reader unpickles both without restriction.

    Raises:
        RuntimeError: on every rank, when any rank failed to read its part (torch raises its
            ``CheckpointException``, a ``BaseException``, on every rank; it is turned into an ``Exception``).
    """
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        _dcp_load(state, path, weights_only)
    except CheckpointException as err:  # a BaseException: make it an error a caller can catch as such
        raise RuntimeError(f"reading the distributed checkpoint {path!r} failed: {err}") from err


def _dcp_load(state: dict[str, Any], path: str, weights_only: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    if not weights_only:
        dcp.load(state, checkpoint_id=path)
        return

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
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
