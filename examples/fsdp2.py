"""lightning-clip under FSDP2: ``ModelParallelStrategy`` + ``fully_shard`` in ``configure_model``.

Runs as is on a CPU machine (2 processes, gloo; on GPUs pass ``--accelerator gpu``):

    python examples/fsdp2.py                 # Lightning launches the second process itself

All three callbacks measure the norms of the full (unsharded) gradients, the same on every rank. A NaN is
injected into rank 1's gradient shards at step 30 (``FaultInjector``): every rank rolls back to the newest
known-good state, here the distributed checkpoint directory of step 25 (newer than the in-memory snapshot
of step 20, in which each rank holds only its own shards), read back with ``weights_only`` semantics. Each
rank prints one JSON line with what it saw; the lines agree. About 30 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard, VanishingGradientMonitor
from lightning_clip.testing import FaultInjector

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class Regressor(pl.LightningModule):
    def __init__(self, width: int = 256, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(32, width), nn.GELU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.GELU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def configure_model(self) -> None:
        # FSDP2: shard every Linear, then the whole net, over the data-parallel mesh
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def data(n: int = 2048) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, generator=g)
    y = torch.sin(x[:, :1]) + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example (``argv`` as on the command line); returns this rank's summary (also printed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--width", type=int, default=256, help="hidden width of the regressor")
    parser.add_argument("--out", default="runs/fsdp2")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)

    clipper = AdaptiveGradientClipping()
    guard = ExplosionGuard(snapshot_every_n_steps=20)
    monitor = VanishingGradientMonitor(check_every_n_steps=20, save_figure=False)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=args.max_steps,
        default_root_dir=args.out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            clipper,
            guard,
            monitor,
            FaultInjector(target="grad", steps=[30], rank=1),  # a NaN in rank 1's shards only
            ModelCheckpoint(dirpath=os.path.join(args.out, "checkpoints"), every_n_train_steps=25),
        ],
    )
    trainer.fit(Regressor(width=args.width), data())
    norm, threshold, _ = clipper.last[0]
    summary = {
        "rank": trainer.global_rank,
        "events": [
            (r["step"], r["kind"], r["restored"]["source"], r["restored"]["step"]) for r in guard.records
        ],
        "rollbacks": guard.rollbacks,
        "last_norm": round(norm, 6),
        "last_threshold": round(threshold, 6),
        "layers_checked": len(monitor.history),
        "snapshot_mib_this_rank": round(guard.snapshot_nbytes / 2**20, 3),
    }
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
