"""AdaptiveGradientClipping under manual optimization with two optimizers: one statistic per optimizer,
keys suffixed ``_opt0`` / ``_opt1``, and each optimizer applies ``min(its pre-clip norm, its threshold)``."""

from __future__ import annotations

import csv
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from lightning_clip.callbacks.adaptive_clipping import AdaptiveGradientClipping
from tests.integration.test_clipping_reference import (
    assert_clipped_some,
    expected_applied,
    mean_thresholds,
    naive_norm,
)
from tests.models import StepNormRecorder, make_trainer, regression_loader


class TwoOptimizerModel(pl.LightningModule):
    """An encoder and a head, each with its own SGD, stepped by hand; the pre-clip norms are measured
    naively right before each ``opt.step()``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.pre: dict[int, list[float]] = {0: [], 1: []}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt0, opt1 = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.encoder(x)), y)
        opt0.zero_grad()
        opt1.zero_grad()
        self.manual_backward(loss)
        for i, (opt, module) in enumerate(((opt0, self.encoder), (opt1, self.head))):
            self.pre[i].append(naive_norm([p.grad for p in module.parameters()]))
            opt.step()

    def configure_optimizers(self) -> Any:
        opt0 = torch.optim.SGD(self.encoder.parameters(), lr=0.3, momentum=0.9)
        opt1 = torch.optim.SGD(self.head.parameters(), lr=0.05, momentum=0.9)
        self.recorders = [StepNormRecorder(opt0), StepNormRecorder(opt1)]
        return [opt0, opt1]


def test_two_optimizers_independent_statistics(tmp_path: Any) -> None:
    pl.seed_everything(0, verbose=False)
    model = TwoOptimizerModel()
    clipper = AdaptiveGradientClipping(factor=1.2, decay=0.9)
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
