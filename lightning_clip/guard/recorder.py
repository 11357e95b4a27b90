"""The guard's event records: build one per event, keep them, write each to the event log.

A failed write of the event log (a full disk, a read-only folder) is a warning: the run goes on, and the
record stays in `EventRecorder.records`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn

from lightning_clip import _compat
from lightning_clip.exceptions import LightningClipWarning
from lightning_clip.guard import decision as D
from lightning_clip.guard.events import EVENTS_FILENAME, EventLog, EventRecord, Remedies, failure_message
from lightning_clip.guard.snapshot import nonfinite_names

if TYPE_CHECKING:
    from lightning_clip._compat import Trainer
    from lightning_clip.step import GradMeasurement

__all__ = ["EventRecorder"]

log = logging.getLogger(__name__)


class EventRecorder:
    """Every event of a run: `records` (on every rank), the JSONL event log at `path` (rank zero)."""

    max_param_names = 5

    def __init__(self) -> None:
        self.path: str | None = None
        self.records: list[dict[str, Any]] = []
        self.names: dict[int, str] = {}  # id(parameter) -> name, for the event's ``params``

    def new(
        self,
        trainer: Trainer,
        kinds: list[str],
        action: str,
        batch: int,
        norm: float | None,
        loss: float | None,
    ) -> EventRecord:
        return EventRecord(
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            batch=batch,
            kinds=list(D.sort_kinds(kinds)),
            action=action,
            norm=norm,
            loss=loss,
            log_step=_compat.logger_step(trainer),
        )

    def bad_weights(self, record: EventRecord, named: Iterable[tuple[str, torch.Tensor]]) -> EventRecord:
        record.params = nonfinite_names(named, self.max_param_names)
        return record

    def grad_params(self, m: GradMeasurement, kinds: tuple[str, ...]) -> list[str]:
        """The first parameters whose gradients went bad (a spike or divergence: the largest)."""
        if not m.finite:
            idx = m.nonfinite_indices()
        elif (D.SPIKE in kinds or D.DIVERGENCE in kinds) and len(m.params):
            idx = torch.topk(m.per_param, min(self.max_param_names, len(m.params))).indices.tolist()
        else:
            return []
        return [self.names.get(id(m.params[i]), f"param[{i}]") for i in idx[: self.max_param_names]]

    def write(self, trainer: Trainer, record: EventRecord, rollbacks: int, lr_scale: float) -> None:
        record.rollbacks, record.lr_scale = rollbacks, lr_scale
        line = record.to_json()
        self.records.append(line)
        log.info("ExplosionGuard event: %s", line)
        if trainer.is_global_zero and self.path is not None:
            try:
                EventLog(self.path).write(line)
            except OSError as err:
                rank_zero_warn(
                    f"ExplosionGuard: could not write the event log {self.path!r} ({err}); training goes on,"
                    " and the event is kept in `ExplosionGuard.records`.",
                    category=LightningClipWarning,
                )

    def failure(self, record: EventRecord, reason: str, remedies: Remedies | None = None) -> str:
        return failure_message(record, reason, self.path or EVENTS_FILENAME, remedies)
