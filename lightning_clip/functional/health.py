"""Pure math of `VanishingGradientMonitor`: layers, depth ratios, through-time
profiles of recurrent modules, spectral radii of recurrent weight blocks and the patience bookkeeping.

Imports torch only, never Lightning, so every piece is usable (and tested) from a plain PyTorch loop::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_clip.functional import health
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 1))
    >>> [name for name, _ in health.model_layers(model)]
    ['0', '2']
    >>> health.depth_ratios([1e-9, 2.0])
    [5e-10, 1.0]

Vocabulary: a *layer* is a module that directly owns parameters, named by its qualified name; its
*depth* is its position in registration order (the first registered is the input side).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_clip._compat import is_dtensor

__all__ = [
    "RECURRENT_GATES",
    "Episode",
    "PatienceTracker",
    "depth_ratios",
    "model_layers",
    "param_layer_index",
    "recurrent_blocks",
    "spectral_radii",
    "spectral_radius",
    "thin_history",
    "time_decay",
    "time_profile",
]

RECURRENT_GATES: dict[str, tuple[str, ...]] = {
    "RNN_TANH": ("h",),
    "RNN_RELU": ("h",),
    "GRU": ("r", "z", "n"),
    "LSTM": ("i", "f", "g", "o"),
}
"""Gate names of the blocks of ``weight_hh`` per ``nn.RNNBase.mode``, in PyTorch's row order."""


def model_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of ``module`` that directly own parameters, in registration order (depth order).

    The root's own parameters, if any, form the layer ``"<root>"``.

    Examples:
        >>> [n for n, _ in model_layers(nn.Sequential(nn.ReLU(), nn.Linear(2, 2), nn.LayerNorm(2)))]
        ['1', '2']
    """
    out = []
    for name, mod in module.named_modules():
        if next(iter(mod.parameters(recurse=False)), None) is not None:
            out.append((name or "<root>", mod))
    return out


def param_layer_index(layers: Sequence[tuple[str, nn.Module]]) -> dict[int, int]:
    """``id(parameter) -> layer index`` for every parameter of ``layers`` (a tied parameter belongs to
    the first layer that owns it)."""
    index: dict[int, int] = {}
    for i, (_, mod) in enumerate(layers):
        for p in mod.parameters(recurse=False):
            index.setdefault(id(p), i)
    return index


def depth_ratios(norms: Sequence[float]) -> list[float]:
    """Each norm divided by the largest one; all NaN when the largest is zero or not finite.

    Examples:
        >>> depth_ratios([0.5, 2.0, 1.0])
        [0.25, 1.0, 0.5]
        >>> depth_ratios([0.0, 0.0])
        [nan, nan]
    """
    if not norms:
        return []
    top = max(norms)
    if not math.isfinite(top) or top <= 0.0 or any(not math.isfinite(n) for n in norms):
        return [math.nan] * len(norms)
    return [n / top for n in norms]


def time_profile(
    grad: torch.Tensor, batch_first: bool = False, batch_sizes: torch.Tensor | None = None
) -> torch.Tensor:
    """Per time step, the squared 2-norm of the gradient reaching the input: ``‖∂L/∂x_t‖²`` (float32,
    on the gradient's device, no host sync). Squares, so profiles of several calls simply add.

    Args:
        grad: the gradient of a recurrent module's input: ``(T, B, F)``, ``(B, T, F)`` when
            ``batch_first``, ``(T, F)`` unbatched, or the ``(N, F)`` data of a ``PackedSequence``.
        batch_first: layout of a 3-D ``grad``.
        batch_sizes: a ``PackedSequence``'s ``batch_sizes`` (rows per time step), when ``grad`` is packed.

    Examples:
        >>> time_profile(torch.ones(3, 2, 4)).tolist()  # T=3, B=2, F=4
        [8.0, 8.0, 8.0]
    """
    sq = grad.detach().to(torch.float32).pow(2)
    if batch_sizes is not None:
        rows = sq.sum(dim=1)
        steps = torch.repeat_interleave(torch.arange(len(batch_sizes)), batch_sizes.cpu()).to(rows.device)
        return torch.zeros(len(batch_sizes), dtype=torch.float32, device=rows.device).index_add_(
            0, steps, rows
        )
    if sq.ndim == 2:
        return sq.sum(dim=1)
    return sq.sum(dim=(0, 2)) if batch_first else sq.sum(dim=(1, 2))


def time_decay(profile_sq: Sequence[float], fraction: float = 0.1) -> tuple[float, int]:
    """How much of the gradient reaches the earliest inputs, relative to the latest.

    Args:
        profile_sq: ``‖∂L/∂x_t‖²`` for ``t = 0 … T−1`` (as from `time_profile`).
        fraction: the share of the sequence averaged at each end (at least one step).

    Returns:
        ``(decay, k)``: mean ``‖∂L/∂x_t‖`` over the first ``k`` steps divided by the mean over the last
        ``k``, with ``k = max(1, ⌊fraction·T⌋)``; ``decay`` is NaN when ``T < 2`` or nothing reaches the
        latest steps.

    Examples:
        >>> d, k = time_decay([0.5**(2 * (9 - t)) for t in range(10)])  # ‖∂L/∂x_t‖ = 0.5^(9−t)
        >>> k, round(d, 6) == round(0.5**9, 6)
        (1, True)
    """
    steps = len(profile_sq)
    if steps < 2:
        return math.nan, 0
    k = max(1, int(fraction * steps))
    norms = [math.sqrt(max(v, 0.0)) if math.isfinite(v) else math.nan for v in profile_sq]
    early = sum(norms[:k]) / k
    late = sum(norms[-k:]) / k
    if not math.isfinite(early) or not math.isfinite(late) or late <= 0.0:
        return math.nan, k
    return early / late, k


def spectral_radius(weight: torch.Tensor) -> torch.Tensor:
    """Largest absolute eigenvalue of a square matrix (float32 result, computed in float64).

    Examples:
        >>> round(float(spectral_radius(torch.tensor([[0.0, 2.0], [0.5, 0.0]]))), 6)
        1.0
    """
    if weight.ndim != 2 or weight.shape[0] != weight.shape[1]:
        raise ValueError(f"`weight` must be a square matrix, got shape {tuple(weight.shape)}.")
    eig = torch.linalg.eigvals(weight.detach().to(torch.float64))
    return eig.abs().max().to(torch.float32)


def recurrent_blocks(module: nn.RNNBase) -> list[tuple[str, torch.Tensor]]:
    """The recurrent weight blocks of ``module``, one square matrix per layer, direction and gate.

    Names are ``l{layer}[_reverse]`` for ``nn.RNN`` and ``l{layer}[_reverse].{gate}`` for ``nn.GRU``
    (gates ``r z n``) and ``nn.LSTM`` (``i f g o``). With ``proj_size > 0`` the block is
    ``W_h{gate} @ W_hr`` (the map from one hidden state to the next gate pre-activation).

    A sharded weight (``DTensor``, FSDP2) is gathered first (``full_tensor()``, collective: every rank must
    call this for the same module).

    Examples:
        >>> [name for name, w in recurrent_blocks(nn.GRU(3, 5))]
        ['l0.r', 'l0.z', 'l0.n']
    """
    gates = RECURRENT_GATES.get(module.mode, ("h",))
    out = []
    for layer in range(module.num_layers):
        for suffix in ("", "_reverse")[: 2 if module.bidirectional else 1]:
            w = _full(getattr(module, f"weight_hh_l{layer}{suffix}").detach())
            proj = getattr(module, f"weight_hr_l{layer}{suffix}", None)
            proj = None if proj is None else _full(proj.detach())
            for gate, block in zip(gates, w.chunk(len(gates), dim=0), strict=True):
                square = block @ proj if proj is not None else block
                name = f"l{layer}{suffix}" if len(gates) == 1 else f"l{layer}{suffix}.{gate}"
                out.append((name, square))
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` (an all-gather), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def spectral_radii(module: nn.RNNBase) -> tuple[list[str], torch.Tensor]:
    """Names and spectral radii (float32 tensor, one host sync inside ``eigvals``) of
    `recurrent_blocks`.

    Examples:
        >>> rnn = nn.RNN(2, 2)
        >>> with torch.no_grad():
        ...     _ = rnn.weight_hh_l0.copy_(torch.tensor([[0.0, 2.0], [0.5, 0.0]]))
        >>> names, radii = spectral_radii(rnn)
        >>> names, [round(r, 6) for r in radii.tolist()]
        (['l0'], [1.0])
    """
    blocks = recurrent_blocks(module)
    return [n for n, _ in blocks], torch.stack([spectral_radius(w) for _, w in blocks])


def thin_history(history: list[Any], max_len: int) -> list[Any]:
    """Keep every second entry (oldest first, the newest always kept) once ``history`` exceeds
    ``max_len``, so a long run's history stays bounded while spanning the whole run.

    Examples:
        >>> thin_history(list(range(5)), 4)
        [0, 2, 4]
    """
    if len(history) <= max_len:
        return history
    kept = history[::2]
    if kept[-1] is not history[-1]:
        kept.append(history[-1])
    return kept


@dataclass
class Episode:
    """One key's consecutive-check counts in `PatienceTracker`."""

    flagged: int = 0
    """consecutive checks at which the key was flagged"""
    healthy: int = 0
    """consecutive checks at which it was observed and not flagged"""
    alerted: bool = False
    """an alert was raised in the current episode"""


class PatienceTracker:
    """Consecutive-check bookkeeping: a key (e.g. a layer) raises an alert once per episode.

    An episode starts when the key has been flagged at ``patience`` consecutive checks (`update`
    returns it then, once) and ends when it has been healthy at ``patience`` consecutive checks; only
    then can it raise a new alert. Keys that are not observed at a check keep their counts.

    Examples:
        >>> t = PatienceTracker(patience=2)
        >>> t.update(flagged={"a"}, observed={"a", "b"}), t.update({"a"}, {"a", "b"}), t.update({"a"}, {"a"})
        ([], ['a'], [])
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        #: key -> its counts (only keys with something to remember)
        self.counts: dict[str, Episode] = {}

    def flagged_count(self, key: str) -> int:
        return self.counts.get(key, Episode()).flagged

    def alerted(self, key: str) -> bool:
        return self.counts.get(key, Episode()).alerted

    def may_alert(self, key: str) -> bool:
        """True when one more flagged check would raise an alert for ``key``."""
        return not self.alerted(key) and self.flagged_count(key) + 1 >= self.patience

    def update(self, flagged: Iterable[str], observed: Iterable[str]) -> list[str]:
        """Record one check; return the keys whose alert is due now (in ``observed`` order)."""
        flagged = set(flagged)
        due = []
        for key in dict.fromkeys([*observed, *sorted(flagged)]):
            c = self.counts.setdefault(key, Episode())
            if key in flagged:
                c.flagged += 1
                c.healthy = 0
                if not c.alerted and c.flagged >= self.patience:
                    c.alerted = True
                    due.append(key)
            else:
                c.flagged = 0
                c.healthy += 1
                if c.alerted and c.healthy >= self.patience:
                    c.alerted = False  # recovered: the episode is over
            if not c.alerted and c.flagged == 0:  # nothing to remember
                self.counts.pop(key)
        return due

    def state_dict(self) -> dict[str, Any]:
        """Plain values: ``{"patience", "counts": {key: [flagged, healthy, alerted (0/1)]}}``."""
        return {
            "patience": self.patience,
            "counts": {k: [c.flagged, c.healthy, int(c.alerted)] for k, c in self.counts.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {
            str(k): Episode(int(v[0]), int(v[1]), bool(v[2])) for k, v in state.get("counts", {}).items()
        }
