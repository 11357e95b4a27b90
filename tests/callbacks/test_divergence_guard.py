"""ExplosionGuard at defaults against finite divergence: a training loss (or norm) that blows up while still
finite is an event, written to the JSONL log, when the gradient norms confirm it; a loss that rises with calm
gradients is no event and snapshots and checkpoint files go on; a rollback rewinds the detector and makes AdaptiveGradientClipping clip tighter.

Real Lightning fits. References: the loss band written out by hand (`tests.reference.loss_band_excess`) fed
the losses the model recorded, and the rule's own state read before and after the rollback.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_clip import (
    AdaptiveGradientClipping,
    ExplosionGuard,
    GradientExplosionError,
    LightningClipWarning,
)
from lightning_clip.functional.divergence import DETECTOR_SMOOTHING, DIVERGED_LOSS_EXCESS, DivergenceDetector
from lightning_clip.report import load_events
from lightning_clip.testing import FaultInjector
from tests.models import (
    ExplodingRNN,
    LossBlowUp,
    TargetsRise,
    adding_loader,
    make_trainer,
    regression_loader,
)
from tests.reference import loss_band_excess


def fit_blowup(
    tmp_path: Any, callbacks: list[Any], max_steps: int, batch_size: int = 8, **model_kwargs: Any
) -> Any:
    torch.manual_seed(0)
    model = LossBlowUp(**model_kwargs)
    kwargs: dict[str, Any] = {}
    if any(isinstance(c, ModelCheckpoint) for c in callbacks):
        kwargs["enable_checkpointing"] = True
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_steps=max_steps, **kwargs)
    trainer.fit(model, regression_loader(n=64 * max_steps, batch_size=batch_size))
    return trainer, model


CALM: dict[str, Any] = {"optimizer": "adam", "lr": 1e-3}
"""A slowly, smoothly decreasing loss, whose ×3 shift the detector sees within a few steps."""


class BoundAtBatchStart(pl.Callback):
    """The clipper's committed threshold bound (``rule.current()``) and ceiling at the start of each batch."""

    def __init__(self, clipper: AdaptiveGradientClipping) -> None:
        self.clipper = clipper
        self.at: dict[int, tuple[float, float, float]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        rule = self.clipper.rule(0)
        self.at[trainer.global_step] = (rule.current(), rule.ceiling, rule.slow_start)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ detection
def test_guard_alone_detects_the_runaway_rolls_back_and_raises_when_the_budget_is_spent(
    tmp_path: Any,
) -> None:
    torch.manual_seed(0)
    model = ExplodingRNN()
    guard = ExplosionGuard()
    trainer = make_trainer(tmp_path, callbacks=[guard], max_steps=80)
    with pytest.raises(GradientExplosionError, match="finite divergence"):
        trainer.fit(model, adding_loader(80))
    # no clipper, nothing lowers the step: every recovery runs away again, 5 rollbacks then the error
    assert guard.rollbacks == 5
    kinds = [r["kind"] for r in guard.records]
    assert kinds == ["divergence"] * 6
    assert [r["action"] for r in guard.records] == ["rollback"] * 5 + ["error"]
    # every rollback went back to the start: the runaway began before any healthy stretch
    assert all(r["restored"]["step"] == 0 for r in guard.records[:5])
    events = load_events(guard.events_path)
    assert [e["kind"] for e in events] == kinds
    # the first event against the loss band written out by hand, fed the losses of the applied steps
    first = guard.records[0]
    excess = loss_band_excess(model.losses[: first["step"] + 1], max_smoothing=DETECTOR_SMOOTHING)
    assert excess[-1] > DIVERGED_LOSS_EXCESS
    assert first["loss_ratio"] == pytest.approx(math.exp(excess[-1]), rel=1e-5)
    # the loss alone is no evidence: the gradients confirmed it (smoothed norm above 10x its own level)
    assert first["norm_ratio"] > 10.0
    assert first["loss"] == pytest.approx(model.losses[first["step"]], rel=1e-6)
    assert events[0]["loss_ratio"] == pytest.approx(first["loss_ratio"])


def test_clipper_and_guard_train_through_the_runaway(tmp_path: Any) -> None:
    """The demo's exploding RNN at defaults: the loss never gets near the runaway of an unclipped run."""
    torch.manual_seed(0)
    unclipped = ExplodingRNN()
    make_trainer(tmp_path / "a", max_steps=12).fit(unclipped, adding_loader(12))
    assert max(unclipped.losses) > 1e4  # the control runs away within 12 steps

    torch.manual_seed(0)
    model = ExplodingRNN()
    guard, clipper = ExplosionGuard(), AdaptiveGradientClipping()
    make_trainer(tmp_path / "b", callbacks=[clipper, guard], max_steps=800).fit(model, adding_loader(800))
    assert max(model.losses) < 10.0
    # and it learns: a quarter below the trivial predictor's MSE (1/6) by step 800 (this seed's mean loss
    # over steps 450-500 is 0.133 with the slow widening at 0.2% a step, 0.111 at 0.05%; over 750-800,
    # 0.078 and 0.090)
    assert sum(model.losses[-50:]) / 50 < 0.75 / 6
    assert clipper.rule(0).ceiling < 0.5 * clipper.last[0][0] or clipper.rule(0).cuts > 0  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ actions
@pytest.mark.parametrize(("action", "text"), [("skip", "cannot repair"), ("raise", "stops training")])
def test_divergence_is_an_error_under_skip_and_raise(tmp_path: Any, action: str, text: str) -> None:
    """One ×1e4 loss at step 20 is a spike, applied; the weights it wrecked keep the loss far up with
    gradients to match: a divergence once the smoothed loss passes 100× its level (step 23)."""
    guard = ExplosionGuard(action=action)
    with pytest.raises(GradientExplosionError, match=text):
        fit_blowup(tmp_path, [guard], 30, steps=(20,), factor=1e4)
    assert [(r["step"], r["kind"]) for r in guard.records] == [(23, "divergence")]
    assert guard.records[0]["loss_ratio"] > 100.0 and guard.records[0]["norm_ratio"] > 10.0


def test_detect_divergence_false_turns_the_finite_check_off_and_the_message_fits_the_run(
    tmp_path: Any,
) -> None:
    """The same wreck: with ``detect_divergence=False`` nothing is an event (the run finishes); with the
    check on, the error names the remedies that fit a guard without a clipper, a loss rising by design
    among them, and never advice for a setting the run already has."""
    quiet = ExplosionGuard(action="raise", detect_divergence=False)
    fit_blowup(tmp_path / "off", [quiet], 30, steps=(20,), factor=1e4)
    assert quiet.records == [] and quiet.events == 0
    guard = ExplosionGuard(action="raise", lr_factor=0.5)
    with pytest.raises(GradientExplosionError) as caught:
        fit_blowup(tmp_path / "on", [guard], 30, steps=(20,), factor=1e4)
    message = str(caught.value)
    assert "attach AdaptiveGradientClipping" in message
    assert "rises by design" in message and "`detect_divergence=False`" in message
    assert "loss_aware=False" not in message  # no clipper attached
    assert "pass `lr_factor` < 1" not in message  # already 0.5
    assert "bf16-mixed" not in message  # not under 16-mixed


def test_with_a_clipper_attached_the_message_never_says_attach_it(tmp_path: Any) -> None:
    clipper = AdaptiveGradientClipping()
    guard = ExplosionGuard(action="raise")
    faults = FaultInjector(target="grad", steps=[12])
    with pytest.raises(GradientExplosionError) as caught:
        fit_blowup(tmp_path, [clipper, guard, faults], 20)
    message = str(caught.value)
    assert "attach AdaptiveGradientClipping" not in message
    assert "give AdaptiveGradientClipping a `max_norm`" in message
    assert "detect_divergence" not in message  # a NaN gradient, not a divergence


def test_divergence_rollback_makes_the_clipper_clip_tighter(tmp_path: Any) -> None:
    clipper = AdaptiveGradientClipping()
    guard = ExplosionGuard(snapshot_every_n_steps=5)
    bounds = BoundAtBatchStart(clipper)
    # ten steps ×1e4 (four that come back are a transient the clipper rides out: no event); the batch after
    # the rollback is still ×1e4 whatever the weights: the guard sees it is in the data
    with pytest.warns(LightningClipWarning, match="the rise is in the\\s+data"):
        _trainer, _model = fit_blowup(
            tmp_path, [clipper, guard, bounds], 45, steps=tuple(range(30, 40)), factor=1e4
        )
    assert len(guard.records) == 1
    first = guard.records[0]
    assert first["kind"] == "divergence" and first["action"] == "rollback"
    step = first["step"]
    bound, ceiling, _ = bounds.at[step]  # what the rule was at when the diverged step came
    _, after, after_slow = bounds.at[step + 1]  # after the rollback
    assert after == pytest.approx(min(ceiling, 0.5 * bound), rel=1e-12)
    assert after_slow <= after
    assert after < 0.75 * bound


# ------------------------------------------------------------------------------------------ known-good
@pytest.mark.parametrize("elevated", [False, True])
def test_snapshots_go_on_through_a_loss_that_rises_with_calm_gradients(tmp_path: Any, elevated: bool) -> None:
    """×3 loss value for steps 15-29 (the gradients unchanged: a loss that rises by design, not because of
    the steps): no event, and the snapshots due at 20, 25 and 30 are still taken, so a NaN gradient at step
    33 rolls back to step 30, as in the control without the rise."""
    guard = ExplosionGuard(snapshot_every_n_steps=5)
    faults = FaultInjector(target="grad", steps=[33])
    steps = tuple(range(15, 30)) if elevated else ()
    fit_blowup(
        tmp_path, [guard, faults], 36, batch_size=256, steps=steps, factor=3.0, value_only=True, **CALM
    )
    assert [(r["step"], r["kind"]) for r in guard.records] == [(33, "nonfinite_grad")]
    assert guard.records[0]["restored"]["step"] == 30


def test_checkpoint_files_written_during_a_healthy_loss_rise_are_rollback_targets(tmp_path: Any) -> None:
    """A ×3 loss value for steps 17-27 with unchanged gradients: every file is marked healthy, and a NaN
    gradient at step 28 rolls back to the newest one (step 25)."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    guard = ExplosionGuard(snapshot_every_n_steps=0)
    faults = FaultInjector(target="grad", steps=[28])
    steps = tuple(range(17, 28))
    fit_blowup(
        tmp_path, [guard, faults, ckpt], 30, batch_size=256, steps=steps, factor=3.0, value_only=True, **CALM
    )
    states = {
        int(p.stem.split("step=")[1]): torch.load(p, weights_only=True)["callbacks"][guard.state_key][
            "healthy"
        ]
        for p in (tmp_path / "ckpt").glob("*.ckpt")
    }
    assert states[25] is True and states[20] is True and states[15] is True
    assert guard.records[0]["restored"]["source"] == "checkpoint"
    assert guard.records[0]["restored"]["step"] == 25


# ------------------------------------------------------------------------------------------ state
class DetectorAfterRollback(pl.Callback):
    def __init__(self, guard: ExplosionGuard) -> None:
        self.guard = guard
        self.pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:  # listed after the guard
        if self.guard.records and self.guard.records[-1]["step"] == trainer.global_step - 1:
            snap = self.guard._known_good.snapshot
            assert snap is not None and snap.guard is not None
            self.pairs.append((self.guard.state_dict()["divergence"], snap.guard["divergence"]))


def test_rollback_rewinds_the_detector_and_its_state_loads_with_weights_only(tmp_path: Any) -> None:
    guard = ExplosionGuard(snapshot_every_n_steps=4)
    probe = DetectorAfterRollback(guard)
    faults = FaultInjector(target="grad", steps=[14])
    trainer, _ = fit_blowup(tmp_path, [guard, faults, probe], 20)
    assert len(probe.pairs) == 1
    live, snapshot = probe.pairs[0]
    assert live == snapshot and live["loss"]["count"] == 12  # the state of the snapshot of step 12
    path = tmp_path / "state.pt"
    torch.save(guard.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded == guard.state_dict()
    other = ExplosionGuard()
    other.load_state_dict(loaded)
    assert other.state_dict() == guard.state_dict()
    assert trainer.global_step == 20


def fit_rise(tmp_path: Any, callbacks: list[Any], steps: int = 200) -> TargetsRise:
    torch.manual_seed(0)
    model = TargetsRise(at=100)
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_steps=steps, max_epochs=-1)
    trainer.fit(model, regression_loader(n=512, batch_size=16))
    return model


def test_a_loss_that_jumps_for_good_with_its_gradients_is_one_rollback_then_a_new_level(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Targets ×30 for good: the loss ×~900 and the norms ×~30 read as a wrecked run, and the guard rolls
    back. The restored, known-good weights see the same loss on the next batch: the rise is in the data.
    The guard says so and goes on from the new level: one rollback, no error, and the run ends where the
    same run without the guard ends. Without that check (patched out), the same fit rolls back 5 times
    and raises."""
    reference = fit_rise(tmp_path / "none", [])
    guard = ExplosionGuard()
    with pytest.warns(LightningClipWarning, match="the rise is in the\\s+data"):
        model = fit_rise(tmp_path / "guard", [guard])
    assert [r["kind"] for r in guard.records] == ["divergence"]
    assert guard.rollbacks == 1 and guard.records[0]["restored"]["step"] <= 100  # trained on the old targets
    tail, ref_tail = model.losses[-20:], reference.losses[-20:]
    assert sum(tail) / 20 < 1.5 * sum(ref_tail) / 20  # the run trained on at the new level

    monkeypatch.setattr(DivergenceDetector, "new_level", lambda self, loss: False)
    blind = ExplosionGuard()
    with pytest.raises(GradientExplosionError, match="rollback budget is spent"):
        fit_rise(tmp_path / "blind", [blind])
    assert blind.rollbacks == 5


def test_with_the_clipper_a_new_level_undoes_its_cuts_and_its_tightening(tmp_path: Any) -> None:
    """Both callbacks on the same jump for good: the clipper cuts its ceiling (an episode), the guard rolls
    back and the clipper tightens. When the restored state sees the same loss, the clipper is told: its
    ceiling goes back to where it stood before the jump, and the run ends where the clipper alone ends
    (which undoes its own episode later, after its three bases)."""
    alone = AdaptiveGradientClipping()
    with pytest.warns(LightningClipWarning, match="throttled"):  # back at its old step length: documented
        reference = fit_rise(tmp_path / "alone", [alone])
    assert alone.rule(0).episodes_undone == 1  # type: ignore[attr-defined]
    clipper, guard = AdaptiveGradientClipping(), ExplosionGuard()
    bounds = BoundAtBatchStart(clipper)
    with pytest.warns(LightningClipWarning) as caught:  # the guard's, and the clipper's throttle as above
        model = fit_rise(tmp_path / "both", [clipper, guard, bounds])
    assert sum("the rise is in the data" in " ".join(str(w.message).split()) for w in caught) == 1
    assert guard.rollbacks == 1
    event = guard.records[0]["step"]
    before = bounds.at[100][1]  # the ceiling when the first batch of new targets came
    assert min(c for step, (_, c, _) in bounds.at.items() if 100 <= step <= event) < 0.1 * before  # cut
    assert bounds.at[event + 2][1] >= before  # undone: back where it stood before the jump
    tail, ref_tail = model.losses[-20:], reference.losses[-20:]
    assert sum(tail) / 20 < 1.5 * sum(ref_tail) / 20
