"""ExplosionGuard's event record and the event log: one JSON object per line in
``lightning_clip_events.jsonl``. No Lightning import.

Strict JSON has no NaN or Infinity, so non-finite numbers are written as the strings ``"nan"``,
``"inf"`` and ``"-inf"`` (read them back with ``float(value)``). The reader is
``lightning_clip.report.load_events``.

Examples:
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
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "EVENTS_FILENAME",
    "KIND_TEXT",
    "EventLog",
    "EventRecord",
    "failure_message",
    "json_number",
]

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


@dataclass
class EventRecord:
    """One event of `ExplosionGuard`, as written to the event log.

    Attributes:
        step, epoch, batch: where it happened (``global_step``, epoch, batch index in the epoch).
        optimizer: index of the optimizer whose step it was.
        kinds: every kind seen, in order of precedence; ``kind`` is the first.
        norm, loss: the step's total gradient norm and mean training loss (None when not measured).
        params: the first parameters whose gradients (or weights) went bad.
        action: ``"rollback"`` | ``"skip"`` | ``"raise"`` | ``"error"`` (recovery impossible).
        restored: after a rollback, ``{"source", "step", "path"}`` of the state restored.
        rollbacks, lr_scale: the guard's counters once the action is done.
        checkpoint_refused: a checkpoint about to be written held non-finite values and was not written.
        loss_ratio, norm_ratio: a ``divergence``: the smoothed loss (gradient norm) as a multiple of its
            healthy level (written for that kind only).
    """

    step: int
    epoch: int
    batch: int
    kinds: list[str]
    action: str
    optimizer: int = 0
    norm: float | None = None
    loss: float | None = None
    params: list[str] = field(default_factory=list)
    restored: dict[str, Any] | None = None
    rollbacks: int = 0
    lr_scale: float = 1.0
    checkpoint_refused: bool = False
    loss_ratio: float | None = None
    norm_ratio: float | None = None

    @property
    def kind(self) -> str:
        return self.kinds[0]

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the event log (non-finite numbers as strings; ``kind`` first of ``kinds``)."""
        out = asdict(self)
        out["kind"] = self.kind
        out["norm"], out["loss"] = json_number(self.norm), json_number(self.loss)
        if not self.checkpoint_refused:
            del out["checkpoint_refused"]
        for key in ("loss_ratio", "norm_ratio"):
            if out[key] is None:
                del out[key]
            else:
                out[key] = json_number(out[key])
        return out


KIND_TEXT = {
    "nonfinite_weights": "non-finite weights",
    "nonfinite_loss": "non-finite training loss",
    "nonfinite_grad": "non-finite gradient norm",
    "scale_collapse": "GradScaler loss scale collapsed",
    "persistent_overflow": "persistent fp16 gradient overflow",
    "divergence": "finite divergence (training loss or gradient norm far above its healthy level)",
    "spike": "gradient-norm spike",
}
"""What each event kind means, in words (the kinds are `lightning_clip.guard.decision`'s)."""


def failure_message(record: EventRecord, reason: str, events_path: str = EVENTS_FILENAME) -> str:
    """The text of `GradientExplosionError` for ``record``: what happened, where,
    which parameters went bad first, why recovery stops (``reason``) and what to try."""
    params = ", ".join(record.params) if record.params else "none identified"
    where = "weights" if record.kind == "nonfinite_weights" else "gradients"
    line = record.to_json()
    return (
        f"ExplosionGuard: {KIND_TEXT.get(record.kind, record.kind)} at step {record.step} (epoch {record.epoch},"
        f" batch {record.batch}); gradient norm {line['norm']}, loss {line['loss']}.\n"
        f"Parameters whose {where} went bad first: {params}.\n"
        f"{reason}\n"
        "What to try: lower the learning rate (or pass `lr_factor` < 1, e.g. 0.5, to lower it at every"
        " rollback); attach AdaptiveGradientClipping; skip the data that triggers it (`skip_batches`) or"
        f" inspect the batches listed in {events_path}; prefer bf16-mixed to 16-mixed; raise `max_rollbacks`"
        " to allow more recoveries."
    )


class EventLog:
    """Appends one JSON line per event to ``path`` (creating its folder), flushed at once."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        clean = {k: json_number(v) if isinstance(v, float) else v for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
