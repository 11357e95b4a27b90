"""The event log: one JSON object per line in ``lightning_clip_events.jsonl``. No Lightning import.

Strict JSON has no NaN or Infinity, so non-finite numbers are written as the strings ``"nan"``,
``"inf"`` and ``"-inf"`` (read them back with ``float(value)``).

Example:
    >>> import json, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), EVENTS_FILENAME)
    >>> EventLog(path).write({"step": 3, "norm": float("nan"), "loss": 0.5})
    >>> json.loads(open(path).read())
    {'step': 3, 'norm': 'nan', 'loss': 0.5}
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

__all__ = ["EVENTS_FILENAME", "EventLog", "json_number", "read_events"]

EVENTS_FILENAME = "lightning_clip_events.jsonl"


def json_number(value: float | None) -> float | str | None:
    """``value`` itself when finite, else ``"nan"`` / ``"inf"`` / ``"-inf"`` (None stays None)."""
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


class EventLog:
    """Appends one JSON line per event to ``path`` (creating its folder), flushed at once."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        clean = {k: json_number(v) if isinstance(v, float) else v for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")


def read_events(path: str) -> list[dict[str, Any]]:
    """Every event of a ``lightning_clip_events.jsonl`` file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
