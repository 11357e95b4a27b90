"""VanishingGradientMonitor names the measured cause: real fits, each cause against an independent reference.

* a deep sigmoid MLP: saturating activations (the product of the mean σ' across depth, recomputed in
  float64 from the recorded weights and batch);
* a ReLU MLP with hidden biases -1: dead units (units never active over the batch, recomputed);
* a tanh RNN with spectral radius 0.5: the radius (numpy's eigenvalues) and the mean tanh' (recomputed);
* an LSTM with forget-gate bias -3: closed forget gates (an LSTM stepped in float64 from the equations);
* a small transformer at Adam lr 1: the blow-up, its step and figures (the model's own loss record) and
  the learning rate.

Healthy models get no warning at all (pytest turns any lightning-clip warning into an error): a ReLU MLP
with BatchNorm, a small transformer with AdamW, and the demo's LSTM once it has learnt.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard
from lightning_clip.callbacks.vanishing_monitor import VanishingGradientMonitor
from lightning_clip.exceptions import VanishingGradientWarning
from tests.models import make_trainer
from tests.vanishing_models import (
    MLP,
    DeepMLP,
    SequenceModel,
    TinyTransformer,
    first_jump,
    geometric_mean,
    mlp_loader,
    pre_activations,
    radius,
    recurrent_reference,
    sequence_loader,
    transformer_loader,
)


def fit(
    tmp_path: Any, model: Any, loader: DataLoader, steps: int, callbacks: tuple[Any, ...] = (), **kw: Any
) -> tuple[VanishingGradientMonitor, list[str]]:
    torch.manual_seed(0)
    model.record_steps = set(range(0, steps, 25))
    monitor = VanishingGradientMonitor(save_figure=False, **kw)
    trainer = make_trainer(tmp_path, max_steps=steps, callbacks=[*callbacks, monitor], deterministic=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", VanishingGradientWarning)
        trainer.fit(model, loader)
    return monitor, [str(w.message) for w in record if issubclass(w.category, VanishingGradientWarning)]


def cause_lines(message: str) -> list[str]:
    return re.findall(r"^  \d\. ([^:]+):", message, flags=re.MULTILINE)


def test_deep_sigmoid_mlp_names_saturation(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = DeepMLP("sigmoid")
    monitor, messages = fit(tmp_path, model, mlp_loader(), 60)
    [msg] = messages
    assert cause_lines(msg) == ["Saturating activations"]
    ev = monitor.last["evidence"]
    assert ev.step == 50 and [s.layer for s in ev.sites] == ["inp", *(f"hidden.{i}" for i in range(28))]
    derivs = [torch.sigmoid(a) * (1 - torch.sigmoid(a)) for a in pre_activations(model, 50)]
    for site, d in zip(ev.sites, derivs, strict=True):
        assert site.mean_derivative == pytest.approx(float(d.mean()), rel=1e-5)
        assert site.flat_share == pytest.approx(float((d < 0.025).double().mean()), abs=1e-6)
    product = math.prod(float(d.mean()) for d in derivs)
    assert f"at most 0.25^29 = {0.25**29:.1e} across depth" in msg
    assert f"the product of their mean derivatives is {product:.1e}" in msg
    fixes = msg.split("Fixes that fit this model")[1]
    assert "ReLU-family" in fixes and "normalisation" in fixes and "residual" in fixes
    assert "LSTM" not in msg and "GRU" not in msg  # not a recurrent model


def test_relu_mlp_with_negative_bias_names_dead_units(tmp_path: Any) -> None:
    model = MLP("relu", bias=-1.0)
    monitor, messages = fit(tmp_path, model, mlp_loader(), 60)
    [msg] = messages
    assert cause_lines(msg)[0] == "Dead units"
    ev = monitor.last["evidence"]
    dead = [float((a <= 0).all(dim=0).double().mean()) for a in pre_activations(model, ev.step)]
    assert [s.dead_share for s in ev.sites] == pytest.approx(dead)  # every ReLU layer
    assert 0.2 < dead[0] < 0.8 and dead[1:] == [1.0] * 8  # the input layer partly, the rest entirely
    named = sum(d >= 0.5 for d in dead)
    assert f"{named} ReLU layers of 9 have at least 50% of their units never active" in msg
    assert "negative biases (mean -1, median over layers)" in msg
    assert "biases initialised at 0 (nn.init.zeros_)" in msg and "LeakyReLU" in msg
    # the second cause, the weight scale: rms(W)·√fan_in of every hidden layer, from the recorded weights
    weights = model.seen[ev.step]["weights"]
    scales = {
        n: float(
            weights[f"{n}.weight"].double().pow(2).mean().sqrt() * math.sqrt(weights[f"{n}.weight"].shape[1])
        )
        for n in model.names()
    }
    assert {c.layer: c.scale for c in ev.scales} == pytest.approx(scales, rel=1e-5)
    assert cause_lines(msg)[1] == "Initialisation"
    median = sorted(scales.values())[len(scales) // 2]
    assert f"have rms(W)·√fan_in {median:.2g} (median) where relu needs 1.4 (nn.init.calculate_gain)" in msg


def test_tanh_rnn_with_radius_half_names_the_radius(tmp_path: Any) -> None:
    model = SequenceModel("rnn")
    monitor, messages = fit(tmp_path, model, sequence_loader(), 60)
    [msg] = [m for m in messages if "through time" in m]
    assert cause_lines(msg) == ["Recurrent spectral radius"]
    expected = radius(model.seen[50]["weights"]["rnn.weight_hh_l0"])
    got = re.search(r"the spectral radius of `rnn.weight_hh_l0` is ([0-9.]+)", msg)
    assert got is not None and float(got.group(1)) == pytest.approx(expected, rel=1e-3)
    h = recurrent_reference(model, 50)["h"]
    tanh_d = float((1 - h * h).mean())
    assert monitor.last["evidence"].gates["rnn"]["h"].mean_derivative == pytest.approx(tanh_d, rel=1e-5)
    assert f"mean tanh' of its units ({tanh_d:.2g})" in msg
    assert "nn.init.orthogonal_" in msg and "nn.LSTM / nn.GRU" in msg


def test_lstm_with_forget_bias_minus_3_names_closed_forget_gates(tmp_path: Any) -> None:
    model = SequenceModel("lstm_forget-3")
    monitor, messages = fit(tmp_path, model, sequence_loader(), 60)
    [msg] = messages
    assert cause_lines(msg) == ["Closed forget gates"]
    f = recurrent_reference(model, 50)["f"]  # (T, B, H)
    gate = monitor.last["evidence"].gates["rnn"]["f"]
    assert gate.mean == pytest.approx(float(f.mean()), rel=1e-5)
    best = max(geometric_mean(f[:, :, u]) for u in range(f.shape[2]))
    assert 10**gate.best_log10 == pytest.approx(best, rel=1e-4)
    assert f"average {float(f.mean()):.2g}; their bias is -3" in msg
    assert f"keeps ×{best:.2g} of it per step" in msg
    assert "a forget-gate bias of 1 to 5 in `rnn`" in msg


def test_blowup_names_the_jump_and_the_learning_rate(tmp_path: Any) -> None:
    model = TinyTransformer()
    model.lr = 1.0
    _, messages = fit(tmp_path, model, transformer_loader(), 80)
    [msg] = messages
    assert cause_lines(msg)[0] == "Collapse after a blow-up"
    reference = first_jump(model.losses, factor=1.5)
    assert reference is not None
    step, base, value = reference
    assert f"jumped from {base:.2g} (median of the {step} step" in msg
    assert f"to {value:.2g} (×{value / base:.3g}) at step {step}," in msg
    assert "the check at step 0 was healthy; the learning rate was 1." in msg
    assert "a lower learning rate (1; try a tenth of it)" in msg
    assert "AdaptiveGradientClipping" in msg and "ExplosionGuard" in msg  # neither is in the Trainer
    assert "normalisation layers" not in msg and "residual (skip)" not in msg  # it has both


@pytest.mark.parametrize("setup", ["none", "clipper", "clip_val", "guard"])
def test_model_facts_see_the_callbacks_and_the_structure(tmp_path: Any, setup: str) -> None:
    """What the fixes are filtered by: clipping and the guard in the Trainer, normalisation, residual
    connections and post-LN transformer layers in the model."""
    callbacks = {"clipper": (AdaptiveGradientClipping(),), "guard": (ExplosionGuard(),)}.get(setup, ())
    monitor = VanishingGradientMonitor(save_figure=False, log_layer_metrics=True)
    kw = {"gradient_clip_val": 1.0} if setup == "clip_val" else {}
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[*callbacks, monitor], **kw)
    trainer.fit(TinyTransformer(), transformer_loader())
    facts = monitor.probe.facts
    assert facts.clipping == (setup in ("clipper", "clip_val")) and facts.guard == (setup == "guard")
    assert facts.normalisation and facts.residual is True and facts.post_ln == 2
    assert facts.recurrent == {} and facts.activations == {"relu": 2}


# ----------------------------------------------------------------------------------------- healthy
@pytest.mark.parametrize("kind", ["relu_batchnorm", "transformer_adamw"])
def test_healthy_models_get_no_warning_with_every_check_analysed(tmp_path: Any, kind: str) -> None:
    if kind == "relu_batchnorm":
        model: Any = MLP("relu", depth=12, batchnorm=True)
        loader = mlp_loader()
    else:
        model = TinyTransformer()
        model.optimizer = "adamw"
        loader = transformer_loader()
    monitor, messages = fit(tmp_path, model, loader, 200, log_layer_metrics=True)  # analyses every check
    assert messages == []
    ev = monitor.last["evidence"]
    assert ev is not None and ev.step == 175 and ev.sites
    assert max(s.dead_share for s in ev.sites) < 0.5
    assert monitor.last["causes"] == {}


def _demo() -> Any:
    path = Path(__file__).resolve().parents[2] / "examples" / "adding_problem.py"
    spec = importlib.util.spec_from_file_location("adding_problem_causes", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["adding_problem_causes"] = module
    spec.loader.exec_module(module)
    return module


def test_demo_lstm_is_silent_once_it_has_learnt(tmp_path: Any) -> None:
    """The demo's `lstm` variant (T = 100, Adam 0.01, forget-gate bias 1, check every 25 steps): its
    through-time decay at init is real (one warning at step 50, naming the forget gates); once it learns
    the long dependency no warning follows."""
    demo = _demo()
    torch.manual_seed(0)
    model = demo.SequenceRegressor("lstm", hidden=32, optimizer="adam", lr=0.01, stop_on_divergence=False)
    loader = DataLoader(demo.AddingProblem(64, 100, seed=0), batch_size=None)
    monitor, messages = fit(tmp_path, model, loader, 700)
    mse = demo.evaluate(model, demo.validation_set(500, 100))
    assert mse < demo.SOLVED_MSE  # it has learnt
    assert len(messages) == 1 and "at step 50:" in messages[0] and "Closed forget gates" in messages[0]
    assert "a higher forget-gate bias, 3 to 5," in messages[0]  # it has 1 already
    decay = monitor.last["time_decay"]["rnn"][0]
    assert decay > 1e-2  # healthy through time at the last check


# ------------------------------------------------------------------------------- counts and switches
def test_depth_message_counts_match_the_monitor_figures(tmp_path: Any) -> None:
    monitor, messages = fit(tmp_path, DeepMLP("sigmoid"), mlp_loader(), 60)
    [msg] = messages
    fig = monitor.last
    due = [k.split(":", 1)[1] for k in fig["warned"] if k.startswith("depth:")]
    below = [
        n for n, r in zip(fig["layers"], fig["depth_ratios"], strict=True) if r < monitor.depth_threshold
    ]
    assert f"at step 50: {len(due)} of {len(fig['layers'])} layers get less than 1e-05" in msg
    listed = re.findall(r"^  (\S+)\s+grad norm", msg, flags=re.MULTILINE)
    assert listed == due[:12]
    more = re.search(r"… and (\d+) more: (.*)$", msg, flags=re.MULTILINE)
    assert more is not None and int(more.group(1)) == len(due) - 12 and more.group(2).split(", ") == due[12:]
    pending = [n for n in below if n not in due]
    if pending:
        assert (
            f"({len(pending)} more layer{'s' if len(pending) > 1 else ''} below the threshold at this check"
            in msg
        )
    assert "already reported" not in msg  # nothing was reported before


def test_measure_causes_off_reads_nothing_and_says_so(tmp_path: Any) -> None:
    monitor, messages = fit(tmp_path, DeepMLP("sigmoid"), mlp_loader(), 60, measure_causes=False)
    [msg] = messages
    assert monitor.last["evidence"] is None and list(monitor.probe.losses) == []
    assert "Causes were not measured (measure_causes=False)." in msg
    assert "ReLU-family activations" in msg  # the generic fixes, still only those that fit


def test_the_documentation_examples_name_their_causes() -> None:
    """`examples/vanishing_causes.py` produces the warnings of docs/callbacks/vanishing_monitor.md: each case
    names its own cause first (`--quick`: the small transformer for the blow-up)."""
    path = Path(__file__).resolve().parents[2] / "examples" / "vanishing_causes.py"
    spec = importlib.util.spec_from_file_location("vanishing_causes_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules["vanishing_causes_example"] = example
    spec.loader.exec_module(example)
    expected = {
        "sigmoid": "Saturating activations",
        "dead": "Dead units",
        "radius": "Recurrent spectral radius",
        "forget": "Closed forget gates",
        "blowup": "Collapse after a blow-up",
    }
    for case, cause in expected.items():
        [msg] = example.run(case, quick=True)
        assert cause_lines(msg)[0] == cause, case


def test_the_blowup_signal_is_shared_with_the_guard(tmp_path: Any) -> None:
    """With ExplosionGuard in the Trainer the step's loss and gradient norm are already on the host: the
    monitor takes those values (its own copy of the loss is dropped, nothing rides on its transfer) and its
    series equal the model's own record of its losses."""
    model = MLP("relu", depth=4)
    monitor, messages = fit(tmp_path, model, mlp_loader(), 30, callbacks=(ExplosionGuard(),))
    assert messages == []
    assert monitor.probe._pending_losses == [] and monitor.probe._pending_norms == []
    assert [s for s, _ in monitor.probe.losses] == list(range(30))
    assert [v for _, v in monitor.probe.losses] == pytest.approx([v for _, v in model.losses], rel=1e-6)
    assert [s for s, _ in monitor.probe.norms] == list(range(30))  # the guard reads every step's norm
    alone, _ = fit(tmp_path / "alone", MLP("relu", depth=4), mlp_loader(), 30)
    # alone, only its own check steps are measured; the last one's norm still waits for the next transfer
    assert [s for s, _ in [*alone.probe.norms, *alone.probe._pending_norms]] == [0, 25]
