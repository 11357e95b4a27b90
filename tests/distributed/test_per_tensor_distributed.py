"""The per-tensor modes under 2-process DDP and FSDP2 (gloo, CPU, forked torchrun-style ranks): every
rank holds the same per-tensor statistics, bit for bit, and they are those of the unsharded model (a
tensor's norm is its full norm), computed by the naive per-tensor loop of :mod:`tests.per_tensor_reference`
on the same global batches (thresholds, coefficients and weights at rel 1e-5)."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

from lightning_clip import AdaptiveGradientClipping
from tests.distributed.launch import run_ranks
from tests.models import (
    CountReduces,
    RegressionModel,
    ShardedRegressionModel,
    global_batches,
    make_trainer,
    rank_loader,
)
from tests.per_tensor_reference import NaivePerTensor, reference_fit

pytestmark = pytest.mark.distributed

STEPS = 8
SETTINGS: dict[str, dict[str, Any]] = {
    "adagc": dict(factor=1.05, decay=0.9, warmup_steps=3, max_norm=0.2),
    "mean_per_tensor": dict(factor=1.1, decay=0.8, warmup_steps=1),
}


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor().detach().clone() if hasattr(t, "full_tensor") else t.detach().clone()


class Record(pl.Callback):
    def __init__(self, clipper: AdaptiveGradientClipping) -> None:
        self.clipper = clipper
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        thresholds = self.clipper.tensor_thresholds()
        assert thresholds is not None
        self.rows.append(
            {
                "thresholds": thresholds.tolist(),
                "state": self.clipper.state_dict(),
                "weights": {k: full(v) for k, v in pl_module.state_dict().items()},
            }
        )


def _run(rank: int, tmp_path: Any, strategy: str, mode: str) -> list[dict[str, Any]]:
    pl.seed_everything(0, verbose=False)
    clipper = AdaptiveGradientClipping(mode=mode, **SETTINGS[mode])
    record = Record(clipper)
    sharded = strategy == "fsdp2"
    trainer = make_trainer(
        tmp_path / f"rank{rank}",
        callbacks=[clipper, record],
        max_steps=STEPS,
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if sharded else "ddp",
        use_distributed_sampler=False,  # each rank gets its own loader: the global batches are known
        deterministic=False,
    )
    model = ShardedRegressionModel(lr=0.2) if sharded else RegressionModel(lr=0.2)
    trainer.fit(model, rank_loader(rank))
    if sharded:
        assert type(trainer.lightning_module.net[0].weight).__name__ == "DTensor"
    return record.rows


def _loss(model: nn.Module, batches: Any) -> torch.Tensor:
    return sum(nn.functional.mse_loss(model(x), y) for x, y in batches) / len(batches)  # type: ignore[return-value]


@pytest.mark.parametrize("mode", ["adagc", "mean_per_tensor"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_same_statistics_on_every_rank_as_the_unsharded_model(
    tmp_path: Any, strategy: str, mode: str
) -> None:
    ranks = run_ranks(_run, tmp_path, strategy, mode)
    pl.seed_everything(0, verbose=False)
    model = RegressionModel(lr=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    settings = dict(SETTINGS[mode])
    naive = NaivePerTensor(mode, **settings)
    expected = reference_fit(model, opt, global_batches(n=STEPS * 8)[:STEPS], _loss, naive)
    assert sum(c < 1.0 for row in expected for c in row["coefs"]) >= 4  # the thresholds matter
    for rows in ranks:
        assert len(rows) == STEPS
        for step, (ours, ref) in enumerate(zip(rows, expected, strict=True)):
            assert ours["thresholds"] == pytest.approx(ref["thresholds"], rel=1e-5), step
            for name, w in ref["weights"].items():
                torch.testing.assert_close(ours["weights"][name], w, rtol=1e-5, atol=1e-6)
    for a, b in zip(ranks[0], ranks[1], strict=True):  # identical on both ranks, bit for bit
        assert torch.equal(a["state"]["rules"]["0"]["stats"], b["state"]["rules"]["0"]["stats"])
        assert a["state"]["rules"]["0"]["steps"] == b["state"]["rules"]["0"]["steps"]


def _with_guard(rank: int, tmp_path: Any) -> int:
    from lightning_clip import ExplosionGuard

    pl.seed_everything(0, verbose=False)
    count = CountReduces()
    guard = ExplosionGuard(action="skip", snapshot_every_n_steps=0)
    clipper = AdaptiveGradientClipping(mode="adagc", **SETTINGS["adagc"])
    trainer = make_trainer(
        tmp_path / f"rank{rank}",
        callbacks=[count, guard, clipper],
        max_steps=STEPS,
        devices=2,
        strategy="ddp",
        use_distributed_sampler=False,
        deterministic=False,
    )
    trainer.fit(RegressionModel(lr=0.2), rank_loader(rank))
    return count.calls


def test_one_collective_per_step_with_the_guard(tmp_path: Any) -> None:
    assert run_ranks(_with_guard, tmp_path) == [STEPS, STEPS]
