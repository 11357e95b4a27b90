"""The exploding RNN of issue 17, copy B: a runaway that the defaults must stop without a user threshold.

Written independently of ``runaway.py`` (copy A): its own long-memory task, initialisation, batching and
model code; the rows come from ``benchmarks/variants.py``.

Setting (defaults of the options): a one-layer tanh RNN (``--cell rnn``, 64 units; ``--cell gru`` a GRU)
as a ``LightningModule``, plain SGD (no momentum) lr 0.2, 3000 steps of 32 fresh sequences of length
T = 20, one intra-op thread per process, deterministic per seed.

* Task, the *signed adding problem*: each time step carries a value ~ U[0, 1] and a marker channel; one
  step in the first half is marked +1, one in the second half −1, and the target is the difference of
  the two marked values (read from the last hidden state). Its variance is 1/6: predicting the mean
  (0) gives MSE 0.1667. Solved: validation MSE < 0.05 (1000 fixed sequences, checked every 100 steps).
* Initialisation: every recurrent block is ``radius ×`` a rotation ``exp(A − Aᵀ)`` (A Gaussian, std
  1/√H), so its spectral radius is exactly ``radius`` (1.2: exploding); input weights N(0, 1/2),
  biases 0, readout N(0, 1/H).
* Diverged: a training loss above 1e3 at any step. A run without ``ExplosionGuard`` is stopped at a loss
  above 1e6 or a non-finite loss (it does not finish). Errors (any exception) are counted.

Bars (issue 17; base setting): ``defaults`` — every run finishes, ≥ 80% solve, median final MSE ≤ 1.1 ×
the best fixed clip's in {0.5, 1, 2}; ``clipper`` — never diverges, ≥ 80% solve. ``--hard`` runs four
settings, each changing one thing (radius 1.4; lr 0.4; T = 30; GRU): there ``defaults`` must solve as
many seeds as the best fixed clip, with a median final MSE ≤ 1.25 × its median. ``--rise`` runs a loss
that rises *for good by design*: the RNN and the GRU whose targets (training and validation) are ×3 from
step 1000 on; no bar from an issue, the defaults' median against the best fixed clip's is reported
(``n/a`` rows of the bars table).

Commands (from the repository root)::

    PYTHONPATH=. python benchmarks/runaway_b.py --json bench_out/runaway_b.json          # 10 seeds × 7 rows
    PYTHONPATH=. python benchmarks/runaway_b.py --hard --seeds 0 1 2 --json bench_out/runaway_b_hard.json

Runtime (measured 2026-12-06 on a 2-core machine shared with other jobs, ``--jobs 1``): 10–17 s per
3000-step fit of the base setting at load ~3, 24–54 s at load ~7 (a ``none`` run is stopped within a
few steps, a ``guard`` run ends in ``GradientExplosionError`` within a second); the default grid (70 fits)
took 639 s. ``--hard`` (4 settings) took 888 s for 5 rows × 2 seeds (GRU fits ~28 s).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from variants import CoefRecorder, bench_trainer, guard_counts, variant

from lightning_clip import ExplosionGuard

torch.set_num_threads(1)

SOLVED = 0.05
BASELINE = 1 / 6
DIVERGED = 1e3
STOP = 1e6
VAL_EVERY = 100


@dataclass(frozen=True)
class Setting:
    radius: float = 1.2
    lr: float = 0.2
    T: int = 20
    cell: str = "rnn"
    steps: int = 3000
    hidden: int = 64
    batch: int = 32
    rise_at: int | None = None  # targets ×`rise` from this step on (a rise by design)
    rise: float = 3.0

    @property
    def label(self) -> str:
        rise = "" if self.rise_at is None else f" targets x{self.rise:g} from {self.rise_at}"
        return f"{self.cell} radius {self.radius} lr {self.lr} T {self.T}{rise}"

    def scale(self, step: int) -> float:
        """The targets' factor at ``step`` (the validation set's: at the end of the run)."""
        return self.rise if self.rise_at is not None and step >= self.rise_at else 1.0


def signed_adding(n: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Values U[0, 1]; marker +1 at one step of the first half, −1 at one of the second; y = x₊ − x₋."""
    values = torch.rand(n, length, generator=gen)
    half = length // 2
    plus = torch.randint(0, half, (n,), generator=gen)
    minus = torch.randint(half, length, (n,), generator=gen)
    markers = torch.zeros(n, length)
    rows = torch.arange(n)
    markers[rows, plus] = 1.0
    markers[rows, minus] = -1.0
    target = values[rows, plus] - values[rows, minus]
    return torch.stack([values, markers], dim=2), target


def scaled_rotation(size: int, radius: float, gen: torch.Generator) -> Tensor:
    """``radius × exp(A − Aᵀ)``: a rotation (orthogonal, det 1) scaled to spectral radius ``radius``."""
    a = torch.randn(size, size, generator=gen) / math.sqrt(size)
    return radius * torch.linalg.matrix_exp(a - a.T)


class RecurrentRegressor(pl.LightningModule):
    def __init__(self, setting: Setting, seed: int) -> None:
        super().__init__()
        self.setting = setting
        self.seed = seed
        h = setting.hidden
        cls = {"rnn": nn.RNN, "gru": nn.GRU}[setting.cell]
        self.rnn = cls(2, h, batch_first=True)
        self.readout = nn.Linear(h, 1)
        gen = torch.Generator().manual_seed(10_007 * (seed + 1))
        blocks = 1 if setting.cell == "rnn" else 3
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(
                torch.cat([scaled_rotation(h, setting.radius, gen) for _ in range(blocks)])
            )
            self.rnn.weight_ih_l0.copy_(
                torch.randn(self.rnn.weight_ih_l0.shape, generator=gen) / math.sqrt(2)
            )
            self.rnn.bias_hh_l0.zero_()
            self.rnn.bias_ih_l0.zero_()
            self.readout.weight.copy_(torch.randn(1, h, generator=gen) / math.sqrt(h))
            self.readout.bias.zero_()
        x, y = signed_adding(1000, setting.T, torch.Generator().manual_seed(2718))
        self.val = (x, setting.scale(setting.steps) * y)

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.rnn(x)[0][:, -1]).squeeze(-1)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        gen = torch.Generator().manual_seed(1_000_003 * (self.seed + 1) + int(batch))
        x, y = signed_adding(self.setting.batch, self.setting.T, gen)
        return F.mse_loss(self(x), self.setting.scale(int(batch)) * y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.setting.lr)

    @torch.no_grad()
    def val_mse(self) -> float:
        value = float(F.mse_loss(self(self.val[0]), self.val[1]))
        return value if math.isfinite(value) else math.inf


class Tracker(pl.Callback):
    """Validation MSE every ``VAL_EVERY`` steps, the first step below ``SOLVED``, divergence and stop."""

    def __init__(self, stop: bool) -> None:
        self.stop = stop
        self.history: list[tuple[int, float]] = []
        self.solved_at: int | None = None
        self.max_loss = 0.0
        self.diverged = False
        self.stopped = False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
        if not math.isfinite(loss):
            loss = math.inf
        self.max_loss = max(self.max_loss, loss)
        self.diverged = self.diverged or loss > DIVERGED
        if self.stop and loss > STOP:
            self.stopped = True
            trainer.should_stop = True
        step = trainer.global_step
        if step % VAL_EVERY == 0:
            mse = pl_module.val_mse()
            self.history.append((step, mse))
            if self.solved_at is None and mse < SOLVED:
                self.solved_at = step


def quiet() -> None:
    torch.set_num_threads(1)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_one(task: tuple[dict[str, Any], str, int]) -> dict[str, Any]:
    setting_dict, variant_name, seed = task
    quiet()
    setting = Setting(**setting_dict)
    row = variant(variant_name)
    pl.seed_everything(seed, verbose=False)
    module = RecurrentRegressor(setting, seed)
    callbacks = row.callbacks()
    tracker = Tracker(stop=not any(isinstance(cb, ExplosionGuard) for cb in callbacks))
    recorder = CoefRecorder()
    error = None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = bench_trainer([*callbacks, recorder, tracker], row.gradient_clip_val, root)
        loader = DataLoader(torch.arange(setting.steps), batch_size=None)  # type: ignore[arg-type]
        try:
            trainer.fit(module, loader)
        except Exception as exc:  # counted as an error, whatever it is
            error = f"{type(exc).__name__}: {exc}".replace("\n", " / ")[:300]
    final = module.val_mse()
    divergences, rollbacks = guard_counts(trainer)
    return {
        "setting": asdict(setting),
        "label": setting.label,
        "variant": variant_name,
        "seed": seed,
        "final_mse": final,
        "solved": final < SOLVED,
        "steps_to_solve": tracker.solved_at,
        "diverged": tracker.diverged,
        "stopped": tracker.stopped,
        "max_loss": tracker.max_loss,
        "error": error,
        "divergences": divergences,
        "rollbacks": rollbacks,
        "tail_coef": recorder.tail_median(),
        "steps": int(trainer.global_step),
        "history": tracker.history,
        "wall_s": time.perf_counter() - start,
    }


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isinf(value)):
        return "∞" if value is not None else "never"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per row: solves, median final MSE (a failed run counts as ∞), median steps to solve (never: ∞)."""
    steps = [r["steps_to_solve"] if r["steps_to_solve"] is not None else math.inf for r in runs]
    return {
        "n": len(runs),
        "solved": sum(r["solved"] for r in runs),
        "median_mse": median([r["final_mse"] if math.isfinite(r["final_mse"]) else math.inf for r in runs]),
        "median_steps": median(steps),
        "diverged": sum(r["diverged"] for r in runs),
        "finished": sum(r["error"] is None and not r["stopped"] for r in runs),
        "errors": sum(r["error"] is not None for r in runs),
        "events": sum(r["divergences"] for r in runs),
        "rollbacks": sum(r["rollbacks"] for r in runs),
        "tail_coef": median([r["tail_coef"] for r in runs]),
        "wall": median([r["wall_s"] for r in runs]),
    }


def tables(label: str, runs: list[dict[str, Any]], variants: list[str], seeds: list[int]) -> str:
    head = "| variant | solved | median MSE | median steps to < 0.05 | diverged | finished | errors | div events | rollbacks | tail coef | wall s |"
    out = [f"### {label} (baseline MSE of the mean {BASELINE:.4f})", "", head, "|---" * 11 + "|"]
    for v in variants:
        rows = [r for r in runs if r["variant"] == v]
        if rows:
            s = summary(rows)
            out.append(
                f"| {v} | {s['solved']}/{s['n']} | {fmt(s['median_mse'])} | {fmt(s['median_steps'])} | "
                f"{s['diverged']} | {s['finished']}/{s['n']} | {s['errors']} | {s['events']} | {s['rollbacks']} | "
                f"{s['tail_coef']:.3g} | {s['wall']:.1f} |"
            )
    out += ["", "final MSE (steps to < 0.05) per seed:", ""]
    out += ["| variant | " + " | ".join(f"s{s}" for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    for v in variants:
        by_seed = {r["seed"]: r for r in runs if r["variant"] == v}
        if by_seed:
            cells = []
            for s in seeds:
                r = by_seed.get(s)
                if r is None:
                    cells.append("-")
                    continue
                tag = "E" if r["error"] else ("S" if r["stopped"] else "")
                cells.append(f"{fmt(r['final_mse'])} ({fmt(r['steps_to_solve'])}){tag}")
            out.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def best_clip(runs: list[dict[str, Any]], by_solves: bool) -> tuple[str | None, dict[str, Any] | None]:
    best: tuple[str | None, dict[str, Any] | None] = (None, None)
    for v in ("clip0.5", "clip1", "clip2"):
        rows = [r for r in runs if r["variant"] == v]
        if not rows:
            continue
        s = summary(rows)
        key = (-s["solved"], s["median_mse"]) if by_solves else (s["median_mse"],)
        if best[1] is None or key < (
            (-best[1]["solved"], best[1]["median_mse"]) if by_solves else (best[1]["median_mse"],)
        ):
            best = (v, s)
    return best


def bars(label: str, runs: list[dict[str, Any]], hard: bool, rise: bool = False) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(bar: str, value: Any, met: bool | None, detail: str = "") -> None:
        out.append({"setting": label, "bar": bar, "value": value, "met": met, "detail": detail})

    defaults = [r for r in runs if r["variant"] == "defaults"]
    clipper = [r for r in runs if r["variant"] == "clipper"]
    name, ref = best_clip(runs, by_solves=hard)
    if defaults:
        d = summary(defaults)
        ratio = d["median_mse"] / ref["median_mse"] if ref and ref["median_mse"] > 0 else math.nan
        if rise:
            add("defaults: every run finishes", f"{d['finished']}/{d['n']}", None)
            add(f"defaults median ÷ {name}'s", ratio, None, f"{fmt(d['median_mse'])} vs {fmt(ref['median_mse'])}"
                if ref else "")  # fmt: skip
        elif hard:
            if ref:
                add(
                    f"defaults solve ≥ {name}",
                    f"{d['solved']} vs {ref['solved']}",
                    d["solved"] >= ref["solved"],
                )
                add(f"defaults median ≤ 1.25 × {name}", ratio, bool(ratio <= 1.25),
                    f"{fmt(d['median_mse'])} vs {fmt(ref['median_mse'])}")  # fmt: skip
        else:
            add("defaults: every run finishes", f"{d['finished']}/{d['n']}", d["finished"] == d["n"])
            add("defaults: ≥ 80% solve", f"{d['solved']}/{d['n']}", d["solved"] >= 0.8 * d["n"])
            if ref:
                add(f"defaults median ≤ 1.1 × {name}", ratio, bool(ratio <= 1.1),
                    f"{fmt(d['median_mse'])} vs {fmt(ref['median_mse'])}")  # fmt: skip
    if clipper and not hard and not rise:
        c = summary(clipper)
        add("clipper: never diverges", f"{c['diverged']} diverged", c["diverged"] == 0)
        add("clipper: ≥ 80% solve", f"{c['solved']}/{c['n']}", c["solved"] >= 0.8 * c["n"])
    return out


def bars_table(all_bars: list[dict[str, Any]]) -> str:
    lines = ["### Bars (issue 17)", "", "| setting | bar | value | met | detail |", "|---|---|---|---|---|"]
    for b in all_bars:
        value = f"{b['value']:.4g}" if isinstance(b["value"], float) else str(b["value"])
        met = "n/a" if b["met"] is None else ("met" if b["met"] else "**missed**")
        lines.append(f"| {b['setting']} | {b['bar']} | {value} | {met} | {b['detail']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--radius", type=float, default=1.2)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--T", type=int, default=20)
    parser.add_argument("--cell", choices=["rnn", "gru"], default="rnn")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    parser.add_argument(
        "--variants", nargs="+", default=["none", "clip0.5", "clip1", "clip2", "defaults", "clipper", "guard"]
    )
    parser.add_argument("--hard", action="store_true", help="radius 1.4; lr 0.4; T = 30; GRU — each alone")
    parser.add_argument(
        "--rise", action="store_true", help="the RNN and the GRU, targets ×3 from step 1000 (by design)"
    )
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for v in args.variants:
        variant(v)
    base = Setting(radius=args.radius, lr=args.lr, T=args.T, cell=args.cell, steps=args.steps)
    settings = (
        [replace(base, radius=1.4), replace(base, lr=0.4), replace(base, T=30), replace(base, cell="gru")]
        if args.hard
        else [replace(base, rise_at=1000), replace(base, cell="gru", rise_at=1000)]
        if args.rise
        else [base]
    )
    tasks = [(asdict(s), v, seed) for s in settings for seed in args.seeds for v in args.variants]
    print(f"# runaway_b: {len(tasks)} fits, torch threads 1 per process, --jobs {args.jobs}", flush=True)
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
    all_bars: list[dict[str, Any]] = []
    for s in settings:
        label_runs = [r for r in runs if r["label"] == s.label]
        print("\n" + tables(s.label, label_runs, args.variants, args.seeds))
        all_bars += bars(s.label, label_runs, args.hard, args.rise)
    print("\n" + bars_table(all_bars))
    print(f"\ntotal wall {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": vars(args) | {"json": str(args.json)}, "runs": runs, "bars": all_bars}
        args.json.write_text(json.dumps(payload, indent=1, default=str))
    return 0


def progress(run: dict[str, Any]) -> None:
    status = f"ERROR {run['error']}" if run["error"] else ("STOPPED" if run["stopped"] else "")
    print(
        f"  {run['label']} {run['variant']:>9} seed {run['seed']}: mse {fmt(run['final_mse'])} "
        f"solved@{fmt(run['steps_to_solve'])} max loss {run['max_loss']:.3g} div {run['divergences']} "
        f"rb {run['rollbacks']} coef {run['tail_coef']:.3g} {status} {run['wall_s']:.1f}s",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
