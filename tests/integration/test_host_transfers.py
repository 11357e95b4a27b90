"""At most one device-to-host transfer per optimizer step, whatever the callbacks and their order.

Counted during the ``on_before_optimizer_step`` hooks of all three callbacks: every ``.item()`` /
``float(tensor)`` / ``bool(tensor)`` (the ``_local_scalar_dense`` op, seen by a dispatch mode) and every
``Tensor.tolist()`` call (no op on the CPU, so counted by wrapping the method).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard, VanishingGradientMonitor
from tests.models import RegressionModel, make_trainer, regression_loader


class _HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            self.count += 1
        return func(*args, **(kwargs or {}))


class Window(pl.Callback):
    """Opens (``first``) or closes the counting window around the other callbacks' hook."""

    def __init__(self, first: bool, shared: dict[str, Any]) -> None:
        self.first, self.shared = first, shared

    @property
    def state_key(self) -> str:
        return f"Window{self.first}"

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.first:
            self.shared["mode"] = _HostReads().__enter__()
            self.shared["tolist"] = 0
            return
        self.shared["mode"].__exit__(None, None, None)
        reads = self.shared["mode"].count + self.shared["tolist"]
        self.shared["per_step"][trainer.global_step] = reads


@pytest.mark.parametrize(
    ("clipper_first", "mode"),
    [(True, "mean"), (False, "mean"), (True, "adagc"), (False, "mean_per_tensor")],
)
def test_one_host_transfer_per_step_with_all_three_callbacks(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, clipper_first: bool, mode: str
) -> None:
    """Also in the per-tensor modes: their per-tensor summary rides on the step's one transfer."""
    shared: dict[str, Any] = {"per_step": {}, "tolist": 0}
    original = torch.Tensor.tolist

    def counting_tolist(self: torch.Tensor) -> Any:
        shared["tolist"] += 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    clipper, guard = AdaptiveGradientClipping(mode=mode), ExplosionGuard(snapshot_every_n_steps=4)
    monitor = VanishingGradientMonitor(check_every_n_steps=5, save_figure=False)
    ours = [clipper, guard, monitor] if clipper_first else [monitor, guard, clipper]
    callbacks = [Window(True, shared), *ours, Window(False, shared)]
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_steps=12, log_every_n_steps=50)
    trainer.fit(RegressionModel(optimizer="adam"), regression_loader(n=128))
    per_step = shared["per_step"]
    assert sorted(per_step) == list(range(12))
    checks = {s for s in per_step if s % 5 == 0}  # the monitor's check steps add their one transfer
    assert Counter(per_step[s] for s in per_step if s not in checks) == Counter({1: 12 - len(checks)})
    assert all(per_step[s] == 2 for s in checks)


class WholeStep(pl.Callback):
    """Counts host reads over the whole batch: forward, backward (the graph read), optimizer step."""

    def __init__(self, shared: dict[str, Any]) -> None:
        self.shared = shared

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.shared["mode"] = _HostReads().__enter__()
        self.shared["tolist"] = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.shared["mode"].__exit__(None, None, None)
        self.shared["per_step"][trainer.global_step - 1] = self.shared["mode"].count + self.shared["tolist"]


class SigmoidLSTM(RegressionModel):
    """An LSTM read by a sigmoid head: gates recomputed and activation sites read at every analysed check."""

    def __init__(self) -> None:
        super().__init__(optimizer="sgd")
        self.rnn = torch.nn.LSTM(8, 6, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.rnn(x.unsqueeze(1).expand(-1, 5, -1))[0][:, -1]
        return self.net(torch.sigmoid(h) @ torch.ones(6, 8) / 6)


def test_cause_measurements_add_no_host_transfer(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every check analysed (log_layer_metrics=True: activation sites, recurrent gates, weight scales,
    per-step losses), a check step still has exactly one transfer more than the same step without the
    monitor, and any other step none."""
    original = torch.Tensor.tolist

    def run(with_monitor: bool) -> dict[int, int]:
        shared: dict[str, Any] = {"per_step": {}, "tolist": 0}

        def counting_tolist(self: torch.Tensor) -> Any:
            shared["tolist"] += 1
            return original(self)

        monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
        monitor = VanishingGradientMonitor(check_every_n_steps=4, save_figure=False, log_layer_metrics=True)
        callbacks = [WholeStep(shared), *([monitor] if with_monitor else [])]
        torch.manual_seed(0)
        trainer = make_trainer(tmp_path, callbacks=callbacks, max_steps=9, log_every_n_steps=50)
        trainer.fit(SigmoidLSTM(), regression_loader(n=128))
        if with_monitor:
            assert monitor.last["evidence"] is not None and monitor.last["evidence"].gates["rnn"]
        return shared["per_step"]

    bare, monitored = run(False), run(True)
    assert sorted(monitored) == list(range(9))
    extra = {s: monitored[s] - bare[s] for s in monitored}
    assert extra == {s: int(s % 4 == 0) for s in range(9)}
