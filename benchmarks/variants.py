"""The rows every zoo benchmark measures (``healthy.py``, ``healthy_b.py``, ``runaway.py``,
``runaway_b.py``): a name → the callbacks and the Trainer's ``gradient_clip_val``.

Both independently written copies of each benchmark import the rows from here, so a row means the same
thing in every table; everything else (data, models, initialisation, batching, metrics) each copy writes
itself. `CoefRecorder` records each optimizer step's clip coefficient for the "median coefficient over the
last 20% of steps" column.

Rows:

* ``none``: no clipping, no callback.
* ``clip<c>`` (e.g. ``clip1``, ``clip0.25``): ``Trainer(gradient_clip_val=c)``. In manual optimization
  Lightning refuses ``gradient_clip_val``: the benchmark clips with ``torch.nn.utils.clip_grad_norm_``
  itself (`manual_clip`).
* ``defaults``: ``[AdaptiveGradientClipping(), ExplosionGuard()]``.
* ``plain``: ``[AdaptiveGradientClipping(loss_aware=False), ExplosionGuard()]``.
* ``clipper``: ``[AdaptiveGradientClipping()]`` alone; ``guard``: ``[ExplosionGuard()]`` alone.
* ``adagc``: AdaGC's defaults (``mode="adagc", max_norm=1.0, factor=1.05, decay=0.98``) with the guard;
  ``mean_per_tensor``: ``mode="mean_per_tensor"`` with the guard (issue 20's per-tensor modes).
* ``defaults_max1``: the defaults with a known bound, ``AdaptiveGradientClipping(max_norm=1.0)``, and the
  guard.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard


@dataclass(frozen=True)
class Variant:
    name: str
    callbacks: Callable[[], list[pl.Callback]]
    gradient_clip_val: float | None = None


FIXED: dict[str, Callable[[], list[pl.Callback]]] = {
    "none": list,
    "defaults": lambda: [AdaptiveGradientClipping(), ExplosionGuard()],
    "plain": lambda: [AdaptiveGradientClipping(loss_aware=False), ExplosionGuard()],
    "clipper": lambda: [AdaptiveGradientClipping()],
    "guard": lambda: [ExplosionGuard()],
    "adagc": lambda: [
        AdaptiveGradientClipping(mode="adagc", max_norm=1.0, factor=1.05, decay=0.98),
        ExplosionGuard(),
    ],
    "mean_per_tensor": lambda: [AdaptiveGradientClipping(mode="mean_per_tensor"), ExplosionGuard()],
    "defaults_max1": lambda: [AdaptiveGradientClipping(max_norm=1.0), ExplosionGuard()],
}
"""Rows without a fixed clip. Add a row here (one line) to put it in every zoo table."""


def variant(name: str) -> Variant:
    """The row called ``name``: a key of `FIXED`, or ``clip<c>`` for ``gradient_clip_val=c``."""
    if name in FIXED:
        return Variant(name, FIXED[name])
    if name.startswith("clip"):
        return Variant(name, list, float(name[4:]))
    raise ValueError(f"unknown variant {name!r}; known: {sorted(FIXED)} or clip<c>")


class CoefRecorder(pl.Callback):
    """Each optimizer step's clip coefficient of every `AdaptiveGradientClipping` (1.0 without one).

    Put it after the variant's callbacks. ``coefs[i]`` lists optimizer ``i``'s coefficients, one per
    optimizer step. `tail_median` is the median over the last ``fraction`` of the steps.
    """

    def __init__(self) -> None:
        self.coefs: dict[int, list[float]] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        clippers = [cb for cb in trainer.callbacks if isinstance(cb, AdaptiveGradientClipping)]  # type: ignore[attr-defined]
        index = 0
        opts = list(trainer.optimizers)
        for i, opt in enumerate(opts):
            if opt is optimizer or getattr(optimizer, "optimizer", None) is opt:
                index = i
        coef = 1.0
        for cb in clippers:
            if index in cb.last:
                coef = min(coef, cb.last[index][2])
        self.coefs.setdefault(index, []).append(coef)

    def tail_median(self, fraction: float = 0.2) -> float:
        """Median coefficient over the last ``fraction`` of the steps, the worst over the optimizers."""
        worst = 1.0
        for values in self.coefs.values():
            tail = values[int(len(values) * (1.0 - fraction)) :]
            if tail:
                worst = min(worst, statistics.median(tail))
        return worst


def guard_counts(trainer: pl.Trainer) -> tuple[int, int]:
    """``(divergence events, rollbacks)`` of the fit's `ExplosionGuard` (0, 0 without one)."""
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, ExplosionGuard):
            divergences = sum(1 for r in cb.records if "divergence" in r.get("kinds", []))
            return divergences, cb.rollbacks
    return 0, 0


def bench_trainer(callbacks: list[pl.Callback], clip: float | None, root: str) -> pl.Trainer:
    """Copy B's Trainer of one fit (``healthy_b.py``, ``runaway_b.py``): one epoch over a loader of batch
    indices on the CPU, Lightning's ``gradient_clip_val=clip``, no logger, checkpoint, progress bar or
    validation. (Copy A's scripts build their own.)"""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        callbacks=callbacks,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
    )
