"""Which Lightning is installed, and which strategies lightning-clip can measure: public Lightning names only.

Both Lightning namespaces are supported: ``pytorch_lightning`` and ``lightning.pytorch`` (``import lightning
as L``). They are two separate class hierarchies (``lightning`` ≥ 2.4 also installs ``pytorch-lightning``),
so lightning-clip's callbacks derive from the ``Callback`` of *every* installed namespace
(:func:`callback_base`) and every ``isinstance`` against a Lightning class checks each namespace's class
(:func:`lightning_classes`). Importing this module imports no Lightning: the namespaces are resolved on
first use (:func:`lightning_namespaces`, once per process).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

__all__ = [
    "MISSING_LIGHTNING",
    "NAMESPACES",
    "callback_base",
    "is_tensorboard_logger",
    "lightning_classes",
    "lightning_namespaces",
    "sparse_problem",
    "strategy_problem",
]


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


# -------------------------------------------------------------------------------------- sparse layouts
def _sparse_grad_modules(module: Any) -> list[str]:
    """Qualified names of the submodules that produce sparse gradients (``sparse=True`` embeddings)."""
    return [
        f"{name or '<root>'} ({type(mod).__name__}(sparse=True))"
        for name, mod in module.named_modules()
        if getattr(mod, "sparse", False) is True and type(mod).__name__ in ("Embedding", "EmbeddingBag")
    ]


def sparse_problem(strategy: Any, module: Any) -> str | None:
    """Why lightning-clip cannot measure ``module``'s gradients under ``strategy``, or None when it can.

    Sparse COO gradients (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``) are measured,
    clipped and checked through their coalesced values on a single device and under DDP. Refused: a
    parameter that is itself sparse (not a strided tensor), and sparse gradients under
    ``ModelParallelStrategy`` (sharded parameters hold no sparse gradient lightning-clip can measure).
    The message names the parameter or module and what to use instead.
    """
    import torch  # here: importing this module imports no torch

    for name, p in module.named_parameters():
        if p.layout != torch.strided:
            return (
                f"lightning-clip measures strided parameters (with strided or sparse COO gradients), but"
                f" parameter `{name}` has layout {p.layout}: keep the parameter dense and let a"
                " `sparse=True` embedding produce sparse gradients instead."
            )
    sparse = _sparse_grad_modules(module)
    if sparse and "ModelParallelStrategy" in [cls.__name__ for cls in type(strategy).__mro__]:
        return (
            f"lightning-clip does not measure sparse gradients under `{type(strategy).__name__}`:"
            f" {', '.join(sparse)}. Use `sparse=False` for these modules under sharded training, or train"
            " them with DDP (`strategy='ddp'`), where sparse gradients are supported."
        )
    return None
