"""Real models for the VanishingGradientMonitor tests (calibration, causes), with what their independent
references need: each records its batch and weights at chosen steps, and its own training loss."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SEQ_LEN, FEATURES, HIDDEN, BATCH = 100, 2, 16, 16


class Regressor(pl.LightningModule):
    """MSE or cross-entropy loss, ``optimizer`` (``adam``, ``adamw``, ``sgd``) at ``lr`` (Adam at 1e-3 by
    default). Records what the references need: the batch and the weights at the steps in
    ``record_steps`` (before that step's update), and the training loss of every step in ``losses``."""

    classify = False
    optimizer = "adam"
    lr = 1e-3

    def __init__(self) -> None:
        super().__init__()
        self.record_steps: set[int] = set()
        self.seen: dict[int, dict[str, Any]] = {}
        self.losses: list[tuple[int, float]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step in self.record_steps:
            weights = {k: v.detach().clone() for k, v in self.state_dict().items()}
            self.seen[self.global_step] = {"x": x.clone(), "weights": weights}
        out = self(x)
        loss = nn.functional.cross_entropy(out, y) if self.classify else nn.functional.mse_loss(out, y)
        self.losses.append((self.global_step, float(loss.detach())))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[self.optimizer]
        return kind(self.parameters(), lr=self.lr)


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

    ``rnn``: tanh RNN with recurrent weights rescaled to spectral radius 0.5; ``lstm_forget<b>``: LSTM with
    forget-gate bias ``b`` (``bias_ih`` rows H..2H, i f g o order; ``bias_hh`` rows zeroed), e.g.
    ``lstm_forget5``, ``lstm_forget-3``; ``lstm``: LSTM, default init."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "rnn":
            self.rnn: nn.RNNBase = nn.RNN(FEATURES, HIDDEN, batch_first=True, nonlinearity="tanh")
            with torch.no_grad():
                w = self.rnn.weight_hh_l0
                w.mul_(0.5 / torch.linalg.eigvals(w.double()).abs().max().float())
        else:
            self.rnn = nn.LSTM(FEATURES, HIDDEN, batch_first=True)
            if kind.startswith("lstm_forget"):
                with torch.no_grad():
                    self.rnn.bias_ih_l0[HIDDEN : 2 * HIDDEN].fill_(float(kind.removeprefix("lstm_forget")))
                    self.rnn.bias_hh_l0[HIDDEN : 2 * HIDDEN].zero_()
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def sequence_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, SEQ_LEN, FEATURES, generator=g)
    y = x[:, :5, 0].mean(1, keepdim=True)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


class MLP(Regressor):
    """``depth`` Linear layers of width ``width``, ``act`` (``torch.<act>``, called in forward) between them,
    optional BatchNorm before each activation; the hidden layers' biases filled with ``bias`` when given."""

    def __init__(
        self, act: str, depth: int = 10, width: int = 32, batchnorm: bool = False, bias: float | None = None
    ) -> None:
        super().__init__()
        self.act = act
        self.inp = nn.Linear(8, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 2))
        self.norms = nn.ModuleList(nn.BatchNorm1d(width) for _ in range(depth - 1)) if batchnorm else None
        self.out = nn.Linear(width, 1)
        if bias is not None:
            with torch.no_grad():
                for lin in [self.inp, *self.hidden]:
                    lin.bias.fill_(bias)

    def names(self) -> list[str]:
        return ["inp", *(f"hidden.{i}" for i in range(len(self.hidden)))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, lin in enumerate([self.inp, *self.hidden]):
            x = lin(x)
            if self.norms is not None:
                x = self.norms[i](x)
            x = getattr(torch, self.act)(x)
        return self.out(x)


def pre_activations(model: DeepMLP | MLP, step: int) -> list[torch.Tensor]:
    """Reference: each hidden layer's pre-activation at ``step``, recomputed in float64 from the recorded
    weights and batch (BatchNorm in training mode: batch statistics, biased variance)."""
    rec = model.seen[step]
    w = {k: v.double() for k, v in rec["weights"].items()}
    act = (
        torch.sigmoid
        if getattr(model, "kind", "") == "sigmoid"
        else getattr(torch, getattr(model, "act", "relu"))
    )
    names = ["inp", *(f"hidden.{i}" for i in range(len(model.hidden)))]
    h, out = rec["x"].double(), []
    for i, name in enumerate(names):
        a = h @ w[f"{name}.weight"].T + w[f"{name}.bias"]
        if isinstance(model, MLP) and model.norms is not None:
            a = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + 1e-5)
            a = a * w[f"norms.{i}.weight"] + w[f"norms.{i}.bias"]
        out.append(a)
        h = act(a)
    return out


def recurrent_reference(model: SequenceModel, step: int) -> dict[str, torch.Tensor]:
    """Reference: the recurrent layer's gates (LSTM ``i f g o``) or hidden states (RNN ``h``) at ``step``,
    ``(T, B, H)``, stepped in float64 from the recorded weights and batch, from the equations in the torch
    docs."""
    rec = model.seen[step]
    w = {k.removeprefix("rnn."): v.double() for k, v in rec["weights"].items() if k.startswith("rnn.")}
    x = rec["x"].double().transpose(0, 1)  # (T, B, F)
    b = w["bias_ih_l0"] + w["bias_hh_l0"]
    h = torch.zeros(x.shape[1], HIDDEN, dtype=torch.float64)
    c = torch.zeros_like(h)
    out: dict[str, list[torch.Tensor]] = {}
    for t in range(x.shape[0]):
        z = x[t] @ w["weight_ih_l0"].T + h @ w["weight_hh_l0"].T + b
        if isinstance(model.rnn, nn.RNN):
            h = torch.tanh(z)
            out.setdefault("h", []).append(h)
            continue
        i, f, g, o = (z[:, k * HIDDEN : (k + 1) * HIDDEN] for k in range(4))
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        for name, v in zip("ifgo", (i, f, g, o), strict=True):
            out.setdefault(name, []).append(v)
    return {k: torch.stack(v) for k, v in out.items()}


def first_jump(
    losses: list[tuple[int, float]], factor: float, window: int = 10
) -> tuple[int, float, float] | None:
    """Reference: the first step whose loss is above ``factor`` × the median of the (up to ``window``)
    losses before it and above all of them: ``(step, median, loss)`` (a plain loop over the model's own
    record, the statistics module's median)."""
    import statistics

    for i in range(1, len(losses)):
        before = [v for _, v in losses[:i]]
        base = statistics.median(before[-window:])
        if losses[i][1] > factor * base and losses[i][1] > max(before):
            return losses[i][0], base, losses[i][1]
    return None


def radius(weight: torch.Tensor) -> float:
    """Reference spectral radius: numpy's eigenvalues in float64."""
    import numpy as np

    return float(np.abs(np.linalg.eigvals(weight.double().numpy())).max())


def geometric_mean(x: torch.Tensor) -> float:
    return float(torch.exp(torch.log(x.double()).mean()))
