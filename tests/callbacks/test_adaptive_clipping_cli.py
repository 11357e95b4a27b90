"""AdaptiveGradientClipping configured from a LightningCLI YAML (``trainer.callbacks`` with ``class_path``)."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

from lightning_clip import AdaptiveGradientClipping
from tests.models import RegressionModel, regression_loader
from tests.reference import PreClipNorms, StepLosses, loss_aware_thresholds


class RegressionData(pl.LightningDataModule):
    def __init__(self, n: int = 64) -> None:
        super().__init__()
        self.n = n

    def train_dataloader(self) -> Any:
        return regression_loader(n=self.n)


CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 12
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning_clip.AdaptiveGradientClipping
      init_args:
        mode: mean
        factor: 1.2
        decay: 0.9
model:
  lr: 0.2
"""


def test_configured_from_yaml_and_clips(tmp_path: Any) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(root=tmp_path))
    cli = LightningCLI(
        RegressionModel, RegressionData, args=["--config", str(config)], run=False, save_config_callback=None
    )
    found = [cb for cb in cli.trainer.callbacks if isinstance(cb, AdaptiveGradientClipping)]
    assert len(found) == 1
    clipper = found[0]
    assert (clipper.mode, clipper.factor, clipper.decay, clipper.max_norm) == ("mean", 1.2, 0.9, None)
    assert cli.model.lr == 0.2

    pre, losses = PreClipNorms(), StepLosses()
    cli.trainer.callbacks[:0] = [pre, losses]  # before the clipper: the naive pre-clip norm
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    norms = pre.norms[0]
    assert len(norms) == 12
    thresholds = loss_aware_thresholds(norms, losses.losses, factor=1.2, decay=0.9)
    assert any(n > t for n, t in zip(norms, thresholds, strict=True))  # it clipped
    assert clipper.last[0][1] == pytest.approx(thresholds[-1], rel=1e-5)


def test_invalid_yaml_argument_is_reported(tmp_path: Any) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(root=tmp_path).replace("factor: 1.2", "factor: 0.5"))
    with pytest.raises(ValueError, match=r"`factor` must be .*, got 0\.5\."):
        LightningCLI(
            RegressionModel,
            RegressionData,
            args=["--config", str(config)],
            run=False,
            save_config_callback=None,
        )
