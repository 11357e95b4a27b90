"""Reading a run's log directory: ``metrics.csv`` (``CSVLogger``), TensorBoard event files and the
event log ``ExplosionGuard`` writes. Imports neither torch nor Lightning (``tensorboard`` only when a
TensorBoard file is read).

`load_events` is the one reader of ``lightning_clip_events.jsonl`` in the package.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from lightning_clip.guard.events import EVENTS_FILENAME

__all__ = [
    "METRICS_FILENAME",
    "TENSORBOARD_PATTERN",
    "ReportError",
    "RunData",
    "Series",
    "load_events",
    "load_metrics_csv",
    "load_run",
    "load_tensorboard",
]

METRICS_FILENAME = "metrics.csv"
"""The file ``CSVLogger`` writes in its ``log_dir``."""
TENSORBOARD_PATTERN = "events.out.tfevents.*"
"""The names of the files ``TensorBoardLogger`` writes in its ``log_dir``."""

MAX_STEP = 2**63 - 1
"""The largest step an event may carry (Lightning's ``global_step`` is a 64-bit counter)."""

Series = dict[str, list[tuple[int, float]]]
"""Metric name -> ``(step, value)`` pairs in file order."""


class ReportError(Exception):
    """A run directory or one of its files is missing or malformed.

    The message names the path and the problem (``lightning-clip report`` prints it and exits with
    status 2).
    """


@dataclass
class RunData:
    """What [`load_run`][lightning_clip.report.load_run] read from a run directory.

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


def _read_lines(path: str, what: str = "", newline: str | None = None) -> list[str]:
    try:
        with open(path, newline=newline, encoding="utf-8") as f:
            return f.readlines()
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: cannot be read{what} ({err}).") from None


def _csv_header(path: str, rows: list[list[str]]) -> list[str]:
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise ReportError(f"{path}: empty file, expected a CSVLogger header line with a 'step' column.")
    header = [h.strip() for h in rows[0]]
    if "step" not in header:
        raise ReportError(
            f"{path}: the header {header!r} has no 'step' column; is it a CSVLogger metrics.csv?"
        )
    return header


def _csv_step(path: str, line: int, cell: str) -> int:
    value = _parse_float(cell, path, line, "step")
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise ReportError(f"{path}: line {line}, column 'step': expected an integer ≥ 0, got {cell!r}.")
    return int(value)


def load_metrics_csv(path: str) -> Series:
    """Read a ``CSVLogger`` ``metrics.csv``: one series per column except ``step`` and ``epoch``.

    Empty cells (a metric not logged on that row) are skipped; ``nan`` / ``inf`` cells are kept.

    Args:
        path: the file.

    Returns:
        Metric name -> ``(step, value)`` pairs, in file order; columns without a value are left out.

    Raises:
        ReportError: the file cannot be read, is empty, has no ``step`` column, or holds a cell that is
            not a number (the message gives the line and column).

    Examples:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "metrics.csv")
        >>> _ = open(path, "w").write("epoch,grad/norm,step\\n0,2.5,0\\n0,,1\\n0,nan,2\\n")
        >>> load_metrics_csv(path)
        {'grad/norm': [(0, 2.5), (2, nan)]}
    """
    try:
        rows = list(csv.reader(_read_lines(path, " as CSV", newline="")))
    except csv.Error as err:
        raise ReportError(f"{path}: cannot be read as CSV ({err}).") from None
    header = _csv_header(path, rows)
    step_col = header.index("step")
    series: Series = {h: [] for h in header if h not in ("step", "epoch")}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise ReportError(f"{path}: line {line} has {len(row)} fields, the header has {len(header)}.")
        step = _csv_step(path, line, row[step_col])
        for name, cell in zip(header, row, strict=True):
            if name in series and cell.strip():
                series[name].append((step, _parse_float(cell.strip(), path, line, name)))
    return {k: v for k, v in series.items() if v}


def load_tensorboard(run_dir: str) -> Series:
    """Scalars of every TensorBoard event file in ``run_dir`` (not recursive), via ``EventAccumulator``.

    Args:
        run_dir: the ``TensorBoardLogger``'s ``log_dir``.

    Returns:
        Tag -> ``(step, value)`` pairs, sorted by step.

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

    Non-finite numbers written as the strings ``"nan"`` / ``"inf"`` / ``"-inf"`` are kept as written
    (read them with ``float(value)``).

    Args:
        path: the file (``ExplosionGuard.events_path``).

    Returns:
        The records, in file order.

    Raises:
        ReportError: the file cannot be read, a line is not JSON, or a record is not an object with an
            integer ``step`` and a string ``kind`` (the message gives the line); a ``step`` or a
            ``log_step`` outside ``[0, 2**63 - 1]``.

    Examples:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "lightning_clip_events.jsonl")
        >>> _ = open(path, "w").write('{"step": 3, "kind": "nonfinite_grad", "norm": "nan"}\\n')
        >>> load_events(path)
        [{'step': 3, 'kind': 'nonfinite_grad', 'norm': 'nan'}]
    """
    events: list[dict[str, Any]] = []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReportError(f"{path}: line {number} is not valid JSON ({err.msg}).") from None
        except (RecursionError, ValueError) as err:  # nested too deep, an integer of thousands of digits
            raise ReportError(
                f"{path}: line {number} cannot be read ({type(err).__name__}: {err})."
            ) from None
        if not isinstance(record, dict):
            raise ReportError(f"{path}: line {number} must be a JSON object, got {type(record).__name__}.")
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or not isinstance(record.get("kind"), str):
            raise ReportError(
                f"{path}: line {number} must have an integer 'step' and a string 'kind', got {line.strip()[:200]!r}."
            )
        if not 0 <= step <= MAX_STEP:
            raise ReportError(f"{path}: line {number}: 'step' must be in [0, 2**63 - 1], got {step}.")
        log_step = record.get("log_step")  # the event's x in the figures (optional)
        if log_step is not None and (
            not isinstance(log_step, int) or isinstance(log_step, bool) or not 0 <= log_step <= MAX_STEP
        ):
            raise ReportError(
                f"{path}: line {number}: 'log_step' must be an integer in [0, 2**63 - 1], got"
                f" {str(log_step)[:200]}."
            )
        events.append(record)
    return events


def _check_run_dir(run_dir: str) -> None:
    if not os.path.exists(run_dir):
        raise ReportError(f"{run_dir}: no such directory.")
    if not os.path.isdir(run_dir):
        raise ReportError(
            f"{run_dir}: is not a directory; pass the logger's log_dir (e.g. lightning_logs/version_0)."
        )


def _add_tensorboard(run: RunData, tb_files: list[str]) -> None:
    try:
        tb = load_tensorboard(run.run_dir)
    except ReportError as err:
        if not run.sources or "not installed" not in str(err):
            raise
        run.notes.append(str(err))  # the CSV was read: go on without the TensorBoard files
        return
    for name, values in tb.items():
        run.series.setdefault(name, values)
    run.sources.extend(tb_files)


def load_run(run_dir: str) -> RunData:
    """Read a run's log directory: ``metrics.csv`` and/or TensorBoard event files, and the event log.

    A directory holding the event log alone is a run too: one trained with ``logger=False`` (its
    ``lightning_clip_logs/version_<N>``), or one that never reached a logging step.

    Args:
        run_dir: the logger's ``log_dir`` (e.g. ``lightning_logs/version_0``), or the run's
            ``lightning_clip_logs/version_<N>``.

    Returns:
        The series, events, files read and notes of the run.

    Raises:
        ReportError: the directory does not exist, holds none of ``metrics.csv``, a TensorBoard event
            file and ``lightning_clip_events.jsonl``, or a file in it is malformed.
    """
    _check_run_dir(run_dir)
    run = RunData(run_dir=run_dir, series={})
    csv_path = os.path.join(run_dir, METRICS_FILENAME)
    tb_files = sorted(glob.glob(os.path.join(run_dir, TENSORBOARD_PATTERN)))
    events_path = os.path.join(run_dir, EVENTS_FILENAME)
    if not os.path.exists(csv_path) and not tb_files and not os.path.exists(events_path):
        raise ReportError(
            f"{run_dir}: holds none of {METRICS_FILENAME} (CSVLogger), a TensorBoard event file and"
            f" {EVENTS_FILENAME} (ExplosionGuard); pass the logger's log_dir (e.g."
            " lightning_logs/version_0) or, for a run without a logger, its"
            " lightning_clip_logs/version_<N>."
        )
    if os.path.exists(csv_path):
        run.series.update(load_metrics_csv(csv_path))
        run.sources.append(csv_path)
    if tb_files:
        _add_tensorboard(run, tb_files)
    if os.path.exists(events_path):
        run.events = load_events(events_path)
        run.sources.append(events_path)
    return run
