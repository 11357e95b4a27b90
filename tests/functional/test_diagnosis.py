"""lightning_clip.diagnosis, the cause model, driven directly: decades credited by hand, ranking, and fixes
that fit the model (never one it already has)."""

from __future__ import annotations

import math

import pytest

from lightning_clip import diagnosis as D


def sig(layer: str, mean_d: float = 0.24, flat: float = 0.0) -> D.SiteFigures:
    return D.SiteFigures("sigmoid", layer, 256, flat, 16, 0.0, mean_d)


def relu(layer: str, dead: float) -> D.SiteFigures:
    return D.SiteFigures("relu", layer, 512, dead, 32, dead, 1 - dead)


def texts(cause: D.Cause) -> list[str]:
    return [f.text for f in cause.fixes]


def test_saturation_decades_and_the_sigmoid_bound() -> None:
    sites = [sig(f"h{i}") for i in range(29)]
    [cause] = D.depth_causes(sites, [], D.ModelFacts(residual=False), None)
    assert cause.key == "saturation"
    assert cause.decades == pytest.approx(-29 * math.log10(0.24))
    assert "at most 0.25^29 = 3.5e-18 across depth" in cause.figures
    assert f"mean derivatives is {10 ** (29 * math.log10(0.24)):.1e}" in cause.figures
    assert "0% of their units are in the flat region" in cause.figures
    assert texts(cause) == [
        "ReLU-family activations (ReLU, GELU, SiLU) instead of sigmoid between layers",
        "normalisation layers (LayerNorm, BatchNorm) before the activations",
        "residual (skip) connections around blocks of layers",
    ]


def test_saturation_needs_two_decades_or_a_flat_layer() -> None:
    assert D.depth_causes([sig("out")], [], D.ModelFacts(), None) == []  # one sigmoid: 0.6 decades
    tanh = D.SiteFigures("tanh", "h", 100, 0.6, 10, 0.2, 0.5)
    [cause] = D.depth_causes([tanh], [], D.ModelFacts(), None)
    assert cause.key == "saturation" and "60% of their units are in the flat region" in cause.figures
    assert "most at `h` (60%)" in cause.figures


def test_fixes_the_model_has_are_not_suggested() -> None:
    sites = [sig(f"h{i}") for i in range(29)]
    facts = D.ModelFacts(normalisation=True, residual=True)
    [cause] = D.depth_causes(sites, [], facts, None)
    assert texts(cause) == ["ReLU-family activations (ReLU, GELU, SiLU) instead of sigmoid between layers"]
    unknown = D.depth_causes(sites, [], D.ModelFacts(residual=None), None)[0]
    assert not any("residual" in t for t in texts(unknown))  # not known: not claimed


def test_dead_units_decades_bias_and_threshold() -> None:
    sites = [relu("a", 0.53), relu("b", 0.2), relu("c", 1.0)]
    scales = [
        D.ScaleFigures("a", "relu", 1.4, math.sqrt(2), -1.0),
        D.ScaleFigures("c", "relu", 1.4, math.sqrt(2), -3.0),
    ]
    [cause] = D.depth_causes(sites, scales, D.ModelFacts(normalisation=True), None)
    assert cause.key == "dead" and cause.decades == 300.0  # one layer entirely dead: capped
    assert "2 ReLU layers of 3 have at least 50% of their units never active" in cause.figures
    assert "`c` 100% of 32, `a` 53% of 32" in cause.figures
    assert "negative biases (mean -2, median over layers)" in cause.figures
    assert [f.key for f in cause.fixes] == ["leaky", "bias", "lr"]  # normalisation present: not suggested
    partial = D.dead_cause([relu("a", 0.6), relu("b", 0.5)], [], D.ModelFacts())
    assert partial is not None and partial.decades == pytest.approx(-math.log10(0.4) - math.log10(0.5))
    assert D.dead_cause([relu("a", 0.49)], [], D.ModelFacts()) is None


def test_init_decades_and_which_init_to_use() -> None:
    scales = [D.ScaleFigures(f"h{i}", "relu", 0.577, math.sqrt(2)) for i in range(9)]
    cause = D.init_cause(scales, D.ModelFacts())
    assert cause is not None
    assert cause.decades == pytest.approx(-9 * math.log10(0.577 / math.sqrt(2)))
    assert (
        "9 layers feeding an activation have rms(W)·√fan_in 0.58 (median) where relu needs 1.4 (nn.init.calculate_gain)"
        in cause.figures
    )
    assert "nn.init.kaiming_normal_(weight, nonlinearity='relu')" in texts(cause)[0]
    assert D.init_cause(scales[:4], D.ModelFacts()) is None  # 1.6 decades: below the bar
    sigmoid = [D.ScaleFigures(f"h{i}", "sigmoid", 0.58, 1.0) for i in range(29)]
    assert D.init_cause(sigmoid, D.ModelFacts()) is None  # ×0.58: not far off per layer


def onset(**kw: object) -> D.Onset:
    base = dict(
        first_flagged=25,
        healthy_before=0,
        jump_what="loss",
        jump_step=3,
        jump_before=9.35,
        jump_value=29.0,
        jump_window=3,
        lr=0.1,
    )
    base.update(kw)
    return D.Onset(**base)  # type: ignore[arg-type]


def test_blowup_ranks_first_with_step_figures_and_learning_rate() -> None:
    dead = [relu("a", 1.0)]
    found = D.depth_causes(dead, [], D.ModelFacts(normalisation=True, residual=True, post_ln=4), onset())
    assert [c.key for c in found] == ["blowup", "dead"]
    text = found[0].figures
    assert "the training loss jumped from 9.3 (median of the 3 steps before) to 29 (×3.1) at step 3" in text
    assert (
        "22 steps before the vanishing was first flagged (step 25); the check at step 0 was healthy" in text
    )
    assert "the learning rate was 0.1" in text
    keys = [f.key for f in found[0].fixes]
    assert keys == ["lr", "warmup", "clip", "guard"]
    assert "the 4 transformer layers with norm_first=False (post-LN) need one" in texts(found[0])[1]
    protected = D.blowup_cause(onset(), D.ModelFacts(clipping=True, guard=True))
    assert protected is not None and [f.key for f in protected.fixes] == ["lr", "warmup"]
    assert D.blowup_cause(D.Onset(first_flagged=0), D.ModelFacts()) is None


def test_time_causes_radius_and_forget_gates() -> None:
    h = D.GateFigures("h", 0.0, 0.0, 0.93, 0.0, math.nan)
    [radius] = D.time_causes("rnn", "RNN_TANH", 16, {"l0": 0.491}, {"h": h}, 90, D.ModelFacts(), None)
    assert radius.key == "radius" and radius.decades == pytest.approx(-90 * math.log10(0.491 * 0.93))
    assert "shrinks like 0.491^T, 1.6e-28 over the 90 steps between the ends" in radius.figures
    assert "gated cell (nn.LSTM / nn.GRU) instead of `rnn`" in texts(radius)[1]
    assert D.time_causes("rnn", "RNN_TANH", 16, {"l0": 1.2}, {"h": h}, 90, D.ModelFacts(), None) == []
    flat = D.GateFigures("h", 0.99, 0.85, 0.003, 0.0, math.nan)
    [saturated] = D.time_causes("rnn", "RNN_TANH", 16, {"l0": 1.2}, {"h": flat}, 30, D.ModelFacts(), None)
    assert saturated.title == "Saturated hidden units"
    assert saturated.decades == pytest.approx(-30 * math.log10(0.003))
    assert "99% of the hidden activations of `rnn` are in the flat region of tanh" in saturated.figures
    closed = D.GateFigures("f", 0.004, 0.0, 0.046, 0.0484, -1.32, best_log10=-1.27, bias=-3.0)
    [forget] = D.time_causes("rnn", "LSTM", 16, {}, {"f": closed}, 90, D.ModelFacts(), None)
    assert forget.decades == pytest.approx(90 * 1.27)
    assert "average 0.048; their bias is -3 (bias_ih + bias_hh, mean)" in forget.figures
    assert "keeps ×0.054 of it per step" in forget.figures
    assert "a forget-gate bias of 1 to 5 in `rnn` (`bias_hh_l0[16:32]`" in texts(forget)[0]
    opened = D.GateFigures("f", 0.0, 0.0, 0.2, 0.65, -0.2, best_log10=-0.06, bias=0.96)
    [still] = D.time_causes("rnn", "LSTM", 32, {}, {"f": opened}, 90, D.ModelFacts(), None)
    assert "a higher forget-gate bias, 3 to 5," in texts(still)[0]
    kept = D.GateFigures("f", 0.0, 0.0, 0.1, 0.95, -0.03, best_log10=-0.005)
    assert D.time_causes("rnn", "LSTM", 32, {}, {"f": kept}, 90, D.ModelFacts(), None) == []  # 0.45 decades


def test_generic_fixes_only_what_the_model_lacks() -> None:
    mlp = D.ModelFacts(normalisation=True, residual=True, activations={"relu": 3})
    assert [f.key for f in D.generic_fixes(mlp, through_time=False)] == ["init"]
    rnn = D.ModelFacts(recurrent={"rnn": "RNN", "lstm": "LSTM"}, activations={"tanh": 1}, residual=False)
    assert [f.key for f in D.generic_fixes(rnn, through_time=True)] == ["gated", "forget"]
    assert [f.key for f in D.generic_fixes(rnn, through_time=False)] == [
        "gated",
        "relu",
        "init",
        "norm",
        "residual",
    ]
    lstm_only = D.ModelFacts(recurrent={"lstm": "LSTM"})
    assert not any(f.key == "gated" for f in D.generic_fixes(lstm_only, through_time=True))


def test_cause_block_numbers_causes_and_gives_each_fix_once() -> None:
    found = D.depth_causes([relu("a", 1.0)], [], D.ModelFacts(), onset())
    block = D.cause_block(found, D.ModelFacts(), through_time=False)
    lines = block.splitlines()
    assert lines[1] == "  Why, strongest measured cause first:"
    assert lines[2].startswith("  1. Collapse after a blow-up: ") and lines[3].startswith("  2. Dead units: ")
    assert block.count("a lower learning rate") == 1  # blow-up and dead units both suggest it: once
    assert D.cause_block([], D.ModelFacts(), True, measured=False).startswith("\n  Causes were not measured")
