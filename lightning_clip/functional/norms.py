"""Gradient norms in fused passes: total, per tensor, per group, and the finite check. Imports torch only.

Conventions: norms are returned in float32 whatever the gradients' dtype; bf16 / fp16 / fp32 gradients
are accumulated in float32 without an up-cast copy (``torch._foreach_norm`` accumulates in the requested
dtype), float64 gradients in float64. As in ``torch.nn.utils.get_total_norm``, the total is the float32
p-norm of the per-tensor norms, so it overflows to ``inf`` once a per-tensor 2-norm passes ~1.8e19. A
0-size tensor has norm 0 for every p (torch refuses its inf-norm). ``None`` gradients are skipped;
nothing here calls ``.item()``.

Sparse gradients (``torch.sparse_coo``: ``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``): the
norm of a sparse tensor is the norm of its *coalesced* values (duplicate indices summed first, as the
optimizer applies them), which is the norm of the dense tensor it stands for. Other sparse layouts (CSR,
CSC, BSR, BSC) raise a ``ValueError`` naming the layout. Complex tensors: the norm of the moduli, as
``torch.linalg.vector_norm`` takes it; `all_finite` sees a NaN or Inf in the real or the imaginary part.

Sharded tensors (``DTensor``: FSDP2's ``fully_shard``, tensor parallelism, e.g. under Lightning's
``ModelParallelStrategy``): `grad_norms` returns the norms of the *full* tensors, the same on every
rank. Each rank reduces its local shards in the same fused pass, then one all-reduce of the per-tensor
partial results (sums of p-th powers, or maxima for the inf-norm) over the default process group combines
them; a shard held by several ranks (a replicated placement, or ranks outside the tensor's device mesh) is
counted once. Every rank of the default group must call it with the same list. `all_finite` looks at
the local shards only (a caller that needs the global answer reduces the flag).

Examples:
    >>> import torch
    >>> from lightning_clip.functional import collect_grads, grad_norms
    >>> model = torch.nn.Linear(4, 2)
    >>> model(torch.ones(3, 4)).sum().backward()
    >>> total, per_tensor = grad_norms(collect_grads(model.parameters()))
    >>> per_tensor.shape
    torch.Size([2])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from operator import attrgetter
from typing import Any

import torch

from lightning_clip._compat import group_tensors_by_device_and_dtype, is_dtensor, local_tensor, replication
from lightning_clip._validation import check_norm_type

__all__ = ["all_finite", "collect_grads", "dense_values", "grad_norms", "group_norms", "total_norm"]


def collect_grads(parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of ``parameters`` that exist (``None`` gradients are skipped), in order."""
    return [p.grad for p in parameters if p.grad is not None]


_FLOAT32_SAFE = (torch.float16, torch.bfloat16, torch.float32)


def dense_values(t: torch.Tensor, coalesce: bool = True) -> torch.Tensor:
    """The strided tensor whose entries are ``t``'s stored values: ``t`` itself when strided; a sparse COO
    tensor's values, coalesced first when ``coalesce`` (duplicate indices summed: what a norm needs; scaling
    and finite checks do without, and then the values are an alias that writes through to ``t``).

    Raises:
        ValueError: ``t`` has a sparse layout other than COO (CSR, CSC, BSR, BSC).

    Examples:
        >>> g = torch.sparse_coo_tensor(torch.tensor([[1, 1, 3]]), torch.tensor([3.0, 1.0, 3.0]), (5,))
        >>> dense_values(g).tolist(), dense_values(g, coalesce=False).tolist()
        ([4.0, 3.0], [3.0, 1.0, 3.0])
    """
    layout = t.layout
    if layout == torch.strided:
        return t
    if layout == torch.sparse_coo:
        return (t.coalesce() if coalesce and not t.is_coalesced() else t)._values()
    raise ValueError(
        f"lightning-clip measures strided and sparse COO tensors, got a tensor with layout {layout}:"
        " convert it with `.to_sparse_coo()` or `.to_dense()`."
    )


def _float32_norms(group: list[Any], norm_type: float) -> torch.Tensor:
    """Per-tensor norms of one device/dtype group as a float32 1-D tensor.

    Half-precision tensors are accumulated in float32 without an up-cast copy; wider dtypes (float64)
    cannot be narrowed by ``_foreach_norm``, so they are reduced in their own precision, then cast.
    """
    if group[0].dtype in _FLOAT32_SAFE:
        return torch.stack(torch._foreach_norm(group, norm_type, dtype=torch.float32))
    return torch.stack(torch._foreach_norm(group, norm_type)).to(torch.float32)


def grad_norms(tensors: Sequence[torch.Tensor], norm_type: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Total and per-tensor p-norms in one fused pass over ``tensors``.

    Args:
        tensors: gradients (any dtypes, one or more devices). An empty sequence gives zeros.
        norm_type: p of the p-norm, any real ``p > 0`` or ``float("inf")``.

    Returns:
        ``(total, per_tensor)``: float32 tensors on the device of the first tensor; ``total`` is the
        p-norm of all tensors taken together (the p-norm of the per-tensor norms), never a sum of norms.
        A NaN or Inf anywhere makes ``total`` non-finite.

    Examples:
        >>> total, per = grad_norms([torch.tensor([3.0, 0.0]), torch.tensor([4.0])])
        >>> float(total), per.tolist()
        (5.0, [3.0, 4.0])
    """
    norm_type = check_norm_type("norm_type", norm_type)
    if len(tensors) == 0:
        zero = torch.zeros((), dtype=torch.float32)
        return zero, torch.zeros(0, dtype=torch.float32)
    common = _common_case_norms(tensors, norm_type)
    if common is not None:
        return torch.linalg.vector_norm(common, norm_type), common
    if any(t.layout != torch.strided for t in tensors):
        tensors = [dense_values(t) for t in tensors]
    if any(is_dtensor(t) for t in tensors):
        return _sharded_norms(tensors, norm_type)
    if math.isinf(norm_type) and any(t.numel() == 0 for t in tensors):
        # the inf-norm of an empty tensor has no identity in torch; here it is 0, as for every other p
        keep = [i for i, t in enumerate(tensors) if t.numel() > 0]
        per_tensor = torch.zeros(len(tensors), dtype=torch.float32, device=tensors[0].device)
        if keep:
            _, kept = grad_norms([tensors[i] for i in keep], norm_type)
            per_tensor[torch.tensor(keep, device=per_tensor.device)] = kept.to(per_tensor.device)
        return torch.linalg.vector_norm(per_tensor, norm_type), per_tensor
    first_device = tensors[0].device
    grouped = group_tensors_by_device_and_dtype(tensors, with_indices=True)
    if len(grouped) == 1:  # the common case: one device, one dtype, already in order
        group, _ = next(iter(grouped.values()))
        per_tensor = _float32_norms(group, norm_type)
        return torch.linalg.vector_norm(per_tensor, norm_type), per_tensor
    per_tensor = torch.empty(len(tensors), dtype=torch.float32, device=first_device)
    for (device, _), (group, indices) in grouped.items():
        stacked = _float32_norms(group, norm_type)
        if device != first_device:
            stacked = stacked.to(first_device)
        per_tensor[torch.tensor(indices, device=first_device)] = stacked
    return torch.linalg.vector_norm(per_tensor, norm_type), per_tensor


_PLAIN_TYPES = {torch.Tensor}
_STRIDED = {torch.strided}
_dtype_of = attrgetter("dtype")
_layout_of = attrgetter("layout")


def plain_strided(tensors: Sequence[torch.Tensor]) -> bool:
    """True when every tensor is a plain strided ``torch.Tensor`` (no ``DTensor`` or other subclass, no
    sparse layout), checked in two C-level passes (about 0.07 µs a tensor): the fused kernels then take
    the tensors as they are.

    Examples:
        >>> plain_strided([torch.ones(2), torch.ones(2).to_sparse()])
        False
    """
    return set(map(type, tensors)) <= _PLAIN_TYPES and set(map(_layout_of, tensors)) <= _STRIDED


def _common_case_norms(tensors: Sequence[torch.Tensor], norm_type: float) -> torch.Tensor | None:
    """The per-tensor norms of the common case in one call, or None for the general path.

    The common case: plain tensors (no ``DTensor`` or other subclass) of one half or single precision
    dtype. Two C-level passes check that (about 0.07 µs a tensor, where the general path's layout,
    ``DTensor`` and grouping passes cost about 0.4 µs); what they do not look at makes the fused kernel
    or the stack raise before anything is computed: a sparse layout, several devices, the inf-norm of an
    empty tensor.
    """
    if set(map(type, tensors)) != _PLAIN_TYPES:
        return None
    dtypes = set(map(_dtype_of, tensors))
    if len(dtypes) != 1 or dtypes.pop() not in _FLOAT32_SAFE:
        return None
    try:
        return torch.stack(torch._foreach_norm(tensors, norm_type, dtype=torch.float32))  # type: ignore[arg-type]
    except (RuntimeError, NotImplementedError):
        return None


def _sharded_norms(tensors: Sequence[torch.Tensor], norm_type: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`grad_norms` of DTensors (and plain tensors among them, taken as replicated on every rank):
    local fused pass, then one all-reduce of the per-tensor partial results."""
    import torch.distributed as dist

    _, local = grad_norms([local_tensor(t) for t in tensors], norm_type)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return torch.linalg.vector_norm(local, norm_type), local
    if math.isinf(norm_type):
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        return torch.linalg.vector_norm(local, norm_type), local
    world = dist.get_world_size()
    copies = [replication(t, world) for t in tensors]
    if any(c is None for c in copies):
        raise ValueError(
            "cannot measure a DTensor with a `Partial` placement (its local part is a pending sum):"
            " redistribute it first, e.g. `t.redistribute(placements=[Replicate()])`."
        )
    # partial sums of p-th powers in float64 (n small numbers), each shard counted once
    powered = local.to(torch.float64).pow(norm_type) / torch.tensor(
        copies, dtype=torch.float64, device=local.device
    )
    dist.all_reduce(powered)
    per_tensor = powered.pow(1.0 / norm_type).to(torch.float32)
    return torch.linalg.vector_norm(per_tensor, norm_type), per_tensor


def total_norm(tensors: Sequence[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The total p-norm of ``tensors`` (float32); see `grad_norms`."""
    return grad_norms(tensors, norm_type)[0]


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor: no NaN or Inf in any of ``tensors`` (one fused pass, no host sync).

    Each tensor's largest magnitude (inf-norm) is taken in its own dtype, so huge finite values never
    overflow into a false alarm, and a NaN anywhere propagates. A complex tensor is checked through its
    real and imaginary parts, a sparse COO tensor through its stored values.

    Examples:
        >>> bool(all_finite([torch.ones(2), torch.tensor([1.0, float("nan")])]))
        False
        >>> bool(all_finite([torch.tensor([3e38, 3e38])]))  # a 1- or 2-norm would overflow here
        True
        >>> bool(all_finite([torch.tensor([1 + 1j, complex(0.0, float("nan"))])]))
        False
    """
    nonempty: list[Any] = [_real_view(t) for t in map(local_tensor, tensors)]
    nonempty = [t for t in nonempty if t.numel() > 0]
    if len(nonempty) == 0:
        return torch.tensor(True)
    device = nonempty[0].device
    flags = []
    for (group_device, _), (group, _) in group_tensors_by_device_and_dtype(nonempty).items():
        if group_device.type == "cpu":
            # the CPU inf-norm kernel is slow (about 12× torch.aminmax, which NaN and ±Inf also reach)
            extrema = torch.stack([v for t in group for v in torch.aminmax(t)])
        else:  # one fused kernel on accelerators
            extrema = torch.stack(torch._foreach_norm(group, math.inf))
        flags.append(torch.isfinite(extrema).all().to(device))
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


def _real_view(t: torch.Tensor) -> torch.Tensor:
    """A real strided view holding every stored number of ``t`` (complex: real and imaginary parts side by
    side; sparse COO: its values, uncoalesced), for the finite check."""
    t = dense_values(t, coalesce=False)
    return torch.view_as_real(t) if t.is_complex() else t


def group_norms(
    per_tensor: torch.Tensor, group_index: torch.Tensor, num_groups: int, norm_type: float = 2.0
) -> torch.Tensor:
    """Combine per-tensor norms into per-group norms (e.g. per layer) without reading the tensors again.

    Args:
        per_tensor: 1-D float tensor of per-tensor p-norms.
        group_index: 1-D long tensor, the group of each entry of ``per_tensor``.
        num_groups: number of groups; a group with no entry gets 0.
        norm_type: the p the per-tensor norms were taken with.

    Examples:
        >>> group_norms(torch.tensor([3.0, 4.0, 1.0]), torch.tensor([0, 0, 1]), 2).tolist()
        [5.0, 1.0]
    """
    norm_type = check_norm_type("norm_type", norm_type)
    out = torch.zeros(num_groups, dtype=per_tensor.dtype, device=per_tensor.device)
    if math.isinf(norm_type):
        return out.scatter_reduce_(0, group_index, per_tensor, reduce="amax", include_self=True)
    return out.index_add_(0, group_index, per_tensor.pow(norm_type)).pow(1.0 / norm_type)
