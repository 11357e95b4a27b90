"""AdaptiveGradientClipping under 2-process DDP on CPU (gloo): both ranks use the same thresholds and apply
``min(pre-clip norm, threshold)``. The children write their figures to files (the parent's objects are
not updated under ``ddp_fork``)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytorch_lightning as pl

from lightning_clip.callbacks.adaptive_clipping import AdaptiveGradientClipping
from tests.models import CountReduces, RecordedModel, make_trainer, regression_loader
from tests.reference import (
    LastFigures,
    PreClipNorms,
    StepLosses,
    assert_clipped_some,
    expected_applied,
    loss_aware_thresholds,
    mean_thresholds,
)

STEPS = 8


class WriteFigures(pl.Callback):
    def __init__(self, path: Any, pre: PreClipNorms, figures: LastFigures) -> None:
        self.path = path
        self.pre = pre
        self.figures = figures

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        out = {
            "pre": self.pre.norms[0],
            "figures": self.figures.figures[0],
            "applied": pl_module.recorder.norms,
            "world_size": trainer.world_size,
        }
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


@pytest.mark.distributed
def test_same_thresholds_on_both_ranks(tmp_path: Any) -> None:
    pl.seed_everything(0, verbose=False)
    pre = PreClipNorms()
    clipper = AdaptiveGradientClipping(factor=1.1, decay=0.8, loss_aware=False)
    figures = LastFigures(clipper)
    trainer = make_trainer(
        tmp_path,
        callbacks=[pre, clipper, figures, WriteFigures(tmp_path, pre, figures)],
        max_steps=STEPS,
        devices=2,
        strategy="ddp_fork",
        deterministic=False,
    )
    trainer.fit(RecordedModel(lr=0.2), regression_loader(n=64, batch_size=4))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # every figure, threshold included, is the same on both ranks (the gradients were all-reduced first)
    assert ranks[0]["figures"] == ranks[1]["figures"]
    assert ranks[0]["pre"] == pytest.approx(ranks[1]["pre"], rel=1e-12)
    for r in ranks:
        norms = r["pre"]
        assert len(norms) == STEPS
        thresholds = mean_thresholds(norms, factor=1.1, decay=0.8)
        assert_clipped_some(norms, thresholds)
        assert [f[1] for f in r["figures"]] == pytest.approx(thresholds, rel=1e-5)
        assert r["applied"] == pytest.approx(expected_applied(norms, thresholds), rel=1e-5)


class WriteLossAware(pl.Callback):
    def __init__(
        self, path: Any, pre: PreClipNorms, losses: StepLosses, figures: LastFigures, count: CountReduces
    ) -> None:
        self.path, self.pre, self.losses, self.figures, self.count = path, pre, losses, figures, count

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        out = {
            "pre": self.pre.norms[0],
            "losses": self.losses.losses,
            "thresholds": [f[1] for f in self.figures.figures[0]],
            "reduces": self.count.calls,
        }
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


class RankLoss(RecordedModel):
    """Rank 1's loss is 4x rank 0's on every batch (its gradient is not): the ranks' losses differ."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        return loss + 3.0 * loss.detach() if self.global_rank == 1 else loss


@pytest.mark.distributed
@pytest.mark.parametrize("with_guard", [False, True])
def test_loss_aware_thresholds_use_the_mean_loss_of_the_ranks(tmp_path: Any, with_guard: bool) -> None:
    """The default rule is fed the loss averaged over the ranks, in one all-reduce per step whatever the
    callbacks (the guard's flags ride on it)."""
    from lightning_clip.callbacks.explosion_guard import ExplosionGuard

    pl.seed_everything(0, verbose=False)
    pre, losses, count = PreClipNorms(), StepLosses(), CountReduces()
    clipper = AdaptiveGradientClipping(factor=1.1, decay=0.8)
    figures = LastFigures(clipper)
    guards = [ExplosionGuard(snapshot_every_n_steps=0, action="skip")] if with_guard else []
    trainer = make_trainer(
        tmp_path,
        callbacks=[
            count,
            pre,
            losses,
            *guards,
            clipper,
            figures,
            WriteLossAware(tmp_path, pre, losses, figures, count),
        ],
        max_steps=STEPS,
        devices=2,
        strategy="ddp_fork",
        deterministic=False,
    )
    trainer.fit(RankLoss(lr=0.2), regression_loader(n=64, batch_size=4))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["thresholds"] == ranks[1]["thresholds"]
    assert ranks[0]["losses"] != ranks[1]["losses"]
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"], strict=True)]
    expected = loss_aware_thresholds(ranks[0]["pre"], mean, factor=1.1, decay=0.8)
    assert ranks[0]["thresholds"] == pytest.approx(expected, rel=1e-5)
    assert [r["reduces"] for r in ranks] == [STEPS, STEPS]
