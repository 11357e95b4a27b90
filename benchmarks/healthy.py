"""Do no harm (issue 17), copy A: a zoo of healthy runs whose loss rises by design or is adversarial.

Each run is a real ``pytorch_lightning`` fit on one CPU thread (``torch.set_num_threads(1)`` in every
process), deterministic per seed (model init, data order and noise all drawn from the seed). Rows come
from ``benchmarks/variants.py`` (``none``, ``clip<c>``, ``defaults``, ``plain``, ... and any row added
there). Families, their sizes and the time of one fit on one core of the shared 2-core machine:

* ``gan``: a 2-D GAN on 8 Gaussians on a ring (radius 2, std 0.05), generator and discriminator MLPs
  2→128→128→out (LeakyReLU), manual optimization with Lightning's ``toggle_optimizer`` pattern, Adam
  betas (0.5, 0.999), generator lr 2e-4, discriminator lr 3e-3 (15×), batch 256, 1500 batches (3000
  optimizer steps). In manual optimization Lightning refuses ``gradient_clip_val``: a ``clip<c>`` row
  clips with ``torch.nn.utils.clip_grad_norm_(params, c)`` before each ``opt.step()``. Metrics: MMD
  (Gaussian kernel, bandwidth 0.5, 2,000 generated against 2,000 real samples, both drawn from fixed
  seeds; the biased estimate's square root) and modes covered (of 8: at least 1% of the generated
  samples within 0.25 of the mode's centre). ~10 s.
* ``vae``: a VAE (144→256→2×16, 16→256→144 Bernoulli logits) on 12×12 binary "digits" generated here
  (10 random stroke prototypes, shifted by up to 1 pixel, 3% of the pixels flipped; 4,096 training and
  1,024 held-out images, fixed); β = 0 for 100 steps, then a linear ramp to 1 over 200 steps; Adam 3e-3,
  batch 64, 1,200 steps. Metric: the held-out loss with β = 1 (negative ELBO per image, nats; the
  reparameterisation noise drawn from a fixed seed). ~10 s.
* ``curriculum``: a GRU (1→64, linear head) predicting, at every step, the scaled running sum
  ``2 S_t / (3 √t)`` of its inputs (uniform in [-1, 1]), the training targets with Gaussian noise of std
  0.25, the loss summed over time; length 10 for 400 steps, then 40 for 600: the summed training loss
  jumps ×5–7 (printed as ``jump``); Adam 3e-3, ×0.1 from step 850. Metric: the held-out summed loss at
  length 40 against the noiseless targets (512 fixed sequences). ~12 s.
* ``transformer_lm``, ``transformer_lm_warmup``: a nanoGPT-shaped causal character LM (2 pre-LayerNorm
  blocks, 4 heads, width 96, context 64, tied embeddings) on CPython's ``pydoc_data.topics`` text (the
  last 10% held out), AdamW lr 2e-3 (betas 0.9/0.95, weight decay 0.1), batch 16, 600 steps; the
  ``_warmup`` family with a linear LR warm-up over the first 100 steps. Metric: validation loss
  (nats/char, 384 fixed windows). ~15–20 s.
* ``classifier``: a ReLU + BatchNorm MLP (32→256→256→4) on 2,048 Gaussian points labelled by a random
  teacher network (2% labels flipped), Adam 1e-3, batch 64, 1,500 steps (~47 epochs, towards zero
  training loss). Metrics: validation accuracy, validation loss, final training loss (eval mode). ~8 s.
* ``sgd_cnn``: a BatchNorm CNN (two blocks of two 3×3 convolutions, 16 and 32 channels, max-pooling,
  linear head) on 16×16 smoothed Gaussian images labelled (10 classes) by a random ReLU-conv teacher
  (3,072 training and 1,024 held-out images, fixed), SGD lr 0.02 with Nesterov momentum 0.9 and weight
  decay 5e-4 (constant), batch 64, 1,440 steps (30 epochs, towards zero training loss): the family where
  the loss-aware ceiling applies (an SGD step follows the gradient's scale). Metrics: validation accuracy,
  validation loss, final training loss (eval mode). ~25 s.
* ``demo_lstm_small``, ``demo_lstm_large``: Lightning's demo LSTM LM (``pytorch_lightning.demos.lstm``:
  ``SimpleLSTM``, ``SequenceSampler``, ``LightningLSTM.training_step``: hidden state carried across
  batches, dropout 0.2) at 2×128 and 2×256 instead of 4×512 (minutes a fit), SGD lr 20, batch 20 × 35
  words of the same prose (words outside the 2,000 most frequent are ``<unk>``; last 10% held out),
  250 and 120 steps (~98 steps an epoch). The reference is the hand-tuned ``clip0.25``; without clipping
  it diverges (validation loss above ln 2000, "untrained"). Metric: validation loss (nats/word, the
  held-out words read in 10 streams, hidden state carried). ~15 s and ~20 s.
* ``demo_transformer``: Lightning's demo Transformer (``pytorch_lightning.demos.transformer.Transformer``,
  its ``LightningTransformer.training_step``) at width 64, 2 heads, feed-forward 128, 1+1 layers, on the
  same words, AdamW lr 1e-3, batch 20 × 35, 250 steps. Metric: validation loss. The demo feeds the
  target sequence to the decoder under a mask that lets position t see token t, so its task is close to
  copying and its loss falls far below a language model's; it is measured as Lightning ships it. ~15 s.

Per run: the metrics, the guard's divergence events and rollbacks (`variants.guard_counts`), errors
(``GradientExplosionError`` or any exception: the run counts as an error), whether the training loss
went non-finite or, for the demo LSTMs, above 100 (a run without a guard then stops), whether the metric is no better than chance
("untrained": ``Family.chance``, e.g. ln 2000 for the word LMs), the median clip coefficient over the
last 20% of the optimizer steps (`variants.CoefRecorder`; 1.0 for rows without `AdaptiveGradientClipping`), wall time.

Printed per family: one Markdown table (rows: variants, a cell per seed and the medians) and a bars
table (issue 17) for every row that is not a reference (``none``, ``clip<c>``): its median metric against
the better reference's median (GAN MMD within 10%; VAE, curriculum, classifier within 2% (accuracy and
validation loss); transformer LMs and the demo Transformer within 1%; demo LSTMs within 3% of
``clip0.25``), 0 divergence events, 0 errors, and, where every ``none`` run trains (no error, finite
loss, metric better than chance), a median tail coefficient ≥ 0.5. Rows ``clip<c>`` record coefficient 1
(Lightning's own clipping is not recorded).

Run (from the repository root)::

    python benchmarks/healthy.py [--families gan vae ...] [--variants none clip1 defaults]
        [--seeds 0 1 2] [--jobs 1] [--json out.json]

``--variants`` defaults to ``none clip1 defaults``; the demo LSTM families always add their reference
``clip0.25``.
The whole zoo at its defaults is 10 families × 3 rows × 3 seeds + 6 = 96 fits, ~20–25 min with one job
on the shared 2-core machine (load 3–6; the times above were measured there, one thread per fit).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.demos.lstm import LightningLSTM, SequenceSampler, SimpleLSTM
from pytorch_lightning.demos.transformer import LightningTransformer, Transformer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from variants import CoefRecorder, guard_counts, variant

from lightning_clip import ExplosionGuard, GradientExplosionError

# -------------------------------------------------------------------------------------------- text data


@lru_cache(maxsize=1)
def prose() -> str:
    """CPython's ``pydoc_data.topics``: ~465k characters of real English prose and code."""
    import pydoc_data.topics as topics

    return "\n".join(topics.topics[k] for k in sorted(topics.topics))


@lru_cache(maxsize=1)
def chars() -> tuple[torch.Tensor, torch.Tensor, int]:
    """The prose as character ids: (train, validation = the last 10%, vocabulary size)."""
    text = prose()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], len(vocab)


@lru_cache(maxsize=1)
def words(vocab_size: int = 2000) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The prose as word ids, tokenised as the demos' ``WikiText2`` (whitespace, ``<eos>`` per line), the
    ``vocab_size - 2`` most frequent words kept, the rest ``<unk>``: (train, validation, vocabulary)."""
    lines = [[*line.split(), "<eos>"] for line in prose().splitlines()]
    counts = Counter(w for line in lines for w in line)
    kept = [w for w, _ in counts.most_common(vocab_size - 1)]
    index = {w: i + 1 for i, w in enumerate(kept)}  # 0: <unk>
    ids = torch.tensor([index.get(w, 0) for line in lines for w in line], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], len(kept) + 1


class Blocks(Dataset):
    """Consecutive blocks of ``block`` tokens and their next tokens (the demos' ``WikiText2`` items)."""

    def __init__(self, data: torch.Tensor, block: int = 35) -> None:
        self.data, self.block = data, block

    def __len__(self) -> int:
        return len(self.data) // self.block - 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = i * self.block
        return self.data[s : s + self.block], self.data[s + 1 : s + self.block + 1]


class RandomWindows(IterableDataset):
    """Endless batches of random windows of ``data`` (inputs, next tokens), reproducible from ``seed``."""

    def __init__(self, data: torch.Tensor, batch: int, block: int, seed: int) -> None:
        self.data, self.batch, self.block, self.seed = data, batch, block, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed)
        while True:
            start = torch.randint(0, len(self.data) - self.block - 1, (self.batch,), generator=g)
            idx = start[:, None] + torch.arange(self.block + 1)
            w = self.data[idx]
            yield w[:, :-1], w[:, 1:]


class Stream(IterableDataset):
    """Endless batches from a generator function ``make(generator)`` seeded with ``seed``."""

    def __init__(self, make: Callable[[torch.Generator], Any], seed: int) -> None:
        self.make, self.seed = make, seed

    def __iter__(self) -> Iterator[Any]:
        g = torch.Generator().manual_seed(self.seed)
        while True:
            yield self.make(g)


# --------------------------------------------------------------------------------------------- GAN
RING_RADIUS, RING_STD, MODES = 2.0, 0.05, 8
MMD_BANDWIDTH, MMD_SAMPLES = 0.5, 2000


def ring_samples(n: int, g: torch.Generator) -> torch.Tensor:
    k = torch.randint(0, MODES, (n,), generator=g)
    angle = 2 * math.pi * k.float() / MODES
    centre = RING_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centre + RING_STD * torch.randn(n, 2, generator=g)


def mlp(sizes: Sequence[int], act: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class GAN(pl.LightningModule):
    def __init__(self, manual_clip: float | None, steps: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.manual_clip = manual_clip
        self.G = mlp([2, 128, 128, 2], lambda: nn.LeakyReLU(0.2))
        self.D = mlp([2, 128, 128, 1], lambda: nn.LeakyReLU(0.2))

    def _step(self, opt: Any, loss: torch.Tensor, params: Any) -> None:
        opt.zero_grad()
        self.manual_backward(loss)
        if self.manual_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(params), self.manual_clip)
        opt.step()

    def training_step(self, real: torch.Tensor, batch_idx: int) -> torch.Tensor:
        g_opt, d_opt = self.optimizers()  # type: ignore[misc]
        n = real.shape[0]
        self.toggle_optimizer(d_opt)
        fake = self.G(torch.randn(n, 2)).detach()
        d_real, d_fake = self.D(real), self.D(fake)
        d_loss = F.binary_cross_entropy_with_logits(
            d_real, torch.ones_like(d_real)
        ) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        self._step(d_opt, d_loss, self.D.parameters())
        self.untoggle_optimizer(d_opt)
        self.toggle_optimizer(g_opt)
        d_gen = self.D(self.G(torch.randn(n, 2)))
        g_loss = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
        self._step(g_opt, g_loss, self.G.parameters())
        self.untoggle_optimizer(g_opt)
        loss = d_loss.detach() + g_loss.detach()
        self.log_dict({"d_loss": d_loss.detach(), "g_loss": g_loss.detach()})
        return loss

    def configure_optimizers(self) -> Any:
        g = torch.optim.Adam(self.G.parameters(), lr=2e-4, betas=(0.5, 0.999))
        d = torch.optim.Adam(self.D.parameters(), lr=3e-3, betas=(0.5, 0.999))
        return [g, d]


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """Square root of the biased MMD² estimate with a Gaussian kernel of the given bandwidth."""

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth**2))

    value = k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()
    return float(value.clamp_min(0).sqrt())


@torch.no_grad()
def eval_gan(model: GAN) -> dict[str, float]:
    real = ring_samples(MMD_SAMPLES, torch.Generator().manual_seed(10_001))
    z = torch.randn(MMD_SAMPLES, 2, generator=torch.Generator().manual_seed(10_002))
    fake = model.G(z)
    if not torch.isfinite(fake).all():
        return {"mmd": math.inf, "modes": 0.0}
    angle = 2 * math.pi * torch.arange(MODES).float() / MODES
    centres = RING_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)
    near = torch.cdist(fake, centres) < 0.25
    covered = (near.float().mean(dim=0) >= 0.01).sum()
    return {"mmd": mmd(fake, real, MMD_BANDWIDTH), "modes": float(covered)}


def build_gan(seed: int, manual_clip: float | None) -> tuple[pl.LightningModule, Any, int]:
    steps = 1500
    data = Stream(lambda g: ring_samples(256, g), seed)
    return GAN(manual_clip, steps), DataLoader(data, batch_size=None), steps


# --------------------------------------------------------------------------------------------- VAE
SIDE = 12


@lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """12×12 binary images: 10 stroke prototypes (random walks of a 2-pixel pen), shifted ±1 pixel,
    3% of the pixels flipped. Fixed (seed 77): 4,096 for training, 1,024 held out."""
    g = torch.Generator().manual_seed(77)
    protos = torch.zeros(10, SIDE, SIDE)
    for p in range(10):
        r, c = (int(v) for v in torch.randint(3, SIDE - 3, (2,), generator=g))
        for _ in range(3):  # three strokes
            dr, dc = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            for _ in range(6):
                protos[p, max(r - 1, 0) : r + 1, max(c - 1, 0) : c + 1] = 1.0
                if torch.rand(1, generator=g) < 0.3:
                    dr, dc = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
                r, c = min(max(r + dr, 1), SIDE - 2), min(max(c + dc, 1), SIDE - 2)
    n = 4096 + 1024
    label = torch.randint(0, 10, (n,), generator=g)
    shift = torch.randint(-1, 2, (n, 2), generator=g)
    images = torch.stack(
        [
            torch.roll(protos[int(k)], (int(s[0]), int(s[1])), dims=(0, 1))
            for k, s in zip(label, shift, strict=True)
        ]
    )
    flip = torch.rand(images.shape, generator=g) < 0.03
    images = torch.where(flip, 1.0 - images, images).flatten(1)
    return images[:4096], images[4096:]


class VAE(pl.LightningModule):
    def __init__(self, latent: int = 16, hidden: int = 256, delay: int = 100, ramp: int = 200) -> None:
        super().__init__()
        d = SIDE * SIDE
        self.enc = mlp([d, hidden, 2 * latent])
        self.dec = mlp([latent, hidden, d])
        self.delay, self.ramp = delay, ramp

    def beta(self) -> float:
        return min(max((self.global_step - self.delay) / self.ramp, 0.0), 1.0)

    def loss(self, x: torch.Tensor, beta: float, eps: torch.Tensor | None = None) -> torch.Tensor:
        mu, logvar = self.enc(x).chunk(2, dim=1)
        eps = torch.randn_like(mu) if eps is None else eps
        z = mu + (0.5 * logvar).exp() * eps
        rec = F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="none").sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return (rec + beta * kl).mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return self.loss(x, self.beta())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


@torch.no_grad()
def eval_vae(model: VAE) -> dict[str, float]:
    _, held = digits()
    eps = torch.randn(held.shape[0], 16, generator=torch.Generator().manual_seed(10_003))
    model.eval()
    return {"loss": float(model.loss(held, 1.0, eps))}


def build_vae(seed: int, manual_clip: float | None) -> tuple[pl.LightningModule, Any, int]:
    train, _ = digits()
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(train), batch_size=64, shuffle=True, drop_last=True, generator=g)
    return VAE(), loader, 1200


# -------------------------------------------------------------------------------------- curriculum
SHORT, LONG, SWITCH, CURRICULUM_STEPS, DECAY_AT, TARGET_NOISE = 10, 40, 400, 1000, 850, 0.25


def running_sum_batch(
    n: int, length: int, g: torch.Generator, noise: float = TARGET_NOISE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs uniform in [-1, 1]; targets ``2 S_t / (3 √t)`` (``S_t`` the running sum), plus Gaussian noise
    of std ``noise`` (the training targets' noise floor makes the summed loss jump ×5–6 at the switch)."""
    x = torch.rand(n, length, 1, generator=g) * 2 - 1
    y = 2 * x.cumsum(dim=1) / (3 * torch.arange(1, length + 1).view(1, length, 1).sqrt())
    return x, y + noise * torch.randn(y.shape, generator=g) if noise else y


class Curriculum(IterableDataset):
    """Batches of 32 sequences: length ``SHORT`` for ``SWITCH`` batches, then ``LONG``."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed)
        i = 0
        while True:
            yield running_sum_batch(32, SHORT if i < SWITCH else LONG, g)
            i += 1


class SeqSum(pl.LightningModule):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.rnn = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        self.losses: list[float] = []

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return (self.head(out) - y).pow(2).mean(dim=(0, 2)).sum()  # summed over time

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(*batch)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [DECAY_AT], gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def eval_curriculum(model: SeqSum) -> dict[str, float]:
    """Held-out loss at length 40 against the noiseless targets, and the training loss's jump at the switch
    (mean of the first 3 batches at length 40 over the last 20 at length 10)."""
    x, y = running_sum_batch(512, LONG, torch.Generator().manual_seed(10_004), noise=0.0)
    before, after = model.losses[SWITCH - 20 : SWITCH], model.losses[SWITCH : SWITCH + 3]
    jump = statistics.fmean(after) / statistics.fmean(before) if len(after) == 3 else math.nan
    return {"loss": float(model.loss(x, y)), "jump": jump}


def build_curriculum(seed: int, manual_clip: float | None) -> tuple[pl.LightningModule, Any, int]:
    return SeqSum(), DataLoader(Curriculum(seed), batch_size=None), CURRICULUM_STEPS


# ------------------------------------------------------------------------------- causal transformer
class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (a.view(b, t, self.heads, c // self.heads).transpose(1, 2) for a in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class CharGPT(pl.LightningModule):
    def __init__(self, vocab: int, warmup: int, width: int = 96, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(1, 64, width))
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as nanoGPT
        self.warmup = warmup
        for name, p in self.named_parameters():  # nanoGPT's initialisation
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.blocks(self.tok(x) + self.pos[:, : x.shape[1]]))
        return F.cross_entropy(self.head(h).flatten(0, 1), y.flatten())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss(*batch)

    def configure_optimizers(self) -> Any:
        decay = [p for p in self.parameters() if p.dim() >= 2]
        other = [p for p in self.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
            lr=2e-3,
            betas=(0.9, 0.95),
        )
        if not self.warmup:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / self.warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def validation_windows(data: torch.Tensor, n: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.linspace(0, len(data) - block - 2, n).long()
    w = data[starts[:, None] + torch.arange(block + 1)]
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def eval_char_lm(model: CharGPT) -> dict[str, float]:
    _, val, _ = chars()
    model.eval()
    x, y = validation_windows(val, 16 * 24, 64)
    return {
        "val_loss": float(
            statistics.fmean(float(model.loss(a, b)) for a, b in zip(x.split(24), y.split(24), strict=True))
        )
    }


def build_char_lm(warmup: int) -> Callable[[int, float | None], tuple[pl.LightningModule, Any, int]]:
    def build(seed: int, manual_clip: float | None) -> tuple[pl.LightningModule, Any, int]:
        train, _, vocab = chars()
        return CharGPT(vocab, warmup), DataLoader(RandomWindows(train, 16, 64, seed), batch_size=None), 600

    return build


# ------------------------------------------------------------------------------------------ classifier
@lru_cache(maxsize=1)
def teacher_data() -> tuple[torch.Tensor, ...]:
    """2,048 + 1,024 Gaussian points in 32-D, labels: argmax of a random teacher MLP, 2% flipped."""
    g = torch.Generator().manual_seed(88)
    x = torch.randn(3072, 32, generator=g)
    w1, w2 = torch.randn(32, 64, generator=g), torch.randn(64, 4, generator=g)
    y = (torch.tanh(x @ w1 / math.sqrt(32)) @ w2).argmax(1)
    flip = torch.rand(3072, generator=g) < 0.02
    y = torch.where(flip, torch.randint(0, 4, (3072,), generator=g), y)
    return x[:2048], y[:2048], x[2048:], y[2048:]


class Labelled(pl.LightningModule):
    """A classifier of labelled batches ``(x, y)``: ``net`` and the optimizer come from the subclass."""

    net: nn.Module

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)


@torch.no_grad()
def eval_labelled(model: Labelled, data: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Validation accuracy and loss, and the final training loss (eval mode), on ``(xt, yt, xv, yv)``."""
    xt, yt, xv, yv = data
    model.eval()
    logits = model.net(xv)
    return {
        "val_acc": float((logits.argmax(1) == yv).float().mean()),
        "val_loss": float(F.cross_entropy(logits, yv)),
        "train_loss": float(F.cross_entropy(model.net(xt), yt)),
    }


def labelled_loader(x: torch.Tensor, y: torch.Tensor, seed: int) -> DataLoader:
    """Batches of 64, reshuffled each epoch from the seed, the last incomplete one dropped."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, drop_last=True, generator=g)


class Classifier(Labelled):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(32, 256),
            nn.BatchNorm1d(256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.BatchNorm1d(256),
            nn.ReLU(),
            nn.Linear(256, 4),
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def eval_classifier(model: Classifier) -> dict[str, float]:
    return eval_labelled(model, teacher_data())


def build_classifier(seed: int, manual_clip: float | None) -> tuple[pl.LightningModule, Any, int]:
    xt, yt, _, _ = teacher_data()
    return Classifier(), labelled_loader(xt, yt, seed), 1500


# ----------------------------------------------------------------------------------- SGD CNN classifier
@lru_cache(maxsize=1)
def teacher_images() -> tuple[torch.Tensor, ...]:
    """16×16 smoothed Gaussian images labelled (10 classes) by a random ReLU-conv teacher: 3,072 training
    and 1,024 held-out images, fixed."""
    g = torch.Generator().manual_seed(123)
    x = 3.0 * F.avg_pool2d(torch.randn(4096, 1, 16, 16, generator=g), 3, 1, 1)
    kernels = torch.randn(8, 1, 5, 5, generator=g) / 5.0
    features = F.adaptive_avg_pool2d(F.relu(F.conv2d(x, kernels, padding=2)), 4).flatten(1)
    y = (features @ torch.randn(128, 10, generator=g)).argmax(1)
    return x[:3072], y[:3072], x[3072:], y[3072:]


class SGDConvNet(Labelled):
    def __init__(self) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.net = nn.Sequential(
            conv(1, 16), conv(16, 16), nn.MaxPool2d(2), conv(16, 32), conv(32, 32), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
        )  # fmt: skip

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4)


def eval_sgd_cnn(model: SGDConvNet) -> dict[str, float]:
    return eval_labelled(model, teacher_images())


def build_sgd_cnn(seed: int, manual_clip: float | None) -> tuple[pl.LightningModule, Any, int]:
    xt, yt, _, _ = teacher_images()
    return SGDConvNet(), labelled_loader(xt, yt, seed), 1440


# ------------------------------------------------------------------------------------ Lightning demos
class DemoLSTM(LightningLSTM):
    """``LightningLSTM`` (its ``training_step``: hidden state carried, SGD lr 20) at a smaller size."""

    def __init__(self, vocab: int, size: int) -> None:
        pl.LightningModule.__init__(self)
        self.model = SimpleLSTM(vocab_size=vocab, ninp=size, nhid=size, nlayers=2)
        self.hidden = None

    def prepare_data(self) -> None:
        pass


@torch.no_grad()
def eval_demo_lstm(model: DemoLSTM) -> dict[str, float]:
    _, val, _ = words()
    model.eval()
    n = 10
    stream = val[: (len(val) - 1) // n * n + 1]
    cols = (len(stream) - 1) // n
    x = stream[:-1].view(n, cols)
    y = stream[1:].view(n, cols)
    hidden = model.model.init_hidden(n)
    total, count = 0.0, 0
    for s in range(0, cols, 35):
        out, hidden = model.model(x[:, s : s + 35], hidden)
        total += float(F.nll_loss(out, y[:, s : s + 35].reshape(-1), reduction="sum"))
        count += y[:, s : s + 35].numel()
    return {"val_loss": total / count if math.isfinite(total) else math.inf}


def build_demo_lstm(
    size: int, steps: int
) -> Callable[[int, float | None], tuple[pl.LightningModule, Any, int]]:
    def build(seed: int, manual_clip: float | None) -> tuple[pl.LightningModule, Any, int]:
        train, _, vocab = words()
        data = Blocks(train)
        return (
            DemoLSTM(vocab, size),
            DataLoader(data, batch_sampler=SequenceSampler(data, batch_size=20)),
            steps,
        )

    return build


class DemoTransformer(LightningTransformer):
    """``LightningTransformer`` (its ``training_step``) at a small size, with AdamW."""

    def __init__(self, vocab: int) -> None:
        pl.LightningModule.__init__(self)
        self.model = Transformer(vocab_size=vocab, ninp=64, nhead=2, nhid=128, nlayers=1)

    def prepare_data(self) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=1e-3)


@torch.no_grad()
def eval_demo_transformer(model: DemoTransformer) -> dict[str, float]:
    _, val, _ = words()
    model.eval()
    data = Blocks(val)
    losses = [
        float(F.nll_loss(model(x, y), y.reshape(-1)))
        for x, y in DataLoader(data, batch_size=20, drop_last=True)
    ]
    return {"val_loss": statistics.fmean(losses)}


def build_demo_transformer(seed: int, manual_clip: float | None) -> tuple[pl.LightningModule, Any, int]:
    train, _, vocab = words()
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(Blocks(train), batch_size=20, shuffle=True, drop_last=True, generator=g)
    return DemoTransformer(vocab), loader, 250


# ----------------------------------------------------------------------------------------- the zoo
@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[int, float | None], tuple[pl.LightningModule, Any, int]]
    evaluate: Callable[[Any], dict[str, float]]
    metric: str  # the bar's metric
    tolerance: float  # the bar: within this fraction of the better reference
    higher_is_better: bool = False
    also: tuple[tuple[str, bool], ...] = ()  # further (metric, higher_is_better) bars
    manual: bool = False
    references: tuple[str, ...] = ("none", "clip1")
    extra_rows: tuple[str, ...] = ()  # added to the default --variants
    info: tuple[str, ...] = ()  # further metrics printed, no bar
    chance: float = math.inf  # a primary metric (lower is better) at or above this: the run did not train
    blowup: float = math.inf  # a training loss above this is a blown-up run (stopped without a guard)


def labelled_family(
    name: str,
    build: Callable[[int, float | None], tuple[pl.LightningModule, Any, int]],
    evaluate: Callable[[Any], dict[str, float]],
) -> Family:
    """A classifier family measured by `eval_labelled`: validation accuracy (the bar, within 2%) and
    validation loss (also within 2%), the final training loss printed."""
    return Family(
        name,
        build,
        evaluate,
        "val_acc",
        0.02,
        higher_is_better=True,
        also=(("val_loss", False),),
        info=("train_loss",),
    )


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("gan", build_gan, eval_gan, "mmd", 0.10, manual=True, info=("modes",)),
        Family("vae", build_vae, eval_vae, "loss", 0.02, chance=SIDE * SIDE * math.log(2)),
        Family("curriculum", build_curriculum, eval_curriculum, "loss", 0.02, info=("jump",), chance=5.93),
        Family("transformer_lm", build_char_lm(0), eval_char_lm, "val_loss", 0.01, chance=math.log(103)),
        Family(
            "transformer_lm_warmup", build_char_lm(100), eval_char_lm, "val_loss", 0.01, chance=math.log(103)
        ),
        labelled_family("classifier", build_classifier, eval_classifier),
        labelled_family("sgd_cnn", build_sgd_cnn, eval_sgd_cnn),
        Family(
            "demo_lstm_small",
            build_demo_lstm(128, 250),
            eval_demo_lstm,
            "val_loss",
            0.03,
            references=("clip0.25",),
            extra_rows=("clip0.25",),
            chance=math.log(2000),
            blowup=100.0,
        ),
        Family(
            "demo_lstm_large",
            build_demo_lstm(256, 120),
            eval_demo_lstm,
            "val_loss",
            0.03,
            references=("clip0.25",),
            extra_rows=("clip0.25",),
            chance=math.log(2000),
            blowup=100.0,
        ),
        Family(
            "demo_transformer",
            build_demo_transformer,
            eval_demo_transformer,
            "val_loss",
            0.01,
            chance=math.log(2000),
        ),
    )
}


class Watch(pl.Callback):
    """Training losses of every batch; without a guard, stops the fit at the first loss that is non-finite
    or above ``blowup`` (a blown-up run only slows down: huge and denormal values)."""

    def __init__(self, guarded: bool, blowup: float = math.inf) -> None:
        self.guarded, self.blowup = guarded, blowup
        self.losses: list[float] = []
        self.nonfinite = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, *args: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else math.nan
        self.losses.append(value)
        if not value <= self.blowup:
            self.nonfinite = True
            if not self.guarded:
                trainer.should_stop = True


def is_reference(row: str) -> bool:
    return row == "none" or row.startswith("clip")


def run_one(task: tuple[str, str, int]) -> dict[str, Any]:
    """One fit: (family, row, seed) → its raw numbers. Runs in a fresh (spawned) process or in-process."""
    family_name, row, seed = task
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # a blown-up run's denormals would slow it down 10x
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    family = FAMILIES[family_name]
    v = variant(row)
    pl.seed_everything(seed, verbose=False)
    manual_clip = v.gradient_clip_val if family.manual else None
    model, loader, steps = family.build(seed, manual_clip)
    callbacks = v.callbacks()
    watch = Watch(any(isinstance(cb, ExplosionGuard) for cb in callbacks), family.blowup)
    coefs = CoefRecorder()
    result: dict[str, Any] = {"family": family_name, "variant": row, "seed": seed, "error": None}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps * (2 if family.manual else 1),  # manual: two optimizer steps per batch
            max_epochs=-1,
            logger=False,
            default_root_dir=root,
            callbacks=[*callbacks, coefs, watch],
            gradient_clip_val=None if family.manual else v.gradient_clip_val,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        try:
            trainer.fit(model, loader)
        except GradientExplosionError as err:
            result["error"] = "GradientExplosionError: " + str(err).splitlines()[0]
        except Exception as err:
            result["error"] = f"{type(err).__name__}: {err}"
            result["traceback"] = traceback.format_exc(limit=-4)
    result["seconds"] = time.perf_counter() - start
    try:
        metrics = family.evaluate(model)
    except Exception as err:
        metrics = {family.metric: math.nan}
        result["error"] = result["error"] or f"evaluation: {type(err).__name__}: {err}"
    metrics = {k: (v if math.isfinite(v) else math.inf) for k, v in metrics.items()}
    divergences, rollbacks = guard_counts(trainer)
    tail = watch.losses[-50:]
    result.update(
        metrics=metrics,
        divergences=divergences,
        rollbacks=rollbacks,
        guard_events=next((cb.events for cb in callbacks if isinstance(cb, ExplosionGuard)), 0),
        nonfinite_loss=watch.nonfinite,
        steps_done=int(trainer.global_step),
        train_last50=statistics.fmean(tail) if tail else math.nan,
        tail_coef=coefs.tail_median(),
    )
    return result


# ------------------------------------------------------------------------------------------ reporting
def _num(x: float) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def median(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def untrained(family: Family, r: dict[str, Any]) -> bool:
    """The run's metric is not finite, or no better than chance (``Family.chance``)."""
    value = r["metrics"].get(family.metric, math.nan)
    return not math.isfinite(value) or (not family.higher_is_better and value >= family.chance)


def trains(family: Family, r: dict[str, Any]) -> bool:
    """A run trained: no error, no non-finite training loss, a metric better than chance."""
    return r["error"] is None and not r["nonfinite_loss"] and not untrained(family, r)


def family_tables(family: Family, runs: list[dict[str, Any]], rows: list[str], seeds: list[int]) -> str:
    """The family's Markdown table and its bars table."""
    by = {(r["variant"], r["seed"]): r for r in runs}
    out = [f"### {family.name}", ""]
    metrics = [family.metric, *(m for m, _ in family.also), *family.info]
    head = " | ".join(f"seed {s}" for s in seeds)
    extra = " | ".join(f"median {m}" for m in metrics[1:])
    out.append(
        f"| row | {head} | median {family.metric} | {extra + ' | ' if extra else ''}div. events | rollbacks"
        " | errors | non-finite | untrained | tail coef | s/fit |"
    )
    out.append("|---" * (len(seeds) + len(metrics) + 8) + "|")
    for row in rows:
        rr = [by[(row, s)] for s in seeds if (row, s) in by]
        if not rr:
            continue
        cells = []
        for s in seeds:
            r = by.get((row, s))
            if r is None:
                cells.append("")
                continue
            flag = (
                "E" if r["error"] else ("N" if r["nonfinite_loss"] else ("U" if untrained(family, r) else ""))
            )
            ev = f" d{r['divergences']}/r{r['rollbacks']}" if r["divergences"] or r["rollbacks"] else ""
            cells.append(f"{_num(r['metrics'].get(family.metric, math.nan))}{flag}{ev}")
        meds = [_num(median([r["metrics"].get(m, math.nan) for r in rr])) for m in metrics]
        out.append(
            f"| {row} | {' | '.join(cells)} | {' | '.join(meds)} | {sum(r['divergences'] for r in rr)}"
            f" | {sum(r['rollbacks'] for r in rr)} | {sum(r['error'] is not None for r in rr)}"
            f" | {sum(r['nonfinite_loss'] for r in rr)} | {sum(untrained(family, r) for r in rr)}"
            f" | {_num(median([r['tail_coef'] for r in rr]))}"
            f" | {statistics.fmean(r['seconds'] for r in rr):.1f} |"
        )
    out.append("")
    out.append(
        "cells: the metric per seed; E: error; N: non-finite (or blown-up) training loss; U: untrained (metric not finite or no"
        " better than chance); dX/rY: divergence events / rollbacks"
    )
    out.append("")
    out.append(bars_table(family, by, rows, seeds))
    return "\n".join(out)


def bars_table(
    family: Family, by: dict[tuple[str, int], dict[str, Any]], rows: list[str], seeds: list[int]
) -> str:
    def runs(row: str) -> list[dict[str, Any]]:
        return [by[(row, s)] for s in seeds if (row, s) in by]

    refs = [r for r in family.references if runs(r)]
    none_fine = bool(runs("none")) and all(trains(family, r) for r in runs("none"))
    lines = [
        f"Bars ({family.name}; reference: the better median of {', '.join(refs) or 'none measured'}):",
        "",
    ]
    lines.append("| row | bar | value | threshold | ratio | result |")
    lines.append("|---|---|---|---|---|---|")
    for row in rows:
        rr = runs(row)
        if is_reference(row) or not rr:
            continue
        for metric, higher in ((family.metric, family.higher_is_better), *family.also):
            ref_meds = {r: median([x["metrics"].get(metric, math.nan) for x in runs(r)]) for r in refs}
            ref_meds = {k: v for k, v in ref_meds.items() if math.isfinite(v)}
            value = median([x["metrics"].get(metric, math.nan) for x in rr])
            if not ref_meds:
                lines.append(f"| {row} | {metric} | {_num(value)} | no finite reference | | n/a |")
                continue
            best_row = (max if higher else min)(ref_meds, key=lambda k: ref_meds[k])
            best = ref_meds[best_row]
            tol = family.tolerance
            threshold = best * (1 - tol) if higher else best * (1 + tol)
            ok = value >= threshold if higher else value <= threshold
            ratio = value / best if best else math.nan
            side = "≥" if higher else "≤"
            lines.append(
                f"| {row} | {metric} {side} {'1-' if higher else '1+'}{tol:g} × {best_row} | {_num(value)}"
                f" | {_num(threshold)} | {ratio:.3f} | {'met' if ok else 'MISSED'} |"
            )
        div = sum(x["divergences"] for x in rr)
        err = sum(x["error"] is not None for x in rr)
        lines.append(f"| {row} | 0 divergence events | {div} | 0 | | {'met' if div == 0 else 'MISSED'} |")
        lines.append(f"| {row} | 0 errors | {err} | 0 | | {'met' if err == 0 else 'MISSED'} |")
        tail = median([x["tail_coef"] for x in rr])
        if none_fine:
            lines.append(
                f"| {row} | median tail coef ≥ 0.5 | {_num(tail)} | 0.5 | | {'met' if tail >= 0.5 else 'MISSED'} |"
            )
        else:
            lines.append(f"| {row} | median tail coef ≥ 0.5 | {_num(tail)} | (none does not train) | | n/a |")
    return "\n".join(lines)


def print_saved(
    paths: Sequence[str], families: Sequence[str], rows: Sequence[str] | None, seeds: Sequence[int]
) -> list[dict[str, Any]]:
    """The tables of runs saved with ``--json`` (merged; a later file's run replaces an earlier one's)."""
    merged: dict[tuple[str, str, int], dict[str, Any]] = {}
    for path in paths:
        with open(path) as f:
            for r in json.load(f):
                r["metrics"] = {k: float(v) for k, v in r["metrics"].items()}
                merged[(r["family"], r["variant"], r["seed"])] = r
    results = list(merged.values())
    for name in families:
        runs = [r for r in results if r["family"] == name and r["seed"] in seeds]
        if not runs:
            continue
        present = list(dict.fromkeys(r["variant"] for r in runs))
        order = [r for r in (rows or present) if r in present]
        print(family_tables(FAMILIES[name], runs, order, list(seeds)))
        print()
    return results


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="rows of benchmarks/variants.py (default: none clip1 defaults, + clip0.25 for the demo LSTMs)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="processes (spawned); 1: in this process")
    parser.add_argument(
        "--json", metavar="PATH", default=None, help="write every run's raw numbers here (after each run)"
    )
    parser.add_argument(
        "--tables-from",
        nargs="+",
        metavar="JSON",
        default=None,
        help="no fits: print the tables of runs saved with --json (several files are merged, later wins)",
    )
    args = parser.parse_args(argv)
    if args.tables_from:
        return print_saved(args.tables_from, args.families, args.variants, args.seeds)
    for row in args.variants or []:
        variant(row)  # fail early on an unknown row
    torch.set_num_threads(1)
    tasks: list[tuple[str, str, int]] = []
    rows_of: dict[str, list[str]] = {}
    for name in args.families:
        rows = list(args.variants or ["none", "clip1", "defaults"])
        rows += [r for r in FAMILIES[name].extra_rows if r not in rows]  # the family's reference rows
        rows_of[name] = rows
        tasks += [(name, row, seed) for row in rows for seed in args.seeds]
    print(
        f"healthy zoo (copy A): {len(tasks)} fits, families {args.families}, seeds {args.seeds},"
        f" 1 thread per fit, {args.jobs} job(s)",
        flush=True,
    )
    results: list[dict[str, Any]] = []

    def done(r: dict[str, Any]) -> None:
        results.append(r)
        if args.json:  # rewritten after each run: an interrupted zoo keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
        m = " ".join(f"{k}={_num(v)}" for k, v in r["metrics"].items())
        print(
            f"  {r['family']} {r['variant']} seed {r['seed']}: {m} div={r['divergences']} rb={r['rollbacks']}"
            f" coef={_num(r['tail_coef'])} {r['seconds']:.1f}s{' ERROR ' + r['error'] if r['error'] else ''}",
            flush=True,
        )

    if args.jobs <= 1:
        for task in tasks:
            done(run_one(task))
    else:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.imap_unordered(run_one, tasks):
                done(r)
    print()
    for name in args.families:
        runs = [r for r in results if r["family"] == name]
        print(family_tables(FAMILIES[name], runs, rows_of[name], args.seeds))
        print()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
