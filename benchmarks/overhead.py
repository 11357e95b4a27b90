"""Per-step training time in a real ``Trainer``: what each clipping set-up adds to a step.

All variants run inside ONE fit, alternated step by step: the steps are cut into blocks of one step per
variant, in a seeded random order inside each block, and an ``Alternator`` callback forwards the per-batch
hooks (``on_train_batch_start`` … ``on_train_batch_end``) to the callbacks of the variant that owns the
step, and the lifecycle hooks (setup, fit/train start and end, checkpoints) to every variant. The wall
time between consecutive ``on_train_batch_start`` calls (the whole step: data, forward, backward, every
callback, the optimizer) is charged to the step's variant. Per block, each variant is paired with the bare
step of the same block; the table shows the median of the paired differences relative to the median bare
step, with a 95% bootstrap confidence interval. Slow drifts of the machine hit every variant alike.

Variants: ``bare``; ``gradient_clip_val=1.0`` (Lightning's own code path: the precision plugin's
``clip_gradients``, as ``configure_gradient_clipping`` calls it); ``AdaptiveGradientClipping``; all three
lightning-clip callbacks at their defaults (``ExplosionGuard`` snapshots every 50 *of its own* steps:
its cadence follows ``global_step``, so it is given ``snapshot_every_n_steps=50 × variants`` here to keep
one snapshot per 50 of the steps it sees); ZClip 1.0.0 through a minimal ``pytorch_lightning`` callback.

Run: ``python benchmarks/overhead.py [--blocks N] [--threads T] [--models lstm,transformer,mlp,many]``.
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
from pytorch_lightning.utilities.enums import GradClipAlgorithmType
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import AdaptiveGradientClipping
from lightning_clip.step import share_step_tracker

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)


_EVERY_VARIANT = (
    "setup",
    "teardown",
    "on_fit_start",
    "on_fit_end",
    "on_train_start",
    "on_train_end",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_save_checkpoint",
    "on_load_checkpoint",
)
_ACTIVE_VARIANT = (
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


class Alternator(pl.Callback):
    """Runs several callback sets in one fit, one set per step, and times every step."""

    def __init__(self, variants: dict[str, list[pl.Callback]], seed: int = 0) -> None:
        self.variants = variants
        self.names = list(variants)
        self.rng = random.Random(seed)
        self.order: list[str] = []
        self.active = self.names[0]
        self.block = -1
        self.stamp: float | None = None
        #: variant -> {block: step time in seconds}
        self.times: dict[str, dict[int, float]] = {n: {} for n in self.names}
        for callbacks in variants.values():  # the callbacks of one variant measure each step once
            share_step_tracker([cb for cb in callbacks if hasattr(cb, "step_tracker")])
        for hook in _EVERY_VARIANT:
            setattr(self, hook, self._to_all(hook))
        for hook in _ACTIVE_VARIANT:
            setattr(self, hook, self._to_active(hook))

    def _to_all(self, hook: str) -> Callable[..., None]:
        def forward(*args: Any, **kwargs: Any) -> None:
            for callbacks in self.variants.values():
                for cb in callbacks:
                    getattr(cb, hook)(*args, **kwargs)

        return forward

    def _to_active(self, hook: str) -> Callable[..., None]:
        def forward(*args: Any, **kwargs: Any) -> None:
            for cb in self.variants[self.active]:
                getattr(cb, hook)(*args, **kwargs)

        return forward

    def _close_step(self) -> None:
        now = time.perf_counter()
        if self.stamp is not None:
            self.times[self.active][self.block] = now - self.stamp
        self.stamp = now

    def on_train_batch_start(self, *args: Any) -> None:
        self._close_step()
        if not self.order:
            self.block += 1
            self.order = self.rng.sample(self.names, len(self.names))
        self.active = self.order.pop()
        for cb in self.variants[self.active]:
            cb.on_train_batch_start(*args)

    def on_train_end(self, *args: Any) -> None:
        self._close_step()
        for callbacks in self.variants.values():
            for cb in callbacks:
                cb.on_train_end(*args)


class LightningGradientClipVal(pl.Callback):
    """What ``Trainer(gradient_clip_val=1.0)`` runs each step (``configure_gradient_clipping``)."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Any) -> None:
        trainer.precision_plugin.clip_gradients(opt, 1.0, GradClipAlgorithmType.NORM)


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


def variants(n_variants: int = 5) -> dict[str, list[pl.Callback]]:
    from lightning_clip import ExplosionGuard, VanishingGradientMonitor

    return {
        "bare": [],
        "gradient_clip_val=1.0": [LightningGradientClipVal()],
        "AdaptiveGradientClipping": [AdaptiveGradientClipping()],
        "all three callbacks": [
            AdaptiveGradientClipping(),
            ExplosionGuard(snapshot_every_n_steps=50 * n_variants),
            VanishingGradientMonitor(save_figure=False),
        ],
        "ZClip callback": [ZClipCallback()],
    }


def run_model(model_name: str, blocks: int) -> dict[str, dict[int, float]]:
    torch.manual_seed(0)
    module, loader = build(model_name)
    alternator = Alternator(variants())
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=blocks * len(alternator.names),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[alternator],
    )
    trainer.fit(module, loader)
    return alternator.times


def bootstrap_ci(values: list[float], n: int = 2000) -> tuple[float, float]:
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=100, help="steps per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="lstm,transformer,mlp,many")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# overhead: torch {torch.__version__}, pytorch-lightning {pl.__version__}, {platform.machine()}, "
        f"{args.threads} thread(s); variants alternated step by step in one fit, {args.blocks} steps each"
    )
    names = list(variants())
    print("| model | bare step | " + " | ".join(n for n in names if n != "bare") + " |")
    print("|" + "---|" * (1 + len(names)))
    for model_name in args.models.split(","):
        times = run_model(model_name, args.blocks)
        bare = times["bare"]
        blocks = sorted(b for b in bare if b >= 2 and all(b in times[n] for n in names))  # 2 warm-up blocks
        base = statistics.median(bare[b] for b in blocks)
        cells = []
        for name in names[1:]:
            rel = [(times[name][b] - bare[b]) / base * 100 for b in blocks]
            lo, hi = bootstrap_ci(rel)
            cells.append(f"{statistics.median(rel):+.1f}% [{lo:+.1f}, {hi:+.1f}]")
        print(f"| {model_name} | {base * 1e3:.2f} ms | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
