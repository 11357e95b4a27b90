"""One measurement of the gradients per optimizer step, shared by every lightning-clip callback.

Whichever callback asks first reads the gradients (one fused ``_foreach_norm`` pass); the others get the
same object, so the gradients are measured once per step whatever the number of callbacks, and every
callback sees the pre-clip figures whatever their order in the Trainer's list. No Lightning import.

The step's single device-to-host transfer carries the total norm and every scalar a callback asked to
bring along (:func:`ride_along`, e.g. ``ExplosionGuard``'s loss), whichever callback reads first.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_clip import functional as F

__all__ = ["StepMeasurement", "mark_skipped", "measure_step", "optimizer_params", "ride_along"]


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter of ``optimizer``, in param-group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


@dataclass
class _Riders:
    """Scalars fetched with the step's norm (shared by every measurement of a step)."""

    providers: dict[str, Callable[[], torch.Tensor | None]] = field(default_factory=dict)
    values: dict[str, float] | None = None


@dataclass
class _StepScale:
    """The factor the step's gradients have been scaled by so far (shared by every measurement of a step)."""

    value: float = 1.0


@dataclass
class StepMeasurement:
    """The gradients of one optimizer at one step, and their pre-clip norms.

    Attributes:
        params: the optimizer's parameters that have a gradient, in order.
        grads: their gradients (the same tensors the optimizer will read).
        total: float32 0-d tensor, the total p-norm (on the gradients' device).
        per_param: float32 1-D tensor, one p-norm per entry of ``params``.
        norm_type: the p.
        skipped: set by a callback that removed the gradients (the update will not be applied).

    Several clipping callbacks share one measurement: :meth:`clip_` scales the gradients only as far as
    needed to bring them from their current norm to a bound, so the final norm is the smallest bound
    whatever the callbacks' order, and every callback sees the same pre-clip figures.
    """

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    total: torch.Tensor
    per_param: torch.Tensor
    norm_type: float
    skipped: bool = False
    _host_total: float | None = field(default=None, repr=False)
    _scale: _StepScale = field(default_factory=_StepScale, repr=False)
    _riders: _Riders = field(default_factory=_Riders, repr=False)

    @property
    def total_norm(self) -> float:
        """The total norm as a Python float: the step's single device-to-host transfer, cached.

        The scalars registered with :func:`ride_along` come to the host in the same transfer.
        """
        if self._host_total is None:
            riders = self._riders
            if riders.values is None and riders.providers:
                keys, tensors = [], [self.total.float().reshape(())]
                for key, provider in riders.providers.items():
                    t = provider()
                    if t is not None:
                        keys.append(key)
                        tensors.append(t.detach().float().reshape(()).to(self.total.device))
                values = torch.stack(tensors).tolist()
                riders.values = dict(zip(keys, values[1:], strict=True))
                self._host_total = float(values[0])
            else:
                self._host_total = float(self.total.item())
        return self._host_total

    def rider(self, key: str) -> float | None:
        """The host value of the scalar registered under ``key`` with :func:`ride_along`, or None when
        it was not registered before this step was measured (or its provider gave None)."""
        if self._host_total is None:
            _ = self.total_norm
        values = self._riders.values
        return None if values is None else values.get(key)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.total_norm)

    @property
    def scale(self) -> float:
        """The factor the gradients have been scaled by since they were measured (1.0: untouched)."""
        return self._scale.value

    def clip_(self, max_norm: float, eps: float = F.EPS) -> float:
        """Bring the gradients' total norm down to ``max_norm`` if their pre-clip norm exceeds it.

        Writes the gradients only when the bound is tighter than every bound applied before at this step
        (one fused multiply per device and dtype); nothing is written when the norm is not finite or the
        update is ``skipped``.

        Returns:
            The coefficient this bound asks for relative to the pre-clip norm, ``min(1, max_norm / (norm +
            eps))`` (``1.0`` when nothing needs clipping, the norm is not finite or the step is skipped).
        """
        norm = self.total_norm
        if self.skipped or not math.isfinite(norm) or norm <= max_norm:
            return 1.0
        coef = max_norm / (norm + eps)
        if coef >= 1.0:
            return 1.0
        current = self._scale.value
        if coef < current:
            F.scale_grads_(self.grads, coef / current)
            self._scale.value = coef
        return coef

    def nonfinite_indices(self) -> list[int]:
        """Indices into ``params`` whose gradient holds a NaN or Inf (only call when not ``finite``)."""
        return torch.nonzero(~torch.isfinite(self.per_param)).flatten().tolist()


def _measure(
    optimizer: torch.optim.Optimizer, norm_type: float, scale: _StepScale, riders: _Riders
) -> StepMeasurement:
    params = [p for p in optimizer_params(optimizer) if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]
    total, per_param = F.grad_norms(grads, norm_type)
    if scale.value != 1.0:  # measured after a clip at this step: report the pre-clip figures
        total, per_param = total / scale.value, per_param / scale.value
    return StepMeasurement(params, grads, total, per_param, norm_type, _scale=scale, _riders=riders)


# owner (the Trainer) -> (step key, {norm_type: measurement}); weak so a finished Trainer frees it.
_CACHE: weakref.WeakKeyDictionary[Any, tuple[tuple[int, int], dict[float, StepMeasurement]]] = (
    weakref.WeakKeyDictionary()
)


def measure_step(
    owner: Any, optimizer: torch.optim.Optimizer, step: int, norm_type: float = 2.0
) -> StepMeasurement:
    """The measurement of ``optimizer``'s gradients at ``step``, computed once and shared.

    Args:
        owner: the object the cache is attached to (the Trainer); weakly referenced.
        optimizer: the optimizer about to step.
        step: a counter unique to this optimizer step (the Trainer's ``global_step``).
        norm_type: the p of the norms; each distinct p costs one pass.
    """
    key = (id(optimizer), step)
    entry = _CACHE.get(owner)
    if entry is None or entry[0] != key:
        entry = (key, {})
        _CACHE[owner] = entry
    by_p = entry[1]
    found = by_p.get(norm_type)
    if found is None:
        siblings = list(by_p.values())
        if siblings:
            scale, riders = siblings[0]._scale, siblings[0]._riders
        else:
            scale, riders = _StepScale(), _Riders(_RIDERS.pop(owner, {}))
        found = _measure(optimizer, norm_type, scale, riders)
        if siblings:  # a measurement with another p exists: keep its skip decision
            found.skipped = any(m.skipped for m in siblings)
        by_p[norm_type] = found
    return found


# owner (the Trainer) -> {key: provider} waiting for the next measurement
_RIDERS: weakref.WeakKeyDictionary[Any, dict[str, Callable[[], torch.Tensor | None]]] = (
    weakref.WeakKeyDictionary()
)


def ride_along(owner: Any, key: str, provider: Callable[[], torch.Tensor | None]) -> None:
    """Ask for a scalar to come to the host with the next measurement's norm (one transfer for both).

    ``provider`` is called when the transfer happens (so it sees in-place changes made until then) and
    returns a 0-d tensor, or None for nothing. Read the value with :meth:`StepMeasurement.rider`.
    """
    _RIDERS.setdefault(owner, {})[key] = provider


def mark_skipped(owner: Any, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Record that the update of ``optimizer`` at ``step`` will not be applied."""
    entry = _CACHE.get(owner)
    if entry is not None and entry[0] == (id(optimizer), step):
        for m in entry[1].values():
            m.skipped = True
