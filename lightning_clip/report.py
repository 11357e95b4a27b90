"""Figures from lightning-clip's measurements. matplotlib (the ``plot`` extra) is imported lazily, inside
each function, so importing this module never needs it."""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_clip.guard.events import EVENTS_FILENAME

__all__ = [
    "NormSummary",
    "ReportError",
    "RunData",
    "RunSummary",
    "format_summary",
    "load_events",
    "load_metrics_csv",
    "load_run",
    "load_tensorboard",
    "percentile",
    "plot_gradient_flow",
    "plot_norms",
    "summarize",
    "write_figures",
]


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


# ------------------------------------------------------------------------------- run report (CLI)
METRICS_FILENAME = "metrics.csv"
"""The file ``CSVLogger`` writes in its ``log_dir``."""
TENSORBOARD_PATTERN = "events.out.tfevents.*"

_NORM_KEY = re.compile(r"^grad/norm(?P<suffix>(_opt\d+)?)$")

Series = dict[str, list[tuple[int, float]]]
"""Metric name -> ``(step, value)`` pairs in file order."""


class ReportError(Exception):
    """A run directory or one of its files is missing or malformed; the message names the path and the
    problem (``lightning-clip report`` prints it and exits with status 2)."""


@dataclass
class RunData:
    """What :func:`load_run` read from a run directory.

    Attributes:
        run_dir: the directory.
        series: metric name -> ``(step, value)`` pairs (``metrics.csv`` first, then TensorBoard scalars
            whose names the CSV lacks).
        events: the event log's records (empty when there is no ``lightning_clip_events.jsonl``).
        sources: the files read, for the summary.
        notes: what was skipped and why (e.g. TensorBoard files without the ``tensorboard`` package).
    """

    run_dir: str
    series: Series
    events: list[dict[str, Any]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _parse_float(text: str, path: str, line: int, column: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ReportError(
            f"{path}: line {line}, column {column!r}: expected a number, got {text!r}."
        ) from None


def load_metrics_csv(path: str) -> Series:
    """Read a ``CSVLogger`` ``metrics.csv``: one series per column except ``step`` and ``epoch``.

    Empty cells (a metric not logged on that row) are skipped; ``nan`` / ``inf`` cells are kept.

    Raises:
        ReportError: the file cannot be read, is empty, has no ``step`` column, or holds a cell that is
            not a number (the message gives the line and column).

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "metrics.csv")
        >>> _ = open(path, "w").write("epoch,grad/norm,step\\n0,2.5,0\\n0,,1\\n0,nan,2\\n")
        >>> load_metrics_csv(path)
        {'grad/norm': [(0, 2.5), (2, nan)]}
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file.") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ReportError(f"{path}: cannot be read as CSV ({err}).") from None
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise ReportError(f"{path}: empty file, expected a CSVLogger header line with a 'step' column.")
    header = [h.strip() for h in rows[0]]
    if "step" not in header:
        raise ReportError(
            f"{path}: the header {header!r} has no 'step' column; is it a CSVLogger metrics.csv?"
        )
    step_col = header.index("step")
    series: Series = {h: [] for h in header if h not in ("step", "epoch")}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise ReportError(f"{path}: line {line} has {len(row)} fields, the header has {len(header)}.")
        step_value = _parse_float(row[step_col], path, line, "step")
        if not math.isfinite(step_value) or step_value != int(step_value) or step_value < 0:
            raise ReportError(
                f"{path}: line {line}, column 'step': expected an integer ≥ 0, got {row[step_col]!r}."
            )
        step = int(step_value)
        for name, cell in zip(header, row, strict=True):
            if name in series and cell.strip():
                series[name].append((step, _parse_float(cell.strip(), path, line, name)))
    return {k: v for k, v in series.items() if v}


def load_tensorboard(run_dir: str) -> Series:
    """Scalars of every TensorBoard event file in ``run_dir`` (not recursive), via ``EventAccumulator``.

    Raises:
        ReportError: ``tensorboard`` is not installed, or an event file cannot be parsed.
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise ReportError(
            f"{run_dir}: holds TensorBoard event files, but the `tensorboard` package is not installed"
            " (pip install tensorboard)."
        ) from None
    series: Series = {}
    for path in sorted(glob.glob(os.path.join(run_dir, TENSORBOARD_PATTERN))):
        try:
            acc = EventAccumulator(path, size_guidance={"scalars": 0})
            acc.Reload()
            tags = acc.Tags().get("scalars", [])
            for tag in tags:
                series.setdefault(tag, []).extend((int(e.step), float(e.value)) for e in acc.Scalars(tag))
        except Exception as err:  # tensorboard raises assorted types on corrupt records
            raise ReportError(f"{path}: cannot be read as a TensorBoard event file ({err}).") from None
    for values in series.values():
        values.sort(key=lambda sv: sv[0])
    return series


def load_events(path: str) -> list[dict[str, Any]]:
    """Read ``lightning_clip_events.jsonl``: one JSON object per line (blank lines ignored).

    Non-finite numbers written as the strings ``"nan"`` / ``"inf"`` / ``"-inf"`` are kept as written.

    Raises:
        ReportError: the file cannot be read, a line is not JSON, or a record is not an object with an
            integer ``step`` and a string ``kind`` (the message gives the line).
    """
    events: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: cannot be read ({err}).") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReportError(f"{path}: line {number} is not valid JSON ({err.msg}).") from None
        if not isinstance(record, dict):
            raise ReportError(f"{path}: line {number} must be a JSON object, got {type(record).__name__}.")
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or not isinstance(record.get("kind"), str):
            raise ReportError(
                f"{path}: line {number} must have an integer 'step' and a string 'kind', got {line.strip()!r}."
            )
        events.append(record)
    return events


def load_run(run_dir: str) -> RunData:
    """Read a run's log directory: ``metrics.csv`` and/or TensorBoard event files, and the event log.

    Args:
        run_dir: the logger's ``log_dir`` (e.g. ``lightning_logs/version_0``).

    Raises:
        ReportError: the directory does not exist, holds neither ``metrics.csv`` nor a TensorBoard event
            file, or a file in it is malformed.
    """
    if not os.path.exists(run_dir):
        raise ReportError(f"{run_dir}: no such directory.")
    if not os.path.isdir(run_dir):
        raise ReportError(
            f"{run_dir}: is not a directory; pass the logger's log_dir (e.g. lightning_logs/version_0)."
        )
    run = RunData(run_dir=run_dir, series={})
    csv_path = os.path.join(run_dir, METRICS_FILENAME)
    tb_files = sorted(glob.glob(os.path.join(run_dir, TENSORBOARD_PATTERN)))
    if not os.path.exists(csv_path) and not tb_files:
        raise ReportError(
            f"{run_dir}: holds neither {METRICS_FILENAME} (CSVLogger) nor a TensorBoard event file; pass the"
            " logger's log_dir (e.g. lightning_logs/version_0)."
        )
    if os.path.exists(csv_path):
        run.series.update(load_metrics_csv(csv_path))
        run.sources.append(csv_path)
    if tb_files:
        try:
            tb = load_tensorboard(run_dir)
        except ReportError as err:
            if not run.sources or "not installed" not in str(err):
                raise
            run.notes.append(str(err))
        else:
            for name, values in tb.items():
                run.series.setdefault(name, values)
            run.sources.extend(tb_files)
    events_path = os.path.join(run_dir, EVENTS_FILENAME)
    if os.path.exists(events_path):
        run.events = load_events(events_path)
        run.sources.append(events_path)
    return run


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (``0 ≤ q ≤ 100``) with linear interpolation (numpy's default); NaN if empty.

    Example:
        >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
        2.5
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class NormSummary:
    """Gradient-norm figures of one optimizer over the logged steps.

    Attributes:
        key: the norm's metric name (``grad/norm`` or ``grad/norm_opt{i}``).
        logged_steps: steps with a logged norm.
        nonfinite: of those, how many norms were NaN/Inf.
        p50, p90, p99, max: percentiles of the finite norms.
        clipped: steps whose clip coefficient (``grad/clip_coef``) was below 1; None without the key.
        clip_rate: ``clipped`` / steps with a logged coefficient; None without the key.
    """

    key: str
    logged_steps: int
    nonfinite: int
    p50: float
    p90: float
    p99: float
    max: float
    clipped: int | None
    clip_rate: float | None


@dataclass
class RunSummary:
    """What :func:`summarize` found in a run (see :func:`format_summary`)."""

    run_dir: str
    sources: list[str]
    last_step: int | None
    norms: list[NormSummary]
    events_by_kind: dict[str, int]
    actions: dict[str, int]
    rollbacks: int
    skipped_steps: int | None
    final: dict[str, float]
    notes: list[str]


def _last(series: Series, key: str) -> float | None:
    values = series.get(key)
    return values[-1][1] if values else None


def summarize(run: RunData) -> RunSummary:
    """The figures of a run: steps, clip rate, norm percentiles, events by kind, rollbacks.

    Rollbacks are counted from the event log when there is one, else from the last logged
    ``explosion/rollbacks``.
    """
    steps = [s for values in run.series.values() for s, _ in values]
    steps += [int(e["step"]) for e in run.events]
    norms: list[NormSummary] = []
    for key in sorted(run.series):
        match = _NORM_KEY.match(key)
        if match is None:
            continue
        values = [v for _, v in run.series[key]]
        finite = [v for v in values if math.isfinite(v)]
        coefs = run.series.get(f"grad/clip_coef{match.group('suffix')}")
        clipped = None if coefs is None else sum(1 for _, c in coefs if c < 1.0)
        norms.append(
            NormSummary(
                key=key,
                logged_steps=len(values),
                nonfinite=len(values) - len(finite),
                p50=percentile(finite, 50),
                p90=percentile(finite, 90),
                p99=percentile(finite, 99),
                max=max(finite) if finite else math.nan,
                clipped=clipped,
                clip_rate=None if coefs is None or clipped is None else clipped / len(coefs),
            )
        )
    kinds = Counter(str(e["kind"]) for e in run.events)
    actions = Counter(str(e.get("action", "?")) for e in run.events)
    if run.events:
        rollbacks = actions.get("rollback", 0)
    else:
        logged = _last(run.series, "explosion/rollbacks")
        rollbacks = int(logged) if logged is not None and math.isfinite(logged) else 0
    skipped = _last(run.series, "explosion/skipped_steps")
    final = {
        k: v[-1][1]
        for k, v in sorted(run.series.items())
        if k.startswith(("val", "train", "test")) or "loss" in k
    }
    return RunSummary(
        run_dir=run.run_dir,
        sources=list(run.sources),
        last_step=max(steps) if steps else None,
        norms=norms,
        events_by_kind=dict(sorted(kinds.items())),
        actions=dict(sorted(actions.items())),
        rollbacks=rollbacks,
        skipped_steps=None if skipped is None or not math.isfinite(skipped) else int(skipped),
        final=final,
        notes=list(run.notes),
    )


def _g(x: float) -> str:
    return f"{x:.4g}"


def format_summary(summary: RunSummary) -> str:
    """The summary as plain text (what ``lightning-clip report`` prints)."""
    out = [f"run: {summary.run_dir}"]
    out += [f"  read: {os.path.basename(s)}" for s in summary.sources]
    out += [f"  note: {n}" for n in summary.notes]
    out.append(f"last step: {summary.last_step if summary.last_step is not None else '-'}")
    if not summary.norms:
        out.append("gradient norms: none logged (attach AdaptiveGradientClipping to log grad/norm)")
    for n in summary.norms:
        out.append(
            f"{n.key}: {n.logged_steps} logged steps, {n.nonfinite} non-finite;"
            f" p50 {_g(n.p50)}  p90 {_g(n.p90)}  p99 {_g(n.p99)}  max {_g(n.max)}"
        )
        if n.clip_rate is not None:
            out.append(f"  clipped: {n.clipped} of the logged steps ({100 * n.clip_rate:.1f}%)")
        else:
            out.append("  clipped: unknown (no grad/clip_coef logged)")
    if summary.events_by_kind:
        kinds = ", ".join(f"{k} {v}" for k, v in summary.events_by_kind.items())
        actions = ", ".join(f"{k} {v}" for k, v in summary.actions.items())
        out.append(f"events: {sum(summary.events_by_kind.values())} ({kinds}); actions: {actions}")
    else:
        out.append("events: none")
    out.append(f"rollbacks: {summary.rollbacks}")
    if summary.skipped_steps is not None:
        out.append(f"skipped steps: {summary.skipped_steps}")
    for k, v in summary.final.items():
        out.append(f"last {k}: {_g(v)}")
    return "\n".join(out)


def _event_number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def plot_norms(run: RunData, path: str | None = None, title: str | None = None) -> Any:
    """Gradient norm and clip threshold over steps, with clipped steps, skips and rollbacks marked.

    Top panel (log scale): the pre-clip norm (``grad/norm``), the threshold (``grad/clip_threshold``),
    a dot on every clipped step (``grad/clip_coef`` < 1), a red triangle at the top for a non-finite norm,
    and the event log's events: a dashed red line for a rollback, an orange line for a skip. Bottom panel
    (when logged): the validation metrics and the training loss.

    Returns:
        The ``matplotlib.figure.Figure`` (not attached to pyplot).

    Raises:
        ImportError: when matplotlib is not installed (the ``plot`` extra).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    lower = [k for k in sorted(run.series) if k.startswith("val")]
    lower += [k for k in sorted(run.series) if k.startswith("train") and "loss" in k]
    fig = Figure(figsize=(7.0, 5.2 if lower else 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1]) if lower else [fig.subplots()]
    ax = axes[0]
    norm_keys = [k for k in sorted(run.series) if _NORM_KEY.match(k)]
    finite_all = [v for k in norm_keys for _, v in run.series[k] if math.isfinite(v) and v > 0]
    top = max(finite_all) * 3 if finite_all else 1.0
    for i, key in enumerate(norm_keys):
        suffix = _NORM_KEY.match(key).group("suffix")  # type: ignore[union-attr]
        pts = run.series[key]
        ax.plot(
            [s for s, v in pts if math.isfinite(v)],
            [v for _, v in pts if math.isfinite(v)],
            color=f"C{i}",
            linewidth=0.8,
            alpha=0.8,
            label=f"gradient norm{suffix}",
        )
        bad = [s for s, v in pts if not math.isfinite(v)]
        if bad:
            ax.scatter(
                bad, [top] * len(bad), marker="^", color="red", s=25, zorder=5, label="non-finite norm"
            )
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
        clipped = [(s, v) for s, v in pts if math.isfinite(v) and coefs.get(s, 1.0) < 1.0]
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
    handles, labels = ax.get_legend_handles_labels()
    styles: dict[str, tuple[str, Any]] = {"rollback": ("red", "-"), "skip": ("orange", "-")}
    seen: set[str] = set()
    for event in run.events:
        action = str(event.get("action", ""))
        color, style = styles.get(action, ("purple", ":"))
        ax.axvline(int(event["step"]), color=color, linestyle=style, linewidth=1.2, alpha=0.8)
        if action not in seen:
            seen.add(action)
            handles.append(Line2D([], [], color=color, linestyle=style))
            labels.append(f"{action or 'event'} ({event['kind']!s})")
    if finite_all:
        ax.set_yscale("log")
    ax.set_ylabel("gradient 2-norm (pre-clip)")
    ax.grid(True, which="major", alpha=0.3)
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="upper right", framealpha=0.8)
    ax.set_title(
        title or f"Gradient norm and clip threshold: {os.path.basename(os.path.normpath(run.run_dir))}",
        fontsize=10,
    )
    if lower:
        bx = axes[1]
        for key in lower:
            pts = [(s, v) for s, v in run.series[key] if math.isfinite(v) and v > 0]
            if pts:
                bx.plot(
                    [s for s, _ in pts],
                    [v for _, v in pts],
                    linewidth=1.0,
                    label=key,
                    marker="." if key.startswith("val") else None,
                    markersize=4,
                    color=None if key.startswith("val") else "grey",
                    alpha=1.0 if key.startswith("val") else 0.6,
                )
        bx.set_yscale("log")
        bx.set_ylabel("metric")
        bx.grid(True, which="major", alpha=0.3)
        bx.legend(fontsize=7, loc="upper right")
        bx.set_xlabel("optimizer step")
    else:
        ax.set_xlabel("optimizer step")
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def write_figures(run: RunData, out_dir: str) -> list[str]:
    """Write the run's figures into ``out_dir`` (created) and return their paths: ``grad_norm.png``
    (:func:`plot_norms`), when any gradient norm or event was logged.

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
    written: list[str] = []
    has_norms = any(_NORM_KEY.match(k) for k in run.series)
    if not has_norms and not run.events:
        return written
    try:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "grad_norm.png")
        plot_norms(run, path)
    except OSError as err:
        raise ReportError(f"{out_dir}: cannot write figures ({err}).") from None
    written.append(path)
    return written
