"""Truncated or corrupted checkpoint files never crash recovery: the guard warns and falls back to an older
good state. Files are cut at seeded random byte offsets (``random.Random(seed)``) right before the fault,
so the rollback has to read them. ``tests/integration/test_rollback_exact.py`` covers one file cut in
half; here: random offsets (0 bytes included), the two newest files cut, and bytes overwritten in place.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_clip.callbacks.adaptive_clipping import AdaptiveGradientClipping
from lightning_clip.callbacks.explosion_guard import ExplosionGuard
from lightning_clip.exceptions import LightningClipWarning
from lightning_clip.testing import FaultInjector
from tests.models import RegressionModel, make_trainer, regression_loader

FAULT = 7  # files at steps 2, 4, 6 exist when the fault's batch starts


class Damage(pl.Callback):
    """When the batch of step ``FAULT`` starts, damage the ``count`` newest files: ``"cut"`` keeps a seeded
    random prefix, ``"garble"`` overwrites a seeded random range with random bytes."""

    def __init__(self, dirpath: Path, seed: int, count: int = 1, how: str = "cut") -> None:
        self.dirpath, self.rng, self.count, self.how = dirpath, random.Random(seed), count, how
        self.damaged: list[str] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step != FAULT:
            return
        files = sorted(self.dirpath.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)[-self.count :]
        for f in files:
            data = bytearray(f.read_bytes())
            if self.how == "cut":
                data = data[: self.rng.randrange(len(data))]
            else:
                start = self.rng.randrange(len(data) - 64)
                data[start : start + 64] = bytes(self.rng.randrange(256) for _ in range(64))
            f.write_bytes(bytes(data))
            self.damaged.append(f.name)


class StateAfter(pl.Callback):
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == FAULT + 1:
            self.model = {k: v.clone() for k, v in pl_module.state_dict().items()}


def fit(tmp_path: Path, damage: Damage, snapshot_every: int) -> tuple[ExplosionGuard, StateAfter, Any, list]:
    guard = ExplosionGuard(snapshot_every_n_steps=snapshot_every)
    after = StateAfter()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    callbacks = [
        damage,
        AdaptiveGradientClipping(),
        guard,
        FaultInjector(target="grad", steps=[FAULT]),
        after,
        ckpt,
    ]
    torch.manual_seed(0)
    model = RegressionModel(optimizer="adam", scheduler=True)
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_steps=10, enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, regression_loader())  # never raises
    lc = [w for w in caught if issubclass(w.category, LightningClipWarning)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return guard, after, model, lc


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("count", [1, 2])
def test_cut_files_fall_back_to_an_older_file_with_a_warning(tmp_path: Path, seed: int, count: int) -> None:
    damage = Damage(tmp_path / "ckpt", seed, count=count)
    guard, after, _model, lc = fit(tmp_path, damage, snapshot_every=0)
    assert len(damage.damaged) == count
    assert [str(w.message).split("'")[1].rsplit("/", 1)[-1] for w in lc] == damage.damaged[::-1]
    assert all("is unreadable" in str(w.message) and "falling back" in str(w.message) for w in lc)
    older = 6 - 2 * count  # the newest intact file
    assert [(r["restored"]["source"], r["restored"]["step"]) for r in guard.records] == [
        ("checkpoint", older)
    ]
    saved = torch.load(tmp_path / "ckpt" / f"epoch=0-step={older}.ckpt", weights_only=True)
    for name, w in saved["state_dict"].items():
        assert torch.equal(after.model[name], w), name  # restored bit-exactly from the older file


def test_every_file_cut_falls_back_to_the_in_memory_snapshot(tmp_path: Path) -> None:
    damage = Damage(tmp_path / "ckpt", seed=0, count=3)
    guard, _after, _model, lc = fit(tmp_path, damage, snapshot_every=50)
    assert len(lc) == 3  # each file tried once, newest first
    assert [(r["restored"]["source"], r["restored"]["step"]) for r in guard.records] == [("snapshot", 0)]


@pytest.mark.parametrize("seed", range(4))
def test_garbled_bytes_never_crash_recovery(tmp_path: Path, seed: int) -> None:
    # bytes overwritten inside the file: either the file no longer loads (warning, older file) or it loads
    # (the zip format does not always notice); recovery never crashes and never restores non-finite values
    damage = Damage(tmp_path / "ckpt", seed, how="garble")
    guard, after, _model, lc = fit(tmp_path, damage, snapshot_every=0)
    assert all("is unreadable" in str(w.message) or "non-finite" in str(w.message) for w in lc)
    (record,) = guard.records
    assert record["restored"]["source"] == "checkpoint"
    assert record["restored"]["step"] == (6 if not lc else 4)
    assert all(torch.isfinite(v).all() for v in after.model.values())
