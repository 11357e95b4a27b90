"""AdaptiveGradientClipping under manual optimization with two optimizers: one statistic per optimizer,
keys suffixed ``_opt0`` / ``_opt1``, and each optimizer applies ``min(its pre-clip norm, its threshold)``."""

from __future__ import annotations

import csv
from typing import Any

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

from lightning_clip.callbacks.adaptive_clipping import AdaptiveGradientClipping
from tests.models import TwoOptimizerModel, make_trainer, regression_loader
from tests.reference import (
    assert_clipped_some,
    expected_applied,
    loss_aware_thresholds,
    mean_thresholds,
)


def test_two_optimizers_stepped_after_one_backward_both_get_its_loss(tmp_path: Any) -> None:
    """The default rule: each optimizer's statistics are fed the loss of the backward before its step."""
    pl.seed_everything(0, verbose=False)
    model = TwoOptimizerModel()
    clipper = AdaptiveGradientClipping()
    make_trainer(tmp_path, callbacks=[clipper], max_steps=24).fit(model, regression_loader())
    assert len(model.losses) == 12
    for i in (0, 1):
        thresholds = loss_aware_thresholds(model.pre[i], model.losses)
        assert model.recorders[i].norms == pytest.approx(expected_applied(model.pre[i], thresholds), rel=1e-5)
        assert clipper.rule(i).band.count == 12  # type: ignore[attr-defined]


def test_two_optimizers_independent_statistics(tmp_path: Any) -> None:
    pl.seed_everything(0, verbose=False)
    model = TwoOptimizerModel()
    clipper = AdaptiveGradientClipping(factor=1.2, decay=0.9, loss_aware=False)
    trainer = make_trainer(
        tmp_path, callbacks=[clipper], max_steps=24, logger=CSVLogger(str(tmp_path), name="", version="")
    )
    trainer.fit(model, regression_loader())
    assert trainer.global_step == 24  # two optimizer steps per batch
    for i in (0, 1):
        norms = model.pre[i]
        assert len(norms) == 12
        thresholds = mean_thresholds(norms, factor=1.2, decay=0.9)
        assert_clipped_some(norms, thresholds)
        assert model.recorders[i].norms == pytest.approx(expected_applied(norms, thresholds), rel=1e-5)
    # statistics really are separate: a shared statistic would have seen 24 norms
    assert clipper.rule(0).count == 12 and clipper.rule(1).count == 12  # type: ignore[attr-defined]

    with open(tmp_path / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    for i in (0, 1):
        logged = [float(r[f"grad/norm_opt{i}"]) for r in rows if r.get(f"grad/norm_opt{i}")]
        assert logged == pytest.approx(model.pre[i], rel=1e-5)
        for key in ("clip_threshold", "clip_coef"):
            assert any(r.get(f"grad/{key}_opt{i}") for r in rows)
    assert not any(k in rows[0] for k in ("grad/norm", "grad/clip_threshold", "grad/clip_coef"))
