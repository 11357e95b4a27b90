"""FaultInjector: each target has its documented effect, on the documented steps/batches/rank only."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lightning_clip.testing import FaultInjector
from tests.models import RegressionModel, make_trainer, regression_loader


class Probe(pl.Callback):
    """Placed after the injector: what the batch, loss, gradients and weights looked like on each step."""

    def __init__(self) -> None:
        self.batch_finite: dict[int, bool] = {}
        self.loss: dict[int, float] = {}
        self.grads: dict[int, dict[str, bool]] = {}
        self.weights: dict[int, dict[str, bool]] = {}
        self._step = -1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step
        self.batch_finite[self._step] = all(bool(torch.isfinite(t).all()) for t in batch)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.grads[self._step] = {
            n: bool(torch.isfinite(p.grad).all()) for n, p in pl_module.named_parameters()
        }
        for p in pl_module.parameters():  # never apply: later steps stay observable
            p.grad = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.loss[self._step] = float(outputs["loss"])
        self.module = pl_module
        self.weights[self._step] = {n: bool(torch.isfinite(p).all()) for n, p in pl_module.named_parameters()}


def run(tmp_path: Any, injector: FaultInjector, max_steps: int = 4, **kwargs: Any) -> Probe:
    probe = Probe()
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, callbacks=[injector, probe], max_steps=max_steps, **kwargs)
    trainer.fit(RegressionModel(optimizer="sgd"), regression_loader(n=32))
    return probe


ALL = {"net.0.weight": True, "net.0.bias": True, "net.2.weight": True, "net.2.bias": True}


def test_input_fault_poisons_the_batch_and_the_loss(tmp_path: Any) -> None:
    inj = FaultInjector(target="input", steps=[2])
    probe = run(tmp_path, inj)
    assert probe.batch_finite == {0: True, 1: True, 2: False, 3: True}
    assert [math.isnan(probe.loss[s]) for s in range(4)] == [False, False, True, False]
    assert inj.injected == [{"step": 2, "batch": 2, "target": "input", "rank": 0}]


class Logged(RegressionModel):
    """Logs its loss in ``training_step`` and records the value it logged."""

    def __init__(self) -> None:
        super().__init__(optimizer="sgd")
        self.logged: dict[int, float] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.logged[self.global_step] = float(loss)
        return loss


@pytest.mark.parametrize("target", ["forward", "loss"])
def test_forward_fault_makes_the_logged_value_non_finite_the_loss_fault_does_not(
    tmp_path: Any, target: str
) -> None:
    """``"forward"`` poisons the forward pass, so the value ``training_step`` logs is NaN; ``"loss"``
    multiplies the loss after it was logged. Both make the gradients non-finite, only on that step; the
    forward hooks are gone after the batch."""
    probe, model = Probe(), Logged()
    inj = FaultInjector(target=target, steps=[2])
    torch.manual_seed(0)
    make_trainer(tmp_path, callbacks=[inj, probe], max_steps=4).fit(model, regression_loader(n=32))
    assert [math.isnan(model.logged[s]) for s in range(4)] == [False, False, target == "forward", False]
    assert [math.isnan(probe.loss[s]) for s in range(4)] == [False, False, True, False]
    assert [all(probe.grads[s].values()) for s in range(4)] == [True, True, False, True]
    assert inj.injected == [{"step": 2, "batch": 2, "target": target, "rank": 0}]
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(("value", "check"), [(float("nan"), math.isnan), (float("inf"), math.isinf)])
def test_loss_fault_makes_training_step_output_and_gradients_non_finite(
    tmp_path: Any, value: float, check: Any
) -> None:
    probe = run(tmp_path, FaultInjector(target="loss", value=value, steps=[1]))
    assert [check(probe.loss[s]) for s in range(4)] == [False, True, False, False]
    assert not any(probe.grads[1].values())
    assert probe.grads[0] == probe.grads[2] == ALL
    assert probe.batch_finite[1]  # the batch itself is untouched
    assert "training_step" not in vars(probe.module)  # the wrapper is gone after the batch


def test_grad_fault_hits_matching_parameters_only(tmp_path: Any) -> None:
    probe = run(
        tmp_path,
        FaultInjector(target="grad", value=float("-inf"), steps=[1, 3], param_pattern=r"^net\.2\.bias$"),
    )
    expected = dict(ALL, **{"net.2.bias": False})
    assert [probe.grads[s] for s in range(4)] == [ALL, expected, ALL, expected]
    assert all(math.isfinite(v) for v in probe.loss.values())


def test_weight_fault_after_the_update(tmp_path: Any) -> None:
    probe = run(tmp_path, FaultInjector(target="weight", steps=[1], param_pattern="net.0"))
    assert probe.weights[0] == ALL
    assert probe.weights[1] == dict(ALL, **{"net.0.weight": False, "net.0.bias": False})
    assert probe.grads[1] == ALL  # step 1 itself computed with good weights
    assert math.isnan(probe.loss[2])  # the next forward pass sees them


def test_batches_fire_every_epoch(tmp_path: Any) -> None:
    inj = FaultInjector(target="input", batches=[1])
    probe = run(tmp_path, inj, max_steps=8)  # 4 batches per epoch, 2 epochs
    assert [s for s, ok in probe.batch_finite.items() if not ok] == [1, 5]
    assert [(i["step"], i["batch"]) for i in inj.injected] == [(1, 1), (5, 1)]


def test_rank_filter(tmp_path: Any) -> None:
    inj = FaultInjector(target="input", steps=[0, 1, 2], rank=1)
    probe = run(tmp_path, inj)  # a single process is rank 0
    assert inj.injected == [] and all(probe.batch_finite.values())
    inj0 = FaultInjector(target="input", steps=[0], rank=0)
    assert not run(tmp_path, inj0).batch_finite[0]


def test_is_not_a_lightning_clip_callback() -> None:
    from lightning_clip.callbacks._base import LightningClipCallback

    assert not isinstance(FaultInjector(steps=[0]), LightningClipCallback)


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        (
            {"target": "bias", "steps": [0]},
            ValueError,
            "`target` must be one of 'loss' | 'grad' | 'weight' | 'input' | 'forward', got 'bias'.",
        ),
        (
            {"value": 1.0, "steps": [0]},
            ValueError,
            "`value` must be float('nan'), float('inf') or float('-inf'), got 1.0.",
        ),
        (
            {"value": "nan", "steps": [0]},
            ValueError,
            "`value` must be float('nan'), float('inf') or float('-inf'), got 'nan'.",
        ),
        ({}, ValueError, "`steps` must be a list of global steps when `batches` is None, got None."),
        (
            {"steps": [0], "batches": [1]},
            ValueError,
            "`batches` must be None when `steps` is given, got [1].",
        ),
        ({"steps": 3}, TypeError, "`steps` must be a list of integers ≥ 0, got 3."),
        ({"steps": [1, -1]}, ValueError, "`steps` must be a list of integers ≥ 0, got [1, -1]."),
        ({"batches": "12"}, TypeError, "`batches` must be a list of integers ≥ 0, got '12'."),
        ({"batches": [0.5]}, ValueError, "`batches` must be a list of integers ≥ 0, got [0.5]."),
        (
            {"steps": [0], "param_pattern": 3},
            TypeError,
            "`param_pattern` must be a regular expression string or None, got 3.",
        ),
        (
            {"steps": [0], "param_pattern": "("},
            ValueError,
            "`param_pattern` must be a valid regular expression, got '('.",
        ),
        (
            {"target": "loss", "steps": [0], "param_pattern": "x"},
            ValueError,
            "`param_pattern` must be None for target='loss', got 'x'.",
        ),
        ({"steps": [0], "rank": -1}, ValueError, "`rank` must be an integer >= 0 or None, got -1."),
        ({"steps": [0], "rank": "1"}, TypeError, "`rank` must be an integer >= 0 or None, got '1'."),
    ],
)
def test_argument_errors(kwargs: dict, exc: type, message: str) -> None:
    with pytest.raises(exc, match=f"^{re.escape(message)}$"):
        FaultInjector(**kwargs)
