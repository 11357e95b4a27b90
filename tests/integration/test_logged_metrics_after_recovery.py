"""Logged metrics after a recovery (issue 19, item 3): the values a user logs with
``self.log(..., on_epoch=True)`` in a step the guard did not apply leave the epoch aggregate, so
``EarlyStopping("train_loss_epoch")`` is not stopped by a NaN the guard recovered from. The reference for
each epoch value: the mean of the values the model logged on the steps that were applied, read from its own
record (and from ``metrics.csv``'s ``train_loss_step`` column)."""

from __future__ import annotations

import csv
import math
import os
from typing import Any

import pytest
import torch
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from lightning_clip import ExplosionGuard
from lightning_clip.testing import FaultInjector
from tests.models import RegressionModel, TwoOptimizerModel, make_trainer, regression_loader


class LoggingModel(RegressionModel):
    """Logs its training loss for the step and the epoch; records what it logged, per epoch and batch."""

    def __init__(self) -> None:
        super().__init__(optimizer="sgd", lr=0.02)
        self.logged: dict[tuple[int, int], float] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.logged[(self.current_epoch, batch_idx)] = float(loss)
        return loss


def _fit(
    tmp_path: Any, faults: FaultInjector, epochs: int, drop: bool = True, **kwargs: Any
) -> tuple[Any, ...]:
    torch.manual_seed(0)
    model = LoggingModel()
    guard = ExplosionGuard(snapshot_every_n_steps=4)
    guard.drop_logged_values = drop
    stopper = EarlyStopping("train_loss_epoch", patience=100, check_on_train_epoch_end=True)
    logger = CSVLogger(str(tmp_path), name="run")
    trainer = make_trainer(
        tmp_path, max_steps=-1, max_epochs=epochs, logger=logger, callbacks=[faults, guard, stopper], **kwargs
    )
    trainer.fit(model, regression_loader())  # 8 batches an epoch
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    epoch_values = {int(r["epoch"]): float(r["train_loss_epoch"]) for r in rows if r.get("train_loss_epoch")}
    return model, guard, trainer, epoch_values, rows


def test_early_stopping_on_train_loss_epoch_is_not_stopped_by_a_recovered_nan(tmp_path: Any) -> None:
    """A poisoned forward pass at step 12 (epoch 1, batch 4): the logged loss is NaN, the guard rolls back;
    the run trains its 15 epochs, and epoch 1's value is the mean of its 7 other batches."""
    faults = FaultInjector(target="forward", steps=[12])
    model, guard, trainer, epoch_values, rows = _fit(tmp_path / "drop", faults, epochs=15)
    assert [(r["step"], r["kind"], r["action"]) for r in guard.records] == [
        (12, "nonfinite_loss", "rollback")
    ]
    assert math.isnan(model.logged[(1, 4)])
    assert trainer.current_epoch == 15 and not trainer.should_stop
    assert sorted(epoch_values) == list(range(15))
    for epoch in range(15):
        applied = [v for (e, _), v in model.logged.items() if e == epoch and math.isfinite(v)]
        assert len(applied) == (7 if epoch == 1 else 8)
        assert epoch_values[epoch] == pytest.approx(sum(applied) / len(applied), rel=1e-6)
    steps = [float(r["train_loss_step"]) for r in rows if r.get("train_loss_step") and r["epoch"] == "1"]
    assert len(steps) == 8 and math.isnan(steps[4])  # the step's own value still shows what happened
    assert epoch_values[1] == pytest.approx(sum(v for v in steps if math.isfinite(v)) / 7, rel=1e-6)

    # the same run keeping the dropped step's values: the epoch mean is NaN and EarlyStopping stops there
    faults = FaultInjector(target="forward", steps=[12])
    _, _, kept, kept_values, _ = _fit(tmp_path / "keep", faults, epochs=15, drop=False)
    assert math.isnan(kept_values[1]) and kept.should_stop and kept.current_epoch == 2


def test_with_accumulation_every_batch_of_the_dropped_window_leaves_the_epoch_value(tmp_path: Any) -> None:
    """``accumulate_grad_batches=2``: batch 5 of each epoch is poisoned; the update of batches 4 and 5 is not
    applied, so both leave the epoch mean, the finite batch 4 too (it is the same update)."""
    faults = FaultInjector(target="forward", batches=[5])
    model, guard, trainer, epoch_values, _ = _fit(tmp_path, faults, epochs=3, accumulate_grad_batches=2)
    assert [(r["epoch"], r["batch"], r["kind"]) for r in guard.records] == [
        (e, 5, "nonfinite_loss") for e in range(3)
    ]
    assert trainer.current_epoch == 3 and not trainer.should_stop
    for epoch in range(3):
        kept = [model.logged[(epoch, b)] for b in (0, 1, 2, 3, 6, 7)]
        assert math.isfinite(model.logged[(epoch, 4)])
        assert epoch_values[epoch] == pytest.approx(sum(kept) / 6, rel=1e-6)


class LoggingTwoOptimizers(TwoOptimizerModel):
    """Manual optimization, two optimizers stepped per batch; logs its loss for the step and the epoch."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log(
            "train_loss", nn.functional.mse_loss(self.head(self.encoder(x)), y), on_step=True, on_epoch=True
        )
        super().training_step(batch, batch_idx)


def test_manual_optimization_with_two_optimizers_drops_the_batch_from_the_epoch_value(tmp_path: Any) -> None:
    """A poisoned forward pass in batch 3 of epoch 0 (global steps 6 and 7): neither optimizer step is
    applied and epoch 0's mean is that of its 7 other batches (the model's own record of its losses)."""
    torch.manual_seed(0)
    model = LoggingTwoOptimizers()
    guard = ExplosionGuard(snapshot_every_n_steps=2)
    faults = FaultInjector(target="forward", steps=[6])
    logger = CSVLogger(str(tmp_path), name="run")
    trainer = make_trainer(tmp_path, max_steps=-1, max_epochs=2, logger=logger, callbacks=[faults, guard])
    trainer.fit(model, regression_loader())
    assert [(r["step"], r["log_step"], r["batch"], r["kind"]) for r in guard.records] == [
        (6, 3, 3, "nonfinite_loss")
    ]
    assert math.isnan(model.losses[3]) and sum(math.isnan(v) for v in model.losses) == 1
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        epoch_values = {
            int(r["epoch"]): float(r["train_loss_epoch"])
            for r in csv.DictReader(f)
            if r.get("train_loss_epoch")
        }
    for epoch in (0, 1):
        applied = [v for v in model.losses[8 * epoch : 8 * epoch + 8] if math.isfinite(v)]
        assert len(applied) == (7 if epoch == 0 else 8)
        assert epoch_values[epoch] == pytest.approx(sum(applied) / len(applied), rel=1e-6)
