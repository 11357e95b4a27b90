"""The figures of a run (steps, clip rate, norm percentiles, events, rollbacks) and their text form.
Imports neither torch nor Lightning."""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_clip._numbers import percentile_of_sorted
from lightning_clip.report.load import RunData, Series

__all__ = [
    "MOST_CLIPPED_KEY",
    "NORM_KEY",
    "TRAINING_STEP_KEYS",
    "NormSummary",
    "RunSummary",
    "TensorClipping",
    "event_x",
    "format_summary",
    "percentile",
    "summarize",
]

NORM_KEY = re.compile(r"^grad/norm(?P<suffix>(_opt\d+)?)$")
"""The gradient-norm keys ``AdaptiveGradientClipping`` logs; ``suffix`` is ``""`` or ``_opt{i}``."""
MOST_CLIPPED_KEY = re.compile(r"^grad/most_clipped(?P<suffix>(_opt\d+)?)/(?P<name>.+)$")
"""Per-tensor modes: the key naming the step's most clipped tensor (its value: that tensor's coefficient)."""


@dataclass
class TensorClipping:
    """How often one parameter tensor was the most clipped one (per-tensor modes).

    Attributes:
        name: the parameter's name.
        steps: logged steps on which it was the most clipped tensor.
        median_coef: the median of its coefficient on those steps.
    """

    name: str
    steps: int
    median_coef: float


TRAINING_STEP_KEYS = ("explosion/", "grad_health/")
"""Prefixes of the keys lightning-clip's callbacks log on the Trainer's training logging steps."""


def event_x(event: dict[str, Any]) -> int:
    """An event's position on the loggers' x axis (``metrics.csv``'s ``step``): its ``log_step``, else (an
    event log written before the field existed) its ``global_step``.

    Examples:
        >>> event_x({"step": 8, "log_step": 4}), event_x({"step": 8})
        (4, 8)
    """
    x = event.get("log_step")
    return int(x) if isinstance(x, int) and not isinstance(x, bool) else int(event["step"])


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (``0 ≤ q ≤ 100``) with linear interpolation (numpy's default); NaN if empty.

    The values are sorted, then interpolated by the code ``PercentileThreshold`` applies to its window.

    Args:
        values: the numbers, in any order.
        q: the percentile, in ``[0, 100]``.

    Returns:
        The interpolated value, or NaN for an empty ``values``.

    Examples:
        >>> percentile([4.0, 1.0, 3.0, 2.0], 50)
        2.5
    """
    return percentile_of_sorted(sorted(values), q)


@dataclass
class NormSummary:
    """Gradient-norm figures of one optimizer over the logged steps.

    Attributes:
        key: the norm's metric name (``grad/norm`` or ``grad/norm_opt{i}``).
        logged_steps: steps with a logged norm.
        nonfinite: of those, how many norms were NaN/Inf.
        p50: the median of the finite norms.
        p90: their 90th percentile.
        p99: their 99th percentile.
        max: the largest finite norm.
        clipped: steps whose clip coefficient (``grad/clip_coef``) was below 1; None without the key.
        clip_rate: ``clipped`` / steps with a logged coefficient; None without the key.
        clipped_fraction: per-tensor modes: the mean fraction of tensors clipped per logged step; None
            without ``grad/clipped_fraction``.
        most_clipped: per-tensor modes: the tensors that were the most clipped, most often first.
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
    clipped_fraction: float | None = None
    most_clipped: list[TensorClipping] = field(default_factory=list)


@dataclass
class RunSummary:
    """What [`summarize`][lightning_clip.report.summarize] found in a run.

    [`format_summary`][lightning_clip.report.format_summary] prints it.

    Attributes:
        run_dir: the directory.
        sources: the files read.
        last_step: the largest step in any series or event; None when nothing was logged.
        norms: one entry per logged gradient-norm key.
        events_by_kind: the event log's records counted by ``kind``.
        actions: the records counted by ``action``.
        rollbacks: rollbacks (from the event log, else the last logged ``explosion/rollbacks``).
        skipped_steps: the last logged ``explosion/skipped_steps``; None without it.
        final: the last value of every loss and ``train*`` / ``val*`` / ``test*`` metric.
        notes: what was skipped while reading and why.
        training_logged: the directory shows a training logging step (a key lightning-clip's guard or
            monitor logs on those steps, ``explosion/*`` / ``grad_health/*``, or a ``*_step`` key of
            ``self.log(on_step=True, on_epoch=True)``): at such a step ``AdaptiveGradientClipping`` logs
            ``grad/norm``, so its absence means the clipper was not attached.
    """

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
    training_logged: bool = False


def _last(series: Series, key: str) -> float | None:
    values = series.get(key)
    return values[-1][1] if values else None


def _norm_summary(series: Series, key: str, suffix: str) -> NormSummary:
    values = [v for _, v in series[key]]
    finite = [v for v in values if math.isfinite(v)]
    coefs = series.get(f"grad/clip_coef{suffix}")
    clipped = None if coefs is None else sum(1 for _, c in coefs if c < 1.0)
    fractions = [v for _, v in series.get(f"grad/clipped_fraction{suffix}", [])]
    most = []
    for name_key, pairs in series.items():
        match = MOST_CLIPPED_KEY.match(name_key)
        if match is not None and match.group("suffix") == suffix and pairs:
            coefs_of = [c for _, c in pairs]
            most.append(TensorClipping(match.group("name"), len(coefs_of), percentile(coefs_of, 50)))
    most.sort(key=lambda t: (-t.steps, t.median_coef, t.name))
    return NormSummary(
        key=key,
        logged_steps=len(values),
        nonfinite=len(values) - len(finite),
        p50=percentile(finite, 50),
        p90=percentile(finite, 90),
        p99=percentile(finite, 99),
        max=max(finite) if finite else math.nan,
        clipped=clipped,
        clip_rate=None if coefs is None or clipped is None else clipped / len(coefs),
        clipped_fraction=sum(fractions) / len(fractions) if fractions else None,
        most_clipped=most,
    )


def summarize(run: RunData) -> RunSummary:
    """The figures of a run: steps, clip rate, norm percentiles, events by kind, rollbacks.

    Rollbacks are counted from the event log when there is one, else from the last logged
    ``explosion/rollbacks``.

    Args:
        run: what [`load_run`][lightning_clip.report.load_run] read.

    Returns:
        The run's summary.
    """
    steps = [s for values in run.series.values() for s, _ in values]
    steps += [event_x(e) for e in run.events]
    norms = [
        _norm_summary(run.series, key, match.group("suffix"))
        for key in sorted(run.series)
        if (match := NORM_KEY.match(key)) is not None
    ]
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
        training_logged=any(k.startswith(TRAINING_STEP_KEYS) or k.endswith("_step") for k in run.series),
    )


def _g(x: float) -> str:
    return f"{x:.4g}"


def _format_norm(n: NormSummary) -> list[str]:
    out = [
        f"{n.key}: {n.logged_steps} logged steps, {n.nonfinite} non-finite;"
        f" p50 {_g(n.p50)}  p90 {_g(n.p90)}  p99 {_g(n.p99)}  max {_g(n.max)}"
    ]
    if n.clip_rate is not None:
        out.append(f"  clipped: {n.clipped} of the logged steps ({100 * n.clip_rate:.1f}%)")
    else:
        out.append("  clipped: unknown (no grad/clip_coef logged)")
    if n.clipped_fraction is not None:
        out.append(f"  per-tensor: {100 * n.clipped_fraction:.1f}% of the tensors clipped per logged step")
    if n.most_clipped:
        out.append("  most clipped tensors (logged steps as the most clipped, median coefficient):")
        out += [f"    {t.name}: {t.steps} steps, coef {_g(t.median_coef)}" for t in n.most_clipped[:10]]
    return out


def format_summary(summary: RunSummary) -> str:
    """The summary as plain text (what ``lightning-clip report`` prints).

    Args:
        summary: what [`summarize`][lightning_clip.report.summarize] returned.

    Returns:
        The lines of the summary, joined by newlines.
    """
    out = [f"run: {summary.run_dir}"]
    out += [f"  read: {os.path.basename(s)}" for s in summary.sources]
    out += [f"  note: {n}" for n in summary.notes]
    out.append(f"last step: {summary.last_step if summary.last_step is not None else '-'}")
    if not summary.norms and summary.training_logged:
        out.append("gradient norms: none logged (attach AdaptiveGradientClipping to log grad/norm)")
    elif not summary.norms:
        out.append(
            "gradient norms: none logged (no training logging step in this directory; AdaptiveGradientClipping"
            " logs grad/norm on the Trainer's logging steps, every `log_every_n_steps`)"
        )
    for n in summary.norms:
        out += _format_norm(n)
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
