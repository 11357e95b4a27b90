"""Resume: a run stopped at step k and resumed with ``Trainer.fit(ckpt_path=...)`` continues with the same
thresholds and ends with bit-identical weights to an uninterrupted run (a step-interval StepLR), for each
kind of ``mode="mean"`` rule: the plain one (``loss_aware=False``, Adam), the loss-aware ceiling (SGD) and
its cautious start alone (Adam at defaults)."""

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
RULES = {  # the rule → (loss_aware, optimizer, lr)
    "plain": (False, "adam", 0.1),
    "loss_aware": (True, "sgd", 0.05),  # the ceiling learned from the loss applies to SGD
    "cautious": (True, "adam", 0.1),  # an optimizer that normalises the gradient: the cautious start alone
}


def _clipper(loss_aware: bool = False) -> AdaptiveGradientClipping:
    return AdaptiveGradientClipping(factor=1.1, decay=0.8, loss_aware=loss_aware)


def _run(
    tmp_path: Any,
    max_steps: int,
    ckpt_path: str | None = None,
    callbacks: tuple[Any, ...] = (),
    rule: str = "plain",
    n: int = 48,
    **kwargs: Any,
):
    pl.seed_everything(0, verbose=False)
    loss_aware, optimizer, lr = RULES[rule]
    model = RegressionModel(optimizer=optimizer, lr=lr, scheduler=True)
    clipper = _clipper(loss_aware)
    figures = LastFigures(clipper)
    trainer = make_trainer(tmp_path, callbacks=[clipper, figures, *callbacks], max_steps=max_steps, **kwargs)
    trainer.fit(model, regression_loader(n=n), ckpt_path=ckpt_path)
    return model, figures, figures.thresholds(), trainer


# The checkpoint is written by ModelCheckpoint at an epoch's last batch (n / 8 batches per epoch): Lightning
# restarts a plain DataLoader's epoch on a mid-epoch resume, and a checkpoint saved after `fit` stopped on
# `max_steps` at an epoch end replays a batch on resume, so only these give the uninterrupted run's batches
# (checked without any lightning-clip callback while writing this test).
@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize(("saved_at", "crashed_at", "n"), [(3, 5, 24), (6, 9, 48), (12, 14, 48)])
def test_resume_continues_exactly(tmp_path: Any, saved_at: int, crashed_at: int, n: int, rule: str) -> None:
    """Step 3 (epochs of 3 batches) is inside the cautious start (its first five norms)."""
    full_model, full_figures, full_thresholds, _ = _run(tmp_path / "full", TOTAL, rule=rule, n=n)
    # the plain rule has no threshold at its first step only; the others clip from the first step
    assert sum(c == float("inf") for c in full_thresholds) == (1 if rule == "plain" else 0)
    coefs = [c for *_, c in full_figures.figures[0][saved_at:]]
    assert any(c < 1.0 for c in coefs)  # the thresholds mattered
    assert rule != "plain" or any(c == 1.0 for c in coefs)

    every = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), every_n_train_steps=saved_at, save_top_k=-1)
    _, _, first, _ = _run(
        tmp_path / "first", crashed_at, callbacks=(every,), rule=rule, n=n, enable_checkpointing=True
    )
    assert first == full_thresholds[:crashed_at]
    files = sorted((tmp_path / "ckpts").glob("*.ckpt"))
    assert [f.name for f in files] == [f"epoch={saved_at // (n // 8) - 1}-step={saved_at}.ckpt"]

    resumed_model, resumed_figures, resumed, _ = _run(
        tmp_path / "resumed", TOTAL, ckpt_path=str(files[0]), rule=rule, n=n
    )
    assert resumed == full_thresholds[saved_at:]  # exact, first resumed step included (no new warm-up)
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed_figures.clipper.state_dict() == full_figures.clipper.state_dict()


@pytest.mark.parametrize("rule", sorted(RULES))
def test_resume_without_saved_state_differs(tmp_path: Any, rule: str) -> None:
    """Control: the same resume with the callback's state dropped from the file restarts the warm-up (the
    loss-aware rule and the cautious start: the ceiling starts again at a tenth of the first norms)."""
    _, _, full_thresholds, _ = _run(tmp_path / "full", TOTAL, rule=rule)
    every = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), every_n_train_steps=6, save_top_k=-1)
    _run(tmp_path / "first", 6, callbacks=(every,), rule=rule, enable_checkpointing=True)
    path = next((tmp_path / "ckpts").glob("*.ckpt"))
    ckpt = torch.load(path, weights_only=True)
    ckpt["callbacks"] = {k: v for k, v in ckpt["callbacks"].items() if "AdaptiveGradientClipping" not in k}
    torch.save(ckpt, path)
    _, figures, resumed, _ = _run(tmp_path / "resumed", TOTAL, ckpt_path=str(path), rule=rule)
    restart = float("inf") if rule == "plain" else 0.1 * figures.figures[0][0][0]  # its pre-clip norm
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
