"""Each cause VanishingGradientMonitor names, produced by a real fit: the warnings shown in
``docs/callbacks/vanishing_monitor.md`` come from this script.

Cases (defaults of the monitor: a check every 25 steps, patience 3, so a warning comes at step 50 at the
earliest):

* ``sigmoid``: a 30-layer sigmoid MLP, PyTorch's default init, Adam at 1e-3: saturating activations.
* ``dead``: a 10-layer ReLU MLP whose hidden biases start at -1: dead units.
* ``radius``: a tanh RNN over 100 time steps, recurrent weights of spectral radius 0.5: the radius.
* ``forget``: an LSTM over 100 time steps with forget-gate bias -3: closed forget gates.
* ``blowup``: Lightning's demo Transformer (``pytorch_lightning.demos.Transformer``) as a word-level
  language model of CPython's own documentation text (``pydoc_data.topics``), Adam at lr 0.1: the loss
  blows up in the first steps and the network collapses (about 90 s on one CPU thread). ``--quick`` uses a
  small transformer encoder at lr 1 instead (a second).

Run ``python examples/vanishing_causes.py [--only sigmoid dead ...] [--quick]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_clip import VanishingGradientMonitor, VanishingGradientWarning


class Regressor(pl.LightningModule):
    """An MSE regressor around ``net``, ``optimizer`` at ``lr``."""

    def __init__(self, net: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class MLP(nn.Module):
    """``depth`` Linear layers of width ``width``, ``act`` called in forward between them."""

    def __init__(self, act: str, depth: int, width: int, bias: float | None = None) -> None:
        super().__init__()
        self.act = getattr(torch, act)
        self.inp = nn.Linear(8, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 2))
        self.out = nn.Linear(width, 1)
        if bias is not None:
            with torch.no_grad():
                for lin in [self.inp, *self.hidden]:
                    lin.bias.fill_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin in [self.inp, *self.hidden]:
            x = self.act(lin(x))
        return self.out(x)


class Recurrent(nn.Module):
    """A recurrent layer over the sequence, a linear head on the last output."""

    def __init__(self, cell: str, radius: float | None = None, forget: float | None = None) -> None:
        super().__init__()
        if cell == "rnn":
            self.rnn: nn.RNNBase = nn.RNN(2, 16, batch_first=True)
            with torch.no_grad():
                w = self.rnn.weight_hh_l0
                w.mul_((radius or 1.0) / torch.linalg.eigvals(w.double()).abs().max().float())
        else:
            self.rnn = nn.LSTM(2, 16, batch_first=True)
            with torch.no_grad():
                self.rnn.bias_ih_l0[16:32].fill_(forget or 0.0)
                self.rnn.bias_hh_l0[16:32].zero_()
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 16)
        layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(self.inp(x)).mean(dim=1))


class Words(Dataset):
    """Word-level blocks of CPython's ``pydoc_data.topics`` (tokenised like Lightning's WikiText2 demo)."""

    def __init__(self, block: int = 35) -> None:
        import pydoc_data.topics as topics

        words: list[str] = []
        for text in topics.topics.values():
            for line in text.splitlines():
                words += [*line.split(), "<eos>"]
        vocab: dict[str, int] = {}
        self.data = torch.tensor([vocab.setdefault(w, len(vocab)) for w in words])
        self.vocab_size = len(vocab)
        self.block = block

    def __len__(self) -> int:
        return len(self.data) // self.block - 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = i * self.block
        return self.data[s : s + self.block], self.data[s + 1 : s + self.block + 1]


class LanguageModel(pl.LightningModule):
    """Lightning's demo Transformer (2 + 2 layers, 200 wide, dropout 0.2) on ``Words``, Adam at ``lr``."""

    def __init__(self, vocab: int, lr: float) -> None:
        super().__init__()
        from pytorch_lightning.demos.transformer import Transformer

        self.model = Transformer(vocab_size=vocab)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.nll_loss(self.model(x, y), y.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _regression(n: int = 512) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return DataLoader(TensorDataset(x, torch.sin(x @ torch.randn(8, 1, generator=g))), batch_size=16)


def _sequences() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 100, 2, generator=g)
    return DataLoader(TensorDataset(x, x[:, :5, 0].mean(1, keepdim=True)), batch_size=16)


def _encoder_data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, 4, generator=g)
    return DataLoader(TensorDataset(x, x[:, :, 0].cumsum(1)[:, -1:].tanh()), batch_size=16)


def case(name: str, quick: bool) -> tuple[pl.LightningModule, DataLoader, int]:
    """The model, data and steps of a case."""
    if name == "sigmoid":
        return Regressor(MLP("sigmoid", 30, 16)), _regression(), 60
    if name == "dead":
        return Regressor(MLP("relu", 10, 32, bias=-1.0)), _regression(), 60
    if name == "radius":
        return Regressor(Recurrent("rnn", radius=0.5)), _sequences(), 60
    if name == "forget":
        return Regressor(Recurrent("lstm", forget=-3.0)), _sequences(), 60
    if name == "blowup" and quick:
        return Regressor(Encoder(), lr=1.0), _encoder_data(), 80
    if name == "blowup":
        words = Words()
        loader = DataLoader(words, batch_size=20, shuffle=True, generator=torch.Generator().manual_seed(0))
        return LanguageModel(words.vocab_size, lr=0.1), loader, 100
    raise ValueError(f"`case` must be one of {', '.join(CASES)}, got {name!r}.")


CASES = ("sigmoid", "dead", "radius", "forget", "blowup")


def run(name: str, quick: bool = False, seed: int = 0) -> list[str]:
    """Fit a case with ``VanishingGradientMonitor()`` at its defaults; returns the warnings' texts."""
    pl.seed_everything(seed, verbose=False)
    model, loader, steps = case(name, quick)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[VanishingGradientMonitor(save_figure=False)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", VanishingGradientWarning)
        trainer.fit(model, loader)
    return [str(w.message) for w in caught if issubclass(w.category, VanishingGradientWarning)]


def main(argv: Sequence[str] | None = None) -> dict[str, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--only", nargs="*", default=list(CASES), choices=CASES)
    parser.add_argument("--quick", action="store_true", help="the small transformer for `blowup`")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|isinstance.treespec|GPU).*")
    out = {}
    for name in args.only:
        messages = run(name, args.quick)
        out[name] = messages
        print(f"## {name}: {len(messages)} warning{'s' if len(messages) != 1 else ''}\n")
        for m in messages:
            print("```text\n" + m + "\n```\n", flush=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
