"""Figures from lightning-clip's measurements.

matplotlib (the ``plot`` extra) is imported lazily, inside each function, so importing this module never
needs it. The figures are ``matplotlib.figure.Figure`` objects on an Agg canvas, not attached to pyplot:
no window opens.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_clip.report.load import ReportError, RunData
from lightning_clip.report.summary import NORM_KEY, event_x

__all__ = ["plot_gradient_flow", "plot_norms", "write_figures"]


def _figure(height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ------------------------------------------------------------------------------------ gradient flow
def _finite_pairs(check: Mapping[str, Any]) -> list[tuple[int, float]]:
    """``(depth, norm)`` of one check, finite norms only, by depth."""
    return sorted(
        (int(d), float(v))
        for d, v in zip(check["layers"], check["norms"], strict=True)
        if math.isfinite(float(v))
    )


def _flow_floor(history: Sequence[Mapping[str, Any]]) -> tuple[float, list[int]]:
    """A tenth of the smallest positive norm (exact zeros are drawn there), and the depths seen."""
    used: set[int] = set()
    floor = math.inf
    for check in history:
        pairs = _finite_pairs(check)
        positive = [v for _, v in pairs if v > 0]
        if positive:
            floor = min(floor, min(positive))
        used.update(d for d, _ in pairs)
    return (floor / 10 if math.isfinite(floor) else 1e-12), sorted(used)


def plot_gradient_flow(
    history: Sequence[Mapping[str, Any]],
    layer_names: Sequence[str],
    path: str | None = None,
    title: str = "Gradient flow: per-layer gradient norm against depth",
) -> Any:
    """Per-layer gradient norm against depth, one line per check, log scale.

    The lines are coloured from the first check to the last, as recorded by
    ``VanishingGradientMonitor`` (its ``history`` and ``layer_names``).

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

    Examples:
        >>> fig = plot_gradient_flow(
        ...     [{"step": 0, "layers": [0, 1], "norms": [1e-8, 1.0]}], ["inp", "out"])
        >>> fig.axes[0].get_yscale()
        'log'
    """
    import matplotlib
    from matplotlib import cm, colors

    fig = _figure(4.0)
    ax = fig.add_subplot()
    steps = [int(h["step"]) for h in history] or [0]
    norm = colors.Normalize(vmin=min(steps), vmax=max(max(steps), min(steps) + 1))
    cmap = matplotlib.colormaps["viridis"]
    floor, depths = _flow_floor(history)
    for h in history:
        pairs = _finite_pairs(h)
        if pairs:
            ys = [max(v, floor) for _, v in pairs]  # exact zeros (underflow) drawn at the floor
            color = cmap(norm(int(h["step"])))
            ax.plot([d for d, _ in pairs], ys, color=color, marker=".", markersize=3, linewidth=1, alpha=0.8)
    ax.set_yscale("log")
    ax.axhline(floor, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("layer (depth, input side first)")
    ax.set_ylabel("gradient 2-norm (0 drawn at the dotted floor)")
    ax.set_title(title, fontsize=10)
    if depths and len(depths) <= 40:
        ax.set_xticks(depths)
        names = [layer_names[d] if d < len(layer_names) else str(d) for d in depths]
        ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.grid(True, which="major", alpha=0.3)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="optimizer step")
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


# ------------------------------------------------------------------------------------ norms of a run
def _draw_norm_series(ax: Any, run: RunData, key: str, color: str, top: float) -> None:
    """One optimizer's norm line, its non-finite steps, its threshold and its clipped steps."""
    suffix = NORM_KEY.match(key).group("suffix")  # type: ignore[union-attr]
    pts = run.series[key]
    finite = [(s, v) for s, v in pts if math.isfinite(v)]
    ax.plot(
        [s for s, _ in finite],
        [v for _, v in finite],
        color=color,
        linewidth=0.8,
        alpha=0.8,
        label=f"gradient norm{suffix}",
    )
    bad = [s for s, v in pts if not math.isfinite(v)]
    if bad:
        ax.scatter(bad, [top] * len(bad), marker="^", color="red", s=25, zorder=5, label="non-finite norm")
    thr = [(s, v) for s, v in run.series.get(f"grad/clip_threshold{suffix}", []) if math.isfinite(v)]
    if thr:
        ax.plot(
            [s for s, _ in thr],
            [v for _, v in thr],
            color="black",
            linewidth=1.2,
            linestyle="--",
            zorder=6,
            label=f"clip threshold{suffix}",
        )
    coefs = dict(run.series.get(f"grad/clip_coef{suffix}", []))
    clipped = [(s, v) for s, v in finite if coefs.get(s, 1.0) < 1.0]
    if clipped:
        ax.scatter(
            [s for s, _ in clipped],
            [v for _, v in clipped],
            s=4,
            color="tab:green",
            alpha=0.7,
            zorder=4,
            label=f"clipped step ({len(clipped)})",
        )


def _draw_events(ax: Any, run: RunData) -> tuple[list[Any], list[str]]:
    """A vertical line per event (red: rollback, orange: skip) at its ``log_step`` (the x of the metrics,
    also in manual optimization with several optimizers); the legend's handles and labels."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    styles: dict[str, tuple[str, Any]] = {"rollback": ("red", "-"), "skip": ("orange", "-")}
    seen: set[str] = set()
    for event in run.events:
        action = str(event.get("action", ""))
        color, style = styles.get(action, ("purple", ":"))
        ax.axvline(event_x(event), color=color, linestyle=style, linewidth=1.2, alpha=0.8)
        if action not in seen:
            seen.add(action)
            handles.append(Line2D([], [], color=color, linestyle=style))
            labels.append(f"{action or 'event'} ({event['kind']!s})")
    return handles, labels


def _draw_metrics(bx: Any, run: RunData, keys: list[str]) -> None:
    """The bottom panel: validation metrics (dots) and the training loss (grey), log scale."""
    for key in keys:
        pts = [(s, v) for s, v in run.series[key] if math.isfinite(v) and v > 0]
        if pts:
            val = key.startswith("val")
            bx.plot(
                [s for s, _ in pts],
                [v for _, v in pts],
                linewidth=1.0,
                label=key,
                marker="." if val else None,
                markersize=4,
                color=None if val else "grey",
                alpha=1.0 if val else 0.6,
            )
    bx.set_yscale("log")
    bx.set_ylabel("metric")
    bx.grid(True, which="major", alpha=0.3)
    bx.legend(fontsize=7, loc="upper right")


def plot_norms(run: RunData, path: str | None = None, title: str | None = None) -> Any:
    """Gradient norm and clip threshold over steps, with clipped steps, skips and rollbacks marked.

    Top panel (log scale): the pre-clip norm (``grad/norm``), the threshold (``grad/clip_threshold``),
    a dot on every clipped step (``grad/clip_coef`` < 1), a red triangle at the top for a non-finite norm,
    and the event log's events: a dashed red line for a rollback, an orange line for a skip. Bottom panel
    (when logged): the validation metrics and the training loss.

    Args:
        run: what [`load_run`][lightning_clip.report.load_run] read.
        path: where to save the figure as PNG (optional).
        title: the figure's title (default: names the run directory).

    Returns:
        The ``matplotlib.figure.Figure`` (not attached to pyplot).

    Raises:
        ImportError: when matplotlib is not installed (the ``plot`` extra).
    """
    lower = [k for k in sorted(run.series) if k.startswith("val")]
    lower += [k for k in sorted(run.series) if k.startswith("train") and "loss" in k]
    fig = _figure(5.2 if lower else 3.6)
    axes = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1]) if lower else [fig.subplots()]
    ax = axes[0]
    norm_keys = [k for k in sorted(run.series) if NORM_KEY.match(k)]
    finite_all = [v for k in norm_keys for _, v in run.series[k] if math.isfinite(v) and v > 0]
    top = max(finite_all) * 3 if finite_all else 1.0
    for i, key in enumerate(norm_keys):
        _draw_norm_series(ax, run, key, f"C{i}", top)
    handles, labels = _draw_events(ax, run)
    if finite_all:
        ax.set_yscale("log")
    ax.set_ylabel("gradient 2-norm (pre-clip)")
    ax.grid(True, which="major", alpha=0.3)
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="upper right", framealpha=0.8)
    name = os.path.basename(os.path.normpath(run.run_dir))
    ax.set_title(title or f"Gradient norm and clip threshold: {name}", fontsize=10)
    if lower:
        _draw_metrics(axes[1], run, lower)
    axes[-1].set_xlabel("optimizer step")
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def write_figures(run: RunData, out_dir: str) -> list[str]:
    """Write the run's figures into ``out_dir`` (created) and return their paths.

    Today one figure: ``grad_norm.png`` ([`plot_norms`][lightning_clip.report.plot_norms]), when any
    gradient norm or event was logged.

    Args:
        run: what [`load_run`][lightning_clip.report.load_run] read.
        out_dir: the folder to write into.

    Returns:
        The paths written (empty when there is nothing to draw).

    Raises:
        ReportError: matplotlib is not installed (install the ``plot`` extra), or ``out_dir`` cannot be
            written.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError(
            f"{out_dir}: cannot write figures, matplotlib is not installed"
            " (pip install 'lightning-clip[plot]', or pass --no-figures)."
        ) from None
    if not any(NORM_KEY.match(k) for k in run.series) and not run.events:
        return []
    path = os.path.join(out_dir, "grad_norm.png")
    try:
        os.makedirs(out_dir, exist_ok=True)
        plot_norms(run, path)
    except OSError as err:
        raise ReportError(f"{out_dir}: cannot write figures ({err}).") from None
    return [path]
