"""Independent references for the clipping tests: docs/design.md's ``mean`` formula written out (see
docs/design.md), the peer libraries driven through their own ``step()``, and callbacks that record the
pre-clip norms and the applied figures. Imported by the tests; holds no test itself."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch

EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s eps, also used by the callback


def naive_norm(grads: list[torch.Tensor]) -> float:
    """Total 2-norm with a float64 per-tensor loop."""
    if not grads:
        return float("nan")
    return math.sqrt(sum(float(torch.sum(g.double() ** 2)) for g in grads))


def optimizer_index(trainer: pl.Trainer, optimizer: Any) -> int:
    raw = getattr(optimizer, "_optimizer", optimizer)
    return next(i for i, opt in enumerate(trainer.optimizers) if opt is raw)


class PreClipNorms(pl.Callback):
    """Pre-clip norms per optimizer index, measured naively; list it before the clipping callback."""

    def __init__(self) -> None:
        self.norms: dict[int, list[float]] = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.norms.setdefault(optimizer_index(trainer, optimizer), []).append(naive_norm(grads))


class LastFigures(pl.Callback):
    """Collects the clipping callback's ``last`` figures (norm, threshold, coef) per optimizer, per step."""

    def __init__(self, clipper: Any) -> None:
        self.clipper = clipper
        self.figures: dict[int, list[tuple[float, float, float]]] = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        index = optimizer_index(trainer, optimizer)
        self.figures.setdefault(index, []).append(self.clipper.last[index])

    def thresholds(self, index: int = 0) -> list[float]:
        return [f[1] for f in self.figures[index]]


def mean_thresholds(
    norms: list[float], factor: float, decay: float, warmup_steps: int = 1, max_norm: float | None = None
) -> list[float]:
    """docs/design.md ``mean`` mode: threshold per step, counting finite norms only."""
    cap = math.inf if max_norm is None else max_norm
    out = []
    m, t = 0.0, 0
    for n in norms:
        if t < warmup_steps:
            threshold = cap
        else:
            mu_hat = m / (1.0 - decay**t)
            threshold = min(factor * mu_hat, cap)
        out.append(threshold)
        if math.isfinite(n):
            t += 1
            m = decay * m + (1.0 - decay) * min(n, threshold)
    return out


def expected_applied(norms: list[float], thresholds: list[float]) -> list[float]:
    """``min(n, c)``, with the clip coefficient's eps as in ``clip_grad_norm_``."""
    return [n * c / (n + EPS) if n > c else n for n, c in zip(norms, thresholds, strict=True)]


def _one_param(norm: float) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    p.grad = torch.tensor([norm], dtype=torch.float64)
    return p


def zclip_applied(
    norms: list[float], z_threshold: float, decay: float, warmup_steps: int, max_norm: float
) -> list[float]:
    """The norm ZClip 1.0.0 (``zscore``, ``adaptive_scaling``) lets through at each step."""
    from zclip import ZClip

    zc = ZClip(alpha=decay, z_thresh=z_threshold, max_grad_norm=max_norm, warmup_steps=warmup_steps)
    out = []
    for n in norms:
        model = torch.nn.Module()
        model.p = _one_param(n)
        zc.step(model)
        out.append(float(model.p.grad))
    return out


def autoclip_applied(norms: list[float], percentile: float, window: int) -> list[float]:
    """The norm autoclip 0.2.1 ``QuantileClip(global_threshold=True)`` lets through at each step."""
    from autoclip.torch import QuantileClip

    p = _one_param(1.0)
    clipper = QuantileClip([p], quantile=percentile / 100.0, history_length=window, global_threshold=True)
    out = []
    for n in norms:
        p.grad = torch.tensor([n], dtype=torch.float64)
        clipper.step()
        out.append(float(p.grad))
    return out


def assert_clipped_some(norms: list[float], thresholds: list[float]) -> None:
    """The run is informative: some steps were clipped and some were not."""
    clipped = [n > c for n, c in zip(norms, thresholds, strict=True) if math.isfinite(n)]
    assert any(clipped), "no step was clipped: the test would not notice missing clipping"
    assert not all(clipped), "every step was clipped: the test would not notice clipping everything"


# ------------------------------------------------------------------------------ tests of the references
