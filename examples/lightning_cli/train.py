"""Train the adding-problem models with ``LightningCLI``, the three lightning-clip callbacks attached from
``config.yaml`` (no change to the model or the training code).

Usage (from the repository root)::

    python examples/lightning_cli/train.py fit --config examples/lightning_cli/config.yaml
    python examples/lightning_cli/train.py fit --config examples/lightning_cli/config.yaml \\
        --trainer.max_steps=300 --model.cell=rnn --model.spectral_radius=1.2 --model.optimizer=sgd --model.lr=0.2
    lightning-clip report runs/lightning_cli/version_0

The callbacks, like any other, are listed under ``trainer.callbacks`` with their arguments, e.g.::

    trainer:
      callbacks:
        - class_path: lightning_clip.AdaptiveGradientClipping
          init_args: {factor: 1.5, max_norm: 1.0}
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adding_problem import AddingProblem, SequenceRegressor, validation_set


class AddingDataModule(pl.LightningDataModule):
    """The adding problem: an endless stream of fresh training batches and a fixed validation set.

    Args:
        seq_len: sequence length T.
        batch_size: training batch size.
        val_size: validation sequences.
        seed: seed of the training stream.
    """

    def __init__(self, seq_len: int = 50, batch_size: int = 64, val_size: int = 1000, seed: int = 0) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_size = val_size
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(AddingProblem(self.batch_size, self.seq_len, self.seed), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(validation_set(self.val_size, self.seq_len), batch_size=500)


def main(args: Sequence[str] | None = None) -> LightningCLI:
    """Run the CLI (``args`` as on the command line; None: ``sys.argv[1:]``)."""
    kwargs: dict[str, Any] = {"args": list(args)} if args is not None else {}
    return LightningCLI(SequenceRegressor, AddingDataModule, **kwargs)


if __name__ == "__main__":
    main()
