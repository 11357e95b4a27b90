"""The figure of the runaway mechanism: the demo's exploding RNN at ``AdaptiveGradientClipping()`` defaults.

Top: the pre-clip gradient norm, the threshold applied, the ceiling learned from the loss, and the plain
mean rule's term (``factor × running mean``, the first release's threshold, which the ceiling holds down).
Bottom: the training loss, its smoothed value and its healthy level (the loss band of the rule), and the
level above which the loss counts as elevated (where the ceiling is cut). The values are read from the rule
after every step, in a real Lightning fit.

Run: ``python benchmarks/runaway_figure.py [--seed 0] [--steps 600] [--out docs/images/runaway_ceiling.png]``
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import adding_problem as demo

from lightning_clip import AdaptiveGradientClipping
from lightning_clip.functional.thresholds import LossAwareMeanThreshold


class Trace(pl.Callback):
    """Per step, after the clipper: norm, threshold, ceiling, mean term, loss, smoothed loss, healthy level,
    elevated level (the last three as losses, not logs)."""

    def __init__(self, clipper: AdaptiveGradientClipping) -> None:
        self.clipper = clipper
        self.rows: list[dict[str, float]] = []
        self._loss = math.nan

    def on_before_backward(self, trainer: pl.Trainer, pl_module: Any, loss: torch.Tensor) -> None:
        self._loss = float(loss.detach())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        rule = self.clipper.rule(0)
        assert isinstance(rule, LossAwareMeanThreshold)
        norm, threshold, _ = self.clipper.last[0]
        band = rule.band
        fast = band.ema / band.weight if band.weight else math.nan
        reference = math.nan if band.reference is None else band.reference
        self.rows.append(
            {
                "norm": norm,
                "threshold": threshold,
                "ceiling": rule.ceiling,
                "mean_term": rule.mean_term(),
                "loss": self._loss,
                "smoothed": math.exp(fast),
                "healthy": math.exp(reference),
                "elevated": math.exp(reference + band.elevated_excess()),
            }
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default="docs/images/runaway_ceiling.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning|lightning")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pl.seed_everything(args.seed, verbose=False)
    clipper = AdaptiveGradientClipping()
    trace = Trace(clipper)
    model = demo.SequenceRegressor(cell="rnn", hidden=32, spectral_radius=1.2, optimizer="sgd", lr=0.2)
    with tempfile.TemporaryDirectory() as root:
        pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=args.steps,
            logger=False,
            default_root_dir=root,
            callbacks=[clipper, trace],
            limit_val_batches=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(model, DataLoader(demo.AddingProblem(64, 20, seed=args.seed), batch_size=None))

    rows = trace.rows
    steps = range(1, len(rows) + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 2])
    top.semilogy(steps, [r["norm"] for r in rows], color="tab:blue", lw=0.6, label="pre-clip gradient norm")
    top.semilogy(
        steps, [r["mean_term"] for r in rows], ":", color="grey", label="plain rule: 1.5 × running mean"
    )
    top.semilogy(
        steps, [r["ceiling"] for r in rows], color="tab:orange", label="ceiling learned from the loss"
    )
    top.semilogy(steps, [r["threshold"] for r in rows], "--", color="black", lw=1, label="threshold applied")
    top.set_ylabel("gradient norm")
    top.legend(loc="upper right", fontsize=8)
    top.set_title(
        f"exploding RNN (radius 1.2, SGD lr 0.2), AdaptiveGradientClipping() defaults, seed {args.seed}"
    )
    bottom.semilogy(steps, [r["loss"] for r in rows], color="lightgrey", lw=0.6, label="training loss")
    bottom.semilogy(steps, [r["smoothed"] for r in rows], color="tab:orange", label="smoothed loss")
    bottom.semilogy(steps, [r["healthy"] for r in rows], color="tab:green", label="healthy level")
    bottom.semilogy(
        steps, [r["elevated"] for r in rows], ":", color="tab:red", label="elevated above (ceiling cut)"
    )
    bottom.set_ylabel("loss")
    bottom.set_xlabel("step")
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=90)
    cuts = clipper.rule(0).cuts  # type: ignore[attr-defined]
    print(
        f"figure: {args.out} ({len(rows)} steps, {cuts} ceiling cuts, final ceiling {rows[-1]['ceiling']:.3g})"
    )


if __name__ == "__main__":
    main()
