"""Why clip 1 trains copy B's SGD residual CNN to a lower loss than no clipping (issue 17).

``healthy_b.py``'s ``sgd_resnet`` (SGD with heavy-ball momentum 0.9, lr 0.05, ×0.1 at 75% of 1250 steps)
ends with a training loss ~0.75 × no clipping's under ``gradient_clip_val=1.0``, and the defaults land
between the two. Is clip 1 a shorter step the defaults fail to learn, or another optimizer? Rows: no
clipping at the zoo's lr and at lower ones, and clip 1 at the zoo's lr. Columns: the medians over seeds
of the final training loss (the whole training set, eval mode) and the test accuracy, and, per quarter
of the run, of the fraction of steps whose pre-clip gradient norm (all parameters, before Lightning's
clipping) is above 1: where clip 1 binds.

Command (from the repository root)::

    PYTHONPATH=. python benchmarks/sgd_resnet_clip.py --seeds 0 1 2 3 4 --jobs 2

Measured 2026-12-06 (2-core machine, seeds 0–4, 20 s a fit): no clipping at lr 0.05 loss 0.0307, at 0.03
0.0379, at 0.02 0.0525; clip 1 at 0.05 0.0233, binding on 48%, 40%, 51% and 16% of the steps of the four
quarters. A shorter step does worse; clip 1 stands at the median norm and shortens the larger half of
the steps only.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
from typing import Any

import pytorch_lightning as pl
import torch
from healthy_b import SGDResNet, quiet
from torch.utils.data import DataLoader
from variants import bench_trainer

from lightning_clip.functional.norms import collect_grads, total_norm

ROWS = (("none", 0.05), ("clip1", 0.05), ("none", 0.03), ("none", 0.02))
"""(clip, lr): ``none`` or ``clip<c>`` (Lightning's ``gradient_clip_val=c``) at SGD learning rate lr."""


class NormRecorder(pl.Callback):
    """The pre-clip gradient norm of all parameters at each optimizer step (Lightning clips after
    ``on_before_optimizer_step``)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.norms.append(float(total_norm(collect_grads(pl_module.parameters()))))


def run_one(task: tuple[str, float, int]) -> dict[str, Any]:
    """One fit of the residual CNN: its metrics and, per quarter, the fraction of norms above 1."""
    row, lr, seed = task
    quiet()
    pl.seed_everything(seed, verbose=False)
    module = SGDResNet(seed, lr=lr)
    recorder = NormRecorder()
    clip = None if row == "none" else float(row.removeprefix("clip"))
    with tempfile.TemporaryDirectory() as root:
        trainer = bench_trainer([recorder], clip, root)
        trainer.fit(module, DataLoader(torch.arange(module.STEPS), batch_size=None))  # type: ignore[arg-type]
    norms, quarter = recorder.norms, len(recorder.norms) // 4
    above = [sum(n > 1.0 for n in norms[i * quarter : (i + 1) * quarter]) / quarter for i in range(4)]
    return {"row": row, "lr": lr, "seed": seed, **module.evaluate(), "above_1": above}


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| row | lr | train loss | accuracy | norm > 1, quarters 1–4 |",
        "|---|---|---|---|---|",
    ]
    for row, lr in ROWS:
        rs = [r for r in runs if (r["row"], r["lr"]) == (row, lr)]
        above = " / ".join(f"{statistics.median(r['above_1'][i] for r in rs):.0%}" for i in range(4))
        loss = statistics.median(r["loss"] for r in rs)
        accuracy = statistics.median(r["accuracy"] for r in rs)
        lines.append(f"| {row} | {lr} | {loss:.4f} | {accuracy:.4f} | {above} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args(argv)
    tasks = [(row, lr, seed) for seed in args.seeds for row, lr in ROWS]
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs, initializer=quiet) as pool:
            runs = pool.map(run_one, tasks)
    else:
        runs = [run_one(task) for task in tasks]
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
