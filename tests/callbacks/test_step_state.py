"""The explicit per-step object (lightning_clip.step): one measurement per step shared by every
lightning-clip callback, whatever their order, with the riders on the same host transfer."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard, VanishingGradientMonitor
from lightning_clip.step import LossWindow, StepTracker
from tests.models import RegressionModel, make_trainer, regression_loader
from tests.reference import naive_norm


def _model_and_opt() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model(torch.randn(5, 3)).pow(2).sum().backward()
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_the_same_step_gives_the_same_state_and_a_new_step_a_new_one() -> None:
    model, opt = _model_and_opt()
    tracker = StepTracker()
    state = tracker.begin(opt, 3)
    assert tracker.begin(opt, 3) is state
    assert state.measure(2.0) is state.measure(2.0)
    assert state.measure(2.0).total_norm == pytest.approx(
        naive_norm([p.grad for p in model.parameters()]), rel=1e-6
    )
    assert tracker.begin(opt, 4) is not state


def test_riders_come_with_the_first_norm_read_and_only_for_the_next_step() -> None:
    _, opt = _model_and_opt()
    tracker = StepTracker()
    calls = []
    tracker.ride_along("loss", lambda: calls.append(1) or torch.tensor(2.5))  # type: ignore[func-returns-value]
    state = tracker.begin(opt, 0)
    assert calls == []  # called at the transfer, not at registration
    _ = state.measure(2.0).total_norm
    assert calls == [1] and state.rider("loss") == 2.5
    assert tracker.begin(opt, 1).rider("loss") is None  # riders wait for one step only


def test_clip_scales_only_as_far_as_the_tightest_bound_and_skip_drops_the_update() -> None:
    model, opt = _model_and_opt()
    state = StepTracker().begin(opt, 0)
    m = state.measure(2.0)
    norm = m.total_norm
    assert m.clip_(norm / 2) == pytest.approx(0.5, rel=1e-5)
    assert m.clip_(norm / 1.5) == pytest.approx(1 / 1.5, rel=1e-5)  # looser: nothing more written
    assert naive_norm([p.grad for p in model.parameters()]) == pytest.approx(norm / 2, rel=1e-5)
    assert state.measure(1.0).total_norm > 0  # another p measures the pre-clip gradients
    state.skip()
    assert state.skipped and m.skipped and all(p.grad is None for p in model.parameters())
    assert m.clip_(1e-9) == 1.0


def test_loss_window_mean_and_take() -> None:
    _, opt = _model_and_opt()
    window = LossWindow()
    for v in (1.0, 2.0, 6.0):
        window.add(torch.tensor(v))
    state = StepTracker().begin(opt, 0)
    assert window.take(state, "absent") == 3.0  # not a rider of this step: fetched apart
    assert window.mean() is None


def test_a_pickled_tracker_starts_fresh() -> None:
    _, opt = _model_and_opt()
    tracker = StepTracker()
    tracker.begin(opt, 0)
    tracker.ride_along("x", lambda: None)
    clone = pickle.loads(pickle.dumps(tracker))
    assert clone.current is None and clone._waiting == {}


@pytest.mark.parametrize("order", [0, 1])
def test_every_callback_of_a_trainer_shares_one_tracker_and_two_trainers_do_not(
    tmp_path: Any, order: int
) -> None:
    callbacks: list[Any] = [
        AdaptiveGradientClipping(),
        ExplosionGuard(),
        VanishingGradientMonitor(save_figure=False),
    ]
    if order:
        callbacks.reverse()
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_steps=3)
    trainer.fit(RegressionModel(), regression_loader())
    trackers = {id(cb.step_tracker) for cb in callbacks}
    assert len(trackers) == 1 and callbacks[0].step_tracker is not None
    other = [AdaptiveGradientClipping()]
    make_trainer(tmp_path, callbacks=other, max_steps=2).fit(RegressionModel(), regression_loader())
    assert other[0].step_tracker is not callbacks[0].step_tracker
