"""Calibration of VanishingGradientMonitor's DEFAULT thresholds on real models trained a few hundred steps.

Must warn: a 30-layer sigmoid MLP with default init (through depth, naming the input-side layers) and a
vanilla tanh RNN over 100-step sequences with recurrent spectral radius 0.5 and the loss on the last output
(through time, naming the recurrent layer and the decay). Must stay silent (pytest turns any
lightning-clip warning into an error): the same MLP with ReLU and residual connections, with ReLU and
LayerNorm, a small transformer encoder, a small CNN with BatchNorm, and an LSTM on the same sequences with
forget-gate bias 5. The default-init LSTM's behaviour is pinned too (documented in the README).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_clip.callbacks.vanishing_monitor import VanishingGradientMonitor
from lightning_clip.exceptions import VanishingGradientWarning
from tests.models import make_trainer
from tests.vanishing_models import (
    SEQ_LEN,
    DeepMLP,
    SequenceModel,
    SmallCNN,
    TinyTransformer,
    cnn_loader,
    mlp_loader,
    sequence_loader,
    transformer_loader,
)


def fit(tmp_path: Any, model: pl.LightningModule, loader: DataLoader, steps: int) -> VanishingGradientMonitor:
    torch.manual_seed(0)
    monitor = VanishingGradientMonitor(save_figure=False)  # default thresholds, check every 25, patience 3
    make_trainer(tmp_path, max_steps=steps, callbacks=[monitor]).fit(model, loader)
    assert len(monitor.history) == (steps - 1) // 25 + 1  # every check ran
    return monitor


def test_warns_on_deep_sigmoid_mlp_naming_input_side_layers(tmp_path: Any) -> None:
    torch.manual_seed(0)
    with pytest.warns(VanishingGradientWarning, match="through depth") as record:
        monitor = fit(tmp_path, DeepMLP("sigmoid"), mlp_loader(), 60)
    messages = [str(w.message) for w in record if w.category is VanishingGradientWarning]
    assert len(messages) == 1  # once per episode, not at every check
    msg = messages[0]
    assert "at step 50" in msg  # third check (steps 0, 25, 50): patience 3
    named = re.findall(r"^  (\S+)\s+grad norm", msg, flags=re.MULTILINE)
    assert named[:3] == ["inp", "hidden.0", "hidden.1"]  # the input-side layers, input side first
    assert "out" not in named and "largest layer (`out`" in msg
    assert "Input-side / output-side gradient norm (`inp` / `out`)" in msg
    assert "ReLU" in msg and "residual" in msg
    ratios = dict(zip(monitor.last["layers"], monitor.last["depth_ratios"], strict=True))
    assert ratios["inp"] < 1e-5 and ratios["out"] > 1e-2


@pytest.mark.parametrize("kind", ["relu_residual", "relu_layernorm"])
def test_silent_on_relu_mlp_with_residuals_or_layernorm(tmp_path: Any, kind: str) -> None:
    monitor = fit(tmp_path, DeepMLP(kind), mlp_loader(), 300)
    assert min(monitor.last["depth_ratios"]) > 1e-5


def test_silent_on_small_transformer(tmp_path: Any) -> None:
    monitor = fit(tmp_path, TinyTransformer(), transformer_loader(), 200)
    assert min(monitor.last["depth_ratios"]) > 1e-5


def test_silent_on_small_cnn_with_batchnorm(tmp_path: Any) -> None:
    monitor = fit(tmp_path, SmallCNN(), cnn_loader(), 200)
    assert min(monitor.last["depth_ratios"]) > 1e-5


def test_warns_on_tanh_rnn_with_small_spectral_radius(tmp_path: Any) -> None:
    model = SequenceModel("rnn")
    with pytest.warns(VanishingGradientWarning, match="through time") as record:
        fit(tmp_path, model, sequence_loader(), 60)
    messages = [str(w.message) for w in record if "through time" in str(w.message)]
    assert len(messages) == 1
    msg = messages[0]
    assert "`rnn` (RNN, tanh) at step 50" in msg
    assert "the earliest 10 of 100 time steps" in msg
    radius = re.search(r"per block: l0 ([0-9.e+-]+)", msg)
    assert radius is not None
    # reference: the eigenvalues of the trained recurrent matrix, computed here in float64
    expected = torch.linalg.eigvals(model.rnn.weight_hh_l0.detach().double()).abs().max().item()
    assert float(radius.group(1)) == pytest.approx(expected, rel=1e-2)
    assert "LSTM" in msg


def test_silent_on_lstm_with_forget_gate_bias_5(tmp_path: Any) -> None:
    monitor = fit(tmp_path, SequenceModel("lstm_forget5"), sequence_loader(), 300)
    decay, _, steps = monitor.last["time_decay"]["rnn"]
    assert steps == SEQ_LEN and decay > 1e-4


def test_default_lstm_loses_gradient_through_100_steps(tmp_path: Any) -> None:
    """What the README documents: forget gates ≈ sigmoid(0) = 0.5 at init shrink the error ~0.5 per step,
    and on this task 100 steps of training do not open them: the monitor warns through time."""
    with pytest.warns(VanishingGradientWarning, match="through time in `rnn` \\(LSTM\\)"):
        monitor = fit(tmp_path, SequenceModel("lstm"), sequence_loader(), 60)
    assert monitor.last["time_decay"]["rnn"][0] < 1e-4
