"""`examples/lightning_cli/`: the YAML config attaches the three callbacks to a real LightningCLI fit."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard, VanishingGradientMonitor, report

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "lightning_cli"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lightning_cli_train", EXAMPLE / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lightning_cli_train"] = module
    spec.loader.exec_module(module)
    return module


def test_config_attaches_the_three_callbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI warns when it sees pytest's arguments
    config = EXAMPLE / "config.yaml"
    expected = {
        c["class_path"]: c["init_args"] for c in yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    }
    cli = _load().main(
        [
            "fit",
            f"--config={config}",
            "--trainer.max_steps=12",
            "--trainer.val_check_interval=6",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--data.seq_len=12",
            "--data.val_size=32",
        ]
    )
    callbacks = {type(c): c for c in cli.trainer.callbacks}
    clip = callbacks[AdaptiveGradientClipping]
    guard = callbacks[ExplosionGuard]
    monitor = callbacks[VanishingGradientMonitor]
    args = expected["lightning_clip.AdaptiveGradientClipping"]
    assert (clip.mode, clip.factor, clip.max_norm) == (args["mode"], args["factor"], args["max_norm"])
    args = expected["lightning_clip.ExplosionGuard"]
    assert (guard.action, guard.max_rollbacks) == (args["action"], args["max_rollbacks"])
    assert (
        monitor.check_every_n_steps
        == expected["lightning_clip.VanishingGradientMonitor"]["check_every_n_steps"]
    )
    assert cli.trainer.global_step == 12
    # the run wrote what `lightning-clip report` reads: one logged norm per step, no event
    run = report.load_run(cli.trainer.log_dir)
    norms = run.series["grad/norm"]
    assert [s for s, _ in norms] == list(range(12))
    assert all(math.isfinite(v) for _, v in norms)
    assert [v for _, v in run.series["explosion/events"]] == [0.0] * 12
    assert len(run.series["val/mse"]) == 2
    assert run.events == []
