"""Figures from lightning-clip's measurements. matplotlib (the ``plot`` extra) is imported lazily, inside
each function, so importing this module never needs it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["plot_gradient_flow"]


# ------------------------------------------------------------------------------------ gradient flow
def plot_gradient_flow(
    history: Sequence[Mapping[str, Any]],
    layer_names: Sequence[str],
    path: str | None = None,
    title: str = "Gradient flow: per-layer gradient norm against depth",
) -> Any:
    """Per-layer gradient norm against depth, one line per check, coloured from the first check to the
    last, log scale (as recorded by :class:`~lightning_clip.VanishingGradientMonitor`).

    Args:
        history: one mapping per check with ``"step"`` (int), ``"layers"`` (indices into
            ``layer_names``, i.e. depths) and ``"norms"`` (the layers' gradient norms).
        layer_names: name of each depth (input side first).
        path: where to save the figure as PNG (optional).
        title: the figure's title.

    Returns:
        The ``matplotlib.figure.Figure`` (not attached to pyplot: no window opens).

    Raises:
        ImportError: when matplotlib is not installed.

    Example:
        >>> fig = plot_gradient_flow(
        ...     [{"step": 0, "layers": [0, 1], "norms": [1e-8, 1.0]}], ["inp", "out"])
        >>> fig.axes[0].get_yscale()
        'log'
    """
    import matplotlib
    from matplotlib import cm, colors
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [int(h["step"]) for h in history] or [0]
    norm = colors.Normalize(vmin=min(steps), vmax=max(max(steps), min(steps) + 1))
    cmap = matplotlib.colormaps["viridis"]
    used: set[int] = set()
    floor = math.inf
    for h in history:
        pairs = [
            (int(d), float(v))
            for d, v in zip(h["layers"], h["norms"], strict=True)
            if math.isfinite(float(v))
        ]
        positive = [v for _, v in pairs if v > 0]
        if positive:
            floor = min(floor, min(positive))
        used.update(d for d, _ in pairs)
    floor = floor / 10 if math.isfinite(floor) else 1e-12
    for h in history:
        pairs = sorted(
            (int(d), float(v))
            for d, v in zip(h["layers"], h["norms"], strict=True)
            if math.isfinite(float(v))
        )
        if not pairs:
            continue
        xs = [d for d, _ in pairs]
        ys = [max(v, floor) for _, v in pairs]  # exact zeros (underflow) drawn at the floor
        ax.plot(xs, ys, color=cmap(norm(int(h["step"]))), marker=".", markersize=3, linewidth=1, alpha=0.8)
    ax.set_yscale("log")
    ax.axhline(floor, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("layer (depth, input side first)")
    ax.set_ylabel("gradient 2-norm (0 drawn at the dotted floor)")
    ax.set_title(title, fontsize=10)
    depths = sorted(used)
    if depths and len(depths) <= 40:
        ax.set_xticks(depths)
        ax.set_xticklabels(
            [layer_names[d] if d < len(layer_names) else str(d) for d in depths], rotation=90, fontsize=6
        )
    ax.grid(True, which="major", alpha=0.3)
    mappable = cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(mappable, ax=ax, label="optimizer step")
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
