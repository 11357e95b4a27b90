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
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip.callbacks.vanishing_monitor import VanishingGradientMonitor
from lightning_clip.exceptions import VanishingGradientWarning
from tests.models import make_trainer

SEQ_LEN, FEATURES, HIDDEN, BATCH = 100, 2, 16, 16


class Regressor(pl.LightningModule):
    """Adam (lr 1e-3), MSE or cross-entropy loss; subclasses build ``self.body``."""

    classify = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        if self.classify:
            return nn.functional.cross_entropy(out, y)
        return nn.functional.mse_loss(out, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class DeepMLP(Regressor):
    """30 Linear layers, width 16: ``sigmoid`` (plain), ``relu_residual`` (h + W relu(h)) or
    ``relu_layernorm`` (relu(LayerNorm(W h))). PyTorch's default init everywhere."""

    def __init__(self, kind: str, depth: int = 30, width: int = 16) -> None:
        super().__init__()
        self.kind = kind
        self.inp = nn.Linear(8, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 2))
        self.norms = (
            nn.ModuleList(nn.LayerNorm(width) for _ in range(depth - 2)) if kind == "relu_layernorm" else None
        )
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = torch.sigmoid if self.kind == "sigmoid" else torch.relu
        h = act(self.inp(x))
        for i, layer in enumerate(self.hidden):
            if self.kind == "relu_residual":
                h = h + layer(act(h))
            elif self.norms is not None:
                h = act(self.norms[i](layer(h)))
            else:
                h = act(layer(h))
        return self.out(h)


def mlp_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, 1, generator=g))
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


class TinyTransformer(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 16)
        layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(self.inp(x)).mean(dim=1))


def transformer_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, 4, generator=g)
    y = x[:, :, 0].cumsum(1)[:, -1:].tanh()
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


class SmallCNN(Regressor):
    classify = True

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def cnn_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1, 8, 8, generator=g)
    y = (x[:, 0, :4, :4].mean((1, 2)) > 0).long() + 2 * (x[:, 0, 4:, 4:].mean((1, 2)) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


class SequenceModel(Regressor):
    """A recurrent layer over 100 steps, the loss on the last output; the target needs the first inputs.

    ``rnn``: tanh RNN with recurrent weights rescaled to spectral radius 0.5; ``lstm_forget5``: LSTM with
    forget-gate bias 5 (i f g o order: rows H..2H); ``lstm``: LSTM, default init."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "rnn":
            self.rnn: nn.RNNBase = nn.RNN(FEATURES, HIDDEN, batch_first=True, nonlinearity="tanh")
            with torch.no_grad():
                w = self.rnn.weight_hh_l0
                w.mul_(0.5 / torch.linalg.eigvals(w.double()).abs().max().float())
        else:
            self.rnn = nn.LSTM(FEATURES, HIDDEN, batch_first=True)
            if kind == "lstm_forget5":
                with torch.no_grad():
                    self.rnn.bias_ih_l0[HIDDEN : 2 * HIDDEN].fill_(5.0)
                    self.rnn.bias_hh_l0[HIDDEN : 2 * HIDDEN].zero_()
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def sequence_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, SEQ_LEN, FEATURES, generator=g)
    y = x[:, :5, 0].mean(1, keepdim=True)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


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
