"""ExplosionGuard's event record and the event log: one JSON object per line in
``lightning_clip_events.jsonl``, one file per run (`run_log_dir`). No Lightning import.

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
import re
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "EVENTS_FILENAME",
    "KIND_TEXT",
    "RUN_LOGS_DIRNAME",
    "EventLog",
    "EventRecord",
    "Remedies",
    "events_path",
    "failure_message",
    "json_number",
    "next_version",
    "run_log_dir",
]

EVENTS_FILENAME = "lightning_clip_events.jsonl"
RUN_LOGS_DIRNAME = "lightning_clip_logs"
"""Without a logger that has a per-run directory, each run's files go to
``<default_root_dir>/lightning_clip_logs/version_<N>``."""


def next_version(root: str) -> int:
    """The next free ``version_<N>`` number in ``root`` (0 when ``root`` holds none), as Lightning's
    ``CSVLogger`` and ``TensorBoardLogger`` number their runs.

    Examples:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> os.makedirs(os.path.join(root, "version_0")); os.makedirs(os.path.join(root, "version_4"))
        >>> next_version(root), next_version(os.path.join(root, "absent"))
        (5, 0)
    """
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    found = [int(m.group(1)) for n in names if (m := re.fullmatch(r"version_(\d+)", n))]
    return max(found) + 1 if found else 0


def run_log_dir(trainer: Any) -> str:
    """This run's own directory for lightning-clip's files (the event log, the gradient-flow figure).

    The first logger's ``log_dir`` when it has one (``CSVLogger``, ``TensorBoardLogger``:
    ``.../version_<N>``); otherwise (``logger=False``, or a logger without a local run directory) a new
    ``version_<N>`` folder under ``<default_root_dir>/lightning_clip_logs`` (`RUN_LOGS_DIRNAME`), numbered
    after the ones already there, so two runs never share a file. The folder is created by the first
    write. Rank zero chooses and every rank gets its choice: call it on every rank (a broadcast), once per
    fit (at ``setup``): a later call after a write gives the next number.
    """
    logger = trainer.loggers[0] if trainer.loggers else None
    path = getattr(logger, "log_dir", None) if logger is not None else None
    if path is None and trainer.is_global_zero:
        root = os.path.join(os.fspath(trainer.default_root_dir), RUN_LOGS_DIRNAME)
        path = os.path.join(root, f"version_{next_version(root)}")
    return os.fspath(trainer.strategy.broadcast(path))


def events_path(trainer: Any) -> str:
    """Path of this run's event log: ``lightning_clip_events.jsonl`` in `run_log_dir` (collective)."""
    return os.path.join(run_log_dir(trainer), EVENTS_FILENAME)


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
        log_step: the step the Trainer's loggers write the batch's metrics under (``metrics.csv``'s
            ``step``: batches that stepped, so in manual optimization with several optimizers it differs
            from ``global_step``, which counts every optimizer's steps); None when unknown.
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
    log_step: int | None = None

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
        if out["log_step"] is None:
            del out["log_step"]
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


@dataclass(frozen=True)
class Remedies:
    """What the run has attached and set, so that `failure_message` names only fixes that fit it.

    Attributes:
        clipper: an `AdaptiveGradientClipping` is attached.
        lr_factor: the guard's ``lr_factor``.
        skip_batches: the guard's ``skip_batches``.
        fp16: the run trains under ``16-mixed`` with a GradScaler.
        detect_divergence: the guard's ``detect_divergence``.
    """

    clipper: bool = False
    lr_factor: float = 1.0
    skip_batches: int = 0
    fp16: bool = False
    detect_divergence: bool = True


def failure_message(
    record: EventRecord, reason: str, events_path: str = EVENTS_FILENAME, remedies: Remedies | None = None
) -> str:
    """The text of `GradientExplosionError` for ``record``: what happened, where, which parameters went
    bad first, why recovery stops (``reason``) and what to try — only the fixes that fit the run
    (``remedies``: what is attached and set; a divergence also names a loss that rises by design).

    Examples:
        >>> record = EventRecord(step=7, epoch=0, batch=7, kinds=["divergence"], action="rollback")
        >>> text = failure_message(record, "Budget spent.", "events.jsonl", Remedies(clipper=True))
        >>> "attach AdaptiveGradientClipping" in text, "`detect_divergence=False`" in text
        (False, True)
    """
    r = remedies if remedies is not None else Remedies()
    params = ", ".join(record.params) if record.params else "none identified"
    where = "weights" if record.kind == "nonfinite_weights" else "gradients"
    line = record.to_json()
    fixes = [
        "lower the learning rate"
        + (
            " (or pass `lr_factor` < 1, e.g. 0.5, to lower it at every rollback)"
            if r.lr_factor >= 1.0
            else ""
        )
    ]
    if r.clipper:
        fixes.append("give AdaptiveGradientClipping a `max_norm` you know to be safe")
    else:
        fixes.append("attach AdaptiveGradientClipping")
    if "divergence" in record.kinds and r.detect_divergence:
        fixes.append(
            "if this loss rises by design (a KL warm-up, a curriculum stage, an adversarial objective) it may be"
            " no runaway: pass `detect_divergence=False` (NaN/Inf stay guarded)"
            + (" and `AdaptiveGradientClipping(loss_aware=False)`" if r.clipper else "")
        )
    if r.skip_batches == 0:
        fixes.append(
            f"skip the data that triggers it (`skip_batches`) or inspect the batches listed in {events_path}"
        )
    else:
        fixes.append(f"inspect the batches listed in {events_path}")
    if r.fp16:
        fixes.append("prefer bf16-mixed to 16-mixed")
    fixes.append("raise `max_rollbacks` to allow more recoveries")
    return (
        f"ExplosionGuard: {KIND_TEXT.get(record.kind, record.kind)} at step {record.step} (epoch {record.epoch},"
        f" batch {record.batch}); gradient norm {line['norm']}, loss {line['loss']}.\n"
        f"Parameters whose {where} went bad first: {params}.\n"
        f"{reason}\n"
        f"What to try: {'; '.join(fixes)}."
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
