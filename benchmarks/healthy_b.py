"""Do-no-harm zoo, copy B (issue 17): healthy runs whose loss rises by design or is adversarial.

Written independently of ``healthy.py`` (copy A): its own data generators, initialisations, batching and
architectures, so that no default is tuned to one setup. The rows (``none``, ``clip<c>``, ``defaults``, ...)
come from the shared registry ``benchmarks/variants.py``. Every fit is a real ``pytorch_lightning`` fit on
the CPU, one intra-op thread per process (``torch.set_num_threads(1)``), deterministic per seed: every
batch is drawn from a ``torch.Generator`` seeded by (seed, batch index), so a variant changes only the
updates, never the data.

Families (steps are optimizer steps unless said; times: one fit, one core of a shared 2-core machine):

* ``gan``: an annulus in 2-D (uniform angle, radius N(2, 0.1²)); generator 2→128→128→2 (LeakyReLU 0.2,
  Xavier-normal init), discriminator 2→192→192→1 (LeakyReLU 0.2, default init), non-saturating loss,
  manual optimization with Lightning's toggle pattern, Adam β=(0, 0.99), generator lr 3e-4,
  discriminator lr 4.5e-3 (15×), batch 128, 1000 batches (2000 optimizer steps). ``clip<c>`` clips
  each network with ``clip_grad_norm_`` before its ``opt.step()`` (Lightning refuses
  ``gradient_clip_val`` in manual mode). Metric: MMD (square root of the unbiased MMD², RBF kernels of
  bandwidths 0.1, 0.5, 2) between 4000 generated and 4000 real points; also the angular sectors covered
  (of 12; a sector counts with ≥ 20% of its share of the points within 0.3 of the circle).
* ``vae``: 8×8 binary images, each the union of 1–3 random bars/squares with 3% pixel flips; MLP VAE
  64→256→(μ, log σ²) of 12 latents →256→64 Bernoulli logits, orthogonal init, Adam 1e-3, batch 128,
  1200 steps; β = 0 for 300 steps, a linear ramp to 1 over 400, then 1. Metric: the full loss
  (β = 1, per image, nats) on 2000 held-out images.
* ``curriculum``: an LSTM (48 units) regresses, at every time step, a fixed nonlinear filter of the last
  six 3-D Gaussian inputs; the loss is summed over time. Length 10 for 450 steps, then 60 for 550: the
  loss jumps ~18× at the switch (0.37 → 6.6 on seed 0). Adam 2e-3, batch 24. Metric: held-out summed loss at length 60.
* ``transformer_lm`` / ``transformer_lm_warmup``: a pre-LayerNorm causal transformer (2 layers, width 64,
  4 heads, context 64; weights N(0, 0.02), residual projections scaled by 1/√(2·layers)) on the
  characters of the docstrings of 70 standard-library modules (parsed with ``ast``, about 700 k characters,
  last 10% held out), batch 16 random windows, AdamW lr 2e-3 β=(0.9, 0.95) weight decay 0.05 on
  matrices, 500 steps, cosine decay to 10%; ``_warmup`` adds a 50-step linear warm-up. Metric:
  validation cross-entropy (nats/char) on 128 fixed windows.
* ``classifier``: labels of a random teacher (16→64 tanh→10, argmax) on Gaussian inputs; 3000 training
  points, student 16→256→BN→ReLU→256→BN→ReLU→10 (Kaiming-normal init), Adam 2e-3, batch 50, 1500 steps
  (25 epochs, reshuffled per epoch): the training loss goes towards 0. Metrics: accuracy on 4000 test
  points and the final loss on the whole training set (eval mode).
* ``sgd_resnet``: 12×12 images of one bar (amplitude 2, length 4–8, random place, 4 orientations: the label) under
  Gaussian noise of std 1; 2000 training images (reshuffled per epoch), a residual CNN (a 3×3 stem and two
  residual blocks of width 24, Kaiming fan-out init, global average pooling), SGD lr 0.05 with heavy-ball
  momentum 0.9, weight decay 1e-4, ×0.1 at 75% of the 1250 steps, batch 32 (20 epochs, towards zero
  training loss): the family where the loss-aware ceiling applies. Metrics: accuracy on 2000 test images
  and the final loss on the whole training set (eval mode).
* ``lstm_lm_small`` / ``lstm_lm_large``: Lightning's demo ``SimpleLSTM`` (the PyTorch word-language-model
  example) on the lower-cased word/punctuation tokens of the same docstrings (1000-word vocabulary plus
  ``<unk>``/``<eos>``), hidden state carried across batches (truncated BPTT) over 16 parallel streams,
  SGD lr 20, dropout 0.2. Small: 2 layers of 64 (embedding 48), BPTT 20, 350 steps. Large: 2 layers of
  160 (embedding 96), BPTT 25, 300 steps. The hand-tuned reference is ``clip0.25``; without clipping
  the runs diverge. Metric: held-out cross-entropy (nats/token).
* ``transformer_demo``: Lightning's demo ``Transformer`` (1 encoder + 1 decoder layer, width 64, 2 heads,
  feed-forward 128, dropout 0.1) on the same word tokens: the encoder reads the previous 20 tokens and the
  causally masked decoder predicts the next 20 (no look-ahead), batch 16 random windows, AdamW 1e-3,
  400 steps. Metric: held-out cross-entropy.

Bars (issue 17), ``defaults`` against the better of ``none`` and ``clip1`` (LSTM LMs: against
``clip0.25``), on the median over seeds: GAN ≤ 1.10×; VAE, curriculum, classifier (accuracy and loss)
within 2%; transformer LMs and the demo transformer within 1%; LSTM LMs ≤ 1.03×. For every family also
0 divergence events and 0 errors over the ``defaults`` runs, and, where ``none`` trains fine (every seed
finite, no error, median within 25% of the best reference), a median tail clip coefficient (last 20% of
steps, `CoefRecorder`) ≥ 0.5.

Command (from the repository root; ``--jobs`` > 1 only on an idle machine)::

    PYTHONPATH=. python benchmarks/healthy_b.py --variants none clip1 defaults --seeds 0 1 2 \
        --json bench_out/healthy_b.json

Runtime (measured 2026-12-06 on a 2-core machine shared with other jobs, load 4–7, ``--jobs 1``), median
wall per fit: gan 11 s, vae 9 s, curriculum 5 s, transformer_lm(_warmup) 13–17 s, classifier 5 s,
lstm_lm_small 5–7 s, lstm_lm_large 11–14 s, transformer_demo 15 s; the default grid (9 families,
``none clip1 defaults`` + ``clip0.25`` for the LSTM LMs, 3 seeds: 87 fits) took 920 s. ``sgd_resnet``
(added later): ~20 s a fit with ``--jobs 2`` on an otherwise idle machine. Output of that run:
``bench_out/healthy_b_cal.txt`` (not committed).
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import logging
import math
import multiprocessing as mp
import re
import statistics
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.demos.lstm import SimpleLSTM
from pytorch_lightning.demos.transformer import Transformer as DemoTransformer
from torch import Tensor, nn
from torch.utils.data import DataLoader
from variants import CoefRecorder, bench_trainer, guard_counts, variant

torch.set_num_threads(1)


def batch_gen(seed: int, index: int, salt: int = 0) -> torch.Generator:
    """The generator of batch ``index`` of seed ``seed``: identical in every variant."""
    return torch.Generator().manual_seed(1_000_003 * (seed + 1) + 7919 * salt + index)


class Base(pl.LightningModule):
    """A module whose batches are batch indices; ``manual_clip`` is the manual rows' clip (None: none)."""

    manual_clip: float | None = None

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------- GAN
RING_RADIUS, RING_WIDTH, SECTORS = 2.0, 0.1, 12


def ring_sample(n: int, gen: torch.Generator) -> Tensor:
    """An annulus: uniform angle, radius N(2, 0.1²)."""
    angle = 2 * math.pi * torch.rand(n, generator=gen)
    radius = RING_RADIUS + RING_WIDTH * torch.randn(n, generator=gen)
    return torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)


def mmd(x: Tensor, y: Tensor, bandwidths: tuple[float, ...] = (0.1, 0.5, 2.0)) -> float:
    """Square root of the unbiased MMD² with a sum of RBF kernels (0 when the estimate is negative)."""
    n, m = len(x), len(y)
    dxx, dyy, dxy = torch.cdist(x, x) ** 2, torch.cdist(y, y) ** 2, torch.cdist(x, y) ** 2
    kxx = sum(torch.exp(-dxx / (2 * b * b)) for b in bandwidths)
    kyy = sum(torch.exp(-dyy / (2 * b * b)) for b in bandwidths)
    kxy = sum(torch.exp(-dxy / (2 * b * b)) for b in bandwidths)
    value = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    value = value + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean()
    return math.sqrt(max(float(value), 0.0))


class RingGAN(Base):
    Z = 2
    BATCH = 128
    BATCHES = 1000

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.automatic_optimization = False
        self.gen = nn.Sequential(
            nn.Linear(self.Z, 128),
            nn.LeakyReLU(0.2),
            nn.Linear(128, 128),
            nn.LeakyReLU(0.2),
            nn.Linear(128, 2),
        )
        self.disc = nn.Sequential(
            nn.Linear(2, 192), nn.LeakyReLU(0.2), nn.Linear(192, 192), nn.LeakyReLU(0.2), nn.Linear(192, 1)
        )
        for layer in self.gen:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_normal_(layer.weight)
                nn.init.zeros_(layer.bias)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        g = torch.optim.Adam(self.gen.parameters(), lr=3e-4, betas=(0.0, 0.99))
        d = torch.optim.Adam(self.disc.parameters(), lr=4.5e-3, betas=(0.0, 0.99))
        return [g, d]

    def _step(self, opt: Any, loss: Tensor, params: Any) -> None:
        self.toggle_optimizer(opt)
        opt.zero_grad()
        self.manual_backward(loss)
        if self.manual_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(params), self.manual_clip)
        opt.step()
        self.untoggle_optimizer(opt)

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        gen = batch_gen(self.seed, int(batch))
        real = ring_sample(self.BATCH, gen)
        z_d = torch.randn(self.BATCH, self.Z, generator=gen)
        z_g = torch.randn(self.BATCH, self.Z, generator=gen)
        g_opt, d_opt = self.optimizers()  # type: ignore[misc]
        fake = self.gen(z_d).detach()
        d_loss = F.softplus(-self.disc(real)).mean() + F.softplus(self.disc(fake)).mean()
        self._step(d_opt, d_loss, self.disc.parameters())
        g_loss = F.softplus(-self.disc(self.gen(z_g))).mean()
        self._step(g_opt, g_loss, self.gen.parameters())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        gen = torch.Generator().manual_seed(424242 + self.seed)
        fake = self.gen(torch.randn(4000, self.Z, generator=gen))
        real = ring_sample(4000, gen)
        if not torch.isfinite(fake).all():
            return {"mmd": math.nan, "sectors": 0.0}
        on_ring = (fake.norm(dim=1) - RING_RADIUS).abs() < 3 * RING_WIDTH
        angle = torch.atan2(fake[:, 1], fake[:, 0])
        sector = ((angle + math.pi) / (2 * math.pi) * SECTORS).long().clamp(0, SECTORS - 1)
        counts = torch.bincount(sector[on_ring], minlength=SECTORS)
        covered = int((counts >= 0.2 * 4000 / SECTORS).sum())
        return {"mmd": mmd(fake, real), "sectors": float(covered)}


# ----------------------------------------------------------------------------------------------- VAE
def shapes_images(n: int, gen: torch.Generator) -> Tensor:
    """8×8 binary images: the union of 1–3 random primitives (horizontal/vertical bars of 2, 3×3 squares)."""
    img = torch.zeros(n, 8, 8)
    k = torch.randint(1, 4, (n,), generator=gen)
    for slot in range(3):
        kind = torch.randint(0, 3, (n,), generator=gen)
        a = torch.randint(0, 7, (n,), generator=gen)
        b = torch.randint(0, 6, (n,), generator=gen)
        active = k > slot
        rows = torch.arange(8).view(1, 8, 1)
        cols = torch.arange(8).view(1, 1, 8)
        av, bv = a.view(-1, 1, 1), b.view(-1, 1, 1)
        hbar = ((rows == av) | (rows == av + 1)).expand(n, 8, 8)
        vbar = ((cols == av) | (cols == av + 1)).expand(n, 8, 8)
        square = (rows >= bv) & (rows < bv + 3) & (cols >= av.clamp(max=5)) & (cols < av.clamp(max=5) + 3)
        shape = torch.where(
            (kind == 0).view(-1, 1, 1), hbar, torch.where((kind == 1).view(-1, 1, 1), vbar, square)
        )
        img = torch.where((active.view(-1, 1, 1) & shape), torch.ones_like(img), img)
    flips = torch.rand(n, 8, 8, generator=gen) < 0.03
    return torch.where(flips, 1 - img, img).view(n, 64)


class ShapesVAE(Base):
    LATENT = 12
    BATCH = 128
    STEPS = 1200
    HOLD, RAMP = 300, 400

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.enc = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 2 * self.LATENT))
        self.dec = nn.Sequential(nn.Linear(self.LATENT, 256), nn.ReLU(), nn.Linear(256, 64))
        for layer in [*self.enc, *self.dec]:
            if isinstance(layer, nn.Linear):
                nn.init.orthogonal_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.held_out = shapes_images(2000, torch.Generator().manual_seed(77))

    def beta(self) -> float:
        return min(max((self.global_step - self.HOLD) / self.RAMP, 0.0), 1.0)

    def losses(self, x: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        mu, logvar = self.enc(x).chunk(2, dim=1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen)
        rec = F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="none").sum(1).mean()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
        return rec, kl

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        gen = batch_gen(self.seed, int(batch))
        rec, kl = self.losses(shapes_images(self.BATCH, gen), gen)
        return rec + self.beta() * kl

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        gen = torch.Generator().manual_seed(99)
        values = [sum(self.losses(self.held_out, gen)) for _ in range(4)]
        return {"loss": float(torch.stack(values).mean())}


# ---------------------------------------------------------------------------------------- curriculum
def filter_task(n: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Inputs N(0, 1) in 3-D; target y_t a fixed nonlinear filter of x_{t-5..t} (zero-padded)."""
    x = torch.randn(n, length, 3, generator=gen)
    pad = F.pad(x, (0, 0, 5, 0))

    def lag(j: int, c: int) -> Tensor:
        return pad[:, 5 - j : 5 - j + length, c]

    y = 0.9 * lag(0, 0) - 0.7 * lag(2, 1) + 0.5 * lag(5, 2) + 0.6 * torch.tanh(lag(1, 0) * lag(4, 1))
    return x, y


class CurriculumLSTM(Base):
    SHORT, LONG, SWITCH, STEPS, BATCH = 10, 60, 450, 1000, 24

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.rnn = nn.LSTM(3, 48, batch_first=True)
        self.head = nn.Linear(48, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.held_out = filter_task(500, self.LONG, torch.Generator().manual_seed(55))

    def summed_loss(self, x: Tensor, y: Tensor) -> Tensor:
        return (self.head(self.rnn(x)[0]).squeeze(-1) - y).pow(2).sum(1).mean()

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        length = self.SHORT if self.global_step < self.SWITCH else self.LONG
        return self.summed_loss(*filter_task(self.BATCH, length, batch_gen(self.seed, int(batch))))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=2e-3)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return {"loss": float(self.summed_loss(*self.held_out))}


# ----------------------------------------------------------------------------------------- corpus
STDLIB_MODULES = [
    "argparse",
    "textwrap",
    "functools",
    "inspect",
    "pathlib",
    "typing",
    "subprocess",
    "random",
    "statistics",
    "datetime",
    "enum",
    "dataclasses",
    "shutil",
    "tarfile",
    "zipfile",
    "difflib",
    "string",
    "threading",
    "queue",
    "calendar",
    "heapq",
    "fractions",
    "_pydecimal",
    "contextlib",
    "collections/__init__",
    "logging/__init__",
    "email/message",
    "http/client",
    "json/__init__",
    "unittest/case",
    "asyncio/tasks",
    "multiprocessing/pool",
    "os",
    "tempfile",
    "pickle",
    "codecs",
    "locale",
    "gettext",
    "smtplib",
    "ftplib",
    "ipaddress",
    "configparser",
    "csv",
    "abc",
    "operator",
    "weakref",
    "copy",
    "pprint",
    "reprlib",
    "bisect",
    "shlex",
    "glob",
    "fnmatch",
    "linecache",
    "traceback",
    "warnings",
    "sched",
    "selectors",
    "socket",
    "ssl",
    "uuid",
    "hashlib",
    "base64",
    "zipimport",
    "trace",
    "pdb",
    "doctest",
    "optparse",
    "getopt",
    "cmd",
    "turtle",
    "imaplib",
    "mailbox",
]

_CORPUS: list[str] = []


def docstring_corpus() -> str:
    """The docstrings of modules, classes and functions of 70 standard-library modules, in file order."""
    if not _CORPUS:
        root = Path(sysconfig.get_paths()["stdlib"])
        docs = []
        for name in STDLIB_MODULES:
            tree = ast.parse((root / f"{name}.py").read_text(encoding="utf8"))
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        docs.append(doc)
        _CORPUS.append("\n\n".join(docs))
    return _CORPUS[0]


def char_data() -> tuple[Tensor, Tensor, int]:
    """Characters (printable ASCII and newline; anything else is '~'), 90% / 10% split."""
    text = docstring_corpus()
    ids = torch.tensor([ord(c) - 31 if 32 <= ord(c) < 127 else (0 if c == "\n" else 95) for c in text])
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], 96


def word_data(vocab: int = 1000) -> tuple[Tensor, Tensor, int]:
    """Lower-cased word and punctuation tokens, the ``vocab`` most frequent plus <unk>=0, <eos>=1."""
    docs = docstring_corpus().split("\n\n")
    tokens: list[str] = []
    for doc in docs:
        tokens.extend(re.findall(r"[a-z0-9_]+|[^\sa-z0-9_]", doc.lower()))
        tokens.append("<eos>")
    counts = collections.Counter(t for t in tokens if t != "<eos>")
    index = {w: i + 2 for i, (w, _) in enumerate(counts.most_common(vocab))}
    index["<eos>"] = 1
    ids = torch.tensor([index.get(t, 0) for t in tokens])
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], vocab + 2


# ------------------------------------------------------------------------------------ transformer LM
class Block(nn.Module):
    def __init__(self, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        for lin in (self.qkv, self.proj, self.up, self.down):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        for lin in (self.proj, self.down):
            lin.weight.data.mul_(1 / math.sqrt(2 * layers))

    def forward(self, x: Tensor) -> Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, w)
        x = x + self.proj(att)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class CharGPT(Base):
    WIDTH, HEADS, LAYERS, CONTEXT, BATCH, STEPS, LR = 64, 4, 2, 64, 16, 500, 2e-3

    def __init__(self, seed: int, warmup: int) -> None:
        super().__init__(seed)
        self.warmup = warmup
        self.train_ids, self.val_ids, vocab = char_data()
        self.tok = nn.Embedding(vocab, self.WIDTH)
        self.pos = nn.Parameter(torch.zeros(self.CONTEXT, self.WIDTH))
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.01)
        self.blocks = nn.Sequential(*[Block(self.WIDTH, self.HEADS, self.LAYERS) for _ in range(self.LAYERS)])
        self.ln = nn.LayerNorm(self.WIDTH)
        self.out = nn.Linear(self.WIDTH, vocab, bias=False)
        nn.init.normal_(self.out.weight, std=0.02)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.ln(self.blocks(self.tok(x) + self.pos[: x.shape[1]]))
        return F.cross_entropy(self.out(h).flatten(0, 1), y.flatten())

    def windows(self, ids: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        span = starts.view(-1, 1) + torch.arange(self.CONTEXT + 1)
        chunk = ids[span]
        return chunk[:, :-1], chunk[:, 1:]

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        gen = batch_gen(self.seed, int(batch))
        starts = torch.randint(len(self.train_ids) - self.CONTEXT - 1, (self.BATCH,), generator=gen)
        return self.loss(*self.windows(self.train_ids, starts))

    def configure_optimizers(self) -> Any:
        decay = [p for p in self.parameters() if p.dim() >= 2]
        rest = [p for p in self.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
            lr=self.LR,
            betas=(0.9, 0.95),
        )
        warmup, steps = self.warmup, self.STEPS

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, steps - warmup)
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        starts = torch.linspace(0, len(self.val_ids) - self.CONTEXT - 2, 128).long()
        return {"val_loss": float(self.loss(*self.windows(self.val_ids, starts)))}


# ------------------------------------------------------------------------------------------ classifier
class EpochClassifier(Base):
    """A classifier over a fixed training set (``x_train``, ``y_train``, set by the subclass with ``net``),
    reshuffled per epoch from the seed and ``SALT``; `evaluate`: test accuracy, whole-training-set loss."""

    TRAIN: int
    BATCH: int
    SALT: int
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    net: nn.Module

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self._perm: tuple[int, Tensor] | None = None  # the current epoch and its order

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        per_epoch = self.TRAIN // self.BATCH
        epoch, pos = divmod(int(batch), per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            order = torch.randperm(self.TRAIN, generator=batch_gen(self.seed, epoch, salt=self.SALT))
            self._perm = (epoch, order)
        rows = self._perm[1][pos * self.BATCH : (pos + 1) * self.BATCH]
        return F.cross_entropy(self.net(self.x_train[rows]), self.y_train[rows])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.net.eval()
        acc = (self.net(self.x_test).argmax(1) == self.y_test).float().mean()
        loss = F.cross_entropy(self.net(self.x_train), self.y_train)
        return {"accuracy": float(acc), "loss": float(loss)}


class TeacherClassifier(EpochClassifier):
    TRAIN, TEST, BATCH, STEPS, SALT = 3000, 4000, 50, 1500, 1

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        data_gen = torch.Generator().manual_seed(31 + seed)
        w1 = torch.randn(16, 64, generator=data_gen) / 4
        w2 = torch.randn(64, 10, generator=data_gen) / 8

        def label(x: Tensor) -> Tensor:
            return (torch.tanh(x @ w1) @ w2).argmax(1)

        self.x_train = torch.randn(self.TRAIN, 16, generator=data_gen)
        self.y_train = label(self.x_train)
        self.x_test = torch.randn(self.TEST, 16, generator=data_gen)
        self.y_test = label(self.x_test)
        self.net = nn.Sequential(
            nn.Linear(16, 256), nn.BatchNorm1d(256), nn.ReLU(),
            nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(),
            nn.Linear(256, 10),
        )  # fmt: skip
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=2e-3)


# ------------------------------------------------------------------------------- SGD residual CNN
def bar_images(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """12×12 images of one bar (length 4–8) at a random place, in one of 4 orientations (the label:
    horizontal, vertical, two diagonals), amplitude 2, under Gaussian noise of std 1."""
    images = torch.zeros(n, 12, 12)
    labels = torch.randint(0, 4, (n,), generator=gen)
    lengths = torch.randint(4, 9, (n,), generator=gen)
    corners = torch.randint(0, 12, (n, 2), generator=gen)
    steps = {0: (0, 1), 1: (1, 0), 2: (1, 1), 3: (1, -1)}
    for i in range(n):
        dr, dc = steps[int(labels[i])]
        r, c = int(corners[i, 0]), int(corners[i, 1])
        for k in range(int(lengths[i])):
            images[i, (r + k * dr) % 12, (c + k * dc) % 12] = 2.0
    return (images + torch.randn(n, 12, 12, generator=gen)).unsqueeze(1), labels


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SGDResNet(EpochClassifier):
    """A residual CNN under SGD with heavy-ball momentum and a step decay: the loss-aware ceiling applies."""

    TRAIN, TEST, BATCH, STEPS, SALT = 2000, 2000, 32, 1250, 3

    def __init__(self, seed: int, lr: float = 0.05) -> None:
        super().__init__(seed)
        self.lr = lr
        data_gen = torch.Generator().manual_seed(4099)
        self.x_train, self.y_train = bar_images(self.TRAIN, data_gen)
        self.x_test, self.y_test = bar_images(self.TEST, data_gen)
        self.net = nn.Sequential(
            nn.Conv2d(1, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
            ResidualBlock(24), ResidualBlock(24),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 4),
        )  # fmt: skip
        for module in self.net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)
        decay = torch.optim.lr_scheduler.MultiStepLR(opt, [int(0.75 * self.STEPS)], gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


# ---------------------------------------------------------------------------------------- LSTM word LM
class StreamLSTM(Base):
    """The demo ``SimpleLSTM`` over ``STREAMS`` contiguous streams, hidden state carried (truncated BPTT)."""

    STREAMS = 16

    def __init__(self, seed: int, ninp: int, nhid: int, bptt: int) -> None:
        super().__init__(seed)
        train, val, vocab = word_data()
        self.bptt = bptt
        self.train_streams = train[: len(train) // self.STREAMS * self.STREAMS].view(self.STREAMS, -1)
        self.val_streams = val[: len(val) // 8 * 8].view(8, -1)
        self.model = SimpleLSTM(vocab_size=vocab, ninp=ninp, nhid=nhid, nlayers=2, dropout=0.2)
        self.hidden: tuple[Tensor, Tensor] | None = None

    def per_pass(self) -> int:
        return (self.train_streams.shape[1] - 1) // self.bptt

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        pos = int(batch) % self.per_pass()
        if pos == 0 or self.hidden is None:
            self.hidden = self.model.init_hidden(self.STREAMS)
        start = pos * self.bptt
        x = self.train_streams[:, start : start + self.bptt]
        y = self.train_streams[:, start + 1 : start + self.bptt + 1]
        self.hidden = (self.hidden[0].detach(), self.hidden[1].detach())
        out, self.hidden = self.model(x, self.hidden)
        return F.nll_loss(out, y.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=20.0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        hidden = self.model.init_hidden(8)
        total, count = 0.0, 0
        length = self.val_streams.shape[1] - 1
        for start in range(0, length, 50):
            x = self.val_streams[:, start : min(start + 50, length)]
            y = self.val_streams[:, start + 1 : start + 1 + x.shape[1]]
            out, hidden = self.model(x, hidden)
            total += float(F.nll_loss(out, y.reshape(-1), reduction="sum"))
            count += y.numel()
        return {"loss": total / count}


# ------------------------------------------------------------------------------------ demo transformer
class DemoTransformerLM(Base):
    BLOCK, BATCH, STEPS = 20, 16, 400

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.train_ids, self.val_ids, vocab = word_data()
        self.model = DemoTransformer(vocab_size=vocab, ninp=64, nhead=2, nhid=128, nlayers=1, dropout=0.1)

    def loss(self, ids: Tensor, starts: Tensor) -> Tensor:
        span = starts.view(-1, 1) + torch.arange(2 * self.BLOCK + 1)
        chunk = ids[span]
        context, inputs, target = (
            chunk[:, : self.BLOCK],
            chunk[:, self.BLOCK : -1],
            chunk[:, self.BLOCK + 1 :],
        )
        return F.nll_loss(self.model(context, inputs), target.reshape(-1))

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        gen = batch_gen(self.seed, int(batch))
        starts = torch.randint(len(self.train_ids) - 2 * self.BLOCK - 1, (self.BATCH,), generator=gen)
        return self.loss(self.train_ids, starts)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        starts = torch.linspace(0, len(self.val_ids) - 2 * self.BLOCK - 2, 160).long()
        return {"loss": float(self.loss(self.val_ids, starts))}


# ------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Family:
    build: Callable[[int], Base]
    batches: int
    metrics: tuple[str, ...]  # bar metrics; names ending in "accuracy" are higher-is-better
    tolerance: float
    reference: str = "best"  # "best": the better of none/clip1; or a variant name
    manual: bool = False
    extra_variants: tuple[str, ...] = field(default=())


FAMILIES: dict[str, Family] = {
    "gan": Family(RingGAN, RingGAN.BATCHES, ("mmd",), 0.10, manual=True),
    "vae": Family(ShapesVAE, ShapesVAE.STEPS, ("loss",), 0.02),
    "curriculum": Family(CurriculumLSTM, CurriculumLSTM.STEPS, ("loss",), 0.02),
    "transformer_lm": Family(lambda s: CharGPT(s, warmup=0), CharGPT.STEPS, ("val_loss",), 0.01),
    "transformer_lm_warmup": Family(lambda s: CharGPT(s, warmup=50), CharGPT.STEPS, ("val_loss",), 0.01),
    "classifier": Family(TeacherClassifier, TeacherClassifier.STEPS, ("accuracy", "loss"), 0.02),
    "sgd_resnet": Family(SGDResNet, SGDResNet.STEPS, ("accuracy", "loss"), 0.02),
    "lstm_lm_small": Family(
        lambda s: StreamLSTM(s, ninp=48, nhid=64, bptt=20),
        350,
        ("loss",),
        0.03,
        "clip0.25",
        False,
        ("clip0.25",),
    ),
    "lstm_lm_large": Family(
        lambda s: StreamLSTM(s, ninp=96, nhid=160, bptt=25),
        300,
        ("loss",),
        0.03,
        "clip0.25",
        False,
        ("clip0.25",),
    ),
    "transformer_demo": Family(DemoTransformerLM, DemoTransformerLM.STEPS, ("loss",), 0.01),
}


# ---------------------------------------------------------------------------------------------- runner
def quiet() -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # a saturated LSTM without clipping otherwise runs 5× slower
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_one(task: tuple[str, str, int]) -> dict[str, Any]:
    """One fit: the family's module with the variant's callbacks; its metrics, guard counts, errors."""
    family_name, variant_name, seed = task
    quiet()
    family = FAMILIES[family_name]
    row = variant(variant_name)
    pl.seed_everything(seed, verbose=False)
    module = family.build(seed)
    recorder = CoefRecorder()
    clip = row.gradient_clip_val
    if family.manual:
        module.manual_clip, clip = clip, None
    loader = DataLoader(torch.arange(family.batches), batch_size=None)  # type: ignore[arg-type]
    error = None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = bench_trainer([*row.callbacks(), recorder], clip, root)
        try:
            trainer.fit(module, loader)
        except Exception as exc:  # counted as an error, whatever it is
            error = f"{type(exc).__name__}: {exc}".replace("\n", " / ")[:300]
    wall = time.perf_counter() - start
    metrics: dict[str, float] = {}
    if error is None:
        try:
            metrics = module.evaluate()
        except Exception as exc:
            error = f"evaluate: {type(exc).__name__}: {exc}"[:300]
    divergences, rollbacks = guard_counts(trainer)
    clip_warnings = sorted(
        {
            str(w.message)[:160]
            for w in caught
            if "lightning_clip" in (w.filename or "") or "lightning_clip" in str(w.category)
        }
    )
    return {
        "family": family_name,
        "variant": variant_name,
        "seed": seed,
        "metrics": metrics,
        "divergences": divergences,
        "rollbacks": rollbacks,
        "error": error,
        "tail_coef": recorder.tail_median(),
        "steps": int(trainer.global_step),
        "wall_s": wall,
        "clip_warnings": clip_warnings,
    }


# --------------------------------------------------------------------------------------------- reports
def higher_is_better(metric: str) -> bool:
    return metric.endswith("accuracy")


def metric_of(run: dict[str, Any], metric: str) -> float:
    value = run["metrics"].get(metric, math.nan)
    return value if math.isfinite(value) else math.nan


def median_metric(runs: list[dict[str, Any]], metric: str) -> float:
    """Median over seeds; a failed run (error, NaN, Inf) counts as the worst value."""
    if not runs:
        return math.nan
    worst = -math.inf if higher_is_better(metric) else math.inf
    values = [metric_of(r, metric) for r in runs]
    values = [worst if math.isnan(v) else v for v in values]
    return float(statistics.median(values))


def fmt(value: float) -> str:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return "failed" if math.isinf(value) else "nan"
    return f"{value:.4g}"


def family_table(name: str, runs: list[dict[str, Any]], variants: list[str], seeds: list[int]) -> str:
    family = FAMILIES[name]
    metrics = list(family.metrics)
    extra = sorted({k for r in runs for k in r["metrics"]} - set(metrics))
    head = [f"{metrics[0]} s{s}" for s in seeds] + [f"median {m}" for m in metrics]
    head += [f"median {m}" for m in extra] + ["div events", "rollbacks", "errors", "tail coef", "wall s"]
    lines = [f"### {name}", "", "| variant | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for v in variants:
        rows = [r for r in runs if r["variant"] == v]
        if not rows:
            continue
        by_seed = {r["seed"]: r for r in rows}
        cells = [fmt(metric_of(by_seed[s], metrics[0])) if s in by_seed else "-" for s in seeds]
        cells += [fmt(median_metric(rows, m)) for m in metrics + extra]
        cells += [
            str(sum(r["divergences"] for r in rows)),
            str(sum(r["rollbacks"] for r in rows)),
            str(sum(r["error"] is not None for r in rows)),
            f"{statistics.median(r['tail_coef'] for r in rows):.3g}",
            f"{statistics.median(r['wall_s'] for r in rows):.1f}",
        ]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def family_bars(name: str, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 17's bars for one family, on the ``defaults`` rows."""
    family = FAMILIES[name]
    rows = {v: [r for r in runs if r["variant"] == v] for v in {r["variant"] for r in runs}}
    defaults = rows.get("defaults", [])
    refs = ["none", "clip1"] if family.reference == "best" else [family.reference]
    out: list[dict[str, Any]] = []
    if not defaults:
        return out
    for metric in family.metrics:
        up = higher_is_better(metric)
        ref_meds = {r: median_metric(rows[r], metric) for r in refs if rows.get(r)}
        if not ref_meds:
            continue
        best_ref = (max if up else min)(ref_meds, key=lambda r: ref_meds[r])
        ref, got = ref_meds[best_ref], median_metric(defaults, metric)
        ratio = got / ref if ref and math.isfinite(ref) and math.isfinite(got) else math.nan
        met = math.isfinite(ratio) and (
            ratio >= 1 - family.tolerance if up else ratio <= 1 + family.tolerance
        )
        bar = f"{'≥' if up else '≤'} {1 - family.tolerance if up else 1 + family.tolerance:g} × {best_ref}"
        out.append({"family": name, "bar": f"{metric} {bar}", "value": ratio, "met": met,
                    "detail": f"defaults {fmt(got)} vs {best_ref} {fmt(ref)}"})  # fmt: skip
    events = sum(r["divergences"] for r in defaults)
    errors = sum(r["error"] is not None for r in defaults)
    out.append(
        {"family": name, "bar": "0 divergence events", "value": events, "met": events == 0, "detail": ""}
    )
    out.append({"family": name, "bar": "0 errors", "value": errors, "met": errors == 0, "detail": ""})
    none = rows.get("none", [])
    metric = family.metrics[-1] if not higher_is_better(family.metrics[-1]) else family.metrics[0]
    best = [median_metric(rows[r], metric) for r in refs if rows.get(r)]
    fine = (
        bool(none)
        and all(r["error"] is None and math.isfinite(metric_of(r, metric)) for r in none)
        and bool(best)
        and (
            median_metric(none, metric) >= 0.8 * max(best)
            if higher_is_better(metric)
            else median_metric(none, metric) <= 1.25 * min(best)
        )
    )
    coef = statistics.median(r["tail_coef"] for r in defaults)
    if fine:
        out.append(
            {"family": name, "bar": "tail coef ≥ 0.5", "value": coef, "met": coef >= 0.5, "detail": ""}
        )
    else:
        out.append({"family": name, "bar": "tail coef ≥ 0.5", "value": coef, "met": None,
                    "detail": "n/a: none does not train fine" if none else "n/a: no none row"})  # fmt: skip
    return out


def bars_table(bars: list[dict[str, Any]]) -> str:
    lines = [
        "### Bars (issue 17), defaults",
        "",
        "| family | bar | value | met | detail |",
        "|---|---|---|---|---|",
    ]
    for b in bars:
        met = "n/a" if b["met"] is None else ("met" if b["met"] else "**missed**")
        value = b["value"]
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {b['family']} | {b['bar']} | {shown} | {met} | {b['detail']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["none", "clip1", "defaults"])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for v in args.variants:
        variant(v)  # unknown names fail before any fit
    tasks = []
    per_family: dict[str, list[str]] = {}
    for name in args.families:
        names = list(args.variants)
        names += [v for v in FAMILIES[name].extra_variants if v not in names]
        per_family[name] = names
        tasks += [(name, v, s) for s in args.seeds for v in names]
    print(f"# healthy_b: {len(tasks)} fits, torch threads 1 per process, --jobs {args.jobs}", flush=True)
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs, initializer=quiet) as pool:
            for run in pool.imap_unordered(run_one, tasks):
                runs.append(run)
                progress(run)
    else:
        for task in tasks:
            runs.append(run_one(task))
            progress(runs[-1])
    bars: list[dict[str, Any]] = []
    for name in args.families:
        family_runs = [r for r in runs if r["family"] == name]
        print("\n" + family_table(name, family_runs, per_family[name], args.seeds))
        bars += family_bars(name, family_runs)
    print("\n" + bars_table(bars))
    print(f"\ntotal wall {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs, "bars": bars}, indent=1)
        )
    return 0


def progress(run: dict[str, Any]) -> None:
    shown = ", ".join(f"{k}={v:.4g}" for k, v in run["metrics"].items())
    status = f"ERROR {run['error']}" if run["error"] else shown
    print(
        f"  {run['family']:>22} {run['variant']:>9} seed {run['seed']}: {status}; div {run['divergences']} "
        f"rb {run['rollbacks']} coef {run['tail_coef']:.3g} steps {run['steps']} {run['wall_s']:.1f}s",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
