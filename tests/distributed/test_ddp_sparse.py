"""Sparse gradients under 2-process DDP (CPU, gloo): DDP all-reduces the sparse COO gradients of
``nn.Embedding(sparse=True)``; the three callbacks measure and clip them as the same fit with a dense
embedding does, on both ranks alike (the children write their figures to files)."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard, VanishingGradientMonitor
from tests.models import make_trainer
from tests.reference import LastFigures
from tests.setup_models import BagOfEmbeddings, token_loader


class WriteResult(pl.Callback):
    def __init__(self, out: Any, figures: LastFigures) -> None:
        self.out, self.figures = out, figures

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        layout = pl_module.emb.weight.grad.layout if pl_module.emb.weight.grad is not None else None
        torch.save(
            {"figures": self.figures.figures[0], "weights": pl_module.state_dict(), "layout": str(layout)},
            self.out / f"rank{trainer.global_rank}.pt",
        )


def _fit(tmp_path: Any, sparse: bool) -> list[dict[str, Any]]:
    out = tmp_path / ("sparse" if sparse else "dense")
    out.mkdir()
    clipper = AdaptiveGradientClipping(max_norm=0.02, loss_aware=False)
    figures = LastFigures(clipper)
    callbacks = [clipper, ExplosionGuard(), VanishingGradientMonitor(save_figure=False), figures]
    trainer = make_trainer(
        out,
        max_steps=6,
        devices=2,
        strategy="ddp_fork",
        deterministic=False,
        callbacks=[*callbacks, WriteResult(out, figures)],
    )
    trainer.fit(BagOfEmbeddings(sparse=sparse), token_loader(n=96))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.distributed
def test_sparse_embedding_under_ddp_matches_its_dense_twin(tmp_path: Any) -> None:
    sparse, dense = _fit(tmp_path, sparse=True), _fit(tmp_path, sparse=False)
    assert len(sparse[0]["figures"]) == 6
    assert sparse[0]["layout"] == "torch.sparse_coo" and dense[0]["layout"] == "torch.strided"
    for rank in (0, 1):
        assert sparse[rank]["figures"] == sparse[0]["figures"]  # the same all-reduced norms on both ranks
        for s, d in zip(sparse[rank]["figures"], dense[rank]["figures"], strict=True):
            assert s == pytest.approx(d, rel=1e-5)
        for name, w in sparse[rank]["weights"].items():
            assert torch.allclose(w, dense[rank]["weights"][name], atol=1e-6), (rank, name)
    assert all(coef < 1.0 for _, _, coef in sparse[0]["figures"])  # every step clipped
