"""Per-step cost of the callbacks under FSDP2 (``ModelParallelStrategy`` + ``fully_shard``), against
Lightning's own ``gradient_clip_val`` path, measured side by side on the CPU (2 processes, gloo).

Same method as ``benchmarks/overhead.py`` (whose ``Alternator`` it uses): all variants run inside ONE fit,
alternated step by step in a seeded random order inside each block (the same order on both ranks, so
their collectives match); each step's wall time (rank 0) is charged to its variant and paired with the bare
step of the same block; the table shows the median paired difference relative to the median bare step,
with a 95% bootstrap interval.

Variants: ``bare``; ``gradient_clip_val=1.0`` (what ``Trainer(gradient_clip_val=1.0)`` runs under
``ModelParallelStrategy``: the precision plugin's ``clip_gradients``, i.e. ``clip_grad_norm_`` on the
DTensor gradients); ``AdaptiveGradientClipping``; all three lightning-clip callbacks at their defaults
(``ExplosionGuard`` snapshots once per 50 of its own steps). Under FSDP2 lightning-clip's norm costs one
extra small all-reduce per step (the per-tensor partial sums); ``clip_grad_norm_`` on DTensors does its own.

GPU (NCCL) figures: to be measured (no GPU on the development machines).

Run: ``python benchmarks/fsdp_overhead.py [--blocks N] [--models mlp,many]`` (1 torch thread per rank).
"""

from __future__ import annotations

import argparse
import io
import logging
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import Alternator, LightningGradientClipVal, bootstrap_ci

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard, VanishingGradientMonitor

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)


class Sharded(pl.LightningModule):
    """``net`` with ``fully_shard`` on each of ``units`` consecutive slices of its layers, then on the whole."""

    def __init__(self, net: nn.Sequential, units: int) -> None:
        super().__init__()
        self.net = net
        self.units = units

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        layers = list(self.net)
        size = max(1, len(layers) // self.units)
        for start in range(0, len(layers), size):
            group = [m for m in layers[start : start + size] if any(True for _ in m.parameters())]
            if group:
                fully_shard(group, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def build(name: str, rank: int) -> tuple[Sharded, DataLoader, int]:
    g = torch.Generator().manual_seed(rank)
    torch.manual_seed(0)  # the same initial weights on both ranks
    if name == "mlp":  # ≈ 2.6M parameters, 8 tensors
        net = nn.Sequential(
            nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
            nn.Linear(1024, 1),
        )  # fmt: skip
        x, y = torch.randn(256, 512, generator=g), torch.randn(256, 1, generator=g)
        units = 4  # one FSDP unit per Linear
    elif name == "many":  # 514 parameter tensors
        net = nn.Sequential(
            *[m for _ in range(128) for m in (nn.Linear(32, 32), nn.LayerNorm(32))], nn.Linear(32, 1)
        )
        x, y = torch.randn(256, 32, generator=g), torch.randn(256, 1, generator=g)
        units = 8  # 8 FSDP units of 32 layers (one unit per Linear: 1.2 s per CPU step)
    else:
        raise ValueError(f"`model` must be 'mlp' or 'many', got {name!r}.")
    n_params = sum(p.numel() for p in net.parameters())
    return Sharded(net, units), DataLoader(TensorDataset(x, y), batch_size=16), n_params


def variants(n_variants: int = 4) -> dict[str, list[Any]]:
    return {
        "bare": [],
        "gradient_clip_val=1.0": [LightningGradientClipVal()],
        "AdaptiveGradientClipping": [AdaptiveGradientClipping()],
        "all three callbacks": [
            AdaptiveGradientClipping(),
            ExplosionGuard(snapshot_every_n_steps=50 * n_variants),
            VanishingGradientMonitor(save_figure=False),
        ],
    }


class MeasureAlone(pl.Callback):
    """After the fit, the gradient measurement alone, alternated call by call on the last gradients (both
    ranks run the same sequence: the collectives match): lightning-clip's global norms (local fused pass +
    one all-reduce), torch's ``get_total_norm`` on the DTensors (+ ``full_tensor()``), and
    ``clip_grad_norm_`` with a bound that never clips (what ``gradient_clip_val`` runs)."""

    def __init__(self, reps: int) -> None:
        self.reps = reps
        self.times: dict[str, list[float]] = {}
        self.grads: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_step != trainer.max_steps - 1:
            return
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.grads = [p.grad.detach().clone() for p in self.params]

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        from lightning_clip.functional import grad_norms

        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g

        def ours() -> None:
            float(grad_norms([p.grad for p in self.params])[0])

        def torch_total() -> None:
            float(torch.nn.utils.get_total_norm([p.grad for p in self.params]).full_tensor())

        def clip() -> None:
            float(torch.nn.utils.clip_grad_norm_(self.params, 1e30).full_tensor())

        variants = {
            "lightning-clip grad_norms": ours,
            "torch get_total_norm": torch_total,
            "clip_grad_norm_": clip,
        }
        for name in variants:
            self.times[name] = []
        for _ in range(self.reps):
            for name, fn in variants.items():
                torch.distributed.barrier()
                t0 = time.perf_counter()
                fn()
                self.times[name].append(time.perf_counter() - t0)


def rank_main(rank: int, model_name: str, blocks: int, port: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    module, loader, n_params = build(model_name, rank)
    alternator = Alternator(variants())
    alone = MeasureAlone(reps=100)
    forward_setup = alternator.setup

    def setup(
        *args: Any, **kwargs: Any
    ) -> None:  # a variant's callbacks share one step tracker, as in a Trainer
        forward_setup(*args, **kwargs)
        for callbacks in alternator.variants.values():
            ours = [cb for cb in callbacks if hasattr(cb, "step_tracker")]
            for cb in ours:
                cb.step_tracker = ours[0].step_tracker

    alternator.setup = setup  # type: ignore[method-assign]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=blocks * len(alternator.names),
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[alternator, alone],
    )
    trainer.fit(module, loader)
    buffer = io.BytesIO()
    torch.save({"times": alternator.times, "params": n_params, "alone": alone.times}, buffer)
    queue.put((rank, buffer.getvalue()))


def run_model(model_name: str, blocks: int) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=rank_main, args=(r, model_name, blocks, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results: dict[int, bytes] = {}
    while len(results) < len(procs):
        try:
            rank, data = queue.get(timeout=10)
            results[rank] = data
        except Exception:  # queue.Empty: stop waiting once a rank died without answering
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise RuntimeError("a rank failed (its traceback is above)") from None
    for p in procs:
        p.join()
    return torch.load(io.BytesIO(results[0]), weights_only=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=60, help="steps per variant")
    parser.add_argument("--models", default="mlp,many")
    args = parser.parse_args()
    print(
        f"# fsdp_overhead: torch {torch.__version__}, pytorch-lightning {pl.__version__}, {platform.machine()},"
        f" ModelParallelStrategy(data_parallel_size=2) on CPU (gloo), 2 processes x 1 thread; variants"
        f" alternated step by step in one fit, {args.blocks} steps each; rank 0's step times"
    )
    names = list(variants())
    print("| model | parameters | bare step | " + " | ".join(n for n in names if n != "bare") + " |")
    print("|" + "---|" * (2 + len(names)))
    measured_alone = []
    for model_name in args.models.split(","):
        out = run_model(model_name, args.blocks)
        measured_alone.append((model_name, out["alone"]))
        times = out["times"]
        bare = times["bare"]
        blocks = sorted(b for b in bare if b >= 2 and all(b in times[n] for n in names))  # 2 warm-up blocks
        base = statistics.median(bare[b] for b in blocks)
        cells = []
        for name in names[1:]:
            diffs = [times[name][b] - bare[b] for b in blocks]
            rel = [d / base * 100 for d in diffs]
            lo, hi = bootstrap_ci(rel)
            cells.append(
                f"{statistics.median(diffs) * 1e3:+.2f} ms ({statistics.median(rel):+.1f}% [{lo:+.1f}, {hi:+.1f}])"
            )
        print(
            f"| {model_name} | {out['params'] / 1e6:.2f}M | {base * 1e3:.2f} ms | "
            + " | ".join(cells)
            + " |",
            flush=True,
        )
    print("| GPU (NCCL) | | to be measured | to be measured | to be measured | to be measured |")
    print()
    print("The measurement alone (median of 100 calls each, alternated, on the fit's last gradients):")
    print(
        "| model | lightning-clip grad_norms (global) | torch get_total_norm + full_tensor | clip_grad_norm_ |"
    )
    print("|---|---|---|---|")
    for model_name, alone in measured_alone:
        cells = [f"{statistics.median(alone[k]) * 1e3:.2f} ms" for k in alone]
        print(f"| {model_name} | " + " | ".join(cells) + " |")
    print("| GPU (NCCL) | to be measured | to be measured | to be measured |")


if __name__ == "__main__":
    main()
