"""The callbacks under FSDP2 (``ModelParallelStrategy`` + ``fully_shard``): 2 processes, gloo, CPU.

Each test runs the sharded fit on 2 ranks (forked, torchrun-style: :mod:`tests.distributed.launch`) and
compares with an independent reference: the same model and global batches, unsharded, in this process
(norms, thresholds and per-layer figures at rel 1e-5), or the full weights recorded at the restored step
(bit-exact after a rollback).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard, VanishingGradientMonitor
from lightning_clip.testing import FaultInjector
from tests.distributed.launch import run_ranks
from tests.models import RegressionModel, ShardedRegressionModel, global_batches, make_trainer, rank_loader
from tests.reference import EPS, loss_aware_thresholds, mean_thresholds, naive_norm

pytestmark = pytest.mark.distributed

STEPS = 8


def fsdp_trainer(tmp_path: Any, callbacks: list[Any], max_steps: int, **kwargs: Any) -> pl.Trainer:
    return make_trainer(
        tmp_path,
        callbacks=callbacks,
        max_steps=max_steps,
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        use_distributed_sampler=False,  # each rank gets its own loader: the global batches are known
        deterministic=False,
        **kwargs,
    )


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor().detach().clone() if hasattr(t, "full_tensor") else t.detach().clone()


class Record(pl.Callback):
    """Per step (on_train_batch_end, after the lightning-clip callbacks): the clipper's and the monitor's
    figures, the full weights (gathered) and this rank's optimizer state shards."""

    def __init__(self, clipper: Any = None, monitor: Any = None) -> None:
        self.clipper, self.monitor = clipper, monitor
        self.rows: dict[int, dict[str, Any]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        row: dict[str, Any] = {"weights": {k: full(v) for k, v in pl_module.state_dict().items()}}
        opt_state = trainer.optimizers[0].state_dict()["state"]
        row["opt"] = {i: {k: full(v) for k, v in s.items()} for i, s in opt_state.items()}
        row["sched"] = [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs]
        if self.clipper is not None:
            row["clip"] = self.clipper.last[0]
        if self.monitor is not None and self.monitor.last:
            row["layers"] = list(self.monitor.last["layers"])
            row["layer_norms"] = list(self.monitor.last["norms"])
            row["grad_to_weight"] = list(self.monitor.last["grad_to_weight"])
        self.rows[trainer.global_step] = row


# ----------------------------------------------------------------------------------- norms + monitor
def _clip_and_monitor(rank: int, tmp_path: Any) -> dict[int, dict[str, Any]]:
    pl.seed_everything(0, verbose=False)
    clipper = AdaptiveGradientClipping(factor=1.1, decay=0.8, loss_aware=False)
    monitor = VanishingGradientMonitor(check_every_n_steps=1, save_figure=False)
    record = Record(clipper, monitor)
    trainer = fsdp_trainer(tmp_path, [clipper, monitor, record], STEPS)
    trainer.fit(ShardedRegressionModel(lr=0.2), rank_loader(rank))
    assert type(trainer.lightning_module.net[0].weight).__name__ == "DTensor"
    return record.rows


def _unsharded_reference(
    world: int = 2, model_class: type = RegressionModel
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """The same model, optimizer and global batches in one process; the ``mean`` rule written out."""
    pl.seed_everything(0, verbose=False)
    model = model_class(lr=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    layers = {f"net.{i}": [m.weight, m.bias] for i, m in enumerate(model.net) if isinstance(m, nn.Linear)}
    norms: list[float] = []
    rows = []
    for batches in global_batches(world=world, n=STEPS * 4 * world)[:STEPS]:
        opt.zero_grad()
        loss = sum(nn.functional.mse_loss(model(x), y) for x, y in batches) / len(batches)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(naive_norm(grads))
        threshold = mean_thresholds(norms, factor=1.1, decay=0.8)[-1]
        layer_norms = [naive_norm([p.grad for p in ps if p.grad is not None]) for ps in layers.values()]
        weight_norms = [naive_norm([p.detach() for p in ps]) for ps in layers.values()]
        rows.append(
            {
                "norm": norms[-1],
                "threshold": threshold,
                "layer_norms": layer_norms,
                "grad_to_weight": [g / w for g, w in zip(layer_norms, weight_norms, strict=True)],
            }
        )
        if norms[-1] > threshold:
            for g in grads:
                g.mul_(threshold / (norms[-1] + EPS))
        opt.step()
    return rows, {k: v.detach() for k, v in model.state_dict().items()}


def test_norms_thresholds_and_layer_figures_match_the_unsharded_model(tmp_path: Any) -> None:
    ranks = run_ranks(_clip_and_monitor, tmp_path)
    reference, final = _unsharded_reference()
    clipped = [r for r in reference if r["norm"] > r["threshold"]]
    assert 2 <= len(clipped) < STEPS  # the reference clips some steps, not all
    for rows in ranks:
        assert sorted(rows) == list(range(1, STEPS + 1))
        for step, ref in enumerate(reference, start=1):
            norm, threshold, coef = rows[step]["clip"]
            assert norm == pytest.approx(ref["norm"], rel=1e-5), step
            assert threshold == pytest.approx(ref["threshold"], rel=1e-5), step
            expected_coef = min(1.0, ref["threshold"] / (ref["norm"] + EPS))
            assert coef == pytest.approx(expected_coef, rel=1e-5), step
            assert rows[step]["layers"] == ["net.0", "net.2"]
            assert rows[step]["layer_norms"] == pytest.approx(ref["layer_norms"], rel=1e-5), step
            assert rows[step]["grad_to_weight"] == pytest.approx(ref["grad_to_weight"], rel=1e-5), step
        for name, w in final.items():  # the clipped updates were the reference's
            torch.testing.assert_close(rows[STEPS]["weights"][name], w, rtol=1e-5, atol=1e-6)
    # identical figures on both ranks, bit for bit
    assert [ranks[0][s]["clip"] for s in ranks[0]] == [ranks[1][s]["clip"] for s in ranks[1]]


# ------------------------------------------------------------------ the default rule under Adam, sharded
def _adam_defaults(rank: int, tmp_path: Any) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    clipper = AdaptiveGradientClipping(factor=1.1, decay=0.8)  # loss_aware at its default
    record = Record(clipper, None)
    trainer = fsdp_trainer(tmp_path, [clipper, record], STEPS)
    trainer.fit(ShardedRegressionModel(optimizer="adam", lr=0.01), rank_loader(rank))
    rule = clipper.rule(0)
    return {
        "kind": type(rule).__name__,
        "clips": [record.rows[s]["clip"] for s in sorted(record.rows)],
        "state": rule.state_dict(),
    }


def test_adam_gets_the_cautious_start_alike_on_every_rank(tmp_path: Any) -> None:
    """FSDP2 with Adam at defaults: the rule is the cautious start alone, its thresholds are the reference
    rule's fed the (full, DTensor-reduced) pre-clip norms and no loss, and both ranks agree bit for bit."""
    ranks = run_ranks(_adam_defaults, tmp_path)
    for got in ranks:
        assert got["kind"] == "CautiousMeanThreshold"
        norms = [n for n, _, _ in got["clips"]]
        expected = loss_aware_thresholds(norms, [None] * len(norms), factor=1.1, decay=0.8, paced=False)
        assert [t for _, t, _ in got["clips"]] == pytest.approx(expected, rel=1e-9)
        assert got["clips"][0][1] == pytest.approx(0.1 * norms[0], rel=1e-12)  # the start clips step 1
        assert all(c < 1.0 for _, _, c in got["clips"][:5])
    assert ranks[0]["clips"] == ranks[1]["clips"]
    assert ranks[0]["state"] == ranks[1]["state"]


# ------------------------------------------------------------------------------- tensor parallelism
class DeepRegression(RegressionModel):
    """A three-layer RegressionModel."""

    def __init__(self, lr: float = 0.2) -> None:
        super().__init__(lr=lr)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


class TensorParallelRegression(DeepRegression):
    """Tensor parallelism over 2 ranks on the first two layers (column-wise, then row-wise: a Megatron MLP),
    the last layer data-parallel only: gradients on a 2-D mesh (sharded and replicated placements) and on
    the 1-D data-parallel mesh, in one optimizer."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        tp, dp = self.device_mesh["tensor_parallel"], self.device_mesh["data_parallel"]
        parallelize_module(self.net, tp, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        fully_shard(self.net[4], mesh=dp)
        fully_shard(self.net, mesh=dp)


class TorchTotalNorm(pl.Callback):
    """What ``torch.nn.utils.get_total_norm`` (behind ``clip_grad_norm_`` and so ``gradient_clip_val``) does
    with the same gradients."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        try:
            torch.nn.utils.get_total_norm(grads)
        except Exception as err:
            self.errors.append(str(err))


def _tensor_parallel(rank: int, tmp_path: Any) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    clipper = AdaptiveGradientClipping(factor=1.1, decay=0.8, loss_aware=False)
    monitor = VanishingGradientMonitor(check_every_n_steps=1, save_figure=False)
    record, torch_norm = Record(clipper, monitor), TorchTotalNorm()
    trainer = make_trainer(
        tmp_path,
        callbacks=[torch_norm, clipper, monitor, record],
        max_steps=STEPS,
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2),
        use_distributed_sampler=False,
        deterministic=False,
    )
    # tensor parallelism: both ranks compute on the same batches
    trainer.fit(TensorParallelRegression(lr=0.2), rank_loader(0, world=1, n=STEPS * 4))
    return {"rows": record.rows, "torch_errors": torch_norm.errors}


def test_tensor_parallel_norms_match_the_unsharded_model(tmp_path: Any) -> None:
    ranks = run_ranks(_tensor_parallel, tmp_path)
    reference, final = _unsharded_reference(world=1, model_class=DeepRegression)
    assert any(r["norm"] > r["threshold"] for r in reference)
    for r in ranks:
        rows = r["rows"]
        for step, ref in enumerate(reference, start=1):
            norm, threshold, _ = rows[step]["clip"]
            assert norm == pytest.approx(ref["norm"], rel=1e-5), step
            assert threshold == pytest.approx(ref["threshold"], rel=1e-5), step
            assert rows[step]["layers"] == ["net.0", "net.2", "net.4"]
            assert rows[step]["layer_norms"] == pytest.approx(ref["layer_norms"], rel=1e-5), step
        for name, w in final.items():
            torch.testing.assert_close(rows[STEPS]["weights"][name], w, rtol=1e-5, atol=1e-6)
        # torch's own total norm cannot combine gradients of two meshes
        assert len(r["torch_errors"]) == STEPS and "same mesh" in r["torch_errors"][0]


# ------------------------------------------------------------------------- rank-local faults, snapshots
def _faults(rank: int, tmp_path: Any, action: str) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    guard = ExplosionGuard(action=action, snapshot_every_n_steps=2, schedulers_after_rollback="restore")
    callbacks = [
        guard,
        FaultInjector(target="grad", steps=[3], rank=1),  # NaN in rank 1's gradient shards only
        FaultInjector(target="weight", steps=[6], rank=1) if action == "rollback" else None,
    ]
    record = Record()
    trainer = fsdp_trainer(tmp_path, [cb for cb in callbacks if cb is not None] + [record], 10)
    trainer.fit(ShardedRegressionModel(optimizer="adam", scheduler=True), rank_loader(rank))
    events = [(r["step"], r["kind"], (r["restored"] or {}).get("step")) for r in guard.records]
    snapshot_bytes = guard.snapshot_nbytes
    return {
        "rows": record.rows,
        "events": events,
        "counters": (guard.events, guard.rollbacks, guard.skipped_steps),
        "snapshot_bytes": snapshot_bytes,
    }


def test_rank_local_nan_rolls_back_every_rank_to_the_snapshot(tmp_path: Any) -> None:
    r0, r1 = run_ranks(_faults, tmp_path, "rollback")
    expected = [(3, "nonfinite_grad", 2), (7, "nonfinite_weights", 6)]
    assert r0["events"] == r1["events"] == expected
    assert r0["counters"] == r1["counters"] == (2, 2, 2)
    for r in (r0, r1):
        rows = r["rows"]
        for after, restored in (
            (4, 2),
            (8, 6),
        ):  # right after each rollback: the snapshot's state, bit for bit
            for name, w in rows[restored]["weights"].items():
                assert torch.equal(rows[after]["weights"][name], w), (after, name)
            for i, state in rows[restored]["opt"].items():
                for key, v in state.items():
                    assert torch.equal(rows[after]["opt"][i][key], v), (after, i, key)
            assert rows[after]["sched"] == rows[restored]["sched"]
        assert all(torch.isfinite(w).all() for w in rows[10]["weights"].values())
    for step in r0["rows"]:  # the full weights are the same on both ranks at every step
        for name, w in r0["rows"][step]["weights"].items():
            assert torch.equal(w, r1["rows"][step]["weights"][name]) or not torch.isfinite(w).all(), (
                step,
                name,
            )
    # each rank's snapshot holds its own shards only: about (1 + 2) x params / 2 for Adam, not the full model
    params = sum(w.numel() * w.element_size() for w in r0["rows"][10]["weights"].values())
    assert r0["snapshot_bytes"] + r1["snapshot_bytes"] == pytest.approx(3 * params, rel=0.05)
    assert max(r0["snapshot_bytes"], r1["snapshot_bytes"]) < 0.75 * 3 * params


def test_rank_local_nan_skips_on_every_rank(tmp_path: Any) -> None:
    r0, r1 = run_ranks(_faults, tmp_path, "skip")
    assert r0["events"] == r1["events"] == [(3, "nonfinite_grad", None)]
    for r in (r0, r1):  # the skipped step left weights and optimizer state untouched, on both ranks
        rows = r["rows"]
        for name, w in rows[3]["weights"].items():
            assert torch.equal(rows[4]["weights"][name], w), name
        for i, state in rows[3]["opt"].items():
            assert all(torch.equal(rows[4]["opt"][i][k], v) for k, v in state.items())


# ----------------------------------------------------------------------- distributed checkpoint rollback
def _from_checkpoint(rank: int, tmp_path: Any) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    guard = ExplosionGuard(
        snapshot_every_n_steps=0, schedulers_after_rollback="restore"
    )  # checkpoint directories are the only rollback source
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1)
    record = Record()
    callbacks = [guard, FaultInjector(target="grad", steps=[5], rank=1), record, ckpt]
    trainer = fsdp_trainer(tmp_path, callbacks, 8, enable_checkpointing=True)
    trainer.fit(ShardedRegressionModel(optimizer="adam", scheduler=True), rank_loader(rank))
    return {"rows": record.rows, "records": guard.records}


def test_rollback_from_a_distributed_checkpoint(tmp_path: Any) -> None:
    r0, r1 = run_ranks(_from_checkpoint, tmp_path)
    written = sorted(os.listdir(tmp_path / "ckpt"))
    assert written == [
        "epoch=0-step=2.ckpt",
        "epoch=0-step=4.ckpt",
        "epoch=0-step=6.ckpt",
        "epoch=0-step=8.ckpt",
    ]
    assert os.path.isdir(
        tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    )  # a torch.distributed.checkpoint directory
    for r in (r0, r1):
        [event] = r["records"]
        assert (event["step"], event["kind"]) == (5, "nonfinite_grad")
        assert event["restored"]["source"] == "checkpoint" and event["restored"]["step"] == 4
        assert event["restored"]["path"].endswith("epoch=0-step=4.ckpt")
        rows = r["rows"]
        for name, w in rows[4]["weights"].items():  # the state saved at step 4, bit for bit
            assert torch.equal(rows[6]["weights"][name], w), name
        for i, state in rows[4]["opt"].items():
            for key, v in state.items():
                assert torch.equal(rows[6]["opt"][i][key], v), (i, key)
        assert rows[6]["sched"] == rows[4]["sched"]
    for name, w in r0["rows"][8]["weights"].items():
        assert torch.equal(w, r1["rows"][8]["weights"][name]) and bool(torch.isfinite(w).all()), name


# ------------------------------------------------------------------------------------------- the example
def _example(rank: int, tmp_path: Any) -> dict[str, Any]:
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "fsdp2.py")
    spec = importlib.util.spec_from_file_location("fsdp2_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--max-steps", "32", "--width", "64", "--out", str(tmp_path)])


def test_the_fsdp2_example_runs_and_the_ranks_agree(tmp_path: Any) -> None:
    """``examples/fsdp2.py`` (the docs' FSDP2 example), both ranks in forked processes."""
    r0, r1 = run_ranks(_example, tmp_path)
    # the NaN on rank 1 at step 30: every rank rolls back to the distributed checkpoint of step 25
    assert r0["events"] == r1["events"] == [(30, "nonfinite_grad", "checkpoint", 25)]
    same = ("rollbacks", "last_norm", "last_threshold", "layers_checked")
    assert {k: r0[k] for k in same} == {k: r1[k] for k in same}
    # the snapshot holds each rank's shards: (1 + 2) x 14,657 fp32 parameters (AdamW) / 2 ranks
    params = 32 * 64 + 64 + 3 * (64 * 64 + 64) + 64 + 1
    assert r0["snapshot_mib_this_rank"] == pytest.approx(3 * params * 4 / 2 / 2**20, rel=0.02)


# ---------------------------------------------------------------------------- the monitor's warning path
class DeepSigmoid(RegressionModel):
    """A 30-layer sigmoid MLP (vanishing gradients through depth), sharded per Linear with FSDP2."""

    def __init__(self) -> None:
        super().__init__(lr=0.1)
        layers: list[nn.Module] = [nn.Linear(8, 16), nn.Sigmoid()]
        for _ in range(28):
            layers += [nn.Linear(16, 16), nn.Sigmoid()]
        self.net = nn.Sequential(*layers, nn.Linear(16, 1))

    configure_model = ShardedRegressionModel.configure_model


def _vanishing(rank: int, tmp_path: Any) -> dict[str, Any]:
    import warnings

    from lightning_clip.exceptions import VanishingGradientWarning

    pl.seed_everything(0, verbose=False)
    monitor = VanishingGradientMonitor(check_every_n_steps=1, patience=2, save_figure=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fsdp_trainer(tmp_path, [monitor], 2).fit(DeepSigmoid(), rank_loader(rank))
    warned = [str(w.message) for w in caught if issubclass(w.category, VanishingGradientWarning)]
    return {"warned": warned, "layers": monitor.layer_names, "history": monitor.history}


def _vanishing_reference(steps: int = 2) -> list[list[float]]:
    """Per-layer gradient 2-norms of the unsharded model at each step (naive float64), SGD as the model's."""
    pl.seed_everything(0, verbose=False)
    model = DeepSigmoid()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    layers = [m for m in model.net if isinstance(m, nn.Linear)]
    out = []
    for batches in global_batches()[:steps]:
        opt.zero_grad()
        loss = sum(nn.functional.mse_loss(model(x), y) for x, y in batches) / len(batches)
        loss.backward()
        out.append([naive_norm([m.weight.grad, m.bias.grad]) for m in layers])
        opt.step()
    return out


def test_the_monitor_warns_from_the_full_gradients(tmp_path: Any) -> None:
    """A 30-layer sigmoid MLP under FSDP2: the per-layer figures of every check are the unsharded model's,
    and rank zero warns, naming as many vanishing layers as the reference has."""
    r0, r1 = run_ranks(_vanishing, tmp_path)
    reference = _vanishing_reference()
    for r in (r0, r1):
        assert [h["step"] for h in r["history"]] == [0, 1]
        for h, ref in zip(r["history"], reference, strict=True):
            assert [r["layers"][i] for i in h["layers"]] == [f"net.{2 * k}" for k in range(30)]
            for got, want in zip(h["norms"], ref, strict=True):
                # norms are accumulated in float32 (sharded or not): squares of gradients below ~1e-19
                # underflow, so the tiniest layers read 0 where the float64 reference reads ~1e-24
                assert got == pytest.approx(want, rel=1e-4, abs=1e-18)
    flagged = sum(1 for n in reference[1] if n / max(reference[1]) < 1e-5)
    [warning] = r0["warned"]
    assert f"at step 1: {flagged} of 30 layers get less than 1e-05" in warning
    assert r1["warned"] == []  # warnings come from rank zero
