"""Clipping: the coefficient that brings a norm down to a bound, and fused in-place scaling. Imports torch only.

As in ``torch.nn.utils``, measuring (`grad_norms`) and applying
(`clip_grads_`) are separate, so a caller decides on the host from a norm it already has.

Examples:
    >>> import torch
    >>> g = [torch.tensor([3.0, 4.0])]
    >>> clip_grads_(g, max_norm=1.0, total=5.0, eps=0.0)
    0.2
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lightning_clip._compat import group_tensors_by_device_and_dtype, is_dtensor, local_tensor
from lightning_clip.functional.norms import dense_values, plain_strided

__all__ = ["EPS", "PerTensorScaler", "clip_coef", "clip_grads_", "scale_grads_"]

EPS = 1e-6
"""Added to the norm in the clip coefficient, as in ``torch.nn.utils.clip_grad_norm_``."""


def clip_coef(total: torch.Tensor | float, max_norm: torch.Tensor | float, eps: float = EPS) -> torch.Tensor:
    """``min(1, max_norm / (total + eps))``: the factor that brings a norm ``total`` down to ``max_norm``.

    Examples:
        >>> float(clip_coef(torch.tensor(10.0), 5.0, eps=0.0))
        0.5
        >>> float(clip_coef(torch.tensor(1.0), 5.0))
        1.0
    """
    total = torch.as_tensor(total, dtype=torch.float32)
    return torch.clamp(torch.as_tensor(max_norm, dtype=torch.float32) / (total + eps), max=1.0)


def scale_grads_(tensors: Sequence[torch.Tensor], coef: torch.Tensor | float) -> None:
    """Multiply every tensor in place by ``coef`` (a Python number or a 0-d tensor) in fused passes.

    A Python number is passed to ``_foreach_mul_`` as a 0-d float32 tensor: on the CPU the scalar
    overload falls back to one kernel per tensor and costs about 3× as much (2000 tensors: 3.6 ms against
    1.2 ms, ``benchmarks/clip_step.py``). Sharded tensors (``DTensor``) are scaled through their local
    shards, with no communication; sparse COO tensors through their stored values (uncoalesced: scaling is
    linear).
    """
    if len(tensors) == 0:
        return
    if not isinstance(coef, torch.Tensor):
        coef = torch.tensor(float(coef), dtype=torch.float32)
    if not plain_strided(tensors):
        tensors = [dense_values(local_tensor(t), coalesce=False) for t in tensors]
    grouped = group_tensors_by_device_and_dtype(tensors)
    for (device, _), (group, _) in grouped.items():
        torch._foreach_mul_(group, coef.to(device))


def clip_grads_(tensors: Sequence[torch.Tensor], max_norm: float, total: float, eps: float = EPS) -> float:
    """Scale ``tensors`` so their total norm ``total`` (already measured) becomes ``max_norm``.

    Host-side decision: nothing is written when ``total <= max_norm`` or ``total`` is not finite. The
    coefficient is ``max_norm / (total + eps)``, as in ``torch.nn.utils.clip_grad_norm_``.

    Returns:
        The coefficient applied (``1.0`` when nothing was written).

    Raises:
        ValueError: ``max_norm`` is negative or NaN (it would flip or poison the gradients).

    Examples:
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> clip_grads_(g, max_norm=1.0, total=5.0, eps=0.0)
        0.2
        >>> g[0].tolist()
        [0.6000000238418579, 0.800000011920929]
    """
    if not max_norm >= 0.0:
        raise ValueError(f"`max_norm` must be a number >= 0 or inf, got {max_norm!r}.")
    if not math.isfinite(total) or total <= max_norm:
        return 1.0
    coef = max_norm / (total + eps)
    if coef >= 1.0:
        return 1.0
    scale_grads_(tensors, coef)
    return coef


class PerTensorScaler:
    """Multiplies each tensor by its own coefficient (a device vector) in one fused ``_foreach_mul_``.

    ``_foreach_mul_`` takes the per-tensor scalars as a list of 0-d tensors; they are views of one buffer
    made once (unbinding a vector of 2,000 entries costs about as much as the multiply itself), so each step
    only copies the coefficients into the buffer. No host read. Sharded tensors (``DTensor``) are scaled
    through their local shards, with no communication.

    Examples:
        >>> scaler = PerTensorScaler()
        >>> grads = [torch.ones(2), torch.ones(3)]
        >>> scaler.scale_(grads, torch.tensor([0.5, 0.25]))
        >>> [g.tolist() for g in grads]
        [[0.5, 0.5], [0.25, 0.25, 0.25]]
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._views: tuple[torch.Tensor, ...] = ()
        # (count, device, all on that device, sharded): the gradients' layout, checked when the count changes
        self._layout: tuple[int, torch.device, bool, bool] | None = None

    def _views_for(self, count: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        if self._buffer is None or self._buffer.numel() < count or self._buffer.device != device:
            self._buffer = torch.ones(count, dtype=torch.float32, device=device)
            self._views = self._buffer.unbind()
        return self._views

    def scale_(self, tensors: list[torch.Tensor], coefs: torch.Tensor) -> None:
        """``tensors[i] *= coefs[i]`` in place for every ``i``."""
        count = len(tensors)
        if count == 0:
            return
        device = coefs.device
        if self._layout is None or self._layout[:2] != (count, device):
            sharded = any(is_dtensor(t) for t in tensors)
            locals_ = [local_tensor(t) for t in tensors] if sharded else tensors
            self._layout = (count, device, all(t.device == device for t in locals_), sharded)
        if self._layout[3]:
            tensors = [local_tensor(t) for t in tensors]
        views = self._views_for(count, device)
        assert self._buffer is not None
        self._buffer[:count].copy_(coefs)
        if self._layout[2]:
            torch._foreach_mul_(tensors, list(views[:count]))
            return
        for i, t in enumerate(tensors):  # several devices (rare): one multiply per tensor
            t.mul_(views[i].to(t.device))
