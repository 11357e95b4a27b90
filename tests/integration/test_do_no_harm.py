"""Do no harm: the default ``mean`` rule's loss-aware ceiling acts only where it can shorten the step and
only when the gradients confirm a loss rise (elsewhere its cautious start alone); a persistent throttle
is warned.

Real Lightning fits. References: the plain ``mean`` rule and the loss-aware rule written out from their
documentation (`tests.reference.mean_thresholds`, `tests.reference.loss_aware_thresholds`), fed the
pre-clip norms and losses each fit recorded.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lightning_clip import AdaptiveGradientClipping
from lightning_clip.exceptions import LightningClipWarning
from lightning_clip.functional.cautious import CautiousMeanThreshold
from lightning_clip.functional.ceiling import LossAwareMeanThreshold
from lightning_clip.functional.thresholds import MeanThreshold
from tests.models import LossBlowUp, make_trainer, regression_loader
from tests.reference import StepLosses, loss_aware_thresholds, mean_thresholds


class PreClip(pl.Callback):
    """Each step's ``(norm, threshold, coef)`` of optimizer 0 as the clipper saw it (listed after it)."""

    def __init__(self, clipper: AdaptiveGradientClipping) -> None:
        self.clipper = clipper
        self.steps: list[tuple[float, float, float]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.steps.append(self.clipper.last[0])


def fit(tmp_path: Any, model: pl.LightningModule, steps: int, clipper: AdaptiveGradientClipping) -> Any:
    pre, losses = PreClip(clipper), StepLosses()
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, callbacks=[clipper, pre, losses], max_steps=steps)
    trainer.fit(model, regression_loader(n=16 * steps, batch_size=16))
    return pre, losses


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_an_optimizer_that_normalises_the_gradient_gets_the_cautious_start_alone(
    tmp_path: Any, optimizer: str
) -> None:
    """Adam's step does not follow a uniform rescaling of the gradients: a loss-driven ceiling cannot
    shorten it, so nothing cuts it — not a loss ×30 with gradients ×30 (steps 20-39). The cautious start
    stays (it keeps the first norms from filling Adam's second moment): the thresholds are the loss-aware
    rule's written out by hand, fed no loss."""
    clipper = AdaptiveGradientClipping()
    torch.manual_seed(0)
    model = LossBlowUp(steps=tuple(range(20, 40)), factor=30.0, optimizer=optimizer, lr=1e-2)
    pre, losses = fit(tmp_path, model, 60, clipper)
    rule = clipper.rule(0)
    assert type(rule) is CautiousMeanThreshold
    norms = [n for n, _, _ in pre.steps]
    expected = loss_aware_thresholds(norms, [None] * len(norms), paced=False)
    assert [t for _, t, _ in pre.steps] == pytest.approx(expected, rel=1e-9)
    assert pre.steps[0][1] == pytest.approx(0.1 * norms[0], rel=1e-12)  # the cautious start
    assert rule.cuts == 0 and rule.probes == 0
    # the loss-aware rule fed the same norms and losses would have cut: the loss is what is ignored
    assert loss_aware_thresholds(norms, list(losses.losses)) != pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_loss_aware_false_is_the_plain_rule_for_every_optimizer(tmp_path: Any, optimizer: str) -> None:
    clipper = AdaptiveGradientClipping(loss_aware=False)
    torch.manual_seed(0)
    model = LossBlowUp(steps=tuple(range(20, 40)), factor=30.0, optimizer=optimizer, lr=1e-2)
    pre, _ = fit(tmp_path, model, 60, clipper)
    assert type(clipper.rule(0)) is MeanThreshold
    norms = [n for n, _, _ in pre.steps]
    assert [t for _, t, _ in pre.steps] == pytest.approx(mean_thresholds(norms, 1.5, 0.97), rel=1e-9)
    assert pre.steps[0][2] == 1.0  # no cautious start: the first step is not clipped


def test_a_divergence_rollback_does_not_tighten_the_cautious_start(tmp_path: Any) -> None:
    """`ExplosionGuard`'s hooks after a divergence rollback: the loss-aware rule (SGD) is tightened to half
    its threshold, the cautious start of an Adam optimizer is left as it is."""
    for optimizer, tightened in (("sgd", True), ("adam", False)):
        clipper = AdaptiveGradientClipping()
        torch.manual_seed(0)
        fit(tmp_path / optimizer, LossBlowUp(optimizer=optimizer, lr=1e-2), 30, clipper)
        rule = clipper.rule(0)
        assert isinstance(rule, LossAwareMeanThreshold)
        before = rule.current()
        memo = clipper.before_rollback()
        clipper.after_rollback(memo, ["divergence"])
        if tightened:
            assert memo == {0: before} and rule.ceiling == pytest.approx(0.5 * before)
        else:
            assert memo == {} and rule.current() == before


def test_sgd_gets_the_loss_aware_ceiling(tmp_path: Any) -> None:
    clipper = AdaptiveGradientClipping()
    torch.manual_seed(0)
    pre, losses = fit(tmp_path, LossBlowUp(optimizer="sgd", lr=0.05), 40, clipper)
    assert type(clipper.rule(0)) is LossAwareMeanThreshold
    norms = [n for n, _, _ in pre.steps]
    expected = loss_aware_thresholds(norms, list(losses.losses))
    assert [t for _, t, _ in pre.steps] == pytest.approx(expected, rel=1e-9)
    assert pre.steps[0][1] == pytest.approx(0.1 * norms[0], rel=1e-12)  # the cautious start


@pytest.mark.parametrize("gradients_too", [False, True])
def test_a_loss_rise_cuts_the_ceiling_only_when_the_gradients_confirm_it(
    tmp_path: Any, gradients_too: bool
) -> None:
    """The loss ×20 for steps 30-49 (SGD). With unchanged gradients (``value_only``: a rise by design) the
    ceiling is never cut; with the gradients ×20 too (the steps blow up) it is, and both match the rule
    written out by hand."""
    clipper = AdaptiveGradientClipping()
    torch.manual_seed(0)
    model = LossBlowUp(steps=tuple(range(30, 50)), factor=20.0, value_only=not gradients_too, optimizer="sgd")
    pre, losses = fit(tmp_path, model, 70, clipper)
    rule = clipper.rule(0)
    assert isinstance(rule, LossAwareMeanThreshold)
    norms = [n for n, _, _ in pre.steps]
    assert [t for _, t, _ in pre.steps] == pytest.approx(
        loss_aware_thresholds(norms, list(losses.losses)), rel=1e-9
    )
    if gradients_too:
        assert rule.cuts >= 1
    else:
        assert rule.cuts == 0
        assert max(losses.losses[30:50]) > 10 * max(losses.losses[20:30])  # the loss did rise


def test_a_persistent_throttle_is_warned_once_naming_the_optimizer(tmp_path: Any) -> None:
    """``max_norm`` far below the norms: the coefficient stays ~1e-4, so after 100 steps one warning names
    optimizer 0 (SGD) and the remedies; the next 100 steps (still throttled: the same episode) add none."""
    clipper = AdaptiveGradientClipping(max_norm=1e-5)
    with pytest.warns(LightningClipWarning, match=r"throttled optimizer 0 \(SGD\)") as caught:
        pre, _ = fit(tmp_path, LossBlowUp(optimizer="sgd"), 250, clipper)
    throttles = [w for w in caught if "throttled" in str(w.message)]
    assert len(throttles) == 1
    assert "loss_aware=False" in str(throttles[0].message) and "max_norm" in str(throttles[0].message)
    coefs = sorted(c for _, _, c in pre.steps[:100])
    assert coefs[50] < 0.1  # the median the warning reports, from the coefficients themselves


def test_a_rule_read_before_the_fit_becomes_the_kind_its_optimizer_takes(tmp_path: Any) -> None:
    clipper = AdaptiveGradientClipping()
    assert type(clipper.rule(0)) is LossAwareMeanThreshold  # before the fit the optimizer is unknown
    torch.manual_seed(0)
    pre, _ = fit(tmp_path, LossBlowUp(optimizer="adam", lr=1e-2), 20, clipper)
    assert type(clipper.rule(0)) is CautiousMeanThreshold
    norms = [n for n, _, _ in pre.steps]
    expected = loss_aware_thresholds(norms, [None] * len(norms), paced=False)
    assert [t for _, t, _ in pre.steps] == pytest.approx(expected, rel=1e-9)
