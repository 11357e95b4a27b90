"""Ranks that see different checkpoint folders (node-local disks, an NFS directory cache, an asynchronous
writer) still restore the same state: 2 processes (gloo), rank 0 writes the files, rank 1 sees its own
``dirpath`` view of them, lagging one file behind or empty. Both ranks must agree on the highest step
every rank can read, restore it, and end with identical weights, without a collective mismatch."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_clip import ExplosionGuard
from lightning_clip.testing import FaultInjector
from tests.distributed.launch import run_ranks
from tests.models import RegressionModel, make_trainer, rank_loader


class View(ModelCheckpoint):
    """Rank 1 lists ``view`` instead of the folder rank 0 writes (ModelCheckpoint broadcasts rank 0's
    ``dirpath`` at setup; the view is set after)."""

    def __init__(self, view: Path | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.view = view

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.view is not None:
            self.dirpath = str(self.view)


class Mirror(pl.Callback):
    """Before each batch, rank 1's view receives rank 0's files: all but the newest (``lag``), all of them
    with a NaN weight in the newest (``damaged``: rank 1 lists and reads the same steps, and its validation
    of the newest fails after the ranks agreed on it), or none."""

    def __init__(self, source: Path, view: Path, mode: str) -> None:
        self.source, self.view, self.mode = source, view, mode
        self.listed: list[str] = []  # rank 1's view when the fault's batch starts

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.mode != "none" and self.source.is_dir():
            self.copy()
        if trainer.global_step == 7:
            self.listed = sorted(p.name for p in self.view.glob("*.ckpt"))

    def copy(self) -> None:
        files = sorted(self.source.glob("*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
        for f in files[:-1]:
            target = self.view / f.name
            if not target.exists() or target.stat().st_size != f.stat().st_size:
                shutil.copy2(f, target)
        if self.mode == "damaged" and files:  # lists and loads like the others, fails validation on rank 1
            ckpt = torch.load(files[-1], weights_only=True)
            ckpt["state_dict"]["net.0.weight"][0, 0] = float("nan")
            torch.save(ckpt, self.view / files[-1].name)


class Report(pl.Callback):
    def __init__(self, guard: ExplosionGuard) -> None:
        self.guard = guard
        self.after: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == 8:  # right after the rollback of step 7
            self.after = {k: v.clone() for k, v in pl_module.state_dict().items()}


def _rank(rank: int, root: Path, mode: str) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    source, view = root / "ckpt", root / "view1"
    view.mkdir(exist_ok=True)
    guard = ExplosionGuard(snapshot_every_n_steps=100, schedulers_after_rollback="restore")
    report = Report(guard)
    ckpt = View(
        view if rank == 1 else None, dirpath=source, filename="{step}", every_n_train_steps=2, save_top_k=-1
    )
    callbacks: list[Any] = [guard, FaultInjector(target="grad", steps=[7], rank=1), report, ckpt]
    mirror = Mirror(source, view, mode)
    if rank == 1:
        callbacks.insert(0, mirror)
    trainer = make_trainer(
        root,
        callbacks=callbacks,
        max_steps=10,
        devices=2,
        strategy="ddp",
        use_distributed_sampler=False,
        deterministic=False,
        enable_checkpointing=True,
    )
    trainer.fit(RegressionModel(optimizer="adam", scheduler=True), rank_loader(rank))
    return {
        "records": [(r["step"], r["restored"]["source"], r["restored"]["step"]) for r in guard.records],
        "after": report.after,
        "weights": {k: v.clone() for k, v in trainer.lightning_module.state_dict().items()},
        "listed": mirror.listed,
    }


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("mode", "expected"),
    [("lag", ("checkpoint", 4)), ("damaged", ("checkpoint", 4)), ("none", ("snapshot", 0))],
)
def test_ranks_with_different_folder_views_restore_the_same_state(
    tmp_path: Path, mode: str, expected: tuple[str, int]
) -> None:
    r0, r1 = run_ranks(_rank, tmp_path, mode, timeout=150)
    assert r0["records"] == r1["records"] == [(7, *expected)]
    for name, w in r0["after"].items():
        assert torch.equal(w, r1["after"][name]), name
    for name, w in r0["weights"].items():
        assert torch.isfinite(w).all() and torch.equal(w, r1["weights"][name]), name
    # the views did differ at the fault: rank 0 saw steps 2, 4, 6; rank 1 one file fewer, a damaged step 6
    # (its failure on rank 1 alone moves both ranks to step 4), or none
    views = {"lag": ["step=2.ckpt", "step=4.ckpt"], "damaged": ["step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]}
    assert r1["listed"] == views.get(mode, [])
