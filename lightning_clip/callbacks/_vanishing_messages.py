"""The text of `VanishingGradientWarning` (what was measured, why, what to do) and
the monitor's logged keys.

Pure functions of the monitor's figures (no torch, no Lightning), so each count in a message can be pinned
against the figures it came from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_clip.diagnosis import Cause, ModelFacts, cause_block, plural

__all__ = [
    "MAX_LISTED",
    "DepthFigures",
    "depth_message",
    "layer_metrics",
    "no_grad_message",
    "recurrent_line",
    "time_message",
]

MAX_LISTED = 12
"""At most this many layers are listed in one warning (the rest are counted and named)."""


def fmt(x: float) -> str:
    return f"{x:.2e}" if math.isfinite(x) else str(x)


@dataclass(frozen=True)
class DepthFigures:
    """One check's through-depth figures, depth order (input side first)."""

    step: int
    layers: Sequence[str]
    norms: Sequence[float]
    ratios: Sequence[float]
    grad_to_weight: Sequence[float]


def recurrent_line(name: str, kind: str, radii: dict[str, float]) -> str:
    """The spectral radii of a recurrent layer's weight blocks (empty when none were computed)."""
    if not radii:
        return ""
    blocks = ", ".join(f"{b} {r:.3g}" for b, r in radii.items())
    return (
        f"\n  `{name}` ({kind}) spectral radius of the recurrent weights per block: {blocks}"
        " (below 1 the gradient shrinks like λ^T through T time steps, above 1 it grows)."
    )


def depth_message(
    fig: DepthFigures,
    due: Sequence[str],
    reported: Sequence[str],
    threshold: float,
    patience: int,
    every: int,
    causes: Sequence[Cause],
    facts: ModelFacts,
    extra: str = "",
    measured: bool = True,
) -> str:
    """The through-depth warning.

    Args:
        fig: the check's figures.
        due: the layers whose warning is due now (flagged ``patience`` checks in a row).
        reported: layers below the threshold now whose warning was given before, in this episode.
            Every other layer below the threshold is counted as flagged at fewer checks in a row.
        threshold, patience, every: the monitor's ``depth_threshold``, ``patience``, ``check_every_n_steps``.
        causes: the named causes, strongest first; ``facts``: what the model contains.
        extra: lines added after the figures (e.g. spectral radii of recurrent layers).
        measured: whether causes were measured at all.
    """
    layers, norms = fig.layers, fig.norms
    top = max(range(len(norms)), key=lambda i: norms[i])
    lines = _depth_lines(fig, due, reported, threshold, patience)
    named = sum(1 for n, r in zip(layers, fig.ratios, strict=True) if r < threshold and n in due)
    first, last = 0, len(layers) - 1
    io_ratio = fmt(norms[first] / norms[last]) if norms[last] > 0 else "n/a"
    return (
        f"Vanishing gradients through depth at step {fig.step}: {named} of {plural(len(layers), 'layer')}"
        f" get less than {threshold:g} of the gradient norm of the largest layer (`{layers[top]}`,"
        f" {fmt(norms[top])}), {patience} checks in a row (every {plural(every, 'step')}), input side first:\n"
        + "\n".join(lines)
        + f"\n  Input-side / output-side gradient norm (`{layers[first]}` / `{layers[last]}`): {io_ratio}."
        + extra
        + cause_block(causes, facts, through_time=False, measured=measured)
    )


def _depth_lines(
    fig: DepthFigures, due: Sequence[str], reported: Sequence[str], threshold: float, patience: int
) -> list[str]:
    """One line per layer due (at most `MAX_LISTED`, the rest named on one line), then the other
    layers below the threshold: already reported, or not yet ``patience`` checks in a row."""
    layers, norms, ratios, gw = fig.layers, fig.norms, fig.ratios, fig.grad_to_weight
    below = [i for i, r in enumerate(ratios) if r < threshold]
    named = [i for i in below if layers[i] in due]
    width = max(len(layers[i]) for i in named[:MAX_LISTED])
    lines = [
        f"  {layers[i]:<{width}}  grad norm {fmt(norms[i])}  ×{fmt(ratios[i])} of the largest  grad/weight {fmt(gw[i])}"
        for i in named[:MAX_LISTED]
    ]
    if len(named) > MAX_LISTED:
        lines.append(
            f"  … and {len(named) - MAX_LISTED} more: {', '.join(layers[i] for i in named[MAX_LISTED:])}"
        )
    others = [layers[i] for i in below if layers[i] not in due]
    old = [n for n in others if n in reported]
    new = [n for n in others if n not in reported]
    if old:
        lines.append(
            f"  ({plural(len(old), 'more layer')} below the threshold, already reported in this episode)"
        )
    if new:
        listed = ", ".join(new[:MAX_LISTED]) + (", …" if len(new) > MAX_LISTED else "")
        lines.append(
            f"  ({plural(len(new), 'more layer')} below the threshold at this check, not yet"
            f" {patience} checks in a row: {listed})"
        )
    return lines


def time_message(
    name: str,
    kind: str,
    step: int,
    decay: float,
    k: int,
    steps: int,
    patience: int,
    threshold: float,
    causes: Sequence[Cause],
    facts: ModelFacts,
    extra: str = "",
    measured: bool = True,
) -> str:
    """The through-time warning of the recurrent layer ``name`` (``kind``: e.g. ``RNN, tanh``): the
    earliest ``k`` of ``steps`` time steps get ``decay`` of what the latest ``k`` get."""
    if decay > 0:
        rate = f"about ×{decay ** (1.0 / max(1, steps - k)):.3g} per time step"
    else:
        rate = "it underflows float32: nothing arrives"
    return (
        f"Vanishing gradients through time in `{name}` ({kind}) at step {step}: the earliest {k} of"
        f" {steps} time steps get {fmt(decay)} of the gradient ‖∂L/∂x_t‖ that reaches the latest {k}"
        f" ({rate}), {patience} checks in a row (threshold {threshold:g}): the loss can hardly learn from"
        " early inputs." + extra + cause_block(causes, facts, through_time=True, measured=measured)
    )


def no_grad_message(step: int, patience: int, layers: dict[str, list[str]]) -> str:
    """Trainable parameters (per layer) that got no gradient on any step of ``patience`` check windows."""
    listed = "; ".join(f"`{n}` ({', '.join(ps)})" for n, ps in list(layers.items())[:MAX_LISTED])
    more = f" and {plural(len(layers) - MAX_LISTED, 'more layer')}" if len(layers) > MAX_LISTED else ""
    return (
        f"Trainable parameters got no gradient on any step up to step {step} since the check before,"
        f" {patience} checks in a row: {listed}{more}."
        " They are not used in the forward pass, or their output is detached from the loss. Reconnect them,"
        " remove them, or freeze them (`requires_grad_(False)`); under DDP unused parameters also need"
        " `strategy=DDPStrategy(find_unused_parameters=True)`."
    )


def layer_metrics(fig: dict[str, Any]) -> dict[str, float]:
    """The ``grad_health/...`` keys of one check's figures (see the monitor's table of logged keys)."""
    out: dict[str, float] = {}
    for name, norm, ratio, gw in zip(
        fig["layers"], fig["norms"], fig["depth_ratios"], fig["grad_to_weight"], strict=True
    ):
        out[f"grad_health/{name}/norm"] = norm
        out[f"grad_health/{name}/ratio"] = gw
        out[f"grad_health/{name}/depth_ratio"] = ratio
    for name, (decay, _, _) in fig["time_decay"].items():
        out[f"grad_health/{name}/time_decay"] = decay
    for name, radii in fig["spectral_radius"].items():
        for block, r in radii.items():
            out[f"grad_health/{name}/spectral_radius/{block}"] = r
    ev = fig.get("evidence")
    for site in ev.sites if ev is not None else []:
        if site.layer is not None:
            out.setdefault(f"grad_health/{site.layer}/flat_share", site.flat_share)
            out.setdefault(f"grad_health/{site.layer}/dead_share", site.dead_share)
    for name, per_gate in (ev.gates if ev is not None else {}).items():
        for gate, g in per_gate.items():
            out[f"grad_health/{name}/gate/{gate}"] = g.mean
    return out
