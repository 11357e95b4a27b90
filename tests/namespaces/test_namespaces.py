"""Both Lightning namespaces: ``pytorch_lightning`` and ``lightning.pytorch`` (``import lightning as L``).

Every test runs once per namespace installed here, so the same file checks a venv with only
``pytorch-lightning``, one with ``lightning`` (which installs ``pytorch-lightning`` too) and one with
``lightning`` alone (``.ci/compat.sh`` builds them). It imports nothing of ``tests/`` that needs a particular
namespace.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard, VanishingGradientMonitor, _namespace
from lightning_clip.testing import FaultInjector

NAMESPACES = sorted(_namespace.lightning_namespaces())
PUBLIC = (AdaptiveGradientClipping, ExplosionGuard, VanishingGradientMonitor, FaultInjector)


def ns(name: str) -> Any:
    return importlib.import_module(name)


def loader(n: int = 48) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def model_class(name: str) -> type:
    """A small regressor deriving from ``name``'s LightningModule."""

    class Regressor(ns(name).LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=0.01)

    return Regressor


def trainer(name: str, tmp_path: Any, callbacks: list[Any], **kwargs: Any) -> Any:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=8,
        default_root_dir=str(tmp_path),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    defaults.update(kwargs)
    return ns(name).Trainer(callbacks=callbacks, **defaults)


def callbacks() -> list[Any]:
    return [
        AdaptiveGradientClipping(),
        ExplosionGuard(snapshot_every_n_steps=2),
        VanishingGradientMonitor(check_every_n_steps=2, save_figure=False),
        FaultInjector(target="grad", steps=[3]),
    ]


@pytest.mark.parametrize("name", NAMESPACES)
def test_genuine_callbacks_of_every_installed_namespace(name: str) -> None:
    for cls in PUBLIC:
        assert issubclass(cls, ns(name).Callback), (cls, name)
    for obj in (*callbacks(), FaultInjector(target="loss", batches=[0])):
        assert isinstance(obj, ns(name).Callback), (obj, name)


@pytest.mark.parametrize("name", NAMESPACES)
def test_fit_rollback_and_resume_in_the_namespace(name: str, tmp_path: Any) -> None:
    """A real fit in the namespace's Trainer: a NaN gradient at step 3 is rolled back to the snapshot of
    step 2, the callbacks' state goes into the checkpoint and a resumed run restores it."""
    cbs = callbacks()
    t = trainer(name, tmp_path, cbs)
    t.fit(model_class(name)(), loader())
    guard = cbs[1]
    assert [(r["step"], r["kind"], r["restored"]["step"]) for r in guard.records] == [
        (3, "nonfinite_grad", 2)
    ]
    assert cbs[0].last[0][1] < float("inf")  # the clipper has a threshold
    assert cbs[2].history  # the monitor checked
    path = os.path.join(tmp_path, "last.ckpt")
    t.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"]
    assert {cb.state_key for cb in cbs[:3]} <= set(saved)
    resumed = callbacks()[:3]
    t2 = trainer(name, tmp_path, resumed, max_steps=10)
    t2.fit(model_class(name)(), loader(), ckpt_path=path)
    assert resumed[1].rollbacks == 1 and resumed[1].events == 1  # counters restored from the checkpoint
    assert t2.global_step == 10


@pytest.mark.parametrize("name", NAMESPACES)
def test_tensorboard_logger_of_the_namespace_is_recognised(name: str, tmp_path: Any) -> None:
    pytest.importorskip("tensorboard")
    logger = ns(name).loggers.TensorBoardLogger(str(tmp_path))
    assert _namespace.is_tensorboard_logger(logger)
    assert not _namespace.is_tensorboard_logger(ns(name).loggers.CSVLogger(str(tmp_path)))


@pytest.mark.parametrize("name", NAMESPACES)
def test_lightning_cli_class_path(name: str, tmp_path: Any) -> None:
    """The namespace's LightningCLI accepts ``class_path: lightning_clip.…`` with ``init_args``."""
    pytest.importorskip("jsonargparse")
    cli = importlib.import_module(f"{name}.cli")
    config = tmp_path / "cli.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            trainer:
              max_steps: 3
              logger: false
              enable_checkpointing: false
              enable_progress_bar: false
              enable_model_summary: false
              default_root_dir: {tmp_path}
              callbacks:
                - class_path: lightning_clip.AdaptiveGradientClipping
                  init_args: {{factor: 2.0, max_norm: 1.0}}
                - class_path: lightning_clip.ExplosionGuard
                  init_args: {{action: skip}}
                - class_path: lightning_clip.VanishingGradientMonitor
                  init_args: {{check_every_n_steps: 1, save_figure: false}}
            """
        )
    )
    demos = importlib.import_module(f"{name}.demos.boring_classes")
    run = cli.LightningCLI(
        demos.BoringModel,
        demos.BoringDataModule,
        args=["fit", "--config", str(config)],
        save_config_callback=None,
    )
    found = {type(cb).__name__: cb for cb in run.trainer.callbacks}
    assert (
        found["AdaptiveGradientClipping"].factor == 2.0 and found["AdaptiveGradientClipping"].max_norm == 1.0
    )
    assert found["ExplosionGuard"].action == "skip"
    assert found["VanishingGradientMonitor"].steps == {0: 3}
    assert run.trainer.global_step == 3


@pytest.mark.parametrize("name", NAMESPACES)
def test_unsupported_strategy_of_the_namespace_is_named(name: str) -> None:
    strategies = ns(name).strategies
    assert _namespace.strategy_problem(strategies.DDPStrategy()) is None
    assert _namespace.strategy_problem(strategies.ModelParallelStrategy()) is None
    problem = _namespace.strategy_problem(strategies.FSDPStrategy())
    assert problem is not None and "`FSDPStrategy`" in problem and "ModelParallelStrategy" in problem


def test_without_any_lightning_the_import_error_names_the_extras() -> None:
    """No Lightning at all: `functional` still works (pure torch), a callback's import names the extras."""
    code = (
        "import sys\n"
        "for m in ('pytorch_lightning', 'lightning', 'lightning.pytorch'): sys.modules[m] = None\n"
        "import torch\n"
        "from lightning_clip import functional\n"
        "assert float(functional.total_norm([torch.tensor([3.0, 4.0])])) == 5.0\n"
        "from lightning_clip import AdaptiveGradientClipping\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1
    assert "ImportError: lightning-clip needs Lightning" in out.stderr
    assert "lightning-clip[lightning]" in out.stderr and "lightning-clip[pytorch-lightning]" in out.stderr
