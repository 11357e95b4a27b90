"""Resume exactness with all three callbacks attached: a run stopped at an arbitrary step (a crash) and
resumed with ``Trainer.fit(ckpt_path=...)`` from the newest ``ModelCheckpoint`` file ends bit-identical to
the uninterrupted run: weights, optimizer state, and the ``state_dict`` of ``AdaptiveGradientClipping``,
``ExplosionGuard`` and ``VanishingGradientMonitor``. Faults before and after the resume point make the
guard's counters, the clipping statistics and the rollbacks part of what must match.

The train loader is :class:`~tests.reliability.scenarios.ResumableLoader`, whose position Lightning saves
in the checkpoint, so a mid-epoch resume sees the same batches (a plain ``DataLoader`` restarts the epoch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_clip.callbacks.adaptive_clipping import AdaptiveGradientClipping
from lightning_clip.callbacks.explosion_guard import ExplosionGuard
from lightning_clip.callbacks.vanishing_monitor import VanishingGradientMonitor
from lightning_clip.testing import FaultInjector
from tests.models import Crash, assert_same
from tests.reliability.scenarios import ResumableLoader, ScenarioModel, make_data

TOTAL = 20  # 12 batches per epoch: the runs cross an epoch boundary
FAULTS = [2, 15]  # gradient NaN: one before every resume point, one after


def run(
    root: Path, arch: str, every: int, crash_at: int | None = None, ckpt_path: str | None = None
) -> tuple[pl.Trainer, list[Any]]:
    pl.seed_everything(0, verbose=False)
    model = ScenarioModel(arch, "adam", lr=0.05, scheduler="step")
    lc = [
        AdaptiveGradientClipping(factor=1.2, decay=0.8),
        ExplosionGuard(snapshot_every_n_steps=1, max_rollbacks=5, lr_factor=0.5, skip_batches=1),
        VanishingGradientMonitor(check_every_n_steps=3, save_figure=False),
    ]
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1)
    callbacks = [*lc, FaultInjector(target="grad", steps=FAULTS), ckpt]
    if crash_at is not None:
        callbacks.insert(0, Crash(crash_at))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=TOTAL,
        default_root_dir=str(root),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=callbacks,
    )
    loader = ResumableLoader(make_data(arch, n=48), batch_size=4)
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return trainer, lc


# The resume points are in healthy training: resumed in the middle of an elevated loss, the run starts
# from the checkpoint's state as its snapshot, while the uninterrupted run still holds an older healthy one.
@pytest.mark.parametrize(("arch", "every", "crash_at"), [("mlp", 5, 7), ("gru", 4, 9), ("mlp", 7, 8)])
def test_resume_is_bit_identical_to_the_uninterrupted_run(
    tmp_path: Path, arch: str, every: int, crash_at: int
) -> None:
    full, full_cbs = run(tmp_path / "full", arch, every)
    guard = full_cbs[1]
    assert [r["step"] for r in guard.records] == FAULTS and guard.rollbacks == 2

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "crashed", arch, every, crash_at=crash_at)
    saved_at = (crash_at // every) * every
    newest = max((tmp_path / "crashed" / "ckpt").glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name.endswith(f"-step={saved_at}.ckpt")
    resumed, resumed_cbs = run(tmp_path / "resumed", arch, every, ckpt_path=str(newest))

    assert resumed.global_step == full.global_step == TOTAL
    assert_same(resumed.lightning_module.state_dict(), full.lightning_module.state_dict(), "model")
    assert_same(resumed.optimizers[0].state_dict(), full.optimizers[0].state_dict(), "optimizer")
    assert_same(
        resumed.lr_scheduler_configs[0].scheduler.state_dict(),
        full.lr_scheduler_configs[0].scheduler.state_dict(),
        "scheduler",
    )
    for a, b in zip(resumed_cbs, full_cbs, strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        if isinstance(a, ExplosionGuard):  # two runs, two identities; the resumed run keeps the crashed one's
            assert sa.pop("run_id") == torch.load(newest, weights_only=True)["lightning_clip_run"]["run_id"]
            assert sb.pop("run_id") != a.run_id
        assert_same(sa, sb, type(a).__name__)
    # the states are not trivial: the clipper counted norms, the monitor checked, the guard rolled back
    assert full_cbs[0].state_dict()["rules"]["0"]["count"] >= 10
    assert len(full_cbs[2].state_dict()["history"]) >= 4
    assert resumed_cbs[1].rollbacks == 2 and resumed_cbs[1].lr_scale == 0.25
