"""What makes gradients vanish, measured: the tensor math behind the causes that
`VanishingGradientMonitor` names. Imports torch only, never Lightning.

* **Activation sites** (`graph_nodes`, `activation_sites`): every sigmoid, tanh and
  ReLU-family node of the autograd graph of a loss, read before ``backward`` from the tensor autograd
  saved for it (so ``torch.sigmoid`` in a ``forward`` counts as much as an ``nn.Sigmoid`` module, and
  ``F.relu`` inside ``nn.TransformerEncoderLayer`` too), with the layer that feeds it.
* **Per-site figures** (`derivative`, `site_figures`): the share of elements in the flat
  region of the activation, the share of units flat over the whole batch (dead ReLU units), the mean
  derivative.
* **Recurrent gates**: see `lightning_clip.functional.gates`.
* **Weight scale** (`weight_scale`, `needed_gain`): ``rms(W)·√fan_in`` against the gain the
  activation needs.
* **Structure** (`graph_structure`): normalisation and residual connections, as the graph has them.
* **Recent jump** (`recent_jump`): a loss or gradient norm that blew up, over any ``(step, value)``
  series.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_clip.functional import causes, health
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 1))
    >>> loss = model(torch.randn(16, 4)).pow(2).mean()
    >>> layers = health.model_layers(model)
    >>> sites = causes.activation_sites(causes.graph_nodes(loss.grad_fn), health.param_layer_index(layers))
    >>> [(s.kind, layers[s.layer][0]) for s in sites]
    [('sigmoid', '0')]
    >>> d, top = causes.derivative(sites[0].kind, sites[0].tensor)
    >>> bool(d.max() <= top == 0.25)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_clip import _compat
from lightning_clip._numbers import median

__all__ = [
    "FLAT",
    "SATURATING",
    "ZERO_GRADIENT",
    "Jump",
    "Site",
    "Structure",
    "activation_sites",
    "derivative",
    "graph_nodes",
    "graph_structure",
    "needed_gain",
    "recent_jump",
    "site_figures",
    "unit_dim",
    "weight_scale",
]

FLAT = 0.1
"""An element is in the flat region of its activation when the derivative there is below this share of
the activation's largest derivative (sigmoid: output outside ``[0.026, 0.974]``; tanh: ``|out| > 0.949``;
ReLU: inactive)."""
SATURATING = ("sigmoid", "tanh")
ZERO_GRADIENT = ("relu", "relu6", "hardtanh")
"""Activations with an exact zero-derivative region, where units can die."""

# autograd node -> (kind, saved tensor, that tensor is the activation's output)
_SITE_NODES: dict[str, tuple[str, str, bool]] = {
    "SigmoidBackward0": ("sigmoid", "_saved_result", True),
    "TanhBackward0": ("tanh", "_saved_result", True),
    "ReluBackward0": ("relu", "_saved_result", True),
    "LeakyReluBackward0": ("leaky_relu", "_saved_self", False),
    "HardtanhBackward0": ("hardtanh", "_saved_self", False),
    "GeluBackward0": ("gelu", "_saved_self", False),
    "SiluBackward0": ("silu", "_saved_self", False),
    "EluBackward0": ("elu", "_saved_self", False),
}
_NORM_NODE_MARKS = ("LayerNorm", "BatchNorm", "GroupNorm", "RmsNorm")


# -------------------------------------------------------------------------------------- the graph
def graph_nodes(root: Any) -> list[Any]:
    """Every node of the autograd graph below ``root`` (a ``grad_fn``, or None), inputs first.

    Examples:
        >>> x = torch.ones(2, requires_grad=True)
        >>> [type(n).__name__ for n in graph_nodes(torch.sigmoid(x * 2).sum().grad_fn)]
        ['AccumulateGrad', 'MulBackward0', 'SigmoidBackward0', 'SumBackward0']
    """
    if root is None:
        return []
    order: list[Any] = []
    seen = {root}
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack:
        node, i = stack.pop()
        children = node.next_functions
        if i < len(children):
            stack.append((node, i + 1))
            child = children[i][0]
            if child is not None and child not in seen:
                seen.add(child)
                stack.append((child, 0))
        else:
            order.append(node)
    return order


def _param_of(node: Any) -> torch.Tensor | None:
    var = getattr(node, "variable", None)  # AccumulateGrad: the leaf it accumulates into
    return var if isinstance(var, torch.Tensor) else None


@dataclass
class Site:
    """One activation of the graph: its kind, the index of the layer feeding it (None when not found),
    the tensor autograd saved for it (the output for sigmoid / tanh / ReLU, else the input) and the
    activation's arguments (``slope``, ``min``/``max``, ``alpha``/``scale``/``input_scale``)."""

    kind: str
    layer: int | None
    tensor: torch.Tensor
    args: dict[str, float] = field(default_factory=dict)


def activation_sites(nodes: Sequence[Any], layer_of: dict[int, int], search: int = 24) -> list[Site]:
    """The activation sites among ``nodes`` (as from `graph_nodes`), inputs first.

    Args:
        nodes: autograd nodes, inputs first.
        layer_of: ``id(parameter) -> layer index``; a site's layer is the first one a breadth-first
            search below it meets (at most ``search`` nodes, never through another activation).
        search: the most nodes the search visits per site.
    """
    sites = []
    for node in nodes:
        spec = _SITE_NODES.get(type(node).__name__)
        if spec is None:
            continue
        kind, attr, _ = spec
        tensor = _compat.saved_tensor(node, attr)
        if tensor is None or not tensor.is_floating_point():
            continue  # freed, or changed in place after the forward
        args: dict[str, float] = {}
        if kind == "leaky_relu":
            args["slope"] = float(_compat.saved_value(node, "_saved_negative_slope", 0.01))
        elif kind == "hardtanh":
            args["min"] = float(_compat.saved_value(node, "_saved_min_val", -1.0))
            args["max"] = float(_compat.saved_value(node, "_saved_max_val", 1.0))
            if args["min"] == 0.0 and args["max"] == 6.0:
                kind = "relu6"
        elif kind == "elu":
            for key in ("alpha", "scale", "input_scale"):
                args[key] = float(_compat.saved_value(node, f"_saved_{key}", 1.0))
        sites.append(Site(kind, _feeding_layer(node, layer_of, search), tensor, args))
    return sites


def _feeding_layer(node: Any, layer_of: dict[int, int], search: int) -> int | None:
    frontier = [f for f, _ in node.next_functions if f is not None]
    visited = 0
    while frontier and visited < search:
        deeper = []
        for f in frontier:
            visited += 1
            p = _param_of(f)
            if p is not None and id(p) in layer_of:
                return layer_of[id(p)]
            if type(f).__name__ not in _SITE_NODES:
                deeper += [g for g, _ in f.next_functions if g is not None]
        frontier = deeper
    return None


def derivative(
    kind: str, t: torch.Tensor, args: dict[str, float] | None = None
) -> tuple[torch.Tensor, float]:
    """The activation's derivative at every element of its saved tensor ``t`` (float32), and the
    largest derivative the activation has anywhere.

    Examples:
        >>> d, top = derivative("tanh", torch.tensor([0.0, 0.5, -0.99]))
        >>> [round(v, 4) for v in d.tolist()], top
        ([1.0, 0.75, 0.0199], 1.0)
    """
    args = args or {}
    t = t.detach().float()
    if kind == "sigmoid":
        return t * (1 - t), 0.25
    if kind == "tanh":
        return 1 - t * t, 1.0
    if kind == "relu":
        return (t > 0).float(), 1.0
    if kind == "leaky_relu":
        slope = args.get("slope", 0.01)
        return torch.where(t > 0, 1.0, slope), max(1.0, abs(slope))
    if kind in ("relu6", "hardtanh"):
        return ((t > args.get("min", -1.0)) & (t < args.get("max", 1.0))).float(), 1.0
    if kind == "gelu":
        cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2.0)))
        return cdf + t * torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi), 1.1289
    if kind == "silu":
        s = torch.sigmoid(t)
        return s * (1 + t * (1 - s)), 1.0998
    if kind == "elu":
        a, sc, isc = args.get("alpha", 1.0), args.get("scale", 1.0), args.get("input_scale", 1.0)
        return torch.where(t > 0, sc, sc * a * isc * torch.exp(t * isc)), max(sc, sc * a * isc)
    raise ValueError(
        f"`kind` must be one of {sorted({v[0] for v in _SITE_NODES.values()} | {'relu6'})}, got {kind!r}."
    )


def unit_dim(layer: nn.Module | None, ndim: int) -> int:
    """The dimension of an activation that indexes the output units of the layer feeding it: dim 1 after a
    convolution or a batch / group norm (channels), else the last one.

    Examples:
        >>> unit_dim(nn.Conv2d(1, 4, 3), 4), unit_dim(nn.Linear(3, 4), 3), unit_dim(None, 1)
        (1, 2, 0)
    """
    if ndim <= 1:
        return 0
    if layer is not None and isinstance(layer, _compat.channel_first_modules()):
        return 1
    return ndim - 1


def site_figures(d: torch.Tensor, top: float, dim: int, flat: float = FLAT) -> torch.Tensor:
    """``[elements, flat share, units, flat-unit share, mean derivative]`` of a derivative tensor
    (float32, on its device: no host transfer).

    An element is flat when ``d < flat · top``; a unit (one index of ``dim``) is flat when all of its
    elements over the batch are (for ReLU: never active, a dead unit).

    Examples:
        >>> d = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 1.0]])  # relu'(x): 2 rows, 3 units
        >>> [round(v, 4) for v in site_figures(d, 1.0, dim=1).tolist()]
        [6.0, 0.5, 3.0, 0.3333, 0.5]
    """
    d = d.reshape(1) if d.ndim == 0 else d
    is_flat = d < flat * top
    units = d.shape[dim]
    dead = is_flat.movedim(dim, 0).reshape(units, -1).all(dim=1)
    counts = torch.tensor([float(d.numel()), float(units)], device=d.device)
    return torch.stack([counts[0], is_flat.float().mean(), counts[1], dead.float().mean(), d.float().mean()])


# ------------------------------------------------------------------------------------ weight scale
def weight_scale(weight: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """``rms(W)·√fan_in`` (0-d float32 tensor): the gain of a layer's initialisation, the quantity
    Kaiming's and Xavier's analyses fix (``E[w²]·fan_in``; the same as ``std(W)·√fan_in`` for zero-mean
    weights). ``norm``: ``‖W‖₂`` when already measured (no second pass over the weights).

    PyTorch's default ``nn.Linear`` / ``nn.Conv*d`` init gives ``1/√3 ≈ 0.577``, Kaiming's for ReLU
    ``√2``, Xavier's for a square layer 1.

    Examples:
        >>> w = nn.init.kaiming_normal_(torch.empty(256, 512), nonlinearity="relu")
        >>> round(float(weight_scale(w)), 1)
        1.4
    """
    fan_in = weight.shape[1] * math.prod(weight.shape[2:]) if weight.ndim >= 2 else weight.numel()
    if norm is None:
        norm = torch.linalg.vector_norm(weight.detach().float())
    return norm.float() * math.sqrt(fan_in / max(1, weight.numel()))


def needed_gain(kind: str, args: dict[str, float] | None = None) -> float:
    """The ``rms(W)·√fan_in`` an activation needs (``nn.init.calculate_gain``; ReLU's for the ReLU-like
    GELU, SiLU, ELU and ReLU6).

    Examples:
        >>> needed_gain("relu") == math.sqrt(2), needed_gain("tanh"), needed_gain("sigmoid")
        (True, 1.6666666666666667, 1)
    """
    if kind in ("sigmoid", "tanh", "relu"):
        return nn.init.calculate_gain(kind)  # type: ignore[arg-type]
    if kind == "leaky_relu":
        return nn.init.calculate_gain("leaky_relu", (args or {}).get("slope", 0.01))
    return 1.0 if kind == "hardtanh" else math.sqrt(2.0)


# --------------------------------------------------------------------------------------- structure
@dataclass(frozen=True)
class Structure:
    """What a graph contains: nodes, normalisation nodes, residual adds (-1: not counted, too large)."""

    nodes: int
    norm_nodes: int
    residual_adds: int


def graph_structure(nodes: Sequence[Any], max_nodes: int = 50_000) -> Structure:
    """Normalisation nodes and residual connections among ``nodes`` (inputs first, as from
    `graph_nodes`).

    A residual connection is an ``add`` of two tensors one of which is computed from the other through
    at least one weight layer (a node with a parameter of two or more dims among its inputs): ``h + f(h)``.

    Examples:
        >>> lin0, lin = nn.Linear(3, 3), nn.Linear(3, 3)
        >>> h = lin0(torch.randn(2, 3))
        >>> graph_structure(graph_nodes((h + lin(torch.relu(h))).sum().grad_fn)).residual_adds
        1
        >>> graph_structure(graph_nodes(lin(torch.relu(h)).sum().grad_fn)).residual_adds
        0
    """
    norms = sum(any(m in type(n).__name__ for m in _NORM_NODE_MARKS) for n in nodes)
    if len(nodes) > max_nodes:
        return Structure(len(nodes), norms, -1)
    index = {n: i for i, n in enumerate(nodes)}
    bit: dict[tuple[int, int], int] = {}  # (node, output number) -> bit: multi-output nodes (unbind)
    anc = [0] * len(nodes)  # ancestors, as bits of (node, output) pairs
    depth = [0] * len(nodes)  # weight layers on the longest data path
    weight_expr = [False] * len(nodes)  # computed from parameters only (e.g. W.t())
    residual = 0
    for i, n in enumerate(nodes):
        entries = list(n.next_functions)
        kids = [(f, k) for f, k in entries if f is not None]
        params = [p for f, _ in kids if (p := _param_of(f)) is not None]
        data = [(index[f], k) for f, k in kids if _param_of(f) is None and not weight_expr[index[f]]]
        weighted = len(kids) - len(params) - len(data) > 0 or any(p.ndim >= 2 for p in params)
        if kids and len(entries) == len(kids) and not data and not type(n).__name__.startswith("Embedding"):
            weight_expr[i] = True  # an embedding lookup is data, though its only input is a parameter
            continue
        for j, k in data:
            anc[i] |= anc[j] | (1 << bit.setdefault((j, k), len(bit)))
        depth[i] = max((depth[j] for j, _ in data), default=0) + int(weighted)
        if type(n).__name__.startswith("AddBackward") and len(data) == 2:
            (x, kx), (y, ky) = data
            linked = (anc[y] >> bit[(x, kx)]) & 1 or (anc[x] >> bit[(y, ky)]) & 1
            residual += int(bool(linked) and depth[x] != depth[y])
    return Structure(len(nodes), norms, residual)


# ------------------------------------------------------------------------------------- recent jump
@dataclass(frozen=True)
class Jump:
    """``value`` (of the training ``"loss"`` or the ``"grad_norm"``) at ``step``, against ``before``,
    the median of the ``before_steps`` values just before it."""

    what: str
    step: int
    before: float
    value: float
    before_steps: int = 1

    @property
    def ratio(self) -> float:
        return self.value / self.before if self.before > 0 else math.inf


def recent_jump(
    what: str,
    series: Sequence[tuple[int, float]],
    start: int,
    end: int,
    factor: float,
    window: int = 10,
    min_history: int = 1,
) -> Jump | None:
    """The first value at a step in ``(start, end]`` that is non-finite, or above both ``factor`` × the
    median of the (up to ``window``) finite values before it and every value before it; None if none.

    ``series``: ``(step, value)`` in step order; at least ``min_history`` finite values must come first.

    Examples:
        >>> s = [(0, 9.4), (1, 7.9), (2, 24.0), (3, 29.0), (4, 31.0)]
        >>> recent_jump("loss", s, start=-1, end=4, factor=1.5)
        Jump(what='loss', step=2, before=8.65, value=24.0, before_steps=2)
        >>> recent_jump("loss", [(0, 1.0), (1, 5.0), (2, 1.0), (3, 4.0)], 1, 3, 1.5) is None  # 4 < 5: no new high
        True
    """
    history: list[float] = []
    for step, value in series:
        if start < step <= end and len(history) >= min_history:
            base = median(history[-window:])
            if base > 0 and (not math.isfinite(value) or (value > factor * base and value > max(history))):
                return Jump(what, step, base, value, len(history[-window:]))
        if math.isfinite(value):
            history.append(value)
    return None
