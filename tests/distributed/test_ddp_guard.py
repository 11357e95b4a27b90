"""ExplosionGuard under 2-process DDP (CPU, gloo): faults on rank 1 only make both ranks act identically,
and after the rollbacks the weights are identical on both ranks."""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lightning_clip import AdaptiveGradientClipping
from lightning_clip.callbacks.explosion_guard import ExplosionGuard
from lightning_clip.guard.events import EVENTS_FILENAME, RUN_LOGS_DIRNAME
from lightning_clip.report import load_events
from lightning_clip.testing import FaultInjector
from tests.models import RegressionModel, TargetsRise, make_trainer, regression_loader


class SaveResult(pl.Callback):
    """Each rank writes its final weights and the guard's counters to a file (children do not share objects)."""

    def __init__(self, out: str, guard: ExplosionGuard) -> None:
        self.out, self.guard = out, guard
        self.after_rollback: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if self.guard.records and self.guard.records[-1]["step"] + 1 == trainer.global_step:
            self.after_rollback[trainer.global_step] = {
                k: v.clone() for k, v in pl_module.state_dict().items()
            }

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        g = self.guard
        torch.save(
            {
                "weights": pl_module.state_dict(),
                "after_rollback": self.after_rollback,
                "counters": (g.events, g.rollbacks, g.skipped_steps),
                "kinds": [(r["step"], r["kind"], r["restored"]["step"]) for r in g.records],
            },
            os.path.join(self.out, f"rank{trainer.global_rank}.pt"),
        )


@pytest.mark.distributed
def test_fault_on_rank_one_only(tmp_path: Any) -> None:
    guard = ExplosionGuard(snapshot_every_n_steps=2)
    # a NaN gradient on rank 1 after DDP's all-reduce (rank 0's gradients stay finite), then NaN weights
    grad_fault = FaultInjector(target="grad", steps=[3], rank=1)
    weight_fault = FaultInjector(target="weight", steps=[6], rank=1)
    callbacks = [guard, grad_fault, weight_fault, SaveResult(str(tmp_path), guard)]
    torch.manual_seed(0)
    trainer = make_trainer(
        tmp_path,
        callbacks=callbacks,
        max_steps=10,
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        deterministic=False,
    )
    trainer.fit(RegressionModel(optimizer="adam", scheduler=True), regression_loader(n=64))
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    expected = [(3, "nonfinite_grad", 2), (7, "nonfinite_weights", 6)]
    assert r0["kinds"] == r1["kinds"] == expected
    assert r0["counters"] == r1["counters"] == (2, 2, 2)
    for step in (4, 8):  # right after each rollback
        for name, w in r0["after_rollback"][step].items():
            assert torch.equal(w, r1["after_rollback"][step][name]), (step, name)
    for name, w in r0["weights"].items():
        assert torch.isfinite(w).all() and torch.equal(w, r1["weights"][name]), name
    # rank zero alone wrote the event log, in the folder of this run (no logger: a version folder)
    events = load_events(os.path.join(tmp_path, RUN_LOGS_DIRNAME, "version_0", EVENTS_FILENAME))
    assert [(e["step"], e["kind"]) for e in events] == [(3, "nonfinite_grad"), (7, "nonfinite_weights")]


class RankOneBlowsUp(RegressionModel):
    """Rank 1's loss is ×1e4 on the batches of steps 12-15 (its gradient too, so the all-reduced norm
    confirms the rise): only the mean over the ranks says the loss diverged; rank 0 alone sees a normal
    loss."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == 1 and 12 <= self.global_step < 16:
            return loss * 1e4
        return loss


@pytest.mark.distributed
def test_divergence_on_the_mean_loss_is_decided_alike_on_every_rank(tmp_path: Any) -> None:
    guard = ExplosionGuard(snapshot_every_n_steps=4)
    torch.manual_seed(0)
    trainer = make_trainer(
        tmp_path,
        callbacks=[guard, SaveResult(str(tmp_path), guard)],
        max_steps=20,
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        deterministic=False,
    )
    trainer.fit(RankOneBlowsUp(optimizer="adam", lr=1e-3), regression_loader(n=64 * 20, batch_size=32))
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["kinds"] == r1["kinds"]
    assert r0["kinds"] and {k for _, k, _ in r0["kinds"]} == {"divergence"}
    assert all(12 <= s < 16 for s, _, _ in r0["kinds"])
    for name, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][name]), name


class SaveRise(pl.Callback):
    """Each rank writes the guard's events, the clipper's rule state and its final weights to a file."""

    def __init__(self, out: str, guard: ExplosionGuard, clipper: AdaptiveGradientClipping) -> None:
        self.out, self.guard, self.clipper = out, guard, clipper

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        torch.save(
            {
                "weights": pl_module.state_dict(),
                "kinds": [(r["step"], r["kind"], r["restored"]["step"]) for r in self.guard.records],
                "rollbacks": self.guard.rollbacks,
                "rule": self.clipper.rule(0).state_dict(),
            },
            os.path.join(self.out, f"rise{trainer.global_rank}.pt"),
        )


@pytest.mark.distributed
@pytest.mark.filterwarnings(
    "ignore::lightning_clip.exceptions.LightningClipWarning"
)  # checked single-process
def test_a_new_level_is_found_alike_on_every_rank(tmp_path: Any) -> None:
    """Targets ×30 for good on both ranks, both callbacks: one divergence rollback, the restored state sees
    the same (mean) loss on both ranks, and both guards restart their check while both clippers undo their
    cuts: the same events, the same rule state bit for bit, the same weights."""
    clipper, guard = AdaptiveGradientClipping(), ExplosionGuard()
    torch.manual_seed(0)
    trainer = make_trainer(
        tmp_path,
        callbacks=[clipper, guard, SaveRise(str(tmp_path), guard, clipper)],
        max_steps=160,
        max_epochs=-1,
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        deterministic=False,
    )
    trainer.fit(TargetsRise(at=100), regression_loader(n=1024, batch_size=16))
    r0 = torch.load(tmp_path / "rise0.pt")
    r1 = torch.load(tmp_path / "rise1.pt")
    assert r0["kinds"] == r1["kinds"] and [k for _, k, _ in r0["kinds"]] == ["divergence"]
    assert r0["rollbacks"] == r1["rollbacks"] == 1
    assert r0["rule"] == r1["rule"]
    assert r0["rule"]["episodes_undone"] >= 1
    for name, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][name]), name
