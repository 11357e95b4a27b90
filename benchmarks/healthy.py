"""Healthy runs must not pay for the runaway mechanism: the defaults against the usual settings.

* Lightning's demo LSTM language model (``pytorch_lightning.demos.lstm.LightningLSTM``: 4 × 512 LSTM,
  SGD lr 20) on real prose (CPython's ``pydoc_data.topics``, tokenised as the demo's ``WikiText2``),
  400 steps: ``[AdaptiveGradientClipping(), ExplosionGuard()]`` at defaults against
  ``Trainer(gradient_clip_val=0.25)`` (the hand-tuned clip of the PyTorch word-language-model example).
* Lightning's demo Transformer (``pytorch_lightning.demos.transformer.Transformer``) with AdamW (lr 1e-3,
  batch 20), same text, 400 steps: the defaults against no clipping.
* The demo's LSTM on the adding problem (``examples/adding_problem.py``, variant ``lstm``: T = 100, Adam
  lr 0.01, 1200 steps) with the defaults: the guard's events (there must be none).

The figure of merit is the mean training loss of the last 50 steps; the ratio is defaults / reference.
Run: ``python benchmarks/healthy.py [--models lstm transformer demo_lstm] [--seeds 0 1 2] [--steps 400]``
(on one busy CPU core the LSTM takes ~6 minutes a fit, the Transformer ~3).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.demos.lstm import LightningLSTM, SequenceSampler
from pytorch_lightning.demos.transformer import LightningTransformer, WikiText2
from torch.utils.data import DataLoader

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard


def write_corpus(folder: Path) -> Path:
    """CPython's ``pydoc_data.topics`` as one text file, the demos' ``WikiText2`` layout."""
    import pydoc_data.topics as topics

    path = folder / "wikitext-2.txt"
    path.write_text("\n".join(topics.topics[k] for k in sorted(topics.topics)), encoding="utf8")
    return path


class LSTMOnText(LightningLSTM):
    def __init__(self, data_dir: Path) -> None:
        self.dataset = WikiText2(data_dir=data_dir, download=False)
        super().__init__(vocab_size=self.dataset.vocab_size)

    def prepare_data(self) -> None:
        pass

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_sampler=SequenceSampler(self.dataset, batch_size=20))


class TransformerOnText(LightningTransformer):
    def __init__(self, data_dir: Path, seed: int) -> None:
        self.dataset = WikiText2(data_dir=data_dir, download=False)
        self.seed = seed
        super().__init__(vocab_size=self.dataset.vocab_size)

    def prepare_data(self) -> None:
        pass

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.dataset, batch_size=20, shuffle=True, generator=g)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=1e-3)


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, *args: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))


def fit_text(model_name: str, setup: str, seed: int, steps: int, data_dir: Path) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    model: pl.LightningModule = (
        LSTMOnText(data_dir) if model_name == "lstm" else TransformerOnText(data_dir, seed)
    )
    losses = Losses()
    guard = ExplosionGuard() if setup == "defaults" else None
    callbacks: list[pl.Callback] = [losses]
    if guard is not None:
        callbacks = [AdaptiveGradientClipping(), guard, losses]
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            logger=False,
            default_root_dir=root,
            callbacks=callbacks,
            gradient_clip_val=0.25 if setup == "clip 0.25" else None,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model)
    return {
        "last50": statistics.fmean(losses.losses[-50:]),
        "max": max(losses.losses),
        "events": 0 if guard is None else guard.events,
        "divergence": 0 if guard is None else sum(r["kind"] == "divergence" for r in guard.records),
    }


def fit_demo_lstm(seed: int) -> dict[str, Any]:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    import adding_problem as demo

    s = demo.Settings(seed=seed)
    pl.seed_everything(seed, verbose=False)
    model = demo.SequenceRegressor(cell="lstm", hidden=s.hidden, optimizer="adam", lr=0.01)
    guard = ExplosionGuard()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=s.long_steps,
            logger=False,
            default_root_dir=root,
            callbacks=[AdaptiveGradientClipping(), guard],
            limit_val_batches=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(
            model, DataLoader(demo.AddingProblem(s.batch_size, s.long_len, seed=seed), batch_size=None)
        )
    mse = demo.evaluate(model, demo.validation_set(s.val_size, s.long_len))
    return {
        "mse": mse,
        "events": guard.events,
        "divergence": sum(r["kind"] == "divergence" for r in guard.records),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--models", nargs="+", default=["lstm", "transformer", "demo_lstm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        write_corpus(data_dir)
        for model_name in args.models:
            if model_name == "demo_lstm":
                for seed in args.seeds:
                    r = fit_demo_lstm(seed)
                    print(
                        f"demo LSTM (adding problem, T=100) seed {seed}: MSE {r['mse']:.4g}, events {r['events']}"
                        f" (divergence {r['divergence']})",
                        flush=True,
                    )
                continue
            reference = "clip 0.25" if model_name == "lstm" else "no clipping"
            ratios = []
            print(
                f"| {model_name} seed | {reference} | defaults | ratio | max loss ref / defaults | events |"
            )
            print("|---|---|---|---|---|---|")
            for seed in args.seeds:
                ref = fit_text(model_name, reference, seed, args.steps, data_dir)
                new = fit_text(model_name, "defaults", seed, args.steps, data_dir)
                ratio = new["last50"] / ref["last50"]
                ratios.append(ratio)
                print(
                    f"| {seed} | {ref['last50']:.4f} | {new['last50']:.4f} | {ratio:.3f} |"
                    f" {ref['max']:.3g} / {new['max']:.3g} | {new['events']} (divergence {new['divergence']}) |",
                    flush=True,
                )
            print(f"{model_name}: median ratio {statistics.median(ratios):.3f}, worst {max(ratios):.3f}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
