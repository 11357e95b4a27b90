"""AdaptiveGradientClipping: arguments, state, fit-start checks, logging, cost per step, non-finite norms."""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_clip.callbacks.adaptive_clipping import AdaptiveGradientClipping
from lightning_clip.exceptions import LightningClipWarning
from tests.models import RecordedModel, RegressionModel, make_trainer, regression_loader
from tests.reference import (
    EPS,
    LastFigures,
    PreClipNorms,
    StepLosses,
    assert_clipped_some,
    autoclip_applied,
    expected_applied,
    mean_thresholds,
)


# ----------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (
            {"mode": "median"},
            ValueError,
            r"`mode` must be one of 'mean' \| 'zscore' \| 'percentile' \| 'adagc' \| 'mean_per_tensor',"
            r" got 'median'\.",
        ),
        ({"mode": 1}, TypeError, r"`mode` must be one of .*, got 1\."),
        ({"factor": 1.0}, ValueError, r"`factor` must be .*1.*, got 1\.0\."),
        ({"factor": "2"}, TypeError, r"`factor` must be a real number.*, got '2'\."),
        ({"factor": math.inf}, ValueError, r"`factor` must be a finite number.*, got inf\."),
        ({"decay": 1.0}, ValueError, r"`decay` must be .*\[0.*1\).*, got 1\.0\."),
        ({"decay": -0.1}, ValueError, r"`decay` must be .*\[0.*1\).*, got -0\.1\."),
        ({"z_threshold": 0.0}, ValueError, r"`z_threshold` must be .*0.*, got 0\.0\."),
        ({"percentile": 101.0}, ValueError, r"`percentile` must be .*\[0.*100.*\].*, got 101\.0\."),
        ({"window": 0}, ValueError, r"`window` must be an integer .*1.*, got 0\."),
        ({"window": 2.5}, TypeError, r"`window` must be an integer .*, got 2\.5\."),
        ({"warmup_steps": 0}, ValueError, r"`warmup_steps` must be an integer .*1.*, got 0\."),
        ({"warmup_steps": True}, TypeError, r"`warmup_steps` must be an integer .*, got True\."),
        ({"max_norm": 0.0}, ValueError, r"`max_norm` must be .*0.*, got 0\.0\."),
        ({"max_norm": math.nan}, ValueError, r"`max_norm` must be a finite number.*, got nan\."),
        (
            {"norm_type": 0.0},
            ValueError,
            r"`norm_type` must be a real number > 0 or float\('inf'\), got 0\.0\.",
        ),
        (
            {"norm_type": "l2"},
            TypeError,
            r"`norm_type` must be a real number > 0 or float\('inf'\), got 'l2'\.",
        ),
        ({"loss_aware": 1}, TypeError, r"`loss_aware` must be True or False, got 1\."),
        (
            {"mode": "zscore", "loss_aware": "no"},
            TypeError,
            r"`loss_aware` must be True or False, got 'no'\.",
        ),
    ],
)
def test_invalid_argument_message(kwargs: dict[str, Any], error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=f"^{pattern}$"):
        AdaptiveGradientClipping(**kwargs)


def test_valid_edge_arguments() -> None:
    AdaptiveGradientClipping(decay=0.0, percentile=0.0, window=1, warmup_steps=1, norm_type=math.inf)
    AdaptiveGradientClipping(mode="percentile", percentile=100.0, max_norm=1e-9, norm_type=0.5)


# --------------------------------------------------------------------------------------------------- state
def test_state_key_is_pinned() -> None:
    # a change here orphans the state in every existing checkpoint: add a CHANGELOG migration note
    assert AdaptiveGradientClipping().state_key == (
        "AdaptiveGradientClipping{'mode': 'mean', 'factor': 1.5, 'decay': 0.97, 'z_threshold': 2.5, "
        "'percentile': 10.0, 'window': 1000, 'warmup_steps': None, 'max_norm': None, 'loss_aware': True, "
        "'norm_type': 2.0}"
    )
    assert AdaptiveGradientClipping(loss_aware=False).state_key != AdaptiveGradientClipping().state_key
    assert AdaptiveGradientClipping(mode="zscore").state_key != AdaptiveGradientClipping().state_key


@pytest.mark.parametrize("mode", ["mean", "zscore", "percentile"])
def test_state_dict_round_trip(mode: str) -> None:
    norms = [3.0, 4.0, float("nan"), 9.0, 2.5, 30.0, 3.5]
    source = AdaptiveGradientClipping(mode=mode, warmup_steps=3, window=4)
    for i, n in enumerate(norms):
        source.rule(0).step(n)
        source.rule(1).step(2 * n + i)
    state = source.state_dict()
    buffer = __import__("io").BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    target = AdaptiveGradientClipping(mode=mode, warmup_steps=3, window=4)
    target.load_state_dict(loaded)
    assert target.state_dict() == state  # before any use (pending) ...
    follow = [5.0, 50.0, 4.0]
    assert [target.rule(0).step(n) for n in follow] == [source.rule(0).step(n) for n in follow]
    assert [target.rule(1).step(n) for n in follow] == [source.rule(1).step(n) for n in follow]
    assert target.state_dict() == source.state_dict()  # ... and after


# --------------------------------------------------------------------------------------- fit-start checks
def test_gradient_clip_val_warns_and_both_apply_ours_first(tmp_path: Any) -> None:
    pl.seed_everything(0, verbose=False)
    model = RecordedModel(lr=0.2)
    pre = PreClipNorms()
    clipper = AdaptiveGradientClipping(factor=1.2, decay=0.9, loss_aware=False)
    figures = LastFigures(clipper)
    trainer = make_trainer(tmp_path, callbacks=[pre, clipper, figures], max_steps=12, gradient_clip_val=9.0)
    with pytest.warns(
        LightningClipWarning, match=r"gradient_clip_val=9\.0.*both apply.*AdaptiveGradientClipping first"
    ):
        trainer.fit(model, regression_loader())
    norms = pre.norms[0]
    thresholds = mean_thresholds(norms, factor=1.2, decay=0.9)
    # ours saw the norm before Lightning's clipping (some exceed 9), and its threshold is the reference one
    assert [f[0] for f in figures.figures[0]] == pytest.approx(norms, rel=1e-5)
    assert figures.thresholds() == pytest.approx(thresholds, rel=1e-5)
    after_ours = expected_applied(norms, thresholds)
    expected = [a * 9.0 / (a + EPS) if a > 9.0 else a for a in after_ours]
    assert model.recorder.norms == pytest.approx(expected, rel=1e-5)
    assert any(a > 9.0 for a in after_ours), "Lightning's clipping never acted"
    assert any(a < 9.0 and a < n * (1 - 1e-4) for a, n in zip(after_ours, norms, strict=True)), (
        "ours never bound"
    )


def test_fused_optimizer_under_fp16_grad_scaler_is_refused(tmp_path: Any) -> None:
    class Fused(RegressionModel):
        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)

    scaler = torch.amp.GradScaler("cpu")
    trainer = make_trainer(
        tmp_path,
        callbacks=[AdaptiveGradientClipping()],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    with pytest.raises(ValueError, match=r"cannot clip Adam under a GradScaler.*fused"):
        trainer.fit(Fused(), regression_loader())
    assert trainer.global_step == 0  # refused before any step

    # the same optimizer under bf16-mixed (no scaler: gradients are unscaled in the hook) is fine
    trainer = make_trainer(
        tmp_path, callbacks=[AdaptiveGradientClipping()], precision="bf16-mixed", max_steps=2
    )
    trainer.fit(Fused(), regression_loader())
    assert trainer.global_step == 2


# ------------------------------------------------------------------------------------------------ logging
@pytest.mark.parametrize("every", [1, 3])
def test_logged_metrics_match_reference(tmp_path: Any, every: int) -> None:
    pl.seed_everything(0, verbose=False)
    pre = PreClipNorms()
    clipper = AdaptiveGradientClipping(factor=1.2, decay=0.9, loss_aware=False)
    logger = CSVLogger(str(tmp_path), name="", version="")
    trainer = make_trainer(
        tmp_path, callbacks=[pre, clipper], max_steps=12, logger=logger, log_every_n_steps=every
    )
    trainer.fit(RegressionModel(lr=0.2), regression_loader())
    norms = pre.norms[0]
    thresholds = mean_thresholds(norms, factor=1.2, decay=0.9)
    coefs = [min(1.0, c / (n + EPS)) for n, c in zip(norms, thresholds, strict=True)]
    with open(tmp_path / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["grad/norm"]]
    steps = [int(r["step"]) for r in rows]
    assert steps == [s for s in range(12) if (s + 1) % every == 0]
    for key, ref in (("grad/norm", norms), ("grad/clip_threshold", thresholds), ("grad/clip_coef", coefs)):
        assert [float(r[key]) for r in rows] == pytest.approx([ref[s] for s in steps], rel=1e-6), key
    assert any(float(r["grad/clip_coef"]) < 1.0 for r in rows) or every > 1
    assert math.isinf(float(rows[0]["grad/clip_threshold"])) or every > 1


# ---------------------------------------------------------------------------------------- cost per step
class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class _StartCount(pl.Callback):
    """Listed first: every following callback's ``on_before_optimizer_step`` runs under the counter."""

    mode: _Count

    def on_before_optimizer_step(self, *args: Any) -> None:
        self.mode = _Count()
        self.mode.__enter__()


class _StopCount(pl.Callback):
    def __init__(self, start: _StartCount) -> None:
        self.start = start
        self.per_step: list[Counter[str]] = []

    def on_before_optimizer_step(self, *args: Any) -> None:
        self.start.mode.__exit__(None, None, None)
        self.per_step.append(self.start.mode.counts)


class TwoDtypeModel(RecordedModel):
    """Adds a float64 parameter: the gradients form two (device, dtype) groups."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bias64 = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x).double() + self.bias64, y.double())


@pytest.mark.parametrize(("model_cls", "groups"), [(RecordedModel, 1), (TwoDtypeModel, 2)])
def test_gradients_read_once_written_only_when_clipped(tmp_path: Any, model_cls: type, groups: int) -> None:
    pl.seed_everything(0, verbose=False)
    model = model_cls(lr=0.2)
    start = _StartCount()
    stop = _StopCount(start)
    clipper = AdaptiveGradientClipping(factor=1.2, decay=0.9, loss_aware=False)
    figures = LastFigures(clipper)
    trainer = make_trainer(tmp_path, callbacks=[start, clipper, figures, stop], max_steps=12)
    trainer.fit(model, regression_loader())
    coefs = [f[2] for f in figures.figures[0]]
    assert any(c < 1.0 for c in coefs) and any(c == 1.0 for c in coefs)
    for counts, coef in zip(stop.per_step, coefs, strict=True):
        assert counts["_foreach_norm"] == groups  # one fused read of every gradient
        assert counts["_foreach_mul_"] == (groups if coef < 1.0 else 0)  # one fused write, only when clipping
        assert counts["_local_scalar_dense"] == 1  # a single device-to-host transfer
        assert counts["norm"] + counts["linalg_vector_norm"] <= 1  # only the norm of the per-tensor norms


def test_two_clippers_measure_once_and_the_tighter_bound_wins(tmp_path: Any) -> None:
    for order in (0, 1):
        pl.seed_everything(0, verbose=False)
        model = RecordedModel(lr=0.2)
        pre = PreClipNorms()
        a = AdaptiveGradientClipping(factor=1.2, decay=0.9, loss_aware=False)
        b = AdaptiveGradientClipping(mode="percentile", percentile=50.0, window=3)
        clippers = [a, b] if order == 0 else [b, a]
        start = _StartCount()
        stop = _StopCount(start)
        trainer = make_trainer(tmp_path, callbacks=[pre, start, *clippers, stop], max_steps=12)
        trainer.fit(model, regression_loader())
        norms = pre.norms[0]
        ta = mean_thresholds(norms, factor=1.2, decay=0.9)
        by_a = expected_applied(norms, ta)
        by_b = autoclip_applied(norms, percentile=50.0, window=3)  # b alone, from autoclip
        assert [c["_foreach_norm"] for c in stop.per_step] == [1] * 12
        assert [c["_local_scalar_dense"] for c in stop.per_step] == [1] * 12
        assert model.recorder.norms == pytest.approx(
            [min(x, y) for x, y in zip(by_a, by_b, strict=True)], rel=1e-5
        )
        # each bound was the tighter one on some steps (a compounding or a last-wins bug would show)
        assert any(x < y * (1 - 1e-4) for x, y in zip(by_a, by_b, strict=True))
        assert any(y < x * (1 - 1e-4) for x, y in zip(by_a, by_b, strict=True))
        # each saw the pre-clip norm and kept its own statistics
        assert a.last[0][1] == pytest.approx(ta[-1], rel=1e-5)
        assert b.last[0][0] == pytest.approx(norms[-1], rel=1e-5)


# ----------------------------------------------------------------------------------- non-finite gradients
class NaNAtStep(RecordedModel):
    """Puts a NaN into one gradient at ``bad_step`` and drops that update in its own
    ``on_before_optimizer_step`` (which Lightning calls after the callbacks')."""

    bad_step = 6

    def on_after_backward(self) -> None:
        if self.trainer.global_step == self.bad_step:
            self.net[0].weight.grad[0, 0] = float("nan")

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.trainer.global_step == self.bad_step:
            self.nan_grad_after_callbacks = self.net[0].weight.grad.clone()
            for p in self.parameters():
                p.grad = None


class StateAround(pl.Callback):
    def __init__(self, clipper: AdaptiveGradientClipping) -> None:
        self.clipper = clipper
        self.states: list[Any] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.states.append(repr(self.clipper.state_dict()))


def test_nonfinite_gradient_is_not_clipped_and_not_counted(tmp_path: Any) -> None:
    pl.seed_everything(0, verbose=False)
    model = NaNAtStep(lr=0.2)
    pre = PreClipNorms()
    clipper = AdaptiveGradientClipping(factor=1.2, decay=0.9, loss_aware=False)
    figures = LastFigures(clipper)
    around = StateAround(clipper)
    trainer = make_trainer(tmp_path, callbacks=[pre, clipper, figures, around], max_steps=12)
    trainer.fit(model, regression_loader())
    norms = pre.norms[0]
    bad = NaNAtStep.bad_step
    assert math.isnan(norms[bad]) and sum(math.isnan(n) for n in norms) == 1
    norm, threshold, coef = figures.figures[0][bad]
    assert math.isnan(norm) and math.isfinite(threshold) and coef == 1.0
    assert around.states[bad] == around.states[bad + 1]  # statistics unchanged by the NaN step
    assert around.states[bad - 1] != around.states[bad]
    # the finite gradient entries were not rescaled (no write): the raw gradient still holds its NaN
    assert torch.isnan(model.nan_grad_after_callbacks[0, 0])
    assert torch.isfinite(model.nan_grad_after_callbacks.flatten()[1:]).all()
    thresholds = mean_thresholds(norms, factor=1.2, decay=0.9)
    assert figures.thresholds() == pytest.approx(thresholds, rel=1e-5)
    assert all(math.isfinite(c) for c in figures.thresholds()[1:])
    finite = [(n, c) for n, c in zip(norms, thresholds, strict=True) if math.isfinite(n)]
    applied = [a for a in model.recorder.norms if not math.isnan(a)]  # the dropped update has no gradients
    assert applied == pytest.approx(
        expected_applied([n for n, _ in finite], [c for _, c in finite]), rel=1e-5
    )
    assert_clipped_some([n for n, _ in finite], [c for _, c in finite])
    assert re.search(r"'count': 11", around.states[-1]) or clipper.rule(0).count == 11  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------- skipped steps
class SpikeAt(RegressionModel):
    """Loss × 1000 at one step: a gradient-norm spike."""

    def __init__(self, spike_step: int) -> None:
        super().__init__(optimizer="sgd", lr=0.01)
        self.spike_step = spike_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * 1000.0 if self.global_step == self.spike_step else loss


class NormsSeen(pl.Callback):
    def __init__(self, clipper: AdaptiveGradientClipping) -> None:
        self.clipper = clipper
        self.norms: list[tuple[float, float]] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.norms.append(self.clipper.last[0][:2])


@pytest.mark.parametrize("clipper_first", [True, False])
def test_a_step_the_guard_skipped_never_enters_the_statistics(tmp_path: Any, clipper_first: bool) -> None:
    """ExplosionGuard skips a spike; whatever the callbacks' order, the clipping statistics are those of a
    rule fed, by hand, only the norms of the steps that were applied."""
    from lightning_clip.callbacks.explosion_guard import ExplosionGuard
    from lightning_clip.functional.ceiling import LossAwareMeanThreshold

    clipper = AdaptiveGradientClipping()
    guard = ExplosionGuard(action="skip", spike_factor=5.0)
    seen = NormsSeen(clipper)
    losses = StepLosses()
    callbacks = [clipper, guard] if clipper_first else [guard, clipper]
    trainer = make_trainer(tmp_path, callbacks=[*callbacks, seen, losses], max_steps=16)
    trainer.fit(SpikeAt(spike_step=13), regression_loader(n=128))
    assert guard.skipped_steps == 1
    reference = LossAwareMeanThreshold()
    for step, ((norm, _), loss) in enumerate(zip(seen.norms, losses.losses, strict=True)):
        threshold = reference.threshold(norm, loss)
        if step != 13:
            reference.update(norm, threshold, loss)
    assert clipper.state_dict()["rules"]["0"] == reference.state_dict()
    assert reference.count == 15
