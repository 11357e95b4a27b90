"""Threshold rules (lightning_clip.functional.thresholds) against the libraries they reproduce and hand computations.

* ``zscore`` against zclip 1.0.0 ``ZClip.step`` and ``percentile`` against autoclip 0.2.1
  ``QuantileClip.step``, both driven for real on a tiny model whose gradients are set to a chosen total
  norm; the clipped norm each library leaves behind is compared with ``min(n, threshold)``.
* ``mean`` against an independent transcription of the docs/design.md formula.
* NaN / Inf robustness (including a hypothesis property over arbitrary float sequences), state round
  trips through ``torch.save`` / ``torch.load(weights_only=True)``, and ``make_rule`` defaults.
"""

from __future__ import annotations

import io
import itertools
import math
import random

import pytest
import torch
from autoclip.torch import QuantileClip
from hypothesis import given, settings
from hypothesis import strategies as st
from zclip import ZClip

from lightning_clip.functional import ceiling as ceiling_module
from lightning_clip.functional.cautious import CautiousMeanThreshold
from lightning_clip.functional.ceiling import LossAwareMeanThreshold
from lightning_clip.functional.thresholds import (
    MeanThreshold,
    PercentileThreshold,
    ThresholdRule,
    ZScoreThreshold,
    make_rule,
)
from tests.reference import loss_aware_thresholds

SEEDS = [0, 1, 2]
STEPS = 320


def norm_sequence(seed: int, steps: int = STEPS, base: float = 20.0, float32: bool = False) -> list[float]:
    """Lognormal noise around ``base`` with injected spikes (×5 to ×60 on ~4% of the steps)."""
    rng = random.Random(seed)
    norms = []
    for _ in range(steps):
        n = base * math.exp(rng.gauss(0.0, 0.25))
        if rng.random() < 0.04:
            n *= rng.uniform(5.0, 60.0)
        if float32:  # exactly representable in float32 (autoclip keeps a float32 history)
            n = float(torch.tensor(n, dtype=torch.float32))
        norms.append(n)
    return norms


def effective(norms: list[float], rule: ThresholdRule) -> list[float]:
    """Our clipped norm per step: ``min(n, threshold)``."""
    return [min(n, rule.step(n)) for n in norms]


def set_grads_to_norm(model: torch.nn.Module, norm: float, gen: torch.Generator) -> None:
    """Give every parameter a random gradient, scaled so that the total 2-norm is exactly ``norm``."""
    params = list(model.parameters())
    directions = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    scale = norm / math.sqrt(sum(float((d * d).sum()) for d in directions))
    for p, d in zip(params, directions, strict=True):
        p.grad = (d * scale).to(p.dtype)


def grad_norm_f64(model: torch.nn.Module) -> float:
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))


# ------------------------------------------------------------------------------------------ ZClip parity
ZCLIP_CONFIGS = [
    # (z_thresh, decay, warmup_steps, max_grad_norm): a cap that never binds, and one that often does
    (2.5, 0.97, 25, 1e6),
    (2.0, 0.9, 10, 30.0),
    (3.0, 0.99, 1, 1e6),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("config", ZCLIP_CONFIGS, ids=lambda c: "z{}-d{}-w{}-max{:g}".format(*c))
def test_zscore_matches_zclip_step(config, seed):
    z_thresh, decay, warmup, max_norm = config
    norms = norm_sequence(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).double()  # exact float64 norms
    gen = torch.Generator().manual_seed(seed)
    zclip = ZClip(
        mode="zscore",
        clip_option="adaptive_scaling",
        clip_factor=1.0,
        alpha=decay,
        z_thresh=z_thresh,
        max_grad_norm=max_norm,
        warmup_steps=warmup,
    )
    theirs = []
    for n in norms:
        set_grads_to_norm(model, n, gen)
        assert zclip.step(model) == pytest.approx(n, rel=1e-12)  # ZClip measured the norm we set
        theirs.append(grad_norm_f64(model))

    ours = effective(
        norms, make_rule("zscore", z_threshold=z_thresh, decay=decay, warmup_steps=warmup, max_norm=max_norm)
    )

    clipped = [i for i, (n, c) in enumerate(zip(norms, theirs, strict=True)) if c < n * (1 - 1e-5)]
    assert len(clipped) >= 5  # the comparison covers real clipping, not only pass-through steps
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        # ZClip scales by c / (n + 1e-6): its clipped norm is c·n/(n + 1e-6), within 1e-7 of c for n ≥ 10
        assert a == pytest.approx(b, rel=1e-6), f"step {step}: ours {a}, ZClip {b}"


# ------------------------------------------------------------------------------------------ AutoClip parity
AUTOCLIP_CASES = [
    # autoclip's default float32 history: percentiles whose interpolation weight q·(k−1) is exact in float32
    (25.0, 50, torch.float32),
    (50.0, 1000, torch.float32),
    (0.0, 20, torch.float32),
    (100.0, 64, torch.float32),
    # any percentile: torch.quantile's float32 weight would be off by ~1e-7·k, i.e. 1e-6 of a spike's height,
    # so the model (and with it autoclip's history) is float64
    (10.0, 50, torch.float64),
    (90.0, 37, torch.float64),
    (10.0, 1000, torch.float64),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("percentile", "window", "dtype"),
    AUTOCLIP_CASES,
    ids=[f"p{p:g}-w{w}-{str(d)[6:]}" for p, w, d in AUTOCLIP_CASES],
)
def test_percentile_matches_autoclip_quantile_clip(percentile, window, dtype, seed):
    norms = norm_sequence(seed, float32=True)
    model = torch.nn.Linear(3, 2).to(dtype)
    clipper = QuantileClip(
        model.parameters(), quantile=percentile / 100, history_length=window, global_threshold=True
    )
    rule = make_rule("percentile", percentile=percentile, window=window, warmup_steps=1)

    clipped_steps = 0
    for step, n in enumerate(norms):
        # one non-zero gradient entry: the float32 norm is exactly n for autoclip and for us
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        model.weight.grad[0, 0] = n
        history = clipper.state["global_history"]
        assert len(history) == 0 or history.dtype == dtype
        their_threshold = float(torch.quantile(history, percentile / 100)) if len(history) else math.inf
        clipper.step()
        their_clipped = float(model.weight.grad[0, 0])

        threshold = rule.step(n)
        assert threshold == pytest.approx(their_threshold, rel=1e-6), f"step {step}"
        assert min(n, threshold) == pytest.approx(their_clipped, rel=1e-6), f"step {step}"
        clipped_steps += their_clipped < n * (1 - 1e-5)
    assert len(clipper.state["global_history"]) == min(window, STEPS)
    if percentile < 100.0:
        assert clipped_steps >= 5


# ------------------------------------------------------------------------------------------ NaN / Inf
def test_zclip_ema_is_poisoned_by_one_nan_while_ours_is_not():
    norms = norm_sequence(7, steps=80)
    nan_step = 40
    model = torch.nn.Linear(4, 3).double()
    gen = torch.Generator().manual_seed(0)
    zclip = ZClip(mode="zscore", alpha=0.97, z_thresh=2.5, max_grad_norm=1e6, warmup_steps=10)
    rule = make_rule("zscore", decay=0.97, z_threshold=2.5, max_norm=1e6, warmup_steps=10)
    clean = make_rule("zscore", decay=0.97, z_threshold=2.5, max_norm=1e6, warmup_steps=10)

    for step, n in enumerate(norms):
        if step == nan_step:
            set_grads_to_norm(model, 1.0, gen)
            model.weight.grad[0, 0] = math.nan
            assert math.isnan(zclip.step(model))
            assert math.isfinite(rule.step(math.nan))
            continue
        set_grads_to_norm(model, n, gen)
        zclip.step(model)
        assert rule.step(n) == clean.step(n)  # identical to the run that never saw the NaN
        if step > nan_step:
            assert math.isnan(zclip.mean) and math.isnan(zclip.var)  # NaN for good
            assert math.isfinite(rule.mean) and math.isfinite(rule.var)
    # after the NaN, ZClip never clips again: a 100x spike passes through untouched
    set_grads_to_norm(model, 2000.0, gen)
    zclip.step(model)
    assert grad_norm_f64(model) == pytest.approx(2000.0)
    assert rule.step(2000.0) < 100.0


RULE_FACTORIES = {
    "mean": lambda: make_rule("mean"),
    "mean_warmup5_max": lambda: make_rule("mean", warmup_steps=5, max_norm=50.0),
    "zscore": lambda: make_rule("zscore", warmup_steps=10),
    "zscore_max": lambda: make_rule("zscore", warmup_steps=10, max_norm=40.0),
    "percentile": lambda: make_rule("percentile", window=30),
    "percentile_warmup5": lambda: make_rule("percentile", window=30, warmup_steps=5),
    "percentile_warmup5_max": lambda: make_rule("percentile", window=30, warmup_steps=5, max_norm=35.0),
}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("factory", RULE_FACTORIES.values(), ids=RULE_FACTORIES.keys())
def test_non_finite_norms_are_ignored_by_every_rule(factory, bad):
    norms = norm_sequence(3, steps=120)
    bad_steps = {0, 3, 11, 12, 50, 51, 52, 90}  # in and after every warm-up
    with_bad, without_bad = factory(), factory()
    seen_finite = False
    for step, n in enumerate(norms):
        if step in bad_steps:
            threshold = with_bad.step(bad)
            assert not math.isnan(threshold)
            assert math.isfinite(threshold) or not seen_finite
        else:
            threshold = with_bad.step(n)
            assert threshold == without_bad.step(n)
            seen_finite = seen_finite or math.isfinite(threshold)
    assert with_bad.state_dict() == without_bad.state_dict()
    assert seen_finite


FLOATS = st.one_of(
    st.floats(min_value=0.0, allow_nan=False, allow_infinity=False),
    st.floats(min_value=0.0, max_value=1e3, allow_nan=False),
    st.sampled_from(
        [math.nan, math.inf, -math.inf, 0.0, 5e-324, 1.7976931348623157e308, 3.4e38, 1e154, 1e200]
    ),
)
RULES = st.one_of(
    st.builds(
        MeanThreshold,
        factor=st.floats(1.0001, 10.0),
        decay=st.floats(0.0, 0.999),
        warmup_steps=st.integers(1, 5),
        max_norm=st.none() | st.floats(1e-3, 1e3),
    ),
    st.builds(
        ZScoreThreshold,
        z_threshold=st.floats(0.1, 5.0),
        decay=st.floats(0.0, 0.999),
        warmup_steps=st.integers(1, 5),
        max_norm=st.none() | st.floats(1e-3, 1e3),
    ),
    st.builds(
        PercentileThreshold,
        percentile=st.floats(0.0, 100.0),
        window=st.integers(1, 8),
        warmup_steps=st.integers(1, 5),
        max_norm=st.none() | st.floats(1e-3, 1e3),
        decay=st.floats(0.0, 0.999),
    ),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(rule=RULES, norms=st.lists(FLOATS, max_size=40))
def test_threshold_is_never_nan_and_stays_finite_once_finite(rule, norms):
    seen_finite = False
    for n in norms:
        threshold = rule.step(n)
        assert not math.isnan(threshold), (n, threshold)
        assert threshold >= 0.0
        if seen_finite:
            assert math.isfinite(threshold), (n, threshold)
        if not math.isfinite(threshold):
            # the only documented inf: a warm-up step without max_norm
            assert threshold == math.inf and rule.max_norm is None
        seen_finite = seen_finite or math.isfinite(threshold)
    if rule.max_norm is not None:
        assert all(math.isfinite(v) for v in _flatten(rule.state_dict()))


def _flatten(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    elif isinstance(value, list):
        for v in value:
            yield from _flatten(v)
    elif value is not None:
        yield float(value)


# ------------------------------------------------------------------------------------------ mean rule
def reference_mean_thresholds(
    norms: list[float], factor: float, decay: float, warmup_steps: int, max_norm: float | None
) -> list[float]:
    """docs/design.md, transcribed: t counts finite norms; thresholds during warm-up are max_norm (or inf);
    afterwards threshold_t = min(factor · m_{t-1} / (1 - decay^{t-1}), max_norm);
    m_t = decay·m_{t-1} + (1 - decay)·min(n_t, threshold_t)."""
    cap = math.inf if max_norm is None else max_norm
    m, t, out = 0.0, 0, []
    for n in norms:
        threshold = cap if t < warmup_steps else min(factor * m / (1.0 - decay**t), cap)
        out.append(threshold)
        if math.isfinite(n):
            t += 1
            m = decay * m + (1.0 - decay) * min(n, threshold)
    return out


@pytest.mark.parametrize(
    ("factor", "decay", "warmup", "max_norm"),
    [
        (1.5, 0.97, 1, None),
        (2.0, 0.9, 1, 30.0),
        (1.2, 0.5, 7, None),
        (3.0, 0.0, 3, 100.0),
        (1.5, 0.999, 2, None),
    ],
)
@pytest.mark.parametrize("seed", SEEDS)
def test_mean_rule_matches_the_design_formula(factor, decay, warmup, max_norm, seed):
    norms = norm_sequence(seed)
    norms[17] = math.nan
    norms[18] = math.inf
    rule = MeanThreshold(factor=factor, decay=decay, warmup_steps=warmup, max_norm=max_norm)
    got = [rule.step(n) for n in norms]
    expected = reference_mean_thresholds(norms, factor, decay, warmup, max_norm)
    assert got == pytest.approx(expected, rel=1e-12)
    plain = make_rule(
        "mean", factor=factor, decay=decay, warmup_steps=warmup, max_norm=max_norm, loss_aware=False
    )
    assert type(plain) is MeanThreshold and plain.step(norms[0]) == expected[0]


JUMP_AT = 150
LOSS_SHAPES = ("calm", "noisy", "runaway", "jump")


def loss_sequence(seed: int, shape: str, steps: int = STEPS) -> list[float | None]:
    """A training loss per step: decreasing with small noise, with large noise, with two runaways (a
    jump of x20 growing for 15 steps), or with a jump by design (x30 for good from step 150: `JUMP_AT`; a bump x3 at
    steps 260-274),
    plus a few steps without a loss and a NaN."""
    rng = random.Random(seed)
    losses: list[float | None] = []
    level = 2.0
    for t in range(steps):
        level *= 0.995
        noise = {"calm": 0.05, "noisy": 0.8, "runaway": 0.2, "jump": 0.2}[shape]
        value = level * math.exp(rng.gauss(0.0, noise))
        if shape == "runaway" and (60 <= t < 75 or 200 <= t < 215):
            value *= 20.0 * 1.3 ** (t % 20)
        if shape == "jump" and t >= JUMP_AT:  # and a bump x3 later, the gradients at their new level
            value *= 30.0 * (3.0 if 260 <= t < 275 else 1.0)
        losses.append(value)
    losses[7], losses[40] = None, math.nan
    return losses


@pytest.mark.parametrize(
    ("factor", "decay", "warmup", "max_norm"),
    [(1.5, 0.97, 1, None), (2.0, 0.9, 1, 30.0), (1.2, 0.5, 7, None), (3.0, 0.0, 3, 100.0)],
)
@pytest.mark.parametrize("shape", LOSS_SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_loss_aware_rule_matches_its_documented_formula(factor, decay, warmup, max_norm, shape, seed):
    norms = norm_sequence(seed)
    norms[17] = math.nan
    norms[18] = math.inf
    losses = loss_sequence(seed, shape)
    if shape == "jump":  # the gradients jump with the loss (x10), for good
        norms[JUMP_AT:] = [10.0 * n for n in norms[JUMP_AT:]]
    rule = make_rule("mean", factor=factor, decay=decay, warmup_steps=warmup, max_norm=max_norm)
    assert type(rule) is LossAwareMeanThreshold
    got, ceilings, undone_counts = [], [], []
    for n, loss in zip(norms, losses, strict=True):
        got.append(rule.step(n, loss))
        ceilings.append(rule.ceiling)
        undone_counts.append(rule.episodes_undone)
    expected = loss_aware_thresholds(norms, losses, factor, decay, warmup, max_norm)
    assert got == pytest.approx(
        expected, rel=1e-7
    )  # the early spread rounds near 0 (a difference of two squares)
    if shape == "runaway":  # the ceiling was cut, well below the plain rule
        assert rule.cuts > 0
        plain = reference_mean_thresholds(norms, factor, decay, warmup, max_norm)
        assert min(g / p for g, p in zip(got[60:80], plain[60:80], strict=True)) < 0.2
    if shape == "calm":
        assert rule.cuts == 0
    if shape == "jump":  # cut by its three bases, then undone: the ceiling back where it stood before
        assert rule.episodes_undone == 1
        at = undone_counts.index(1)
        assert JUMP_AT + 30 <= at < JUMP_AT + 60
        assert min(ceilings[JUMP_AT:at]) < 1e-3 * ceilings[JUMP_AT - 1]
        assert ceilings[at] == ceilings[JUMP_AT - 1]


def test_loss_aware_start_is_a_tenth_of_the_median_of_the_first_five_norms():
    rule = LossAwareMeanThreshold()
    # an outlying first norm (40) sets the start only until the median sees past it: a tenth of the median
    # of 40; of 40, 10; of 40, 10, 12; of 40, 10, 12, 8; of 40, 10, 12, 8, 10
    starts = [rule.step(norm, loss=1.0) for norm in (40.0, 10.0, 12.0, 8.0, 10.0)]
    assert starts == pytest.approx([4.0, 2.5, 1.2, 1.1, 1.0], rel=1e-12)
    # from there it widens as usual (the 5th step's update too): binding, the loss in its band, by at most
    # 2^0.1 a step (less while the norms were this noisy: a doubling per window of the norm band)
    grown = [1.0] + [rule.step(10.0, loss=1.0) for _ in range(3)]
    assert all(1.0 < b / a <= 2**0.1 + 1e-12 for a, b in itertools.pairwise(grown))
    # a lull first (a small first norm): the median lifts the start as the norms come
    lull = LossAwareMeanThreshold()
    assert [lull.step(norm) for norm in (0.2, 3.0, 2.0, 4.0, 2.5)] == pytest.approx(
        [0.02, 0.16, 0.2, 0.25, 0.25]
    )


def test_loss_aware_first_steps_and_a_cut_by_hand():
    rule = LossAwareMeanThreshold()
    for _ in range(5):  # the start: a tenth of the norms' median, whatever the ceiling would have grown to
        assert rule.step(10.0, loss=1.0) == pytest.approx(1.0)
    # the band sets its reference (0) at the 5th loss, once it has 3 noise terms (0): the 5th step was
    # healthy and binding, so it widened the ceiling by 2^0.1.
    # smoothed log loss after five ln 1 and one ln 50: 0.2·ln 50 / (1 − 0.8⁶); the reference: 0 relaxed by
    # 0.001 (no noise, so no early spread)
    excess = 0.2 * math.log(50.0) / (1 - 0.8**6) - 0.001
    expected = 2**0.1 * math.exp(-excess)  # base = the ceiling in force, shrunk by the loss ratio
    # the loss on its own cuts nothing: with the norm at its level the ceiling stands
    assert rule.threshold(10.0, loss=50.0) == pytest.approx(2**0.1, rel=1e-12)
    # a norm ×100 confirms it: the norm band's excess 0.2·ln 100 / (1 − 0.8⁶) − 0.001 > ln 2
    assert 0.2 * math.log(100.0) / (1 - 0.8**6) - 0.001 > math.log(2.0)
    assert rule.step(1000.0, loss=50.0) == pytest.approx(expected, rel=1e-12)
    assert rule.cuts == 1 and rule.slow_start == pytest.approx(0.5 * 2**0.1)


def test_loss_aware_start_resumes_mid_way_and_ends_at_a_tightening():
    norms = [40.0, 10.0, 12.0, 8.0, 10.0, 9.0, 11.0]
    whole = LossAwareMeanThreshold()
    expected = [whole.step(n, loss=1.0) for n in norms]
    first = LossAwareMeanThreshold()
    got = [first.step(n, loss=1.0) for n in norms[:2]]
    state = first.state_dict()
    assert state["first_norms"] == [40.0, 10.0]  # plain values, in the checkpoint
    resumed = LossAwareMeanThreshold()
    resumed.load_state_dict(state)
    got += [resumed.step(n, loss=1.0) for n in norms[2:]]
    assert got == expected  # bit for bit
    assert resumed.state_dict()["first_norms"] is None  # the start is over after 5 norms
    # a tightening (a rollback for a divergence) inside the start ends it: the median does not undo it
    early = LossAwareMeanThreshold()
    early.step(40.0, loss=1.0)
    early.tighten(1.0)
    assert early.step(10.0, loss=1.0) == pytest.approx(0.5)  # not a tenth of median(40, 10) = 2.5
    # a state saved before the start was checkpointed: the start is over once a norm was counted
    legacy = {key: value for key, value in state.items() if key != "first_norms"}
    old = LossAwareMeanThreshold()
    old.load_state_dict(legacy)
    assert old.first_norms is None and old.step(12.0, loss=1.0) == pytest.approx(first.ceiling)


def test_loss_aware_ceiling_never_collapses_to_zero():
    rule = LossAwareMeanThreshold()
    loss = 1.0
    for t in range(3000):  # a loss that keeps exploding: every episode cuts
        loss = 1.0 if t % 40 < 20 else loss * 1e3
        threshold = rule.step(5.0 if t % 40 < 20 else 5e3, loss)  # the norms confirm every runaway
        assert threshold > 0.0 and math.isfinite(threshold)
    assert rule.ceiling >= 1.1754943508222875e-38


def test_mean_rule_hand_example():
    # factor 2, decay 0.5, warm-up 1: m1 = 0.5·4 = 2, μ̂1 = 2/0.5 = 4, threshold2 = 8
    # the spike enters clipped to 8: m2 = 0.5·2 + 0.5·8 = 5, μ̂2 = 5/0.75, threshold3 = 40/3
    rule = MeanThreshold(factor=2.0, decay=0.5)
    assert rule.step(4.0) == math.inf
    assert rule.step(100.0) == 8.0
    assert rule.step(1.0) == pytest.approx(40.0 / 3.0, rel=1e-15)


def test_loss_aware_rule_follows_a_steadily_growing_norm():
    """With a healthy loss the ceiling widens on the steps it binds: it trails a norm that grows for good,
    clipping a few steps by a few percent, and a spike on top is still clipped."""
    rng = random.Random(0)
    norms = [1.01**t * math.exp(rng.gauss(0.0, 0.02)) for t in range(600)]
    rule = make_rule("mean")
    thresholds = [rule.step(n, loss=1.0) for n in norms]
    late = list(zip(norms[100:], thresholds[100:], strict=True))
    assert sum(n > c for n, c in late) / len(late) < 0.2
    assert min(c / n for n, c in late) > 0.9  # never by more than 10%
    assert thresholds[-1] > 0.95 * norms[-1]  # it grew ~390x along with the norm
    assert rule.step(10 * norms[-1], loss=1.0) < 2 * norms[-1]


def test_mean_rule_follows_a_steadily_growing_norm():
    rng = random.Random(0)
    norms = [1.01**t * math.exp(rng.gauss(0.0, 0.02)) for t in range(600)]  # +1% a step for 600 steps
    rule = make_rule("mean", loss_aware=False)  # factor 1.5, decay 0.97
    thresholds = [rule.step(n) for n in norms]
    clipped = sum(n > c for n, c in zip(norms, thresholds, strict=True))
    assert clipped / len(norms) < 0.02
    assert thresholds[-1] > norms[-1]  # the threshold grew ~390x along with the norm
    # a spike on top of that trend is still clipped
    assert rule.step(10 * norms[-1]) < 2 * norms[-1]


# ------------------------------------------------------------------------------------------ state round trip
STATE_CASES = {
    "mean": dict(mode="mean"),
    "mean_warmup": dict(mode="mean", warmup_steps=20, max_norm=60.0),
    "zscore_in_warmup": dict(mode="zscore"),  # k=15 < 25: the buffer and the warm-up mean rule travel
    "zscore": dict(mode="zscore", warmup_steps=5),
    "zscore_max": dict(mode="zscore", warmup_steps=5, max_norm=30.0),
    "percentile_evicting": dict(mode="percentile", window=8),
    "percentile_warmup": dict(mode="percentile", warmup_steps=30, window=50),
}


def _through_a_file(state: dict) -> dict:
    """``state`` saved with ``torch.save`` and loaded back with ``weights_only=True``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _fed(
    norms: list[float], losses: list[float], rule: LossAwareMeanThreshold | None = None
) -> tuple[LossAwareMeanThreshold, list[float]]:
    """``rule`` (a fresh default one when None) fed these steps, and the thresholds it gave."""
    rule = LossAwareMeanThreshold() if rule is None else rule
    return rule, [rule.step(n, loss) for n, loss in zip(norms, losses, strict=True)]


def _loaded(state: dict) -> LossAwareMeanThreshold:
    """A fresh default loss-aware rule that loaded ``state``."""
    rule = LossAwareMeanThreshold()
    rule.load_state_dict(state)
    return rule


@pytest.mark.parametrize("k", [15, 60])
@pytest.mark.parametrize("kwargs", STATE_CASES.values(), ids=STATE_CASES.keys())
def test_state_dict_round_trip_continues_exactly(kwargs, k):
    norms = norm_sequence(11, steps=150)
    norms[5] = math.nan
    uninterrupted = make_rule(**kwargs)
    expected = [uninterrupted.step(n) for n in norms]

    first = make_rule(**kwargs)
    head = [first.step(n) for n in norms[:k]]
    state = _through_a_file(first.state_dict())
    assert state == first.state_dict()

    resumed = make_rule(**kwargs)
    resumed.load_state_dict(state)
    tail = [resumed.step(n) for n in norms[k:]]
    assert head + tail == expected  # bit-identical, not approximately
    assert resumed.state_dict() == uninterrupted.state_dict()
    # the state was not a no-op: a fresh rule diverges from the uninterrupted one
    fresh = make_rule(**kwargs)
    assert [fresh.step(n) for n in norms[k:]] != expected[k:]


def test_percentile_load_state_dict_keeps_only_the_window():
    long = make_rule("percentile", window=100)
    for n in range(1, 101):
        long.step(float(n))
    short = make_rule("percentile", window=10, percentile=0.0)
    short.load_state_dict(long.state_dict())
    assert short.state_dict()["history"] == [float(n) for n in range(91, 101)]
    assert short.step(1.0) == 91.0  # the minimum of the last 10 norms


# ------------------------------------------------------------------------------------------ make_rule
@pytest.mark.parametrize(
    ("mode", "cls", "default_warmup"),
    [
        ("mean", LossAwareMeanThreshold, 1),
        ("zscore", ZScoreThreshold, 25),
        ("percentile", PercentileThreshold, 1),
    ],
)
def test_make_rule_defaults(mode, cls, default_warmup):
    rule = make_rule(mode)
    assert type(rule) is cls
    assert rule.warmup_steps == default_warmup
    assert rule.max_norm is None
    assert make_rule(mode, warmup_steps=3).warmup_steps == 3
    assert type(make_rule(mode, loss_aware=False)) is (MeanThreshold if mode == "mean" else cls)
    # warm-up length observed, not only stored: max_norm holds for exactly that many steps
    capped = make_rule(mode, max_norm=1e9, loss_aware=False)
    thresholds = [capped.step(10.0 + 0.1 * i) for i in range(default_warmup + 1)]
    assert thresholds[:default_warmup] == [1e9] * default_warmup
    assert thresholds[default_warmup] < 1e9


def test_make_rule_passes_every_argument():
    mean = make_rule("mean", factor=3.0, decay=0.5, max_norm=7.0)
    assert (mean.factor, mean.decay, mean.max_norm) == (3.0, 0.5, 7.0)
    z = make_rule("zscore", z_threshold=1.5, decay=0.8)
    assert (z.z_threshold, z.decay) == (1.5, 0.8)
    p = make_rule("percentile", percentile=25.0, window=9)
    assert (p.percentile, p.window) == (25.0, 9)


def test_warmup_without_max_norm_is_protected_by_the_mean_rule():
    # zscore / percentile warm-up without max_norm: step 1 is free, then the mean rule (factor 1.5) caps
    for mode in ("zscore", "percentile"):
        rule = make_rule(mode, warmup_steps=10)
        assert rule.step(10.0) == math.inf
        assert rule.step(1000.0) == pytest.approx(15.0)


@pytest.mark.parametrize("factory", RULE_FACTORIES.values(), ids=RULE_FACTORIES.keys())
def test_norms_beyond_float32_range_cannot_overflow_the_statistics(factory):
    # a float32 measurement never exceeds 3.4e38, but a rule fed by hand may see more: squaring 1e200 in
    # the z-score variance raised OverflowError before, and decay=0 turned an infinite variance into NaN
    rule = factory()
    thresholds = [rule.step(n) for n in [1e200, 1.7976931348623157e308, *norm_sequence(5, steps=40), 1e300]]
    assert all(not math.isnan(t) for t in thresholds)
    assert all(math.isfinite(t) for t in thresholds[12:])
    state = rule.state_dict()
    if isinstance(rule, LossAwareMeanThreshold):
        assert state.pop("slow_start") == math.inf  # documented: no episode yet
    assert all(math.isfinite(v) for v in _flatten(state))
    zero_decay = ZScoreThreshold(decay=0.0, warmup_steps=2, max_norm=10.0)
    assert all(math.isfinite(zero_decay.step(n)) for n in [1e200, 1e250, 1e300, 3.0, 1e300])


def test_zscore_eps_must_be_positive():
    with pytest.raises(ValueError, match=r"^`eps` must be a number > 0, got 0\.0\.$"):
        ZScoreThreshold(eps=0.0)
    rule = ZScoreThreshold(warmup_steps=3)  # constant norms: std 0, z divides by eps alone
    assert [rule.step(2.0) for _ in range(5)][3:] == [pytest.approx(2.0 + 2.5e-6)] * 2


def test_mean_rule_ignores_zero_norms_instead_of_pinning_the_threshold_at_zero() -> None:
    """A first norm of exactly 0 (e.g. a batch without valid targets) must not freeze the threshold at 0:
    the rule ends up where the same sequence without the zero takes it."""
    with_zero, without = MeanThreshold(factor=1.5, decay=0.9), MeanThreshold(factor=1.5, decay=0.9)
    with_zero.step(0.0)
    seq = [1.0, 2.0, 1.5, 1.0]
    assert [with_zero.step(n) for n in seq] == [without.step(n) for n in seq]
    assert with_zero.current() > 0


def test_loss_aware_state_round_trip_through_a_confirmed_runaway():
    """Resumed in the middle of a runaway (loss and norms ×1.1 a step): the same thresholds bit for bit,
    cuts included; the norm band travels in the state (without it the resumed rule cuts later)."""
    rng = random.Random(3)
    norms = [2.0 * math.exp(rng.gauss(0.0, 0.1)) for _ in range(60)] + [2.0 * 1.1**k for k in range(1, 41)]
    losses = [1.0 * math.exp(rng.gauss(0.0, 0.1)) for _ in range(60)] + [1.1**k for k in range(1, 41)]
    uninterrupted, expected = _fed(norms, losses)
    assert uninterrupted.cuts > 0
    for k in (62, 70):
        first, head = _fed(norms[:k], losses[:k])
        state = _through_a_file(first.state_dict())
        resumed, tail = _fed(norms[k:], losses[k:], _loaded(state))
        assert head + tail == expected
        assert resumed.state_dict() == uninterrupted.state_dict()
        partial = _loaded({key: v for key, v in state.items() if key != "norm_band"})
        assert _fed(norms[k:], losses[k:], partial)[1] != expected[k:]


def _bounces(
    norm_rate: float,
    loss_rate: float,
    first: int,
    hard_steps: int = 3,
    norm_factor: float = 8.0,
    loss_factor: float = 15.0,
) -> tuple[list[float], list[float]]:
    """A loss trained down (×``loss_rate`` a step) whose norms shrink (×``norm_rate`` a step), and from step
    ``first`` on, every 40 steps, ``hard_steps`` hard batches in a row: the loss ×``loss_factor`` and the
    norms ×``norm_factor`` (a classifier under SGD: the loss and its gradients rise together, and fall back
    on their own)."""
    rng = random.Random(5)
    norms, losses = [], []
    for t in range(400):
        hard = t >= first and (t - first) % 40 < hard_steps
        norms.append(5.0 * norm_rate**t * math.exp(rng.gauss(0.0, 0.1)) * (norm_factor if hard else 1.0))
        losses.append(2.0 * loss_rate**t * math.exp(rng.gauss(0.0, 0.1)) * (loss_factor if hard else 1.0))
    return norms, losses


@pytest.mark.parametrize(
    ("condition", "other", "norm_rate", "loss_rate", "first"),
    [
        # the loss trained towards zero (0.03 at step 280, where training began at ~1.8): even smoothed
        # over a bounce, below a tenth of where it began
        ("LEARNED_FACTOR", "RULING_FACTOR", 0.99, 0.985, 280),
        # the norms shrink faster than the loss: the ceiling (~4) over twice the plain threshold (~0.7)
        ("RULING_FACTOR", "LEARNED_FACTOR", 0.98, 0.995, 120),
    ],
)
def test_hard_batches_do_not_ratchet_the_ceiling(monkeypatch, condition, other, norm_rate, loss_rate, first):
    """Hard batches raise the loss and the norms together (smoothed: the loss over twice its level, the
    norms over twice theirs), so without its two conditions the rule cuts its ceiling at each, below the
    plain rule, at each bounce. Each condition alone (the other switched off) keeps every cut away:
    the loss more than 10× below where training began (`LEARNED_FACTOR`), or the ceiling more than 2×
    above the plain rule's threshold (`RULING_FACTOR`): no episode, the plain rule's threshold on every
    step from the first bounce, and the documented formula (`tests.reference`) with both conditions."""
    norms, losses = _bounces(norm_rate, loss_rate, first)
    rule = LossAwareMeanThreshold()
    got = [rule.step(n, loss) for n, loss in zip(norms, losses, strict=True)]
    assert got == pytest.approx(loss_aware_thresholds(norms, losses, 1.5, 0.97, 1, None), rel=1e-7)
    plain = reference_mean_thresholds(norms, 1.5, 0.97, 1, None)
    monkeypatch.setattr(ceiling_module, other, math.inf)
    alone = LossAwareMeanThreshold()
    got = [alone.step(n, loss) for n, loss in zip(norms, losses, strict=True)]
    assert alone.cuts == 0 and alone.probes == 0
    assert got[first:] == pytest.approx(plain[first:], rel=1e-12)
    monkeypatch.setattr(ceiling_module, condition, math.inf)
    unconditioned = LossAwareMeanThreshold()
    cut = [unconditioned.step(n, loss) for n, loss in zip(norms, losses, strict=True)]
    assert unconditioned.cuts >= 3
    assert min(c / p for c, p in zip(cut[first:], plain[first:], strict=True)) < 0.5


@pytest.mark.parametrize(
    ("norm_factor", "hard_steps", "norm_rate", "loss_rate", "loss_factor", "bases", "in_force", "ceilings"),
    [
        # norms ×3 for 5 steps, at most 1.72 × the plain threshold, the loss ~0.03 (begun at 2): each new
        # episode bases on the first's (the rule as it was, every base the threshold in force: the ceiling
        # 0.428 → 0.217 → 0.108)
        (3.0, 5, 0.995, 0.985, 15.0, [2.36, 2.36, 2.36], [2.36, 1.213, 1.039], [0.428, 0.422, 0.405]),
        # norms ×8 for 3 steps: over 3 × the plain threshold (still running away) — the cuts compound
        (8.0, 3, 0.99, 0.985, 15.0, [0.686, 0.307, 0.163], [0.686, 0.307, 0.163], [0.264, 0.118, 0.064]),
        # the norms as in the first, but the loss not yet halved since training began (a runaway taking
        # hold before the run learned) — the cuts compound
        (3.0, 5, 0.995, 0.998, 5.0, [2.36, 1.186, 0.634], [2.36, 1.186, 0.634], [0.836, 0.405, 0.21]),
    ],
)
def test_episodes_compound_only_while_the_runaway_escalates(
    monkeypatch, norm_factor, hard_steps, norm_rate, loss_rate, loss_factor, bases, in_force, ceilings
):
    """Hard batches (from step 280, every 40 steps) with both conditions switched off: an episode opens at
    each bounce. One that does not escalate (its norm at most `COMPOUND_FACTOR` × the plain rule's threshold,
    its smoothed loss below half of where training began) bases on the last base taken, not on the threshold
    the last cut left in force, so its cut follows the worst excess instead of multiplying; one that
    escalates bases on the threshold in force. Reference: the documented formula (`tests.reference`, its
    two conditions off), step for step; the ratios that decide are checked against their bounds."""
    monkeypatch.setattr(ceiling_module, "LEARNED_FACTOR", math.inf)
    monkeypatch.setattr(ceiling_module, "RULING_FACTOR", math.inf)
    norms, losses = _bounces(norm_rate, loss_rate, 280, hard_steps, norm_factor, loss_factor)
    rule, opened, got = LossAwareMeanThreshold(), [], []
    for t, (n, loss) in enumerate(zip(norms, losses, strict=True)):
        base, before, plain = rule.episode_base, rule.current(), rule.mean_term()
        got.append(rule.step(n, loss))
        if base is None and rule.episode_base is not None:
            learned = rule.band.smoothed() - rule.band.start_level
            opened.append((t, rule.episode_base, before, rule.ceiling, n / plain, learned))
    assert [t for t, *_ in opened] == [284, 324, 364] if hard_steps == 5 else [281, 321, 361]
    assert [round(o[1], 3) for o in opened] == bases
    assert [round(o[2], 3) for o in opened] == in_force
    assert [round(o[3], 3) for o in opened] == ceilings
    runaway = [o[4] > ceiling_module.COMPOUND_FACTOR for o in opened[1:]]
    early = [o[5] > -math.log(ceiling_module.COMPOUND_FACTOR) for o in opened[1:]]
    assert runaway == [norm_factor == 8.0] * 2 and early == [loss_rate == 0.998] * 2
    expected = loss_aware_thresholds(norms, losses, 1.5, 0.97, 1, None, conditions=False)
    assert got == pytest.approx(expected, rel=1e-7)


def _jump_for_good() -> tuple[list[float], list[float]]:
    """Calm for 100 steps, then the loss ×30 and the norms ×10 for good, from one step to the next (SGD
    targets scaled up: no runaway, a new level)."""
    rng = random.Random(4)
    norms = [2.0 * math.exp(rng.gauss(0.0, 0.1)) * (10.0 if t >= 100 else 1.0) for t in range(260)]
    losses = [math.exp(rng.gauss(0.0, 0.1)) * (30.0 if t >= 100 else 1.0) for t in range(260)]
    return norms, losses


def test_an_episode_the_loss_does_not_answer_is_undone():
    """A jump for good: three bases cut the ceiling >1000×; 10 steps after the third, the loss stands where
    it jumped (neither climbing on nor coming down), so the episode is undone — the ceiling and the
    slow-start level back to what they were before it, exactly, and the bands' healthy levels at the new
    level (no new episode after it). Reference: the same rule that never undoes an episode."""
    norms, losses = _jump_for_good()
    rule, kept = LossAwareMeanThreshold(), LossAwareMeanThreshold()
    kept._answered = lambda fast, calm: True  # type: ignore[method-assign]
    before, opened = None, None
    for t, (n, loss) in enumerate(zip(norms, losses, strict=True)):
        state = (rule.ceiling, rule.slow_start)
        rule.step(n, loss)
        kept.step(n, loss)
        if opened is None and rule.cuts:
            before, opened = state, t
        if rule.episodes_undone:
            break
    assert before is not None and opened is not None and rule.episodes_undone == 1
    assert opened == 101  # one step after the jump: the smoothed norm is then twice its level
    assert t == opened + 30  # re-based at +10 and +20; undone 10 steps after the third base
    assert (rule.ceiling, rule.slow_start) == before
    assert kept.ceiling < 1e-3 * before[0] and kept.episode_count == 3
    cuts = rule.cuts
    for n, loss in zip(norms[t + 1 :], losses[t + 1 :], strict=True):
        rule.step(n, loss)
        kept.step(n, loss)
    assert rule.cuts == cuts and rule.episode_base is None  # no new episode after the undo
    assert rule.ceiling >= before[0]
    assert kept.episode_base is not None and kept.ceiling < 1e-3 * before[0]  # held down for good


def test_an_episode_that_ends_a_probe_undoes_the_probe_too():
    """A stall halves the binding ceiling (a probe, step 23: 2.062 → 1.031); two steps later, while the
    probe waits for its answer, the loss jumps ×30 and the norms ×10 for good. The episode that opens ends
    the probe, and once undone it returns the ceiling to where it stood before the probe (2.062), not to
    the probe's halving; the documented formula (`tests.reference`) agrees step for step."""
    rng = random.Random(6)
    norms, losses = [], []
    for t in range(80):
        jump = t >= 25
        norms.append(10.0 * math.exp(rng.gauss(0.0, 0.05)) * (10.0 if jump else 1.0))
        losses.append(math.exp(rng.gauss(0.0, 0.02)) * (1.2 if t >= 12 else 1.0) * (30.0 if jump else 1.0))
    rule = LossAwareMeanThreshold()
    got, undone_at, before_probe = [], None, None
    for t, (n, loss) in enumerate(zip(norms, losses, strict=True)):
        probes = rule.probes
        ceiling = rule.ceiling
        got.append(rule.step(n, loss))
        if rule.probes > probes:
            before_probe = ceiling
            assert t == 23 and rule.ceiling == pytest.approx(0.5 * ceiling)
        if undone_at is None and rule.episodes_undone:
            undone_at = t
            assert rule.ceiling == before_probe
    assert before_probe == pytest.approx(2.062, abs=1e-3) and undone_at is not None
    assert got == pytest.approx(loss_aware_thresholds(norms, losses, 1.5, 0.97, 1, None), rel=1e-7)


@pytest.mark.parametrize("k", [103, 125, 131])
def test_an_episode_being_undone_resumes_bit_for_bit(k):
    """Resumed during the jump's episode (its first base, its third, right after the undo): the same state
    and thresholds bit for bit; without the state before the episode, the resumed rule is not undone to
    it."""
    norms, losses = _jump_for_good()
    uninterrupted, expected = _fed(norms, losses)
    first, _ = _fed(norms[:k], losses[:k])
    state = _through_a_file(first.state_dict())
    resumed = _loaded(state)
    assert resumed.state_dict() == first.state_dict()  # the peak and the anchor of the base included
    if k == 125:
        assert resumed.episode_peak is not None and resumed.episode_anchor is not None
    assert _fed(norms[k:], losses[k:], resumed)[1] == expected[k:]
    assert resumed.state_dict() == uninterrupted.state_dict()
    keys = {103: ["episode_undo"], 125: ["episode_undo"], 131: []}[k]
    for key in keys:
        partial = _loaded({name: v for name, v in state.items() if name != key})
        assert _fed(norms[k:], losses[k:], partial)[1] != expected[k:], key


def _runaway_then_drift() -> tuple[list[float], list[float]]:
    """A confirmed runaway (cut), 300 healthy binding steps, then a loss drifting up by 0.04% a step while
    the norms stay at their level (binding the cut ceiling)."""
    rng = random.Random(3)
    norms = [2.0 * math.exp(rng.gauss(0.0, 0.1)) for _ in range(60)] + [2.0 * 1.1**k for k in range(1, 41)]
    losses = [1.0 * math.exp(rng.gauss(0.0, 0.1)) for _ in range(60)] + [1.1**k for k in range(1, 41)]
    norms += [2.0 * math.exp(rng.gauss(0.0, 0.1)) for _ in range(1800)]
    losses += [math.exp(rng.gauss(0.0, 0.05)) for _ in range(300)]
    losses += [math.exp(0.0004 * k + rng.gauss(0.0, 0.05)) for k in range(1500)]
    return norms, losses


def test_a_loss_drifting_up_after_a_cut_stops_the_slow_widening():
    """The drift gate: after a cut, the ceiling widens by `slow_growth` only while the smoothed loss is
    within its calm band of the lowest it has been. Reference: the same rule with the gate switched off
    (a loss that drifts more slowly than the band's healthy level relaxes never reads as a rise)."""
    norms, losses = _runaway_then_drift()
    gated, ungated = LossAwareMeanThreshold(), LossAwareMeanThreshold()
    ungated.drifted = lambda calm: False  # type: ignore[method-assign]
    ceilings = []
    for n, loss in zip(norms, losses, strict=True):
        gated.step(n, loss)
        ungated.step(n, loss)
        ceilings.append((gated.ceiling, ungated.ceiling))
    assert gated.cuts > 0 and math.isfinite(gated.slow_start)
    (g_mid, u_mid), (g_end, u_end) = ceilings[1000], ceilings[-1]
    assert g_end == g_mid  # drifted: held, never cut
    assert u_end > 1.5 * u_mid  # without the gate: 0.05% a step for 900 steps
    assert g_end < u_end


def test_the_drift_gate_state_travels_in_the_checkpoint():
    """Resumed in the middle of the drift: the same ceilings bit for bit; without ``best_loss`` the resumed
    rule takes the drifted loss as its best and widens again."""
    norms, losses = _runaway_then_drift()
    _, expected = _fed(norms, losses)
    k = 1200
    first, _ = _fed(norms[:k], losses[:k])
    state = _through_a_file(first.state_dict())
    assert _fed(norms[k:], losses[k:], _loaded(state))[1] == expected[k:]
    forgetful = _loaded({key: v for key, v in state.items() if key != "best_loss"})
    tail = _fed(norms[k:], losses[k:], forgetful)[1]
    assert tail[-1] > expected[-1]


def _stall(answers: bool, steps: int = 1500) -> tuple[LossAwareMeanThreshold, list[float]]:
    """Norms steady at 100 (the ceiling starts at 10 and binds throughout; the norms never confirm a rise).
    When ``answers``, the loss is ``(threshold / 0.3) ** 0.25`` from the first step (a step too long for
    the problem: the loss rises as the ceiling widens); otherwise it is calm at 1 for 25 steps, then 3
    times higher for good (a harder stage of the task, whatever the step)."""
    rng = random.Random(5)
    rule = LossAwareMeanThreshold()
    ceilings = []
    for t in range(steps):
        threshold = rule.current() if t else 10.0
        level = max(1.0, (threshold / 0.3) ** 0.25) if answers else (1.0 if t < 25 else 3.0)
        rule.step(100.0 * math.exp(rng.gauss(0.0, 0.05)), level * math.exp(rng.gauss(0.0, 0.05)))
        ceilings.append(rule.ceiling)
    return rule, ceilings


def test_a_stall_that_answers_a_tighter_step_is_probed_down():
    """The loss stands above its lowest while the clip binds and the norms stay at their level (no
    episode): the ceiling is halved, and each halving the loss answers is kept. Between probes the ceiling
    widens slowly again (the slow-start level), so it saws down rather than falls."""
    rule, ceilings = _stall(answers=True)
    assert rule.cuts == 0 and rule.probes >= 3
    assert ceilings[-1] < 0.5 * max(ceilings)


def test_a_stall_that_does_not_answer_is_not_probed_down():
    """A loss that rose for good (×3, whatever the step): each probe is undone once the loss has not
    answered it, and the drift holds the widening — the ceiling ends where the rise found it."""
    rule, ceilings = _stall(answers=False)
    assert rule.cuts == 0 and rule.probes >= 1
    assert ceilings[-1] == pytest.approx(max(ceilings[20:100]), rel=1e-12)
    assert min(ceilings[200:]) >= 0.5 * ceilings[-1]


def test_an_open_probe_travels_in_the_checkpoint():
    """Resumed while a probe is open: the same ceilings bit for bit; without the probe's state the
    resumed rule never undoes the halving."""
    rng = random.Random(5)
    norms = [100.0 * math.exp(rng.gauss(0.0, 0.05)) for _ in range(600)]
    losses = [(3.0 if t >= 25 else 1.0) * math.exp(rng.gauss(0.0, 0.05)) for t in range(600)]
    uninterrupted = LossAwareMeanThreshold()
    expected, opened = [], None
    for t, (n, loss) in enumerate(zip(norms, losses, strict=True)):
        expected.append(uninterrupted.step(n, loss))
        if opened is None and uninterrupted.probe_level is not None:
            opened = t
    assert opened is not None
    k = opened + 3
    first, _ = _fed(norms[:k], losses[:k])
    assert first.probe_level is not None
    state = _through_a_file(first.state_dict())
    assert _fed(norms[k:], losses[k:], _loaded(state))[1] == expected[k:]
    forgetful = _loaded({key: v for key, v in state.items() if not key.startswith("probe")})
    assert _fed(norms[k:], losses[k:], forgetful)[1] != expected[k:]


def test_an_undone_probe_leaves_the_slow_start_level_where_it_was():
    """A probe the loss does not answer is undone whole: the ceiling back, and the slow-start level as it
    stood before the probe (lowered with the halving, it would leave the restored ceiling above it, to
    widen only at the slow pace — a healthy run throttled by a probe it did not answer)."""
    rng = random.Random(5)
    rule = LossAwareMeanThreshold()
    undone = 0
    before = None
    for t in range(1500):
        level = 1.0 if t < 25 else 3.0
        opened = rule.probe_level is not None
        slow, ceiling = rule.slow_start, rule.ceiling
        rule.step(100.0 * math.exp(rng.gauss(0.0, 0.05)), level * math.exp(rng.gauss(0.0, 0.05)))
        if not opened and rule.probe_level is not None:
            before = (slow, ceiling)
        if opened and rule.probe_level is None:
            assert before is not None
            if rule.ceiling >= before[1]:  # undone
                undone += 1
                assert rule.slow_start == before[0]
    assert undone >= 1


def test_tighten_then_new_level_restores_the_ceiling_and_a_calm_step_forgets_it():
    """`tighten` keeps what it replaced (with an open episode: what the episode replaced) until the loss is
    calm again; `new_level` restores it and starts the bands afresh."""
    norms, losses = _jump_for_good()
    rule = LossAwareMeanThreshold()
    for n, loss in zip(norms[:105], losses[:105], strict=True):  # into the jump's first episode
        rule.step(n, loss)
    assert rule.episode_base is not None and rule.episode_undo is not None
    before_episode = rule.episode_undo
    rule.tighten(0.5 * rule.current())
    assert rule.episode_base is None and rule.episode_undo == before_episode
    rule.new_level()
    assert (rule.ceiling, rule.slow_start) == before_episode
    assert rule.band.reference is None and rule.norm_band.reference is None and rule.best_loss is None
    calm = LossAwareMeanThreshold()
    for n, loss in zip(norms[:60], losses[:60], strict=True):
        calm.step(n, loss)
    ceiling = calm.ceiling
    calm.tighten(0.5 * calm.current())
    assert calm.episode_undo is not None and calm.episode_undo[0] == ceiling
    calm.step(norms[60], losses[60])  # a calm step: the memory of the tightening is dropped
    assert calm.episode_undo is None
    calm.new_level()
    assert calm.ceiling < ceiling  # nothing to undo any more


def test_cautious_start_widens_at_the_fast_rate_whatever_the_noise():
    """Noisy norms (×1 and ×30 alternating) make the loss-aware rule pace its widening by its norm band's
    window; the cautious start alone (an optimizer that normalises the gradient) widens by 2^0.1 on every
    binding step, so noise cannot hold it (and throttle Adam) for hundreds of steps."""
    norms = [1.0 if t % 2 else 30.0 for t in range(60)]
    cautious, paced = CautiousMeanThreshold(), LossAwareMeanThreshold()
    got_c = [cautious.step(n) for n in norms]
    got_p = [paced.step(n) for n in norms]
    assert got_c[:5] == got_p[:5]  # the same start: a tenth of the median of the first five
    assert got_c == pytest.approx(loss_aware_thresholds(norms, [None] * 60, paced=False), rel=1e-12)
    assert got_p == pytest.approx(loss_aware_thresholds(norms, [None] * 60), rel=1e-12)
    # from the 6th step on, every binding step (norm above the threshold) widens it by exactly 2^0.1
    ratios = [b / a for a, b, n in zip(got_c[5:40], got_c[6:41], norms[5:40], strict=True) if n > a]
    assert len(ratios) >= 10 and ratios == pytest.approx([2**0.1] * len(ratios), rel=1e-12)
    assert got_p[40] < 0.5 * got_c[40]  # the paced rule is far behind
