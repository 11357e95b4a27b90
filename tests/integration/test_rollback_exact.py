"""A rollback restores bit-exactly what was saved: model, Adam state, LR scheduler, GradScaler and the
other lightning-clip callbacks' state; from the in-memory snapshot or from a ModelCheckpoint file; and a
corrupted newest file falls back to an older one with a warning."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins import MixedPrecision

from lightning_clip.callbacks.adaptive_clipping import AdaptiveGradientClipping
from lightning_clip.callbacks.explosion_guard import ExplosionGuard
from lightning_clip.exceptions import LightningClipWarning
from lightning_clip.testing import FaultInjector
from tests.models import RegressionModel, assert_same, make_trainer, regression_loader


def full_state(trainer: pl.Trainer) -> dict[str, Any]:
    """Independent deep copy of everything a rollback must restore (torch's own state_dicts)."""
    agc = next(cb for cb in trainer.callbacks if isinstance(cb, AdaptiveGradientClipping))  # type: ignore[attr-defined]
    return copy.deepcopy(
        {
            "model": trainer.lightning_module.state_dict(),
            "optimizer": trainer.optimizers[0].state_dict(),
            "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            "scaler": trainer.precision_plugin.state_dict(),
            "agc": agc.state_dict(),
        }
    )


class StateAt(pl.Callback):
    """Records full_state at the end of the batches whose global_step (after the update) is in ``steps``."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)
        self.states: dict[int, dict[str, Any]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step in self.steps:
            self.states[trainer.global_step] = full_state(trainer)


def fp16() -> dict[str, Any]:
    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}


def test_snapshot_rollback_is_bit_exact_under_fp16_with_adam_scheduler_scaler(tmp_path: Any) -> None:
    # snapshots every 3 steps: snapshot 3; a NaN loss at step 5 (batch 5) rolls back to it
    before = StateAt([6])  # runs before the guard: the state the bad step left behind
    reference = StateAt([3])
    after = StateAt([6])  # runs after the guard: the restored state
    guard = ExplosionGuard(snapshot_every_n_steps=3, schedulers_after_rollback="restore")
    callbacks = [
        before,
        reference,
        AdaptiveGradientClipping(),
        guard,
        FaultInjector(target="loss", steps=[5]),
        after,
    ]
    torch.manual_seed(0)
    model = RegressionModel(optimizer="adam", scheduler=True)
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_steps=8, **fp16())
    trainer.fit(model, regression_loader())
    assert [(r["step"], r["kind"], r["restored"]["step"]) for r in guard.records] == [
        (5, "nonfinite_loss", 3)
    ]
    assert_same(after.states[6], reference.states[3])
    # the test can fail: the state before the rollback differed in every part
    bad = before.states[6]
    assert not torch.equal(bad["model"]["net.0.weight"], reference.states[3]["model"]["net.0.weight"])
    assert bad["scheduler"]["last_epoch"] != reference.states[3]["scheduler"]["last_epoch"]
    assert bad["scaler"]["scale"] == reference.states[3]["scaler"]["scale"] / 2  # the overflow halved it
    assert bad["agc"] != reference.states[3]["agc"]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_checkpoint_file_rollback_is_bit_exact(tmp_path: Any, precision: str) -> None:
    after = StateAt([6])
    guard = ExplosionGuard(snapshot_every_n_steps=0, schedulers_after_rollback="restore")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    agc = AdaptiveGradientClipping()
    callbacks = [agc, guard, FaultInjector(target="grad", steps=[5]), after, ckpt]
    torch.manual_seed(0)
    model = RegressionModel(optimizer="adam", scheduler=True)
    trainer = make_trainer(
        tmp_path, callbacks=callbacks, max_steps=8, enable_checkpointing=True, precision=precision
    )
    trainer.fit(model, regression_loader())
    path = str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    assert [(r["step"], r["restored"]["source"], r["restored"]["path"]) for r in guard.records] == [
        (5, "checkpoint", path)
    ]
    saved = torch.load(path, weights_only=False)
    expected = {
        "model": saved["state_dict"],
        "optimizer": saved["optimizer_states"][0],
        "scheduler": saved["lr_schedulers"][0],
        "scaler": {},
        "agc": saved["callbacks"][agc.state_key],
    }
    assert_same(after.states[6], expected)


def test_fp16_overflow_is_calibration_not_an_event(tmp_path: Any) -> None:
    # an Inf gradient under 16-mixed: the GradScaler skips the step and halves its scale by itself
    scales = []
    for steps in ([], [3]):
        guard = ExplosionGuard(snapshot_every_n_steps=2, schedulers_after_rollback="restore")
        torch.manual_seed(0)
        faults = [FaultInjector(target="grad", value=float("inf"), steps=steps)] if steps else []
        trainer = make_trainer(tmp_path, callbacks=[guard, *faults], max_steps=6, **fp16())
        trainer.fit(RegressionModel(optimizer="adam"), regression_loader())
        assert guard.records == [] and guard.skipped_steps == 0
        scales.append(trainer.precision_plugin.scaler.get_scale())
    assert scales[1] == scales[0] / 2  # the scaler handled the overflow itself


def test_fp16_persistent_overflow_rolls_back(tmp_path: Any) -> None:
    guard = ExplosionGuard(snapshot_every_n_steps=2, schedulers_after_rollback="restore")
    guard.overflow_patience = 3
    torch.manual_seed(0)
    faults = FaultInjector(target="grad", value=float("inf"), steps=[2, 3, 4])

    class Scales(pl.Callback):
        def __init__(self) -> None:
            self.scales: dict[int, float] = {}

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            self.scales[trainer.global_step] = trainer.precision_plugin.scaler.get_scale()

    scales = Scales()
    trainer = make_trainer(tmp_path, callbacks=[guard, faults, scales], max_steps=8, **fp16())
    trainer.fit(RegressionModel(optimizer="adam"), regression_loader())
    assert [(r["step"], r["kind"], r["restored"]["step"]) for r in guard.records] == [
        (4, "persistent_overflow", 2)
    ]
    assert scales.scales[4] == scales.scales[2] / 4  # two overflows halved it twice
    assert scales.scales[5] == scales.scales[2]  # restored with snapshot 2


def test_corrupted_newest_checkpoint_falls_back_with_a_warning(tmp_path: Any) -> None:
    class Truncate(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 5:
                newest = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
                data = newest.read_bytes()
                newest.write_bytes(data[: len(data) // 2])

    after = StateAt([6])
    guard = ExplosionGuard(snapshot_every_n_steps=0, schedulers_after_rollback="restore")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    agc = AdaptiveGradientClipping()
    callbacks = [Truncate(), agc, guard, FaultInjector(target="grad", steps=[5]), after, ckpt]
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_steps=8, enable_checkpointing=True)
    with pytest.warns(LightningClipWarning, match=r"epoch=0-step=4\.ckpt' is unreadable"):
        trainer.fit(RegressionModel(optimizer="adam", scheduler=True), regression_loader())
    older = str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    assert [(r["restored"]["step"], r["restored"]["path"]) for r in guard.records] == [(2, older)]
    saved = torch.load(older, weights_only=False)
    assert_same(after.states[6]["model"], saved["state_dict"])
    assert_same(after.states[6]["optimizer"], saved["optimizer_states"][0])
    assert os.path.getsize(tmp_path / "ckpt" / "epoch=0-step=8.ckpt") > 0


def test_snapshot_is_a_copy_not_an_alias(tmp_path: Any) -> None:
    # two rollbacks to the same snapshot: the second restores what the first did (CPU tensors would alias)
    first, second = StateAt([3]), StateAt([5])
    guard = ExplosionGuard(snapshot_every_n_steps=100, schedulers_after_rollback="restore")
    callbacks = [AdaptiveGradientClipping(), guard, FaultInjector(target="loss", steps=[2, 4]), first, second]
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_steps=6)
    trainer.fit(RegressionModel(optimizer="adam", scheduler=True), regression_loader())
    assert [r["restored"]["step"] for r in guard.records] == [0, 0]
    assert_same(first.states[3], second.states[5])
