"""The loss band and the divergence detector (lightning_clip.functional.divergence) against their
documentation written out by hand (`tests.reference.loss_band_excess`), hand-computed cases, and the
one-all-reduce-per-step contract of `StepState` (single process: a reducer that sums two copies)."""

from __future__ import annotations

import io
import math
import random

import pytest
import torch

from lightning_clip.functional.divergence import (
    DIVERGED,
    ELEVATED,
    HEALTHY,
    HEALTHY_STREAK,
    DivergenceDetector,
    LossBand,
)
from lightning_clip.step import LOSS_RIDER, StepTracker
from tests.reference import loss_band_excess


def losses(seed: int, noise: float, steps: int = 400) -> list[float | None]:
    rng = random.Random(seed)
    out: list[float | None] = []
    level = 3.0
    for t in range(steps):
        level *= 0.997
        value = level * math.exp(rng.gauss(0.0, noise))
        if t in (150, 151, 152, 153, 154, 155):  # a runaway
            value *= 10.0 ** (t - 149)
        out.append(value)
    out[20], out[21], out[22] = None, math.nan, -1.0  # not judged
    return out


@pytest.mark.parametrize("noise", [0.02, 0.3, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_band_matches_its_documented_formula(seed: int, noise: float) -> None:
    values = losses(seed, noise)
    band = LossBand()
    got = []
    for v in values:
        reading = band.update(v)
        got.append(None if reading is None else reading.excess)
    expected = loss_band_excess(values)
    assert [g is None for g in got] == [e is None for e in expected]
    assert [g for g in got if g is not None] == pytest.approx(
        [e for e in expected if e is not None],
        abs=1e-7,  # the early spread is a difference of two squares: rounding near 0
    )


def test_noisier_losses_are_smoothed_more() -> None:
    calm, noisy = LossBand(), LossBand()
    for a, b in zip(losses(0, 0.05), losses(0, 1.0), strict=True):
        calm.update(a)
        noisy.update(b)
    assert calm.decay() == pytest.approx(0.8)  # at moderate noise the band is as responsive as it gets
    assert noisy.decay() > 0.9
    # σ ≈ the per-step standard deviation of log(loss): sqrt(2)·noise for independent steps... estimated
    assert noisy.noise_level() == pytest.approx(math.sqrt(2.0) * 1.0, rel=0.35)


def test_values_that_are_not_judged_leave_the_band_untouched() -> None:
    band = LossBand()
    for v in (1.0, 0.9, 0.8):
        band.update(v)
    before = band.state_dict()
    for bad in (None, math.nan, math.inf, 0.0, -3.0):
        assert band.peek(bad) is None and band.update(bad) is None
    assert band.state_dict() == before


def test_detector_verdicts_by_hand() -> None:
    detector = DivergenceDetector()
    for _ in range(30):
        assert detector.update(1.0, 2.0).verdict == HEALTHY
    assert detector.snapshot_ok
    # a loss that stays ×40 with calm gradients: excess 0.2·ln 40·(1 + 0.8 + ...) passes ln 4, but a loss
    # on its own is no evidence (a KL warm-up, a curriculum): healthy, and snapshots go on
    reading = detector.peek(40.0, 2.0)
    assert reading.verdict == HEALTHY
    assert reading.loss_excess == pytest.approx(0.2 * math.log(40.0), abs=2e-3)
    assert [detector.update(40.0, 2.0).verdict for _ in range(3)] == [HEALTHY] * 3
    assert detector.snapshot_ok
    # the same ×40 jump with gradients ×100 their level: elevated once the smoothed norm, ln(100)·(1 − 0.8^k),
    # passes ln 10, but a jump that settles where it jumped (a curriculum stage) is no divergence
    jump = DivergenceDetector()
    for _ in range(30):
        jump.update(1.0, 2.0)
    verdicts = [jump.update(40.0, 200.0).verdict for _ in range(40)]
    norm_excess = [math.log(100.0) * (1 - 0.8**k) for k in range(1, 6)]
    assert verdicts[:5] == [ELEVATED if e > math.log(10.0) else HEALTHY for e in norm_excess]
    assert DIVERGED not in verdicts and verdicts[-1] == ELEVATED
    assert not jump.snapshot_ok
    # a loss that keeps compounding (×1.5 a step) with the gradients growing along: diverged within a few
    # steps of the confirmation, once the smoothed loss is twice the highest single loss of its first 5 steps
    runaway = DivergenceDetector()
    for _ in range(30):
        runaway.update(1.0, 2.0)
    verdicts = [runaway.update(1.5**k, 2.0 * 1.5**k).verdict for k in range(1, 40)]
    assert DIVERGED in verdicts
    first = verdicts.index(DIVERGED)
    assert 5 <= first < 25  # not before the confirmation has 5 steps to set its anchor; soon after
    # a loss that bounces ×5 back up but stays below where training started is no divergence, even with
    # the gradients ×100 (a classifier trained towards zero loss): elevated, never diverged
    towards_zero = DivergenceDetector()
    for k in range(200):
        towards_zero.update(2.0 * 0.97**k, 1.0)
    low = 2.0 * 0.97**199
    bounced = [towards_zero.update(5 * low, 100.0).verdict for _ in range(10)]
    assert DIVERGED not in bounced and bounced[-1] == ELEVATED
    # a gradient norm that stays ×1e4 with a calm loss is a divergence on its own, once its smoothed log,
    # ln(1e4)·(1 − 0.8^k), passes ln 1000: at the 7th step
    other = DivergenceDetector()
    for _ in range(20):
        other.update(1.0, 1.0)
    verdicts = [other.update(1.0, 1e4).verdict for _ in range(7)]
    assert DIVERGED not in verdicts[:6] and verdicts[6] == DIVERGED


def test_snapshot_ok_needs_a_healthy_streak_or_a_healthy_start() -> None:
    detector = DivergenceDetector()
    assert detector.snapshot_ok  # nothing seen: the start is a known-good state
    for _ in range(6):  # the bands set their references at the 5th value (after 3 noise terms)
        detector.update(1.0, 1.0)
    assert detector.snapshot_ok  # every step so far healthy
    for _ in range(4):
        detector.update(10.0, 1.0)
    assert detector.snapshot_ok  # a loss rise with calm gradients: snapshots go on
    for _ in range(4):
        detector.update(1.0, 100.0)
    assert not detector.snapshot_ok  # gradients ×100 their level: no known-good state
    for _ in range(HEALTHY_STREAK + 40):
        detector.update(1.0, 1.0)
        if detector.snapshot_ok:
            break
    assert detector.healthy_streak == HEALTHY_STREAK


def test_a_single_loss_spiking_100x_its_smoothed_level_is_no_known_good_step() -> None:
    """A loss so noisy that its band reads a ×10 batch as noise: one batch at 200× the smoothed loss of
    the steps before it (hand computation: log 200 = 5.30 > log 100 = 4.61) resets the healthy streak,
    so the weights it was computed on are not snapshotted; 99× (log 99 = 4.60) does not. A loss that then stays
    at 200× for good is followed by the smoothed value, and the streak comes back."""
    rng = random.Random(0)
    detector = DivergenceDetector()
    for _ in range(60):  # a noisy healthy loss: ×1 or ×10 at random, calm gradients
        detector.update(rng.choice([1.0, 10.0]), 1.0)
    assert detector.snapshot_ok
    level = math.exp(detector.loss.smoothed() or 0.0)
    detector.update(99.0 * level, 1.0)
    assert detector.snapshot_ok  # 99× the smoothed level: not a spike
    level = math.exp(detector.loss.smoothed() or 0.0)
    detector.update(200.0 * level, 1.0)
    assert detector.healthy_streak == 0 and not detector.snapshot_ok
    for _ in range(HEALTHY_STREAK + 40):  # a new level for good: the smoothed value follows it
        detector.update(200.0 * level, 1.0)
        if detector.snapshot_ok:
            break
    assert detector.snapshot_ok


def test_detector_state_round_trip_with_weights_only() -> None:
    detector = DivergenceDetector()
    values = [v for v in losses(3, 0.3) if v is not None]
    for v in values[:100]:
        detector.update(v, 2.0)
    buffer = io.BytesIO()
    torch.save(detector.state_dict(), buffer)
    buffer.seek(0)
    resumed = DivergenceDetector()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for v in values[100:]:
        assert resumed.update(v, 2.0) == detector.update(v, 2.0)
    assert resumed.state_dict() == detector.state_dict()


def test_detector_state_saved_before_the_band_kept_its_start_level_loads_it() -> None:
    """A state saved when the detector kept where training began itself (``loss_start``, the loss band's
    first reference) and the band did not: the same start level, the same verdicts after it."""
    detector = DivergenceDetector()
    values = [v for v in losses(3, 0.3) if v is not None]
    for v in values[:100]:
        detector.update(v, 2.0)
    state = detector.state_dict()
    start = state["loss"].pop("start_level")
    assert start is not None and start == detector.loss.start_level
    older = DivergenceDetector()
    older.load_state_dict({**state, "loss_start": start})
    assert older.loss.start_level == start
    for v in values[100:]:
        assert older.update(v, 2.0) == detector.update(v, 2.0)


def test_step_state_sums_the_loss_and_every_contribution_in_one_reduction() -> None:
    calls: list[list[float]] = []

    def two_ranks(values: list[float]) -> list[float]:  # rank 1 saw the same values: the sum doubles them
        calls.append(list(values))
        return [2.0 * v for v in values]

    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    tracker = StepTracker()
    tracker.reducer = two_ranks
    tracker.ride_along(LOSS_RIDER, lambda: torch.tensor(3.0))
    tracker.contribute("flags", lambda state: [1.0, 0.0])
    state = tracker.begin(torch.optim.SGD([p], lr=0.1), step=0)
    assert state.mean_loss == 3.0  # (3 + 3) / (1 + 1)
    assert state.summed("flags") == [2.0, 0.0]
    assert state.summed("other") is None
    assert calls == [[3.0, 1.0, 1.0, 0.0]]  # one reduction for the step, the loss first
    # the next step starts without contributions: only the loss slot travels
    tracker.ride_along(LOSS_RIDER, lambda: torch.tensor(5.0))
    nxt = tracker.begin(torch.optim.SGD([p], lr=0.1), step=1)
    assert nxt.mean_loss == 5.0 and nxt.summed("flags") is None and calls[-1] == [5.0, 1.0]
