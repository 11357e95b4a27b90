"""The demo's exploding RNN, every clipping setup, several seeds: does the run train through the runaway?

The setup (``examples/adding_problem.py``): a 32-unit tanh RNN whose recurrent weights are ``radius`` × a
random orthogonal matrix (1.2), plain SGD (lr 0.2), the adding problem with T = 20, batch 64, 3000 steps;
the final validation MSE on the demo's fixed set of 1,000 sequences. Each row is a real Lightning fit per
seed. A run *diverged* when its training loss went above 1e3 at any applied step (a run without the guard
is stopped at 1e6); *solved* is a final MSE below 0.05 (predicting the mean scores 0.167).

Rows: no clipping; ``Trainer(gradient_clip_val=c)`` for c in 0.5, 1, 2, 5; ``AdaptiveGradientClipping`` in
ZClip's and AutoClip's modes (our parity modes, at our defaults); ``AdaptiveGradientClipping()`` alone at
defaults; ``ExplosionGuard()`` alone; both at defaults. The last lines check the issue's bars.

Run: ``python benchmarks/runaway.py [--seeds 0 1 2 3 4] [--steps 3000] [--radius 1.2] [--lr 0.2]
[--only ROW ...] [--threads 1]`` (about 30 s per fit on one busy core).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import adding_problem as demo

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard, GradientExplosionError

DIVERGED_LOSS = 1e3


@dataclass(frozen=True)
class Row:
    name: str
    callbacks: Callable[[], list[pl.Callback]]
    gradient_clip_val: float | None = None


ROWS = [
    Row("no clipping", list),
    *[Row(f"gradient_clip_val={c:g}", list, c) for c in (0.5, 1.0, 2.0, 5.0)],
    Row('mode="zscore" (ZClip)', lambda: [AdaptiveGradientClipping(mode="zscore")]),
    Row('mode="percentile" (AutoClip)', lambda: [AdaptiveGradientClipping(mode="percentile")]),
    Row("AdaptiveGradientClipping()", lambda: [AdaptiveGradientClipping()]),
    Row("ExplosionGuard()", lambda: [ExplosionGuard()]),
    Row(
        "AdaptiveGradientClipping() + ExplosionGuard()",
        lambda: [AdaptiveGradientClipping(), ExplosionGuard()],
    ),
]


class MaxLoss(pl.Callback):
    """The largest training loss of the applied steps (the guard's skipped ones excluded)."""

    def __init__(self) -> None:
        self.max = 0.0
        self._loss = math.nan

    def on_before_backward(self, trainer: pl.Trainer, pl_module: Any, loss: torch.Tensor) -> None:
        self._loss = float(loss.detach())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        skipped = [cb for cb in trainer.callbacks if isinstance(cb, ExplosionGuard)]  # type: ignore[attr-defined]
        if skipped and skipped[0].records and skipped[0].records[-1]["step"] == trainer.global_step - 1:
            return  # that step was not applied
        value = self._loss
        self.max = math.inf if not math.isfinite(value) else max(self.max, value)


@dataclass
class Run:
    mse: float
    max_loss: float
    error: str | None
    rollbacks: int
    events: int
    seconds: float

    @property
    def diverged(self) -> bool:
        return not self.max_loss <= DIVERGED_LOSS

    @property
    def solved(self) -> bool:
        return self.error is None and self.mse < demo.SOLVED_MSE


def fit(row: Row, seed: int, steps: int, radius: float, lr: float) -> Run:
    pl.seed_everything(seed, verbose=False)
    callbacks = row.callbacks()
    guarded = any(isinstance(cb, ExplosionGuard) for cb in callbacks)
    model = demo.SequenceRegressor(
        cell="rnn", hidden=32, spectral_radius=radius, optimizer="sgd", lr=lr, stop_on_divergence=not guarded
    )
    train = DataLoader(demo.AddingProblem(64, 20, seed=seed), batch_size=None)
    track = MaxLoss()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            logger=False,
            default_root_dir=root,
            callbacks=[*callbacks, track],
            gradient_clip_val=row.gradient_clip_val,
            limit_val_batches=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        error = None
        start = time.perf_counter()
        try:
            trainer.fit(model, train)
        except GradientExplosionError as err:
            error = str(err).splitlines()[0]
        seconds = time.perf_counter() - start
    mse = demo.evaluate(model, demo.validation_set(1000, 20))
    guard = next((cb for cb in callbacks if isinstance(cb, ExplosionGuard)), None)
    return Run(
        mse=mse if math.isfinite(mse) else math.inf,
        max_loss=track.max,
        error=error,
        rollbacks=0 if guard is None else guard.rollbacks,
        events=0 if guard is None else guard.events,
        seconds=seconds,
    )


class Trace(pl.Callback):
    """Per step, after the clipper committed it: pre-clip norm, threshold, the ceiling, the plain mean term,
    the training loss, its smoothed value and its healthy level (listed after the clipper)."""

    def __init__(self, clipper: AdaptiveGradientClipping, guard: ExplosionGuard | None) -> None:
        self.clipper, self.guard = clipper, guard
        self.rows: list[dict[str, float]] = []
        self._loss = math.nan

    def on_before_backward(self, trainer: pl.Trainer, pl_module: Any, loss: torch.Tensor) -> None:
        self._loss = float(loss.detach())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.clipper.on_train_batch_end()  # commit the step (idempotent)
        rule = self.clipper.rule(0)
        band = rule.band  # type: ignore[attr-defined]
        norm, threshold, _ = self.clipper.last[0]
        self.rows.append(
            {
                "step": trainer.global_step - 1,
                "norm": norm,
                "threshold": threshold,
                "ceiling": rule.ceiling,  # type: ignore[attr-defined]
                "mean_term": rule.mean_term(),  # type: ignore[attr-defined]
                "loss": self._loss,
                "smoothed": math.exp(band.ema / band.weight) if band.weight else math.nan,
                "healthy": math.exp(band.reference) if band.reference is not None else math.nan,
                "cut_level": math.exp(band.reference + band.elevated_excess())
                if band.reference is not None
                else math.nan,
                "event": float(
                    bool(
                        self.guard
                        and self.guard.records
                        and self.guard.records[-1]["step"] == trainer.global_step - 1
                    )
                ),
            }
        )


def figure(path: str, seed: int, steps: int, radius: float, lr: float) -> None:
    """The threshold and the signal that drives it, against steps, for one fit at defaults."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pl.seed_everything(seed, verbose=False)
    model = demo.SequenceRegressor(
        cell="rnn", hidden=32, spectral_radius=radius, optimizer="sgd", lr=lr, stop_on_divergence=False
    )
    clipper, guard = AdaptiveGradientClipping(), ExplosionGuard()
    trace = Trace(clipper, guard)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            logger=False,
            default_root_dir=root,
            callbacks=[clipper, guard, trace],
            limit_val_batches=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, DataLoader(demo.AddingProblem(64, 20, seed=seed), batch_size=None))
    rows = trace.rows
    x = [r["step"] for r in rows]
    fig = Figure(figsize=(8.0, 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(x, [r["norm"] for r in rows], color="C0", linewidth=0.6, label="pre-clip gradient norm")
    top.plot(
        x,
        [r["mean_term"] for r in rows],
        color="grey",
        linestyle=":",
        linewidth=1.2,
        label="1.5 × running mean (the plain rule)",
    )
    top.plot(
        x, [r["ceiling"] for r in rows], color="C3", linewidth=1.2, label="ceiling learned from the loss"
    )
    top.plot(
        x,
        [r["threshold"] for r in rows],
        color="black",
        linestyle="--",
        linewidth=1.0,
        label="threshold applied",
    )
    top.set_yscale("log")
    top.set_ylabel("gradient norm")
    top.legend(fontsize=7, loc="upper right")
    top.set_title(
        f"AdaptiveGradientClipping() on the exploding RNN (radius {radius}, SGD lr {lr}, seed {seed})",
        fontsize=10,
    )
    bottom.plot(x, [r["loss"] for r in rows], color="0.6", linewidth=0.5, label="training loss")
    bottom.plot(x, [r["smoothed"] for r in rows], color="C1", linewidth=1.2, label="smoothed loss")
    bottom.plot(x, [r["healthy"] for r in rows], color="C2", linewidth=1.2, label="its healthy level")
    bottom.plot(
        x,
        [r["cut_level"] for r in rows],
        color="C2",
        linestyle=":",
        linewidth=1.0,
        label="elevated above this (1.25–2 × healthy, by the noise): the ceiling is cut",
    )
    for r in rows:
        if r["event"]:
            bottom.axvline(r["step"], color="red", linewidth=0.8)
    bottom.set_yscale("log")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("loss")
    bottom.legend(fontsize=7, loc="upper right")
    fig.savefig(path, dpi=100)
    print(f"figure: {path}")


def _num(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.1e}"


def cell(r: Run) -> str:
    flags = "".join(("D" if r.diverged else "", "E" if r.error else ""))
    extra = f" r{r.rollbacks}/e{r.events}" if (r.rollbacks or r.events) else ""
    return f"{_num(r.mse)}{flags}{extra}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def main(argv: Sequence[str] | None = None) -> dict[str, list[Run]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--radius", type=float, default=1.2)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--only", nargs="*", default=None, help="rows whose name contains one of these")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--figure", metavar="PNG", default=None, help="only draw the figure of one fit (seed: the first)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.figure:
        figure(args.figure, args.seeds[0], args.steps, args.radius, args.lr)
        return {}
    rows = [r for r in ROWS if args.only is None or any(o in r.name for o in args.only)]
    results: dict[str, list[Run]] = {}
    print(
        f"exploding RNN: radius {args.radius}, SGD lr {args.lr}, T=20, {args.steps} steps, seeds {args.seeds},"
        f" {args.threads} thread(s)"
    )
    for row in rows:
        results[row.name] = [fit(row, seed, args.steps, args.radius, args.lr) for seed in args.seeds]
        runs = results[row.name]
        print(
            f"  {row.name}: {' '.join(cell(r) for r in runs)} ({sum(r.seconds for r in runs):.0f} s)",
            flush=True,
        )
    print()
    head = " | ".join(f"seed {s}" for s in args.seeds)
    print(f"| setup | {head} | median MSE | solved | diverged | errors | rollbacks | events |")
    print("|---" * (len(args.seeds) + 7) + "|")
    for name, runs in results.items():
        print(
            f"| {name} | {' | '.join(cell(r) for r in runs)} | {_num(median([r.mse for r in runs]))}"
            f" | {sum(r.solved for r in runs)}/{len(runs)} | {sum(r.diverged for r in runs)}"
            f" | {sum(r.error is not None for r in runs)} | {sum(r.rollbacks for r in runs)}"
            f" | {sum(r.events for r in runs)} |"
        )
    print(
        "\ncells: final validation MSE; D: the training loss went above 1e3; E: GradientExplosionError;"
        " rN/eN: rollbacks / guard events"
    )
    fixed = {
        n: median([r.mse for r in runs]) for n, runs in results.items() if n.startswith("gradient_clip_val")
    }
    best = {
        n: m
        for n, m in fixed.items()
        if n in ("gradient_clip_val=0.5", "gradient_clip_val=1", "gradient_clip_val=2")
    }
    both = results.get("AdaptiveGradientClipping() + ExplosionGuard()")
    alone = results.get("AdaptiveGradientClipping()")
    if best and both:
        name, value = min(best.items(), key=lambda kv: kv[1])
        m = median([r.mse for r in both])
        ok = all(r.error is None and not r.diverged for r in both)
        print(
            f"bar, clipper + guard: {sum(r.error is None and not r.diverged for r in both)}/{len(both)} finish"
            f" without error or divergence, {sum(r.solved for r in both)}/{len(both)} solve; median {_num(m)}"
            f" vs 1.1 x {_num(value)} ({name}, the best fixed median) = {_num(1.1 * value)}:"
            f" {'met' if ok and m <= 1.1 * value and sum(r.solved for r in both) >= 0.8 * len(both) else 'MISSED'}"
            f" (ratio {m / value:.3f})"
        )
    if alone:
        n_ok = sum(not r.diverged for r in alone)
        print(
            f"bar, clipper alone: {n_ok}/{len(alone)} never above 1e3, {sum(r.solved for r in alone)}/{len(alone)}"
            f" solve: {'met' if n_ok == len(alone) and sum(r.solved for r in alone) >= 0.8 * len(alone) else 'MISSED'}"
        )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
