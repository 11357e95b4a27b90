"""Per-step training time in a real ``Trainer``: what each clipping set-up adds to a step.

Variants are alternated inside one process: every round runs one short fit per variant (rotating the
order), and a timing callback records the wall time between consecutive ``on_train_batch_start`` calls
(the whole step: forward, backward, every callback, the optimizer). Each fit's median step time is paired
with the bare fit of the same round; the table shows the median of the paired relative differences and a
95% bootstrap confidence interval.

Run: ``python benchmarks/overhead.py [--rounds N] [--steps S] [--models lstm,mlp,many,transformer]``.
"""

from __future__ import annotations

import argparse
import logging
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import AdaptiveGradientClipping

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.stamps.append(time.perf_counter())

    def on_train_end(self, *args: Any) -> None:
        self.stamps.append(time.perf_counter())

    def median_step(self, skip: int = 3) -> float:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)][skip:]
        return statistics.median(gaps)


class ZClipCallback(pl.Callback):
    """ZClip through a minimal ``pytorch_lightning`` callback (its own one needs the ``lightning`` package)."""

    def __init__(self) -> None:
        from zclip import ZClip

        self.zclip = ZClip()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.zclip.step(pl_module)


class Model(pl.LightningModule):
    def __init__(self, net: nn.Module, loss: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        super().__init__()
        self.net = net
        self.loss = loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss(self.net, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class LSTMLM(nn.Module):
    def __init__(self, vocab: int = 1000, dim: int = 256) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(self.emb(x))[0])


def _lm_loss(net: nn.Module, batch: Any) -> torch.Tensor:
    (x,) = batch
    logits = net(x[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def _mse_loss(net: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(net(x), y)


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 1000, dim: int = 128) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.enc(self.emb(x)))


def build(name: str) -> tuple[Model, DataLoader]:
    """The benchmark models: (module, loader)."""
    g = torch.Generator().manual_seed(0)
    if name == "lstm":  # ≈ 1.0M parameters
        tokens = torch.randint(0, 1000, (256, 33), generator=g)
        return Model(LSTMLM(), _lm_loss), DataLoader(TensorDataset(tokens), batch_size=16)
    if name == "transformer":  # ≈ 1.0M parameters, 4 layers
        tokens = torch.randint(0, 1000, (256, 33), generator=g)
        return Model(TinyTransformer(), _lm_loss), DataLoader(TensorDataset(tokens), batch_size=16)
    if name == "mlp":  # ≈ 10.5M parameters
        net = nn.Sequential(
            nn.Linear(1024, 2048),
            nn.ReLU(),
            *[m for _ in range(2) for m in (nn.Linear(2048, 2048), nn.ReLU())],
            nn.Linear(2048, 1),
        )
        x, y = torch.randn(512, 1024, generator=g), torch.randn(512, 1, generator=g)
        return Model(net, _mse_loss), DataLoader(TensorDataset(x, y), batch_size=32)
    if name == "many":  # 512 parameter tensors
        net = nn.Sequential(
            *[m for _ in range(128) for m in (nn.Linear(32, 32), nn.LayerNorm(32))], nn.Linear(32, 1)
        )
        x, y = torch.randn(512, 32, generator=g), torch.randn(512, 1, generator=g)
        return Model(net, _mse_loss), DataLoader(TensorDataset(x, y), batch_size=32)
    raise ValueError(f"`model` must be one of 'lstm' | 'transformer' | 'mlp' | 'many', got {name!r}.")


def variants() -> dict[str, Callable[[], tuple[list[pl.Callback], dict[str, Any]]]]:
    def all_three() -> tuple[list[pl.Callback], dict[str, Any]]:
        from lightning_clip import ExplosionGuard, VanishingGradientMonitor  # type: ignore[attr-defined]

        return [AdaptiveGradientClipping(), ExplosionGuard(), VanishingGradientMonitor()], {}

    return {
        "bare": lambda: ([], {}),
        "gradient_clip_val=1.0": lambda: ([], {"gradient_clip_val": 1.0}),
        "AdaptiveGradientClipping": lambda: ([AdaptiveGradientClipping()], {}),
        "all three callbacks": all_three,
        "ZClip callback": lambda: ([ZClipCallback()], {}),
    }


def run_fit(
    model_name: str, make: Callable[[], tuple[list[pl.Callback], dict[str, Any]]], steps: int
) -> float:
    torch.manual_seed(0)
    module, loader = build(model_name)
    callbacks, extra = make()
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, *callbacks],
        **extra,
    )
    trainer.fit(module, loader)
    return timer.median_step()


def bootstrap_ci(values: list[float], n: int = 2000) -> tuple[float, float]:
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="lstm,transformer,mlp,many")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# overhead: torch {torch.__version__}, pytorch-lightning {pl.__version__}, {platform.machine()}, "
        f"{args.threads} thread(s), {args.rounds} rounds × {args.steps} steps per variant, alternated"
    )
    names = list(variants())
    print("| model | bare step | " + " | ".join(n for n in names if n != "bare") + " |")
    print("|" + "---|" * (1 + len(names)))
    for model_name in args.models.split(","):
        per: dict[str, list[float]] = {n: [] for n in names}
        makers = variants()
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                try:
                    per[name].append(run_fit(model_name, makers[name], args.steps))
                except ImportError:
                    per[name].append(float("nan"))
        cells = []
        for name in names[1:]:
            rel = [(v - b) / b * 100 for v, b in zip(per[name], per["bare"], strict=True)]
            if any(v != v for v in rel):
                cells.append("n/a")
                continue
            lo, hi = bootstrap_ci(rel)
            cells.append(f"{statistics.median(rel):+.1f}% [{lo:+.1f}, {hi:+.1f}]")
        print(f"| {model_name} | {statistics.median(per['bare']) * 1e3:.2f} ms | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
