"""The demo's exploding RNN, every clipping row, 10 seeds: does the run train through the runaway? (copy A)

The setup (``examples/adding_problem.py``): a 32-unit tanh RNN whose recurrent weights are ``radius`` × a
random orthogonal matrix (1.2), plain SGD (lr 0.2), the adding problem with T = 20, batch 64, 3000 steps;
the final validation MSE on the demo's fixed set of 1,000 sequences, and the validation MSE every 100
steps, for the *steps to MSE < 0.05* (the first multiple of 100 at which it is below). ``--cell gru``
puts a 32-unit ``nn.GRU`` in place of the RNN, each of its three recurrent blocks ``radius`` × its own
random orthogonal matrix. Each row is a real Lightning fit per seed (one CPU thread). A run *diverged*
when its training loss went above 1e3 at any applied step (a run without the guard is stopped at 1e6);
*solved* is a final MSE below 0.05 (predicting the mean scores 0.167); an *error* is a
``GradientExplosionError`` (or any exception).

Rows: ``benchmarks/variants.py`` (``none``, ``clip<c>`` = ``Trainer(gradient_clip_val=c)``, ``defaults``
= both callbacks at defaults, ``clipper`` and ``guard`` alone, ``plain``, ...) and two local ones,
``zscore`` and ``percentile``: ``AdaptiveGradientClipping`` in ZClip's and AutoClip's modes. Default rows:
``none clip0.5 clip1 clip2 defaults clipper guard``.

Bars (issues 11 and 17), printed under the table:

* ``defaults``: every run finishes (no error, never above 1e3); ≥ 80% solve; median MSE ≤ 1.1 × the best
  median of ``clip0.5``, ``clip1``, ``clip2``;
* ``clipper``: never diverges; ≥ 80% solve;
* ``--hard [PRESET ...]``: the presets ``radius1.4``, ``lr0.4``, ``T30``, ``gru`` (each alone, the rest at
  the demo's values) and ``gru_radius3`` (a GRU at the demo's values does not explode), and per preset: ``defaults`` solve as many seeds as the best fixed clip in {0.5, 1, 2} (most solved,
  then lowest median), with a median ≤ 1.25 × its median.

``--rise [PRESET ...]``: a loss that rises *for good by design* under SGD: the presets ``rise`` (the demo's
RNN) and ``rise_gru`` (``--cell gru``), whose targets are multiplied by 3 from step 1000 on (the loss
jumps ×10–100, the gradient norms ×10, and stay there; the validation targets are ×3 too). No bar from an
issue: the line under the table gives the defaults' median against the best fixed clip's (the rule
before its episodes could be undone ended at a loss of 3–5, its ceiling cut to ~1e-6 for good).

Run: ``python benchmarks/runaway.py [--seeds 0 ... 9] [--variants ROW ...] [--steps 3000] [--radius 1.2]
[--lr 0.2] [--T 20] [--cell rnn|gru] [--hard [PRESET ...]] [--rise [PRESET ...]] [--jobs 1] [--json PATH]`` (8–18 s a fit on
one core of the shared 2-core machine, load 3–8; a run without clipping stops at once; the default 7 rows
× 10 seeds took 13 min with one job). ``--tables-from JSON ...`` prints the tables and bars of saved
runs (merged). ``--figure PNG`` draws the threshold of one fit at defaults instead.
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
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adding_problem as demo
from variants import CoefRecorder, guard_counts, variant

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard, GradientExplosionError

DIVERGED_LOSS = 1e3
EVAL_EVERY = 100
DEFAULT_ROWS = ("none", "clip0.5", "clip1", "clip2", "defaults", "clipper", "guard")
FIXED_CLIPS = ("clip0.5", "clip1", "clip2")

LOCAL_ROWS: dict[str, Callable[[], list[pl.Callback]]] = {
    "zscore": lambda: [AdaptiveGradientClipping(mode="zscore")],
    "percentile": lambda: [AdaptiveGradientClipping(mode="percentile")],
}


def row_setup(name: str) -> tuple[Callable[[], list[pl.Callback]], float | None]:
    """The callbacks factory and ``gradient_clip_val`` of row ``name``."""
    if name in LOCAL_ROWS:
        return LOCAL_ROWS[name], None
    v = variant(name)
    return v.callbacks, v.gradient_clip_val


@dataclass(frozen=True)
class Setting:
    name: str = "demo"
    radius: float = 1.2
    lr: float = 0.2
    T: int = 20
    cell: str = "rnn"
    steps: int = 3000
    rise_at: int | None = None  # the targets are multiplied by `rise` from this step on
    rise: float = 3.0


HARD = (
    Setting("radius1.4", radius=1.4),
    Setting("lr0.4", lr=0.4),
    Setting("T30", T=30),
    Setting("gru", cell="gru"),
    Setting("gru_radius3", cell="gru", radius=3.0),
)
"""The ``--hard`` presets. A GRU at the demo's values does not explode (no clipping solves it, MSE
0.002-0.005 on seeds 0-2), hence ``gru_radius3`` too (no clipping blows up on seeds 0 and 1)."""

RISE = (Setting("rise", rise_at=1000), Setting("rise_gru", cell="gru", rise_at=1000))
"""The ``--rise`` presets: the targets ×3 for good from step 1000 (a rise by design, not a runaway)."""


class RisingTargets(IterableDataset):
    """``data``'s batches, their targets multiplied by ``factor`` from the ``at``-th batch on."""

    def __init__(self, data: demo.AddingProblem, at: int, factor: float) -> None:
        self.data, self.at, self.factor = data, at, factor

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, (x, y) in enumerate(self.data):
            yield x, (y * self.factor if i >= self.at else y)


class MaxLoss(pl.Callback):
    """The largest training loss of the applied steps (the guard's skipped ones excluded), and the
    validation MSE every `EVAL_EVERY` steps."""

    def __init__(self, val: Any) -> None:
        self.max = 0.0
        self._loss = math.nan
        self.val = val
        self.history: list[tuple[int, float]] = []

    def on_before_backward(self, trainer: pl.Trainer, pl_module: Any, loss: torch.Tensor) -> None:
        self._loss = float(loss.detach())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        if step % EVAL_EVERY == 0:
            self.history.append((step, demo.evaluate(pl_module, self.val)))
        skipped = [cb for cb in trainer.callbacks if isinstance(cb, ExplosionGuard)]  # type: ignore[attr-defined]
        if skipped and skipped[0].records and skipped[0].records[-1]["step"] == step - 1:
            return  # that step was not applied
        value = self._loss
        self.max = math.inf if not math.isfinite(value) else max(self.max, value)


@dataclass
class Run:
    row: str
    seed: int
    setting: str
    mse: float
    max_loss: float
    error: str | None
    rollbacks: int
    events: int
    divergences: int
    seconds: float
    steps_to_solve: float  # first evaluated step with val MSE < 0.05 (inf: never)
    tail_coef: float

    @property
    def diverged(self) -> bool:
        return not self.max_loss <= DIVERGED_LOSS

    @property
    def solved(self) -> bool:
        return self.error is None and self.mse < demo.SOLVED_MSE

    @property
    def finished(self) -> bool:
        return self.error is None and not self.diverged


def make_model(setting: Setting, guarded: bool) -> demo.SequenceRegressor:
    model = demo.SequenceRegressor(
        cell="rnn",
        hidden=32,
        spectral_radius=setting.radius,
        optimizer="sgd",
        lr=setting.lr,
        stop_on_divergence=not guarded,
    )
    if setting.cell == "gru":
        gru = nn.GRU(2, 32, batch_first=True)
        with torch.no_grad():
            for block in range(3):  # reset, update, candidate
                q, _ = torch.linalg.qr(torch.randn(32, 32))
                gru.weight_hh_l0[block * 32 : (block + 1) * 32].copy_(setting.radius * q)
        model.rnn = gru
    return model


def fit(task: tuple[str, int, Setting]) -> Run:
    """One fit: (row, seed, setting). Runs in a spawned process or in this one."""
    row, seed, setting = task
    torch.set_num_threads(1)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    make_callbacks, clip_val = row_setup(row)
    pl.seed_everything(seed, verbose=False)
    callbacks = make_callbacks()
    guarded = any(isinstance(cb, ExplosionGuard) for cb in callbacks)
    model = make_model(setting, guarded)
    data = demo.AddingProblem(64, setting.T, seed=seed)
    val = demo.validation_set(1000, setting.T)
    if setting.rise_at is not None:
        data = RisingTargets(data, setting.rise_at, setting.rise)
        val = TensorDataset(val.tensors[0], setting.rise * val.tensors[1])
    train = DataLoader(data, batch_size=None)
    track, coefs = MaxLoss(val), CoefRecorder()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=setting.steps,
            logger=False,
            default_root_dir=root,
            callbacks=[*callbacks, coefs, track],
            gradient_clip_val=clip_val,
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
            error = "GradientExplosionError: " + str(err).splitlines()[0]
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
        seconds = time.perf_counter() - start
    mse = demo.evaluate(model, val)
    guard = next((cb for cb in callbacks if isinstance(cb, ExplosionGuard)), None)
    divergences, rollbacks = guard_counts(trainer)
    solved_at = [s for s, m in track.history if m < demo.SOLVED_MSE]
    return Run(
        row=row,
        seed=seed,
        setting=setting.name,
        mse=mse if math.isfinite(mse) else math.inf,
        max_loss=track.max,
        error=error,
        rollbacks=rollbacks,
        events=0 if guard is None else guard.events,
        divergences=divergences,
        seconds=seconds,
        steps_to_solve=float(solved_at[0]) if solved_at else math.inf,
        tail_coef=coefs.tail_median(),
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


def _steps(x: float) -> str:
    return "never" if not math.isfinite(x) else f"{x:.0f}"


def table(setting: Setting, results: dict[str, list[Run]], seeds: Sequence[int]) -> str:
    """The Markdown table of one setting: rows × seeds, medians, solved, diverged, errors, events."""
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [
        f"### {setting.name}: {setting.cell}, radius {setting.radius}, SGD lr {setting.lr}, T={setting.T},"
        f" {setting.steps} steps"
        + ("" if setting.rise_at is None else f", targets x{setting.rise:g} from step {setting.rise_at}"),
        "",
        f"| row | {head} | median MSE | solved | median steps to < 0.05 | diverged | errors | divergence"
        " events | rollbacks | tail coef | s/fit |",
        "|---" * (len(seeds) + 10) + "|",
    ]
    for name, runs in results.items():
        by_seed = {r.seed: r for r in runs}
        cells = " | ".join(cell(by_seed[s]) if s in by_seed else "" for s in seeds)
        lines.append(
            f"| {name} | {cells} | {_num(median([r.mse for r in runs]))}"
            f" | {sum(r.solved for r in runs)}/{len(runs)} | {_steps(median([r.steps_to_solve for r in runs]))}"
            f" | {sum(r.diverged for r in runs)} | {sum(r.error is not None for r in runs)}"
            f" | {sum(r.divergences for r in runs)} | {sum(r.rollbacks for r in runs)}"
            f" | {median([r.tail_coef for r in runs]):.3g} | {statistics.fmean(r.seconds for r in runs):.1f} |"
        )
    lines.append("")
    lines.append(
        "cells: final validation MSE; D: the training loss went above 1e3; E: error (GradientExplosionError);"
        " rN/eN: rollbacks / guard events; steps to < 0.05: first multiple of 100 with val MSE < 0.05"
    )
    return "\n".join(lines)


def best_fixed(results: dict[str, list[Run]]) -> tuple[str, list[Run]] | None:
    """The fixed clip in {0.5, 1, 2} that solves the most seeds, then has the lowest median MSE."""
    fixed = [(n, results[n]) for n in FIXED_CLIPS if n in results]
    if not fixed:
        return None
    return min(fixed, key=lambda kv: (-sum(r.solved for r in kv[1]), median([r.mse for r in kv[1]])))


def bars(results: dict[str, list[Run]], hard: bool, rise: bool = False) -> list[str]:
    """The issue's bars, one line each."""
    out: list[str] = []
    best = best_fixed(results)
    both, alone = results.get("defaults"), results.get("clipper")
    if best and both:
        name, runs = best
        value, m = median([r.mse for r in runs]), median([r.mse for r in both])
        n, solved, finished = len(both), sum(r.solved for r in both), sum(r.finished for r in both)
        steps = median([r.steps_to_solve for r in both])
        ref_steps = median([r.steps_to_solve for r in runs])
        if rise:
            out.append(
                f"rise by design (no bar), defaults: {finished}/{n} finish, {solved}/{n} solve vs"
                f" {sum(r.solved for r in runs)}/{len(runs)} for {name} (the best fixed); median {_num(m)}"
                f" vs {_num(value)} (ratio {m / value:.3f})"
            )
            return out
        if hard:
            ref_solved = sum(r.solved for r in runs)
            ok = solved >= ref_solved and m <= 1.25 * value
            out.append(
                f"bar (hard), defaults: {solved}/{n} solve vs {ref_solved}/{len(runs)} for {name} (the best fixed);"
                f" median {_num(m)} vs 1.25 x {_num(value)} = {_num(1.25 * value)} (ratio {m / value:.3f});"
                f" steps to < 0.05: {_steps(steps)} vs {_steps(ref_steps)}: {'met' if ok else 'MISSED'}"
            )
        else:
            ok = finished == n and solved >= 0.8 * n and m <= 1.1 * value
            out.append(
                f"bar, defaults: {finished}/{n} finish (no error, never above 1e3), {solved}/{n} solve;"
                f" median {_num(m)} vs 1.1 x {_num(value)} ({name}, the best fixed) = {_num(1.1 * value)}"
                f" (ratio {m / value:.3f}); steps to < 0.05: {_steps(steps)} vs {_steps(ref_steps)}:"
                f" {'met' if ok else 'MISSED'}"
            )
    if alone and not hard:
        n_ok, solved = sum(not r.diverged for r in alone), sum(r.solved for r in alone)
        ok = n_ok == len(alone) and solved >= 0.8 * len(alone)
        out.append(
            f"bar, clipper alone: {n_ok}/{len(alone)} never above 1e3, {solved}/{len(alone)} solve:"
            f" {'met' if ok else 'MISSED'}"
        )
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, list[Run]]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument(
        "--variants", nargs="+", default=list(DEFAULT_ROWS), help="rows (variants.py, zscore, percentile)"
    )
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--radius", type=float, default=1.2)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--T", type=int, default=20)
    parser.add_argument("--cell", choices=("rnn", "gru"), default="rnn")
    parser.add_argument(
        "--hard",
        nargs="*",
        default=None,
        metavar="PRESET",
        help=f"hard presets instead of one setting (none named: all of {[h.name for h in HARD]})",
    )
    parser.add_argument(
        "--rise",
        nargs="*",
        default=None,
        metavar="PRESET",
        help=f"rise-by-design presets instead of one setting (none named: all of {[r.name for r in RISE]})",
    )
    parser.add_argument("--jobs", type=int, default=1, help="processes (spawned); 1: in this process")
    parser.add_argument("--json", metavar="PATH", default=None, help="write every run's raw numbers here")
    parser.add_argument(
        "--figure", metavar="PNG", default=None, help="only draw the figure of one fit (seed: the first)"
    )
    parser.add_argument(
        "--tables-from",
        nargs="+",
        metavar="JSON",
        default=None,
        help="no fits: the tables and bars of runs saved with --json (merged; --hard as they were run)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.figure:
        figure(args.figure, args.seeds[0], args.steps, args.radius, args.lr)
        return {}
    for row in args.variants:
        row_setup(row)  # fail early on an unknown row
    if args.hard is not None or args.rise is not None:
        presets, named = (HARD, args.hard) if args.hard is not None else (RISE, args.rise)
        settings = [replace(h, steps=args.steps) for h in presets if not named or h.name in named]
    else:
        name = "demo" if (args.radius, args.lr, args.T, args.cell) == (1.2, 0.2, 20, "rnn") else "custom"
        settings = [Setting(name, args.radius, args.lr, args.T, args.cell, args.steps)]
    tasks = [(row, seed, st) for st in settings for row in args.variants for seed in args.seeds]
    if not args.tables_from:
        print(
            f"exploding RNN (copy A): {len(tasks)} fits, settings {[st.name for st in settings]},"
            f" rows {args.variants}, seeds {args.seeds}, 1 thread per fit, {args.jobs} job(s)",
            flush=True,
        )
    runs: list[Run] = []
    if args.tables_from:
        saved: dict[tuple[str, str, int], Run] = {}
        for path in args.tables_from:
            with open(path) as f:
                for d in json.load(f):
                    d.pop("diverged", None), d.pop("solved", None)
                    saved[(d["setting"], d["row"], d["seed"])] = Run(**d)
        runs = [r for r in saved.values() if r.seed in args.seeds]
        names = list(dict.fromkeys(r.setting for r in runs))
        known = {st.name: st for st in (*HARD, *RISE, Setting())}
        settings = [known.get(n, Setting(n)) for n in names]
        args.seeds = sorted({r.seed for r in runs})
        tasks = []
        print(f"saved runs: {len(runs)} from {args.tables_from}")

    def done(r: Run) -> None:
        runs.append(r)
        if args.json:  # rewritten after each run: an interrupted benchmark keeps what it measured
            with open(args.json, "w") as f:
                json.dump(
                    [{**asdict(x), "diverged": x.diverged, "solved": x.solved} for x in runs], f, indent=1
                )
        print(
            f"  {r.setting} {r.row} seed {r.seed}: {cell(r)} steps<0.05 {_steps(r.steps_to_solve)}"
            f" {r.seconds:.1f}s{' ' + r.error if r.error else ''}",
            flush=True,
        )

    if args.jobs <= 1:
        for task in tasks:
            done(fit(task))
    else:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.imap_unordered(fit, tasks):
                done(r)
    out: dict[str, dict[str, list[Run]]] = {}
    for st in settings:
        rows = list(dict.fromkeys([*args.variants, *(r.row for r in runs)]))
        results = {
            row: sorted((r for r in runs if r.setting == st.name and r.row == row), key=lambda r: r.seed)
            for row in rows
        }
        results = {row: rr for row, rr in results.items() if rr}
        out[st.name] = results
        print()
        print(table(st, results, sorted({r.seed for rr in results.values() for r in rr})))
        print()
        for line in bars(results, hard=st.name in {h.name for h in HARD}, rise=st.rise_at is not None):
            print(line)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
