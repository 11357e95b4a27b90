"""After a rollback, step-interval LR schedulers are fast-forwarded back to ``global_step`` (the default,
``schedulers_after_rollback="fast_forward"``), keeping ``lr_factor``: the schedule ends on time. With
``"restore"`` they keep the restored state and lag. Epoch-interval and ``ReduceLROnPlateau`` schedulers keep
their restored state. Real fits: OneCycleLR, cosine with warm-up (``LambdaLR`` and ``SequentialLR``),
``ReduceLROnPlateau``; the reference is the same schedule in a run without a fault."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lightning_clip.callbacks.explosion_guard import ExplosionGuard
from lightning_clip.testing import FaultInjector
from tests.models import RegressionModel, make_trainer, regression_loader

STEPS, FAULT, WARMUP = 40, 24, 5  # snapshots every 10 steps: the fault rolls back to step 20

Factory = Callable[[torch.optim.Optimizer], dict[str, Any]]


def one_cycle(opt: torch.optim.Optimizer) -> dict[str, Any]:
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS + 1)
    return {"scheduler": sched, "interval": "step"}


def cosine_warmup_lambda(opt: torch.optim.Optimizer) -> dict[str, Any]:
    def factor(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor), "interval": "step"}


def cosine_warmup_sequential(opt: torch.optim.Optimizer) -> dict[str, Any]:
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=WARMUP)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS - WARMUP)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[WARMUP])
    return {"scheduler": sched, "interval": "step"}


class ScheduledModel(RegressionModel):
    def __init__(self, factory: Factory) -> None:
        super().__init__(optimizer="sgd", lr=0.05)
        self.factory = factory

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": self.factory(opt)}


def final_lr(factory: Factory, fault: bool, **guard_kwargs: Any) -> tuple[float, int, ExplosionGuard]:
    guard = ExplosionGuard(snapshot_every_n_steps=10, **guard_kwargs)
    callbacks: list[Any] = [guard]
    if fault:
        callbacks.append(FaultInjector(target="grad", steps=[FAULT]))
    torch.manual_seed(0)
    trainer = make_trainer(None, callbacks=callbacks, max_steps=STEPS, default_root_dir=None)
    trainer.fit(ScheduledModel(factory), regression_loader(n=STEPS * 8))
    sched = trainer.lr_scheduler_configs[0].scheduler
    return float(trainer.optimizers[0].param_groups[0]["lr"]), int(sched.last_epoch), guard


@pytest.mark.parametrize("factory", [one_cycle, cosine_warmup_lambda, cosine_warmup_sequential])
@pytest.mark.parametrize("lr_factor", [1.0, 0.5])
def test_step_schedules_are_fast_forwarded_and_end_on_time(
    tmp_path: Any, monkeypatch: Any, factory: Factory, lr_factor: float
) -> None:
    monkeypatch.chdir(tmp_path)
    reference, ref_epoch, _ = final_lr(factory, fault=False)
    lr, epoch, guard = final_lr(factory, fault=True, lr_factor=lr_factor)
    assert [(r["step"], r["restored"]["step"]) for r in guard.records] == [(FAULT, 20)]
    assert epoch == ref_epoch == STEPS
    assert lr == pytest.approx(reference * lr_factor, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("factory", [one_cycle, cosine_warmup_lambda])
def test_restore_keeps_the_restored_schedule_which_lags(
    tmp_path: Any, monkeypatch: Any, factory: Factory
) -> None:
    monkeypatch.chdir(tmp_path)
    reference, _, _ = final_lr(factory, fault=False)
    lr, epoch, _ = final_lr(factory, fault=True, schedulers_after_rollback="restore")
    assert epoch == STEPS - (FAULT + 1 - 20)  # behind by the steps rolled back
    assert lr > 10 * reference  # the anneal phase is cut


class Plateau(RegressionModel):
    """``ReduceLROnPlateau`` on the training loss (interval "step") and a ``StepLR`` with interval "epoch"."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss.detach(), on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5, threshold=10.0)
        epochs = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return [opt], [
            {"scheduler": plateau, "interval": "step", "monitor": "train_loss"},
            {"scheduler": epochs, "interval": "epoch"},
        ]


class SchedulerStates(pl.Callback):
    def __init__(self) -> None:
        self.states: dict[int, list[dict[str, Any]]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.states[trainer.global_step] = [
            {k: v for k, v in cfg.scheduler.state_dict().items() if k != "_last_lr"}
            for cfg in trainer.lr_scheduler_configs
        ]


def test_plateau_and_epoch_schedulers_keep_their_restored_state(tmp_path: Any) -> None:
    states = SchedulerStates()
    guard = ExplosionGuard(snapshot_every_n_steps=10)  # the default fast_forward
    callbacks = [guard, FaultInjector(target="grad", steps=[18]), states]
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_steps=20)
    trainer.fit(Plateau(), regression_loader(n=64))  # 8 batches an epoch: the StepLR stepped at step 16
    assert [(r["step"], r["restored"]["step"]) for r in guard.records] == [(18, 10)]
    # right after the rollback both are exactly the snapshot's: neither is stepped forward
    assert states.states[19] == states.states[10]
    assert states.states[18][1] != states.states[10][1] and states.states[18][0] != states.states[10][0]
