"""The gates of recurrent layers, recomputed: their fused kernels (cuDNN, oneDNN) keep them to themselves.
Imports torch only, never Lightning.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> lstm = nn.LSTM(3, 4, batch_first=True)
    >>> x = torch.randn(2, 5, 3)
    >>> found = recurrent_gates(lstm, x, None, lstm(x)[0])
    >>> [round(v, 3) for v in gate_figures("LSTM", found)["f"].tolist()[:1]]  # 10 (time, sequence) rows x 4 units
    [40.0]
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from lightning_clip.functional.causes import FLAT, derivative, site_figures

__all__ = ["gate_figures", "layer0_param", "recurrent_gates"]

_GATE_KIND = {
    "i": "sigmoid",
    "f": "sigmoid",
    "o": "sigmoid",
    "r": "sigmoid",
    "z": "sigmoid",
    "g": "tanh",
    "n": "tanh",
}


def recurrent_gates(module: nn.RNNBase, x: Any, hx: Any, out: Any) -> dict[str, torch.Tensor] | None:
    """Gate activations of layer 0 (forward direction) of ``module``, recomputed from its input ``x``,
    initial state ``hx`` (None: zeros), output ``out`` and weights: ``{gate: (N, H)}`` over the ``N``
    valid (time step, sequence) rows. ``i f g o`` (LSTM), ``r z n`` (GRU), ``h`` (RNN).

    With one layer the output holds layer 0's hidden states and the gates come in one batched pass;
    with several, layer 0 is run again step by step. None for an unknown ``mode``.

    Examples:
        >>> lstm = nn.LSTM(3, 4)
        >>> x = torch.randn(5, 2, 3)
        >>> gates = recurrent_gates(lstm, x, None, lstm(x)[0])
        >>> {k: tuple(v.shape) for k, v in gates.items()}
        {'i': (10, 4), 'f': (10, 4), 'g': (10, 4), 'o': (10, 4)}
    """
    mode = module.mode
    if mode not in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"):
        return None
    with torch.no_grad():
        mask = None
        if isinstance(x, PackedSequence):  # padded back in the caller's batch order, like hx
            xs, lengths = pad_packed_sequence(x)
            outs, _ = pad_packed_sequence(out)
            mask = torch.arange(xs.shape[0]).unsqueeze(1) < lengths.unsqueeze(0)
        else:
            xs, outs = _time_major(x, module.batch_first), _time_major(out, module.batch_first)
        xs = xs.float()
        steps, batch = xs.shape[0], xs.shape[1]
        hsize = module.proj_size or module.hidden_size
        h0 = _layer0(hx[0] if isinstance(hx, tuple) else hx, batch, hsize, xs)
        c0 = _layer0(hx[1], batch, module.hidden_size, xs) if isinstance(hx, tuple) else None
        w_hh = layer0_param(module, "weight_hh_l0")
        b_hh = layer0_param(module, "bias_hh_l0") if module.bias else None
        b_ih = layer0_param(module, "bias_ih_l0") if module.bias else None
        pre_x = nn.functional.linear(xs, layer0_param(module, "weight_ih_l0"), b_ih)
        if module.num_layers == 1:
            h_prev = torch.cat([h0.unsqueeze(0), outs[..., :hsize].float()[:-1]], dim=0)
            gates = _gates(mode, pre_x, h_prev, w_hh, b_hh)
        else:
            gates = _run_layer0(module, pre_x, h0, c0, w_hh, b_hh)
        rows = mask.reshape(-1).to(xs.device) if mask is not None else None
        flat = {k: g.reshape(steps * batch, -1) for k, g in gates.items()}
        return {k: g[rows] if rows is not None else g for k, g in flat.items()}


def layer0_param(module: nn.RNNBase, name: str) -> torch.Tensor:
    """A parameter of ``module`` (e.g. ``weight_hh_l0``), detached, in float32."""
    return cast(torch.Tensor, getattr(module, name)).detach().float()


def _time_major(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    if x.ndim == 2:  # unbatched (T, F)
        return x.unsqueeze(1)
    return x.transpose(0, 1) if batch_first else x


def _layer0(h: torch.Tensor | None, batch: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """Layer 0, forward direction, of an initial state ``(L·D, B, H)`` (``(L·D, H)`` unbatched)."""
    if h is None:
        return like.new_zeros(batch, size)
    return (h[0] if h.ndim == 3 else h[0:1]).float().reshape(batch, size)


def _gates(
    mode: str, pre_x: torch.Tensor, h_prev: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The gates from the input part ``pre_x`` and the previous hidden state (nn.LSTM / nn.GRU / nn.RNN
    equations, PyTorch's row order)."""
    pre_h = nn.functional.linear(h_prev, w_hh, b_hh)
    if mode == "LSTM":
        i, f, g, o = (pre_x + pre_h).chunk(4, dim=-1)
        return {"i": i.sigmoid(), "f": f.sigmoid(), "g": g.tanh(), "o": o.sigmoid()}
    if mode == "GRU":
        xr, xz, xn = pre_x.chunk(3, dim=-1)
        hr, hz, hn = pre_h.chunk(3, dim=-1)
        r = (xr + hr).sigmoid()
        return {"r": r, "z": (xz + hz).sigmoid(), "n": (xn + r * hn).tanh()}
    return {"h": (pre_x + pre_h).tanh() if mode == "RNN_TANH" else (pre_x + pre_h).relu()}


def _run_layer0(
    module: nn.RNNBase,
    pre_x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor | None,
    w_hh: torch.Tensor,
    b_hh: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Layer 0 step by step (with several layers its hidden states are not in the module's output)."""
    h = h0
    c = c0 if c0 is not None else h0.new_zeros(h0.shape[0], module.hidden_size)
    w_hr = getattr(module, "weight_hr_l0", None)
    collected: dict[str, list[torch.Tensor]] = {}
    for t in range(pre_x.shape[0]):
        gates = _gates(module.mode, pre_x[t], h, w_hh, b_hh)
        for k, v in gates.items():
            collected.setdefault(k, []).append(v)
        if module.mode == "LSTM":
            c = gates["f"] * c + gates["i"] * gates["g"]
            h = gates["o"] * torch.tanh(c)
            h = h @ w_hr.float().t() if w_hr is not None else h
        elif module.mode == "GRU":
            h = (1 - gates["z"]) * gates["n"] + gates["z"] * h
        else:
            h = gates["h"]
    return {k: torch.stack(v) for k, v in collected.items()}


def gate_figures(mode: str, gates: dict[str, torch.Tensor], flat: float = FLAT) -> dict[str, torch.Tensor]:
    """Per gate ``(N, H)``: `site_figures` of its derivative (units: the hidden units), then its mean
    value, its mean ``log10`` and the largest per-unit mean ``log10`` (the most open unit's geometric-mean
    gate value; both NaN for the tanh gates ``g``, ``n`` and the RNN's ``h``): 8 floats.

    Examples:
        >>> f = gate_figures("LSTM", {"f": torch.tensor([[0.1, 0.01], [0.1, 0.01]])})["f"]
        >>> [round(v, 4) for v in f.tolist()[5:]]
        [0.055, -1.5, -1.0]
    """
    out = {}
    for name, g in gates.items():
        kind = _GATE_KIND.get(name, "tanh" if mode == "RNN_TANH" else "relu")
        d, top = derivative(kind, g)
        if kind == "sigmoid":
            logs = g.float().clamp_min(1e-30).log10()
            tail = torch.stack([g.float().mean(), logs.mean(), logs.mean(dim=0).max()])
        else:
            tail = torch.stack([g.float().mean(), g.new_tensor(math.nan), g.new_tensor(math.nan)])
        out[name] = torch.cat([site_figures(d, top, g.ndim - 1, flat), tail.float()])
    return out
