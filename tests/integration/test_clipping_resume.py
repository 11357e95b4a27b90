"""Resume: a run stopped at step k and resumed with ``Trainer.fit(ckpt_path=...)`` continues with the same
thresholds and ends with bit-identical weights to an uninterrupted run (Adam + a step-interval StepLR)."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_clip.callbacks.adaptive_clipping import AdaptiveGradientClipping
from tests.models import RegressionModel, make_trainer, regression_loader
from tests.reference import LastFigures

TOTAL = 16


def _clipper(loss_aware: bool = False) -> AdaptiveGradientClipping:
    return AdaptiveGradientClipping(factor=1.1, decay=0.8, loss_aware=loss_aware)


def _run(
    tmp_path: Any,
    max_steps: int,
    ckpt_path: str | None = None,
    callbacks: tuple[Any, ...] = (),
    loss_aware: bool = False,
    **kwargs: Any,
):
    pl.seed_everything(0, verbose=False)
    # the loss-aware ceiling applies to SGD (an optimizer that normalises the gradient gets the plain rule)
    optimizer, lr = ("sgd", 0.05) if loss_aware else ("adam", 0.1)
    model = RegressionModel(optimizer=optimizer, lr=lr, scheduler=True)
    clipper = _clipper(loss_aware)
    figures = LastFigures(clipper)
    trainer = make_trainer(tmp_path, callbacks=[clipper, figures, *callbacks], max_steps=max_steps, **kwargs)
    trainer.fit(model, regression_loader(n=48), ckpt_path=ckpt_path)
    return model, figures, figures.thresholds(), trainer


# The checkpoint is written by ModelCheckpoint at an epoch's last batch (6 batches per epoch): Lightning
# restarts a plain DataLoader's epoch on a mid-epoch resume, and a checkpoint saved after `fit` stopped on
# `max_steps` at an epoch end replays a batch on resume, so only these give the uninterrupted run's batches
# (checked without any lightning-clip callback while writing this test).
@pytest.mark.parametrize("loss_aware", [False, True])
@pytest.mark.parametrize(("saved_at", "crashed_at"), [(6, 9), (12, 14)])
def test_resume_continues_exactly(tmp_path: Any, saved_at: int, crashed_at: int, loss_aware: bool) -> None:
    full_model, full_figures, full_thresholds, _ = _run(tmp_path / "full", TOTAL, loss_aware=loss_aware)
    # the plain rule has no threshold at its first step only; the loss-aware one clips from the first step
    assert sum(c == float("inf") for c in full_thresholds) == (0 if loss_aware else 1)
    coefs = [c for *_, c in full_figures.figures[0][saved_at:]]
    assert any(c < 1.0 for c in coefs)  # the thresholds mattered
    assert loss_aware or any(c == 1.0 for c in coefs)

    every = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), every_n_train_steps=saved_at, save_top_k=-1)
    _, _, first, _ = _run(
        tmp_path / "first", crashed_at, callbacks=(every,), loss_aware=loss_aware, enable_checkpointing=True
    )
    assert first == full_thresholds[:crashed_at]
    files = sorted((tmp_path / "ckpts").glob("*.ckpt"))
    assert [f.name for f in files] == [f"epoch={saved_at // 6 - 1}-step={saved_at}.ckpt"]

    resumed_model, resumed_figures, resumed, _ = _run(
        tmp_path / "resumed", TOTAL, ckpt_path=str(files[0]), loss_aware=loss_aware
    )
    assert resumed == full_thresholds[saved_at:]  # exact, first resumed step included (no new warm-up)
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed_figures.clipper.state_dict() == full_figures.clipper.state_dict()


@pytest.mark.parametrize("loss_aware", [False, True])
def test_resume_without_saved_state_differs(tmp_path: Any, loss_aware: bool) -> None:
    """Control: the same resume with the callback's state dropped from the file restarts the warm-up (the
    loss-aware rule: its ceiling starts again at a tenth of the first norms)."""
    _, _, full_thresholds, _ = _run(tmp_path / "full", TOTAL, loss_aware=loss_aware)
    every = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), every_n_train_steps=6, save_top_k=-1)
    _run(tmp_path / "first", 6, callbacks=(every,), loss_aware=loss_aware, enable_checkpointing=True)
    path = next((tmp_path / "ckpts").glob("*.ckpt"))
    ckpt = torch.load(path, weights_only=True)
    ckpt["callbacks"] = {k: v for k, v in ckpt["callbacks"].items() if "AdaptiveGradientClipping" not in k}
    torch.save(ckpt, path)
    _, figures, resumed, _ = _run(tmp_path / "resumed", TOTAL, ckpt_path=str(path), loss_aware=loss_aware)
    restart = 0.1 * figures.figures[0][0][0] if loss_aware else float("inf")  # its pre-clip norm
    assert resumed[0] == pytest.approx(restart, rel=1e-6)
    assert resumed[0] != pytest.approx(full_thresholds[6], rel=1e-3)


def test_state_in_checkpoint_loads_with_weights_only(tmp_path: Any) -> None:
    _, figures, _, trainer = _run(tmp_path, 7)
    clipper = figures.clipper
    path = tmp_path / "state.ckpt"
    trainer.save_checkpoint(str(path))
    ckpt = torch.load(path, weights_only=True)
    saved = ckpt["callbacks"][clipper.state_key]
    assert saved == clipper.state_dict()
    assert saved["rules"]["0"]["count"] == 7
    fresh = _clipper()
    fresh.load_state_dict(saved)
    assert fresh.rule(0).current() == clipper.rule(0).current()  # type: ignore[attr-defined]
