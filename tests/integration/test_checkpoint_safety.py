"""Rollback reads checkpoint files with ``weights_only=True``: a file that carries a pickled object is
skipped with a warning naming the type (the rollback falls back to the snapshot), unless
``ExplosionGuard(trust_checkpoints=True)``; Lightning's own checkpoint content needs nothing more.
Also: strategies whose gradients the callbacks cannot measure are refused with a clear error."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from pytorch_lightning import strategies as S
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_clip import _namespace
from lightning_clip.callbacks.adaptive_clipping import AdaptiveGradientClipping
from lightning_clip.callbacks.explosion_guard import ExplosionGuard
from lightning_clip.callbacks.vanishing_monitor import VanishingGradientMonitor
from lightning_clip.exceptions import LightningClipWarning
from lightning_clip.testing import FaultInjector
from tests.models import RegressionModel, make_trainer, regression_loader


class Marker:
    """A user object in the hyper-parameters: pickled into the checkpoint, outside torch's allowlist."""

    def __init__(self, tag: str = "x") -> None:
        self.tag = tag


class ModelWithObjectHparam(RegressionModel):
    def __init__(self, marker: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters()


def fit_with_fault(tmp_path: Any, trust: bool) -> ExplosionGuard:
    """Snapshot at step 5, checkpoints every 2 steps, a NaN gradient at step 7: the newest state is the
    checkpoint of step 6 (it carries a pickled ``Marker``), the next is the snapshot of step 5."""
    guard = ExplosionGuard(snapshot_every_n_steps=5, trust_checkpoints=trust)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1)
    callbacks = [guard, FaultInjector(target="grad", steps=[7]), ckpt]
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_steps=9, enable_checkpointing=True)
    trainer.fit(ModelWithObjectHparam(marker=Marker()), regression_loader(n=128))
    return guard


def test_a_checkpoint_carrying_a_pickled_object_is_skipped_with_a_warning(tmp_path: Any) -> None:
    step6 = tmp_path / "ckpt" / "epoch=0-step=6.ckpt"
    with pytest.warns(LightningClipWarning) as caught:
        guard = fit_with_fault(tmp_path, trust=False)
    [event] = guard.records
    assert (event["step"], event["kind"]) == (7, "nonfinite_grad")
    assert event["restored"]["source"] == "snapshot" and event["restored"]["step"] == 5
    [warning] = [w for w in caught if "epoch=0-step=6.ckpt" in str(w.message)]
    message = str(warning.message)
    assert f"{__name__}.Marker" in message  # names the type the file needs
    assert "trust_checkpoints=True" in message and "add_safe_globals" in message
    # the independent fact behind it: torch refuses the file under weights_only=True, for that type
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(step6, weights_only=True)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(step6)) == [f"{__name__}.Marker"]


def test_trust_checkpoints_reads_it(tmp_path: Any) -> None:
    guard = fit_with_fault(tmp_path, trust=True)
    [event] = guard.records
    assert event["restored"]["source"] == "checkpoint" and event["restored"]["step"] == 6
    assert event["restored"]["path"].endswith("epoch=0-step=6.ckpt")


def test_lightning_checkpoint_content_loads_with_weights_only(tmp_path: Any) -> None:
    """Every lightning-clip callback's state, Adam, a step scheduler and ModelCheckpoint's state."""
    callbacks = [
        AdaptiveGradientClipping(),
        AdaptiveGradientClipping(mode="percentile"),
        AdaptiveGradientClipping(mode="zscore"),
        ExplosionGuard(spike_factor=3.0),
        VanishingGradientMonitor(check_every_n_steps=1, save_figure=False),
        ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True),
    ]
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_steps=6, enable_checkpointing=True)
    trainer.fit(RegressionModel(optimizer="adam", scheduler=True), regression_loader())
    ckpt = torch.load(os.path.join(tmp_path, "ckpt", "last.ckpt"), weights_only=True)
    assert {cb.state_key for cb in callbacks[:5]} <= set(ckpt["callbacks"])


# --------------------------------------------------------------------------------- strategy refusal
def bare(cls: type) -> Any:
    """A real instance of a strategy class whose constructor needs hardware or packages absent here (or
    that is abstract): the check reads nothing but the class."""
    return object.__new__(cls)


def custom_parallel_strategy() -> type:
    """A user's own ParallelStrategy that is neither DDP nor ModelParallel (abstract methods cleared: only
    the class is inspected)."""
    cls = type("MyStrategy", (S.ParallelStrategy,), {})
    cls.__abstractmethods__ = frozenset()  # type: ignore[attr-defined]
    return cls


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        (S.SingleDeviceStrategy("cpu"), None),
        (S.DDPStrategy(), None),
        (S.DDPStrategy(start_method="fork"), None),
        (S.ModelParallelStrategy(), None),
        (S.FSDPStrategy(), "`FSDPStrategy`: FSDP1 keeps each rank's shard"),
        (bare(S.DeepSpeedStrategy), "`DeepSpeedStrategy`: DeepSpeed owns the optimizer step"),
        (bare(S.XLAStrategy), "`XLAStrategy`"),
        (bare(custom_parallel_strategy()), "`MyStrategy`: it measures gradients under"),
    ],
)
def test_strategy_check(strategy: Any, expected: str | None) -> None:
    problem = _namespace.strategy_problem(strategy)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem
        assert "ModelParallelStrategy" in problem and "fully_shard" in problem  # what to use instead


def test_setup_refuses_an_unsupported_strategy(tmp_path: Any) -> None:
    """Through a real fit: a DDPStrategy subclass named like DeepSpeed's is refused at setup."""

    class DeepSpeedStrategy(S.SingleDeviceStrategy):  # stands in for the real one, which needs a GPU
        pass

    trainer = make_trainer(tmp_path, strategy=DeepSpeedStrategy("cpu"), callbacks=[ExplosionGuard()])
    with pytest.raises(
        ValueError, match=r"ExplosionGuard: lightning-clip does not support `DeepSpeedStrategy`"
    ):
        trainer.fit(RegressionModel(), regression_loader())
