"""What a VanishingGradientMonitor check step costs, against a plain training step, in a real ``Trainer``.

The variants run inside ONE fit, alternated step by step in a seeded random order inside each block (the
``Alternator`` of ``benchmarks/overhead.py``: the whole step is timed, data, forward, backward, every
callback and the optimizer); per block each variant is paired with the bare step of the same block, and the
table shows the median paired difference relative to the median bare step, with a 95% bootstrap interval.

* ``bare``: no monitor.
* ``other step``: a monitor on a step that is not a check step (``check_every_n_steps`` larger than the run):
  it keeps the step's loss as a tensor and reads the learning rate, nothing else.
* ``check``: every step a check step, nothing due (causes not measured: the per-layer pass, the
  through-time profiles and the one host transfer, as before causes existed).
* ``check + causes``: every step a check step at which a warning may be due, so the causes are measured
  too: the autograd graph read before backward (activation sites, structure), recurrent gates recomputed,
  weight scales, all in the same transfer. This is what the monitor pays only at a check where a layer has
  been flagged ``patience - 1`` times in a row (or every check with ``log_layer_metrics=True``).

Run: ``python benchmarks/monitor_check.py [--blocks N] [--threads T] [--models lstm,transformer,mlp,many,sigmoid]``.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import Alternator, Model, _mse_loss, bootstrap_ci, build

from lightning_clip import VanishingGradientMonitor

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)


class AlwaysDue(VanishingGradientMonitor):
    """A monitor for which every check may raise a warning, so every check measures the causes."""

    def _may_warn(self) -> bool:
        return True


def build_model(name: str) -> tuple[Model, DataLoader]:
    if name == "sigmoid":  # the calibration's 30-layer sigmoid MLP, functional sigmoid between Linear layers
        layers: list[nn.Module] = [nn.Linear(8, 16)]
        for _ in range(28):
            layers += [nn.Sigmoid(), nn.Linear(16, 16)]
        net = nn.Sequential(*layers, nn.Sigmoid(), nn.Linear(16, 1))
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(512, 8, generator=g), torch.randn(512, 1, generator=g)
        return Model(net, _mse_loss), DataLoader(TensorDataset(x, y), batch_size=16)
    return build(name)


def variants() -> dict[str, list[pl.Callback]]:
    return {
        "bare": [],
        "other step": [VanishingGradientMonitor(check_every_n_steps=10**9, save_figure=False)],
        "check": [VanishingGradientMonitor(check_every_n_steps=1, save_figure=False, measure_causes=False)],
        "check + causes": [AlwaysDue(check_every_n_steps=1, save_figure=False)],
    }


def run_model(name: str, blocks: int) -> dict[str, dict[int, float]]:
    torch.manual_seed(0)
    module, loader = build_model(name)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=60, help="steps per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="lstm,transformer,mlp,many,sigmoid")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# monitor check step: torch {torch.__version__}, pytorch-lightning {pl.__version__},"
        f" {platform.machine()}, {args.threads} thread(s); variants alternated step by step in one fit,"
        f" {args.blocks} steps each; median paired difference to the bare step [95% CI]"
    )
    names = list(variants())
    print("| model | bare step | " + " | ".join(names[1:]) + " |")
    print("|" + "---|" * len(names) + "---|")
    for model_name in args.models.split(","):
        times = run_model(model_name, args.blocks)
        bare = times["bare"]
        blocks = sorted(b for b in bare if b >= 2 and all(b in times[n] for n in names))  # 2 warm-up blocks
        base = statistics.median(bare[b] for b in blocks)
        cells = []
        for name in names[1:]:
            diff = [times[name][b] - bare[b] for b in blocks]
            rel = [d / base * 100 for d in diff]
            lo, hi = bootstrap_ci(rel)
            cells.append(
                f"{statistics.median(diff) * 1e3:+.2f} ms ({statistics.median(rel):+.1f}% [{lo:+.1f}, {hi:+.1f}])"
            )
        print(f"| {model_name} | {base * 1e3:.2f} ms | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
