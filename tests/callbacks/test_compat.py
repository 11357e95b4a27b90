"""lightning_clip._compat (the only private Lightning and torch access) against the installed versions."""

from __future__ import annotations

import csv
import os
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.precision import MixedPrecision

from lightning_clip import _compat
from tests.models import RegressionModel, TwoOptimizerModel, make_trainer, regression_loader


class Probe(pl.Callback):
    """Calls every accessor from inside the optimizer-step hook, where the callbacks use them."""

    def __init__(self) -> None:
        self.should_log: list[bool] = []
        self.indices: list[int] = []
        self.scalers: list[Any] = []
        self.log_dirs: list[str] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.should_log.append(_compat.should_update_logs(trainer))
        self.indices.append(_compat.optimizer_index(trainer, optimizer))
        self.scalers.append(_compat.gradient_scaler(trainer))
        self.log_dirs.append(_compat.log_dir(trainer))
        if self.should_log[-1]:
            pl_module.log("probe", float(trainer.global_step))


def test_should_update_logs_matches_the_rows_lightning_writes(tmp_path: Any) -> None:
    probe = Probe()
    logger = CSVLogger(str(tmp_path), name="run", version="v")
    trainer = make_trainer(tmp_path, callbacks=[probe], max_steps=10, logger=logger, log_every_n_steps=4)
    trainer.fit(RegressionModel(), regression_loader())
    with open(os.path.join(logger.log_dir, "metrics.csv")) as fh:
        written = sorted(int(r["step"]) for r in csv.DictReader(fh) if r.get("probe"))
    # independent reference: Lightning's documented rule, every 4th step
    assert written == [3, 7]
    assert [s for s, flag in enumerate(probe.should_log) if flag] == written
    assert set(probe.log_dirs) == {logger.log_dir}
    assert probe.indices == [0] * 10 and probe.scalers == [None] * 10


def test_log_dir_without_logger_is_default_root_dir(tmp_path: Any) -> None:
    probe = Probe()
    trainer = make_trainer(tmp_path / "root", callbacks=[probe], max_steps=1, logger=False)
    trainer.fit(RegressionModel(), regression_loader())
    assert probe.log_dirs == [str(tmp_path / "root")]


def test_optimizer_index_with_two_optimizers(tmp_path: Any) -> None:
    probe = Probe()
    trainer = make_trainer(tmp_path, callbacks=[probe], max_steps=6)
    trainer.fit(TwoOptimizerModel(), regression_loader())
    assert probe.indices == [0, 1, 0, 1, 0, 1]
    raw = trainer.optimizers[1]
    assert _compat.optimizer_index(trainer, raw) == 1
    assert _compat.optimizer_index(trainer, trainer.strategy._lightning_optimizers[1]) == 1


def test_gradient_scaler_under_16_mixed(tmp_path: Any) -> None:
    scaler = torch.amp.GradScaler("cpu")
    probe = Probe()
    trainer = make_trainer(
        tmp_path, callbacks=[probe], max_steps=2, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    )
    trainer.fit(RegressionModel(), regression_loader())
    assert probe.scalers == [scaler, scaler]

    probe = Probe()
    trainer = make_trainer(tmp_path, callbacks=[probe], max_steps=1, precision="bf16-mixed")
    trainer.fit(RegressionModel(), regression_loader())
    assert probe.scalers == [None]


def test_force_scaler_skip_makes_the_scaler_skip_and_back_off_like_an_overflow() -> None:
    """Reference: a GradScaler whose gradients really overflowed. Forced, finite gradients behave alike:
    the optimizer step is skipped (weights unchanged) and the scale backs off by the same factor."""
    from lightning_clip._compat import force_scaler_skip

    def run(overflow: bool, force: bool) -> tuple[torch.Tensor, float]:
        w = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.SGD([w], lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale(w.sum()).backward()  # the scaler is live; gradients 1024 each
        if overflow:
            w.grad.fill_(float("inf"))  # type: ignore[union-attr]
        scaler.unscale_(opt)
        if force:
            force_scaler_skip(scaler, opt)
        scaler.step(opt)
        scaler.update()
        return w.detach().clone(), float(scaler.get_scale())

    real_w, real_scale = run(overflow=True, force=False)
    forced_w, forced_scale = run(overflow=False, force=True)
    plain_w, plain_scale = run(overflow=False, force=False)
    assert torch.equal(forced_w, torch.ones(3)) and torch.equal(real_w, torch.ones(3))
    assert forced_scale == real_scale == 512.0
    assert not torch.equal(plain_w, torch.ones(3)) and plain_scale == 1024.0


def test_group_tensors_by_device_and_dtype_against_a_naive_grouping() -> None:
    tensors = [
        torch.ones(2),
        torch.ones(3, dtype=torch.float64),
        torch.zeros(1),
        torch.ones(1, dtype=torch.bfloat16),
    ]
    grouped = _compat.group_tensors_by_device_and_dtype(tensors, with_indices=True)
    naive: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        naive.setdefault((t.device, t.dtype), []).append(i)
    assert {key: indices for key, (_, indices) in grouped.items()} == naive
    for (_, group_dtype), (group, indices) in grouped.items():
        assert all(a is tensors[i] for a, i in zip(group, indices, strict=True))
        assert all(t.dtype == group_dtype for t in group)


def test_steps_inside_amp_scaling_flags_fused_optimizers_only() -> None:
    params = [torch.nn.Parameter(torch.ones(2))]
    assert _compat.steps_inside_amp_scaling(torch.optim.AdamW(params, fused=True))
    assert not _compat.steps_inside_amp_scaling(torch.optim.AdamW(params))
    assert not _compat.steps_inside_amp_scaling(torch.optim.SGD(params, lr=0.1))


def test_sync_scheduler_last_lr_reports_the_lowered_rates() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    opt.param_groups[0]["lr"] = 0.1  # lowered by hand, as at a rollback with lr_factor
    assert sched.get_last_lr() == [0.4]
    _compat.sync_scheduler_last_lr(sched)
    assert sched.get_last_lr() == [0.1]


def test_child_schedulers_are_the_ones_a_sequential_scheduler_drives() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    warm = torch.optim.lr_scheduler.LinearLR(opt, total_iters=2)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    sequential = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[2])
    assert _compat.child_schedulers(sequential) == [warm, cos]
    assert _compat.child_schedulers(torch.optim.lr_scheduler.ChainedScheduler([warm, cos])) == [warm, cos]
    assert _compat.child_schedulers(cos) == []


def test_precision_checkpoint_key_is_the_key_lightning_saves(tmp_path: Any) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = make_trainer(tmp_path, max_steps=2, plugins=[plugin], enable_checkpointing=False)
    trainer.fit(RegressionModel(), regression_loader())
    path = os.path.join(tmp_path, "last.ckpt")
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt[_compat.precision_checkpoint_key(trainer)] == trainer.precision_plugin.state_dict()
    assert "scale" in ckpt[_compat.precision_checkpoint_key(trainer)]


def test_unwrap_optimizer_returns_the_torch_optimizer(tmp_path: Any) -> None:
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(TwoOptimizerModel(), regression_loader())
    wrapped = trainer.strategy._lightning_optimizers[1]
    assert _compat.unwrap_optimizer(wrapped) is trainer.optimizers[1]
    assert _compat.unwrap_optimizer(trainer.optimizers[0]) is trainer.optimizers[0]


def test_saved_tensors_of_autograd_nodes() -> None:
    """The saved tensor is the very output (sigmoid) / input (leaky ReLU) of the forward; a freed one (after
    backward) and a missing attribute give None; saved scalars come back as numbers."""
    x = torch.randn(4, requires_grad=True)
    y = torch.sigmoid(x)
    z = torch.nn.functional.leaky_relu(x * 2, 0.3)
    assert torch.equal(_compat.saved_tensor(y.grad_fn, "_saved_result"), y.detach())  # type: ignore[arg-type]
    assert torch.equal(_compat.saved_tensor(z.grad_fn, "_saved_self"), (x * 2).detach())  # type: ignore[arg-type]
    assert _compat.saved_value(z.grad_fn, "_saved_negative_slope", 0.01) == pytest.approx(0.3)
    assert _compat.saved_tensor(y.grad_fn, "_saved_nothing") is None
    assert _compat.saved_value(y.grad_fn, "_saved_nothing", 7.0) == 7.0
    y.sum().backward()
    assert _compat.saved_tensor(y.grad_fn, "_saved_result") is None  # freed by backward


def test_module_families_cover_torch_layers() -> None:
    nn = torch.nn
    norms = _compat.norm_modules()
    for layer in (
        nn.BatchNorm1d(3),
        nn.BatchNorm2d(3),
        nn.InstanceNorm1d(3),
        nn.LayerNorm(3),
        nn.GroupNorm(1, 3),
    ):
        assert isinstance(layer, norms)
    assert not isinstance(nn.Linear(2, 2), norms)
    channels = _compat.channel_first_modules()
    for layer in (
        nn.Conv1d(1, 2, 3),
        nn.Conv2d(1, 2, 3),
        nn.ConvTranspose2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.GroupNorm(1, 2),
    ):
        assert isinstance(layer, channels)
    assert not isinstance(nn.LayerNorm(2), channels) and not isinstance(nn.Linear(2, 2), channels)


def test_logger_step_is_the_step_metrics_csv_writes_in_manual_optimization(tmp_path: Any) -> None:
    """Two optimizers stepped per batch: ``global_step`` grows by 2, the loggers' step by 1; the value read
    inside each optimizer step is the ``step`` the batch's metrics are written under."""
    seen: list[tuple[int, int]] = []

    class Steps(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            seen.append((trainer.global_step, _compat.logger_step(trainer)))
            pl_module.log("probe", float(trainer.global_step), on_step=True, on_epoch=False)

    logger = CSVLogger(str(tmp_path), name="run", version="v")
    trainer = make_trainer(tmp_path, callbacks=[Steps()], max_steps=8, logger=logger)
    trainer.fit(TwoOptimizerModel(), regression_loader())
    with open(os.path.join(logger.log_dir, "metrics.csv")) as fh:
        written = {int(float(r["probe"])): int(r["step"]) for r in csv.DictReader(fh) if r.get("probe")}
    # each batch's row holds the value logged last (at its second optimizer step): global steps 1, 3, 5, 7
    assert written == {1: 0, 3: 1, 5: 2, 7: 3}
    assert seen == [(g, g // 2) for g in range(8)]


def test_epoch_logged_values_restored_leave_the_epoch_aggregates(tmp_path: Any) -> None:
    """Saved at the start of batch 2, restored at the end of batch 3: batches 2 and 3 leave the epoch mean
    (and max) of the logged values; a key first logged in batch 3 starts again from nothing."""
    logged: dict[int, float] = {}

    class Logs(RegressionModel):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            logged[batch_idx] = float(loss)
            self.log("mean_loss", loss, on_step=False, on_epoch=True)
            self.log("max_loss", loss, on_step=False, on_epoch=True, reduce_fx="max")
            if batch_idx >= 3:
                self.log("late", loss, on_step=False, on_epoch=True)
            return loss

    class Window(pl.Callback):
        def __init__(self) -> None:
            self.restored: list[str] = []

        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int
        ) -> None:
            if batch_idx == 2:
                self.saved = _compat.epoch_logged_values(trainer)

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
            if args[-1] == 3:
                self.restored = _compat.restore_epoch_logged_values(trainer, self.saved)

    window = Window()
    trainer = make_trainer(tmp_path, callbacks=[window], max_steps=8)
    trainer.fit(Logs(), regression_loader())  # one epoch of 8 batches
    kept = [logged[b] for b in (0, 1, 4, 5, 6, 7)]
    metrics = trainer.callback_metrics
    assert sorted(window.restored) == ["late", "max_loss", "mean_loss"]
    assert float(metrics["mean_loss"]) == pytest.approx(sum(kept) / 6, rel=1e-6)
    assert float(metrics["max_loss"]) == pytest.approx(max(kept), rel=1e-6)
    assert float(metrics["late"]) == pytest.approx(sum(logged[b] for b in (4, 5, 6, 7)) / 4, rel=1e-6)
