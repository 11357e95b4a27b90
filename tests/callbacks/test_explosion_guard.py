"""ExplosionGuard on real fits: every action × every fault kind × when, lr_factor, skip_batches, spikes,
the budget error, resume, the JSONL event log and the logged counters."""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from lightning_clip.callbacks.explosion_guard import ExplosionGuard
from lightning_clip.exceptions import GradientExplosionError
from lightning_clip.guard.events import EVENTS_FILENAME
from lightning_clip.report import load_events
from lightning_clip.testing import FaultInjector
from tests.models import DropUpdate, RegressionModel, StepNormRecorder, make_trainer, regression_loader


# ---------------------------------------------------------------------------------------------- helpers
class NormsOnStart(pl.Callback):
    """Attaches a StepNormRecorder (naive float64 norms of the applied gradients) at train start."""

    recorder: StepNormRecorder

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.recorder = StepNormRecorder(trainer.optimizers[0])


def ckpt_callback(tmp_path: Any, every: int = 3) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=os.path.join(tmp_path, "ckpt"), every_n_train_steps=every, save_top_k=-1)


def weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def ckpt_files(tmp_path: Any) -> list[str]:
    d = os.path.join(tmp_path, "ckpt")
    return sorted(os.path.join(d, f) for f in os.listdir(d)) if os.path.isdir(d) else []


def fit(
    tmp_path: Any,
    callbacks: list[Any],
    *,
    model: RegressionModel | None = None,
    max_steps: int = 9,
    ckpt_path: str | None = None,
    **kwargs: Any,
) -> tuple[pl.Trainer, RegressionModel, BaseException | None]:
    torch.manual_seed(0)
    model = model or RegressionModel(optimizer="adam", scheduler=True)
    kwargs.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_steps=max_steps, **kwargs)
    try:
        trainer.fit(model, regression_loader(), ckpt_path=ckpt_path)
    except GradientExplosionError as err:
        return trainer, model, err
    return trainer, model, None


# ------------------------------------------------------------------------------ action × fault × when
# Fits of 9 steps, Adam + step-interval StepLR, snapshots every 4 steps (at 0, 4, 8), ModelCheckpoint every 3
# steps (files at 3, 6, 9). A fault at step s hits the batch that starts while global_step == s.
# "first": s=0 (only the fit-start snapshot exists); "mid": s=4 (snapshot 4 is newer than file 3);
# "after_ckpt": s=6 (file 6 was written at the end of the previous batch and is newer than snapshot 4).
WHEN = {"first": 0, "mid": 4, "after_ckpt": 6}
SOURCE = {"first": ("snapshot", 0), "mid": ("snapshot", 4), "after_ckpt": ("checkpoint", 6)}
# a weight fault is applied after step s's update: the next forward (step s + 1) is the first to see it
TARGETS = {"loss": ("nonfinite_loss", 0), "grad": ("nonfinite_grad", 0), "weight": ("nonfinite_weights", 1)}


@pytest.mark.parametrize("when", list(WHEN))
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("action", ["rollback", "skip", "raise"])
def test_action_fault_matrix(tmp_path: Any, action: str, target: str, when: str) -> None:
    s = WHEN[when]
    kind, delay = TARGETS[target]
    event_step = s + delay
    guard = ExplosionGuard(action=action, snapshot_every_n_steps=4)
    faults = FaultInjector(target=target, value=float("nan"), steps=[s])
    trainer, model, err = fit(tmp_path, [guard, faults, ckpt_callback(tmp_path)])

    assert faults.injected and faults.injected[0]["step"] == s
    assert len(guard.records) == 1
    record = guard.records[0]
    assert (record["step"], record["kind"]) == (event_step, kind)
    assert all(
        torch.isfinite(v).all() for f in ckpt_files(tmp_path) for v in torch.load(f)["state_dict"].values()
    )

    if action == "raise" or (action == "skip" and target == "weight"):
        assert isinstance(err, GradientExplosionError)
        assert f"at step {event_step} " in str(err)
        assert trainer.global_step == event_step  # aborted before the bad update
        expected_reason = "action='raise'" if action == "raise" else "action='skip'` cannot repair"
        assert expected_reason in str(err)
        return
    assert err is None
    assert trainer.global_step == 9
    assert weights_finite(model)
    if action == "rollback":
        assert guard.rollbacks == 1
        assert (record["restored"]["source"], record["restored"]["step"]) == SOURCE[when]
        assert record["action"] == "rollback"
        return
    # skip: the same weights as a run where that batch's update was simply not applied
    assert guard.rollbacks == 0 and guard.skipped_steps == 1
    _, reference, ref_err = fit(tmp_path / "ref", [DropUpdate([s]), ckpt_callback(tmp_path / "ref")])
    assert ref_err is None
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("action", ["rollback", "skip"])
def test_nan_weights_never_reach_a_checkpoint_file(tmp_path: Any, action: str) -> None:
    # weights turn NaN after step 5's update: global_step 6 is a save step of ModelCheckpoint(every 3)
    guard = ExplosionGuard(action=action, snapshot_every_n_steps=4)
    faults = FaultInjector(target="weight", steps=[5])
    _trainer, model, err = fit(tmp_path, [guard, faults, ckpt_callback(tmp_path)])
    names = [os.path.basename(f) for f in ckpt_files(tmp_path)]
    for f in ckpt_files(tmp_path):
        ckpt = torch.load(f)
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()), f
    record = guard.records[0]
    assert (record["step"], record["kind"], record["checkpoint_refused"]) == (6, "nonfinite_weights", True)
    if action == "skip":
        assert isinstance(err, GradientExplosionError)
        assert "epoch=0-step=6.ckpt" not in names  # refused before the file was written
        return
    assert err is None and weights_finite(model)
    assert "epoch=0-step=6.ckpt" in names
    # the file written at step 6 holds the restored state: snapshot 4 (weights taken at step 4)
    assert record["restored"] == {"source": "snapshot", "step": 4, "path": None}
    assert (
        torch.load(os.path.join(tmp_path, "ckpt", "epoch=0-step=6.ckpt"))["callbacks"][guard.state_key][
            "rollbacks"
        ]
        == 1
    )


def test_nan_weights_at_the_last_step_are_rolled_back_at_train_end(tmp_path: Any) -> None:
    guard = ExplosionGuard(snapshot_every_n_steps=4)
    _trainer, model, err = fit(tmp_path, [guard, FaultInjector(target="weight", steps=[8])])
    assert err is None and weights_finite(model)
    assert [(r["step"], r["kind"], r["restored"]["step"]) for r in guard.records] == [
        (9, "nonfinite_weights", 8)
    ]


def test_snapshot_cadence_catches_nan_weights(tmp_path: Any) -> None:
    # the injector runs before the guard: at step 4 (a snapshot step) the guard finds the NaN weights itself
    guard = ExplosionGuard(snapshot_every_n_steps=4)
    _trainer, model, err = fit(tmp_path, [FaultInjector(target="weight", steps=[3]), guard])
    assert err is None and weights_finite(model)
    assert [(r["step"], r["kind"], r["restored"]["step"]) for r in guard.records] == [
        (4, "nonfinite_weights", 0)
    ]


def test_inf_value_and_input_fault(tmp_path: Any) -> None:
    guard = ExplosionGuard(action="skip")
    _trainer, model, err = fit(
        tmp_path, [guard, FaultInjector(target="input", value=float("inf"), steps=[2])]
    )
    assert err is None and weights_finite(model)
    assert [(r["step"], r["kind"]) for r in guard.records] == [(2, "nonfinite_loss")]


# ------------------------------------------------------------------------------------------ no good state
def test_nothing_good_to_go_back_to_is_an_error(tmp_path: Any) -> None:
    guard = ExplosionGuard(snapshot_every_n_steps=0)
    _trainer, _model, err = fit(
        tmp_path, [guard, FaultInjector(target="grad", steps=[1]), ckpt_callback(tmp_path, 5)]
    )
    assert isinstance(err, GradientExplosionError)
    assert "no known-good state to go back to" in str(err)
    assert guard.records[0]["action"] == "error"


def test_checkpoint_files_only(tmp_path: Any) -> None:
    guard = ExplosionGuard(snapshot_every_n_steps=0)
    faults = FaultInjector(target="grad", steps=[4, 7])
    _trainer, model, err = fit(tmp_path, [guard, faults, ckpt_callback(tmp_path, 2)])
    assert err is None and weights_finite(model)
    restored = [
        (r["restored"]["source"], r["restored"]["step"], os.path.basename(r["restored"]["path"]))
        for r in guard.records
    ]
    assert restored == [("checkpoint", 4, "epoch=0-step=4.ckpt"), ("checkpoint", 6, "epoch=0-step=6.ckpt")]


# -------------------------------------------------------------------------------------- lr_factor, skip
def test_lr_factor_lowers_every_learning_rate_and_the_schedule_continues(tmp_path: Any) -> None:
    lr0, gamma, step_size = 0.05, 0.7, 3  # RegressionModel's StepLR
    guard = ExplosionGuard(snapshot_every_n_steps=2, lr_factor=0.5)
    faults = FaultInjector(target="grad", steps=[5, 7])
    model = RegressionModel(optimizer="sgd", lr=lr0, scheduler=True)
    trainer, model, err = fit(tmp_path, [guard, faults], model=model, max_steps=11)
    assert err is None and guard.rollbacks == 2
    sched = trainer.lr_scheduler_configs[0].scheduler
    scale = 0.5**2
    assert sched.base_lrs == pytest.approx([lr0 * scale], rel=1e-12)
    expected = lr0 * scale * gamma ** (sched.last_epoch // step_size)  # StepLR's closed form
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert guard.lr_scale == scale
    # the default fast-forwards the step scheduler after each rollback: it is where the run is
    assert sched.last_epoch == trainer.global_step


def test_skip_batches_are_not_learned_from(tmp_path: Any) -> None:
    norms = NormsOnStart()
    guard = ExplosionGuard(snapshot_every_n_steps=2, skip_batches=2)
    model = RegressionModel(optimizer="sgd")
    trainer, model, err = fit(
        tmp_path, [norms, guard, FaultInjector(target="grad", steps=[3])], model=model, max_steps=8
    )
    assert err is None
    applied = [not math.isnan(n) for n in norms.recorder.norms]
    # step 3: the bad update; steps 4 and 5: the two batches after the rollback
    assert applied == [True, True, True, False, False, False, True, True]
    assert guard.skipped_steps == 3
    assert trainer.callback_metrics["explosion/skipped_steps"] == 3


def test_skip_batches_with_gradient_accumulation(tmp_path: Any) -> None:
    # accumulate 2: step k uses batches 2k and 2k+1. Rollback at step 2 (batch 5); skip_batches=3 covers
    # batches 6, 7, 8: steps 3 (6, 7) and 4 (8, 9) are not applied, step 5 is.
    norms = NormsOnStart()
    guard = ExplosionGuard(snapshot_every_n_steps=1, skip_batches=3)
    model = RegressionModel(optimizer="sgd")
    _trainer, model, err = fit(
        tmp_path,
        [norms, guard, FaultInjector(target="grad", steps=[2])],
        model=model,
        max_steps=6,
        accumulate_grad_batches=2,
    )
    assert err is None
    applied = [not math.isnan(n) for n in norms.recorder.norms]
    assert applied == [True, True, False, False, False, True]


# ------------------------------------------------------------------------------------------------ spike
class ScaleGrads(pl.Callback):
    def __init__(self, step: int, factor: float) -> None:
        self.step, self.factor = step, factor

    def on_after_backward(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                p.grad.mul_(self.factor)


def test_spike_is_an_event_after_warmup_only(tmp_path: Any) -> None:
    norms = NormsOnStart()
    guard = ExplosionGuard(action="skip", spike_factor=4.0)
    assert guard.spike_warmup_steps == 10
    callbacks = [norms, guard, ScaleGrads(3, 30.0), ScaleGrads(12, 1e3)]
    _trainer, _model, err = fit(
        tmp_path, callbacks, model=RegressionModel(optimizer="sgd", lr=1e-3), max_steps=14
    )
    assert err is None
    # step 3 is inside the warm-up: applied, not an event; step 12 is a spike: skipped
    assert [(r["step"], r["kind"]) for r in guard.records] == [(12, "spike")]
    assert not math.isnan(norms.recorder.norms[3]) and math.isnan(norms.recorder.norms[12])
    assert guard.records[0]["params"]  # the largest per-parameter norms
    # naive reference: 4 × bias-corrected EMA (decay 0.97) of the norms of steps 0..11, all applied
    applied = norms.recorder.norms[:12]
    ema = 0.0
    for n in applied:
        ema = 0.97 * ema + 0.03 * n
    threshold = 4.0 * ema / (1 - 0.97**12)
    assert max(applied[10:]) < threshold < guard.records[0]["norm"]


# ------------------------------------------------------------------------------------------------ budget
def test_budget_error_message(tmp_path: Any) -> None:
    guard = ExplosionGuard(snapshot_every_n_steps=2, max_rollbacks=1)
    faults = FaultInjector(target="grad", value=float("inf"), steps=[3, 5], param_pattern=r"^net\.2\.")
    _trainer, model, err = fit(tmp_path, [guard, faults])
    assert isinstance(err, GradientExplosionError)
    message = str(err)
    assert message.startswith(
        "ExplosionGuard: non-finite gradient norm at step 5 (epoch 0, batch 5); gradient norm inf"
    )
    assert "Parameters whose gradients went bad first: net.2.weight, net.2.bias." in message
    assert "The rollback budget is spent: 1 rollback(s) already done (max_rollbacks=1" in message
    assert "What to try: lower the learning rate" in message
    assert [r["action"] for r in guard.records] == ["rollback", "error"]
    assert weights_finite(model)  # the bad update was never applied


# ------------------------------------------------------------------------------------------------ resume
def test_resume_keeps_counters_and_the_budget(tmp_path: Any) -> None:
    guard1 = ExplosionGuard(snapshot_every_n_steps=2, max_rollbacks=2)
    ckpt1 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4)
    _, _, err = fit(tmp_path, [guard1, FaultInjector(target="grad", steps=[2]), ckpt1], max_steps=5)
    assert err is None and guard1.rollbacks == 1
    path = str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    saved = torch.load(path)["callbacks"][guard1.state_key]
    assert (saved["rollbacks"], saved["events"], saved["skipped_steps"]) == (1, 1, 1)

    guard2 = ExplosionGuard(snapshot_every_n_steps=2, max_rollbacks=2)
    faults = FaultInjector(target="grad", steps=[5, 6])
    _, _, err = fit(tmp_path / "b", [guard2, faults], max_steps=10, ckpt_path=path)
    assert isinstance(err, GradientExplosionError)
    assert "2 rollback(s) already done (max_rollbacks=2" in str(err)
    assert guard2.rollbacks == 2 and guard2.events == 3


# ----------------------------------------------------------------------------------------- records, logs
def test_events_jsonl_and_logged_counters(tmp_path: Any) -> None:
    class Losses(pl.Callback):
        def __init__(self) -> None:
            self.loss: dict[int, float] = {}

        def on_before_backward(self, trainer: pl.Trainer, pl_module: Any, loss: torch.Tensor) -> None:
            self.loss[trainer.global_step] = float(loss)

    losses = Losses()
    guard = ExplosionGuard(snapshot_every_n_steps=4)
    faults = FaultInjector(target="grad", steps=[6], param_pattern=r"^net\.2\.")
    logger = CSVLogger(str(tmp_path), name="run")
    trainer, _model, err = fit(tmp_path, [losses, guard, faults], logger=logger)
    assert err is None
    path = os.path.join(trainer.log_dir, EVENTS_FILENAME)
    assert guard.events_path == path
    events = load_events(path)
    assert events == [
        {
            "step": 6,
            "log_step": 6,  # one optimizer: the loggers' step is global_step
            "epoch": 0,
            "batch": 6,
            "optimizer": 0,
            "kind": "nonfinite_grad",
            "kinds": ["nonfinite_grad"],
            "norm": "nan",
            "loss": pytest.approx(losses.loss[6], rel=1e-6),
            "params": ["net.2.weight", "net.2.bias"],
            "action": "rollback",
            "restored": {"source": "snapshot", "step": 4, "path": None},
            "rollbacks": 1,
            "lr_scale": 1.0,
        }
    ]
    metrics = trainer.callback_metrics
    assert (
        metrics["explosion/events"],
        metrics["explosion/rollbacks"],
        metrics["explosion/skipped_steps"],
    ) == (1, 1, 1)


def test_guard_state_is_not_restored_by_its_own_rollback(tmp_path: Any) -> None:
    # counters only grow: two rollbacks to the same snapshot leave rollbacks == 2
    guard = ExplosionGuard(snapshot_every_n_steps=100)
    _trainer, _model, err = fit(tmp_path, [guard, FaultInjector(target="loss", steps=[2, 3])])
    assert err is None
    assert (guard.events, guard.rollbacks, guard.skipped_steps) == (2, 2, 2)
    assert [r["restored"]["step"] for r in guard.records] == [0, 0]
    assert copy.deepcopy(guard.state_dict())["rollbacks"] == 2


# ------------------------------------------------------------------------------------ manual optimization
class ManualTwoOptimizers(RegressionModel):
    """Manual optimization: two Adam optimizers (one per layer), each stepped every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        opts = self.optimizers()
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in opts:
            opt.step()
        return loss.detach()

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.Adam(self.net[0].parameters(), lr=0.01),
            torch.optim.Adam(self.net[2].parameters(), lr=0.01),
        ]


def test_manual_optimization_nan_loss_rolls_back_both_optimizers(tmp_path: Any) -> None:
    # global_step grows by 2 per batch; a NaN loss on the batch starting at global_step 4 (batch 2)
    guard = ExplosionGuard(snapshot_every_n_steps=2)
    faults = FaultInjector(target="loss", steps=[4])
    model = ManualTwoOptimizers()
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, callbacks=[guard, faults], max_steps=12)
    trainer.fit(model, regression_loader())
    assert weights_finite(model)
    assert [(r["step"], r["kind"], r["optimizer"], r["restored"]["step"]) for r in guard.records] == [
        (4, "nonfinite_loss", 0, 4)
    ]
    assert guard.skipped_steps == 2  # both optimizers' updates of that batch
    assert all(
        math.isfinite(v)
        for opt in trainer.optimizers
        for s in opt.state.values()
        for v in s["exp_avg"].flatten().tolist()
    )
