r"""Known-good training states for `ExplosionGuard`: capture and check.

Reading a state from a checkpoint file, validating and restoring it is `lightning_clip.guard.rollback`.

A `TrainingState` holds everything a rollback puts back: the model's ``state_dict``, every
optimizer's and every LR scheduler's ``state_dict``, the precision plugin's state (the GradScaler under
16-mixed) and the ``state_dict`` of the other lightning-clip callbacks. It comes either from the live
Trainer (an in-memory snapshot: every tensor is *copied* to the CPU, so later steps cannot change it)
or from a checkpoint file written by the Trainer's ``ModelCheckpoint``.

Restoring (`lightning_clip.guard.rollback.restore`) always loads from a fresh copy:
``Optimizer.load_state_dict`` and ``LRScheduler.load_state_dict`` keep references to the tensors they are
given.

Sharded training (FSDP2 / tensor parallelism under ``ModelParallelStrategy``): parameters and optimizer
states are ``DTensor`` shards. Each rank copies only its own shards (:class:`LocalShard`: the local tensor
on the CPU plus what rebuilds the ``DTensor``), so a snapshot costs each rank about
``(1 + k) × parameter bytes / shards`` of CPU memory (``k`` optimizer state tensors per parameter, 2 for
Adam). Restoring rebuilds the ``DTensor``\ s and loads them into the module directly:
``ModelParallelStrategy.load_model_state_dict`` does nothing (it expects its own ``load_checkpoint``).
Finite checks look at local shards; the guard reduces them over the ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_clip import _compat
from lightning_clip.functional import norms

if TYPE_CHECKING:
    from lightning_clip._compat import Trainer

__all__ = [
    "LocalShard",
    "TrainingState",
    "all_finite",
    "capture",
    "copy_to_cpu",
    "float_tensors",
    "materialize",
    "nbytes",
    "nonfinite_names",
]


class LocalShard:
    """A CPU copy of this rank's shard of a ``DTensor`` and what rebuilds the ``DTensor`` from it."""

    __slots__ = ("local", "mesh", "placements", "shape", "stride")

    def __init__(self, t: torch.Tensor) -> None:
        self.local = t.to_local().detach().to("cpu", copy=True)  # type: ignore[attr-defined]
        self.mesh = t.device_mesh  # type: ignore[attr-defined]
        self.placements = tuple(t.placements)  # type: ignore[attr-defined]
        self.shape = t.shape
        self.stride = t.stride()

    def copy(self) -> LocalShard:
        out = object.__new__(LocalShard)
        out.local = self.local.clone()
        out.mesh, out.placements, out.shape, out.stride = self.mesh, self.placements, self.shape, self.stride
        return out

    def to_dtensor(self, device: torch.device | str) -> torch.Tensor:
        """A new ``DTensor`` on ``device`` holding a copy of the shard."""
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            self.local.to(device, copy=True),
            self.mesh,
            self.placements,
            run_check=False,
            shape=self.shape,
            stride=self.stride,
        )


def _map(obj: Any, fn: Any) -> Any:
    """``fn`` applied to every tensor and :class:`LocalShard` inside nested collections."""
    return apply_to_collection(obj, (torch.Tensor, LocalShard), fn)


def _copy(t: Any) -> Any:
    if isinstance(t, LocalShard):
        return t.copy()
    if _compat.is_dtensor(t):
        return LocalShard(t)
    return t.detach().to("cpu", copy=True)


def copy_to_cpu(obj: Any) -> Any:
    """A deep copy of ``obj`` (nested collections) whose tensors are new CPU tensors (``tensor.to("cpu")`` of
    a CPU tensor would be an alias); a ``DTensor`` becomes a :class:`LocalShard` (this rank's shard only)."""
    return _map(obj, _copy)


def materialize(obj: Any, device: torch.device | str) -> Any:
    """A copy of ``obj`` ready to load: every :class:`LocalShard` rebuilt as a new ``DTensor`` on
    ``device``, every tensor a new CPU tensor (``load_state_dict`` casts it to the parameter's device)."""
    return _map(obj, lambda t: t.to_dtensor(device) if isinstance(t, LocalShard) else _copy(t))


def _local(t: Any) -> torch.Tensor:
    return t.local if isinstance(t, LocalShard) else _compat.local_tensor(t)


def _inexact(t: torch.Tensor) -> bool:
    """A tensor that can hold a NaN or Inf: floating point or complex."""
    return t.is_floating_point() or t.is_complex()


def float_tensors(obj: Any) -> list[torch.Tensor]:
    """Every floating-point or complex tensor inside ``obj`` (nested collections; of a ``DTensor`` or
    :class:`LocalShard`, the local shard), in order."""
    found: list[torch.Tensor] = []
    _map(obj, lambda t: found.append(_local(t)) if _inexact(_local(t)) else None)
    return found


def nbytes(obj: Any) -> int:
    """Bytes held by the tensors inside ``obj`` (local shards only)."""
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        local = _local(t)
        total += local.numel() * local.element_size()

    _map(obj, add)
    return total


def all_finite(obj: Any) -> bool:
    """True when no floating-point or complex tensor inside ``obj`` holds a NaN or Inf (one fused pass; local
    shards)."""
    tensors = float_tensors(obj)
    return bool(norms.all_finite(tensors)) if tensors else True


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]], limit: int = 5) -> list[str]:
    """The first ``limit`` names whose tensor holds a NaN or Inf (event path only)."""
    out = []
    for name, t in named:
        t = _local(t)
        if _inexact(t) and not bool(norms.all_finite([t])):
            out.append(name)
            if len(out) >= limit:
                break
    return out


@dataclass
class TrainingState:
    """One known-good state. ``step`` is the ``global_step`` it was taken (or saved) at; ``guard`` the
    guard's own ``state_dict`` at that time (its divergence detector is rewound from it), when known."""

    step: int
    source: str  # "snapshot" | "checkpoint"
    model: dict[str, Any]
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]
    precision: dict[str, Any] | None
    callbacks: dict[str, Any]
    lr_scale: float = 1.0
    path: str | None = None
    guard: dict[str, Any] | None = None

    def finite(self) -> bool:
        """No NaN/Inf in the weights nor in the optimizer states (this rank's shards, when sharded)."""
        return all_finite(self.model) and all_finite(self.optimizers)

    @property
    def sharded(self) -> bool:
        """True when the state holds ``DTensor`` shards (FSDP2 / tensor parallelism)."""
        return any(isinstance(v, LocalShard) for v in self.model.values())

    def nbytes(self) -> int:
        """CPU bytes of the model and optimizer states held here (this rank's shards, when sharded)."""
        return nbytes(self.model) + nbytes(self.optimizers)


def capture(
    trainer: Trainer,
    callbacks: Sequence[Any] = (),
    lr_scale: float = 1.0,
    guard: dict[str, Any] | None = None,
) -> TrainingState:
    """Copy the live training state to the CPU, with the ``state_dict`` of ``callbacks`` (by ``state_key``)
    and the ``guard``'s own state."""
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
        guard=copy_to_cpu(guard) if guard is not None else None,
    )
