""" "Got no gradient" over a window (issue 19, item 4): a parameter is flagged only when it got no gradient on
any optimizer step since the previous check. Heads used on some steps only (round-robin multi-task heads,
an auxiliary head used 1 step in 10) raise no warning; a layer never used still does."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from lightning_clip import ExplosionGuard, VanishingGradientMonitor, VanishingGradientWarning
from lightning_clip.testing import FaultInjector
from tests.models import make_trainer, regression_loader
from tests.setup_models import PartlyUsedHeads


def _fit(
    tmp_path: Any, monitor: VanishingGradientMonitor, steps: int, extra: list[Any] | None = None
) -> tuple[PartlyUsedHeads, list[str]]:
    model = PartlyUsedHeads()
    trainer = make_trainer(tmp_path, max_steps=steps, callbacks=[*(extra or []), monitor])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", VanishingGradientWarning)
        trainer.fit(model, regression_loader(n=256))
    return model, [str(w.message) for w in record if w.category is VanishingGradientWarning]


def _never_used(model: PartlyUsedHeads) -> set[str]:
    """The heads the model's own record shows were never used (the reference)."""
    used = {name for _, heads in model.used for name in heads}
    return {"head_a", "head_b", "aux", "unused"} - used


@pytest.mark.parametrize(
    ("every", "patience", "steps", "warned_at"),
    [(10, 2, 40, 10), (25, 3, 101, 50)],  # every check step is even and not 5 mod 10: a one-step view errs
)
def test_partly_used_heads_get_no_warning_an_unused_layer_does(
    tmp_path: Any, every: int, patience: int, steps: int, warned_at: int
) -> None:
    monitor = VanishingGradientMonitor(check_every_n_steps=every, patience=patience, save_figure=False)
    model, messages = _fit(tmp_path, monitor, steps)
    assert _never_used(model) == {"unused"}
    assert len(messages) == 1
    assert messages[0].startswith(
        f"Trainable parameters got no gradient on any step up to step {warned_at} since the check before,"
        f" {patience} checks in a row: `unused` (weight, bias)."
    )
    for name in ("head_a", "head_b", "aux"):
        assert f"`{name}`" not in messages[0]
    assert monitor.last["no_grad"] == {"unused": ["weight", "bias"]}


def test_a_skipped_step_still_counts_the_gradients_it_had(tmp_path: Any) -> None:
    """The guard drops the updates of steps 5 and 15 (their gradients set to None before the monitor's hook):
    the auxiliary head, used at those steps only in the windows 1..10 and 11..20, still counts as used."""
    guard = ExplosionGuard(action="skip")
    faults = FaultInjector(target="grad", steps=[5, 15], param_pattern=r"^trunk\.")
    monitor = VanishingGradientMonitor(check_every_n_steps=10, patience=2, save_figure=False)
    model, messages = _fit(tmp_path, monitor, 40, extra=[faults, guard])
    assert [(r["step"], r["action"]) for r in guard.records] == [(5, "skip"), (15, "skip")]
    assert (5, ["head_b", "aux"]) in model.used and (15, ["head_b", "aux"]) in model.used
    assert len(messages) == 1 and "`unused`" in messages[0] and "`aux`" not in messages[0]
