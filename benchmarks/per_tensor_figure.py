"""The figure of the per-tensor modes: each tensor's norm against its own threshold on a real run.

Lightning's demo Transformer (``pytorch_lightning.demos.transformer``, AdamW lr 1e-3, batch 20) on real
prose (CPython's ``pydoc_data.topics``, tokenised as the demo's ``WikiText2``), with
``AdaptiveGradientClipping(mode="adagc")`` at AdaGC's defaults (``max_norm=1.0, factor=1.05,
decay=0.98``, warm-up 99 steps) or ``mode="mean_per_tensor"`` at its defaults. A callback listed before the
clipper records, at each step, every tensor's pre-clip norm (a naive float64 norm per tensor) and the
threshold the clipper holds for it.

Run: ``python benchmarks/per_tensor_figure.py [--mode adagc] [--steps 300] [--out docs/images/per_tensor_thresholds.png]``
(matplotlib; about 2 minutes a fit on one busy CPU core, 1 thread).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.demos.transformer import LightningTransformer, WikiText2
from torch.utils.data import DataLoader

from lightning_clip import AdaptiveGradientClipping

SETTINGS: dict[str, dict[str, Any]] = {
    "adagc": dict(mode="adagc", max_norm=1.0, factor=1.05, decay=0.98),
    "mean_per_tensor": dict(mode="mean_per_tensor"),
}
SHOWN = ("embedding.weight", "self_attn.in_proj_weight", "linear1.weight", "decoder.weight")
"""Name endings of the tensors drawn (the first match of each)."""


def write_corpus(folder: Path) -> Path:
    """CPython's ``pydoc_data.topics`` as one text file, the demos' ``WikiText2`` layout."""
    import pydoc_data.topics as topics

    path = folder / "wikitext-2.txt"
    path.write_text("\n".join(topics.topics[k] for k in sorted(topics.topics)), encoding="utf8")
    return path


class TransformerOnText(LightningTransformer):
    def __init__(self, data_dir: Path) -> None:
        self.dataset = WikiText2(data_dir=data_dir, download=False)
        super().__init__(vocab_size=self.dataset.vocab_size)

    def prepare_data(self) -> None:
        pass

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(self.dataset, batch_size=20, shuffle=True, generator=g)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=1e-3)


class Record(pl.Callback):
    """Per step, before the clipper: each tensor's pre-clip norm and the threshold it meets."""

    def __init__(self, clipper: AdaptiveGradientClipping) -> None:
        self.clipper = clipper
        self.norms: list[list[float]] = []
        self.thresholds: list[list[float]] = []
        self.names: list[str] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if not self.names:
            by_id = {id(p): n for n, p in pl_module.named_parameters()}
            self.names = [by_id[id(p)] for p in params]
        self.norms.append([math.nan if p.grad is None else float(p.grad.double().norm()) for p in params])
        held = self.clipper.tensor_thresholds()
        assert held is not None
        self.thresholds.append(held.tolist() if len(held) else [math.inf] * len(params))


def run(mode: str, steps: int) -> Record:
    pl.seed_everything(0, verbose=False)
    clipper = AdaptiveGradientClipping(**SETTINGS[mode])
    record = Record(clipper)
    with tempfile.TemporaryDirectory() as root:
        model = TransformerOnText(write_corpus(Path(root)).parent)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            logger=False,
            default_root_dir=root,
            callbacks=[record, clipper],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model)
    return record


def figure(record: Record, mode: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(len(record.norms))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=(3, 1))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, ending in zip(colors, SHOWN, strict=False):
        i = next((k for k, n in enumerate(record.names) if n.endswith(ending)), None)
        if i is None:
            continue
        top.plot(steps, [row[i] for row in record.norms], color=color, lw=0.6, alpha=0.45)
        held = [row[i] if math.isfinite(row[i]) else math.nan for row in record.thresholds]
        top.plot(steps, held, color=color, lw=1.6, label=record.names[i])
    top.set_yscale("log")
    top.set_ylabel("norm (thin) / threshold (thick)")
    top.legend(fontsize=8, loc="upper right")
    top.set_title(f"AdaptiveGradientClipping(mode={mode!r}): each tensor against its own threshold")
    clipped = [
        sum(n > t for n, t in zip(nr, tr, strict=True) if math.isfinite(t)) / len(nr)
        for nr, tr in zip(record.norms, record.thresholds, strict=True)
    ]
    bottom.plot(steps, clipped, color="k", lw=0.8)
    bottom.set_ylabel("tensors clipped\nby their own threshold")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"figure: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(SETTINGS), default="adagc")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="docs/images/per_tensor_thresholds.png")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = run(args.mode, args.steps)
    figure(record, args.mode, args.out)
    late = record.norms[len(record.norms) // 2 :], record.thresholds[len(record.thresholds) // 2 :]
    rate = sum(n > t for nr, tr in zip(*late, strict=True) for n, t in zip(nr, tr, strict=True)) / sum(
        len(nr) for nr in late[0]
    )
    print(f"{len(record.names)} tensors; second half: {100 * rate:.1f}% of the (tensor, step) pairs clipped")


if __name__ == "__main__":
    main()
