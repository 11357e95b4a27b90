"""Complex parameters (issue 19, item 6): every finite check covers complex tensors, so a NaN in a complex
weight is caught as non-finite weights at once, and complex gradients are measured as the norm of their
moduli."""

from __future__ import annotations

import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard
from lightning_clip.functional import all_finite
from lightning_clip.guard import snapshot
from lightning_clip.testing import FaultInjector
from tests.models import make_trainer, regression_loader
from tests.reference import LastFigures, optimizer_index
from tests.setup_models import ComplexFeatures


@pytest.mark.parametrize("part", ["real", "imag"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_finite_checks_see_either_part_of_a_complex_tensor(part: str, bad: float) -> None:
    t = torch.ones(3, dtype=torch.complex64)
    assert (
        bool(all_finite([t])) and snapshot.all_finite({"w": t}) and snapshot.nonfinite_names([("w", t)]) == []
    )
    value = complex(bad, 0.0) if part == "real" else complex(0.0, bad)
    t[1] = value
    assert not bool(all_finite([torch.ones(2), t]))
    assert not snapshot.all_finite({"w": t, "b": torch.ones(2)})
    assert snapshot.nonfinite_names([("b", torch.ones(2)), ("w", t)]) == ["w"]


class _ComplexNorms(pl.Callback):
    """Pre-clip gradient norms measured by hand: sqrt of the summed squared moduli, float64."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        assert optimizer_index(trainer, optimizer) == 0
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(math.sqrt(sum(float(g.abs().double().pow(2).sum()) for g in grads)))


def test_nan_in_a_complex_weight_is_caught_as_nonfinite_weights_at_once(tmp_path: Any) -> None:
    """The weight is poisoned after the update of step 4: the guard's weights check at the end of that
    batch (a snapshot step) names it and rolls back to the snapshot of step 4; no NaN loss follows."""
    guard = ExplosionGuard(snapshot_every_n_steps=1)
    clipper = AdaptiveGradientClipping()
    reference, figures = _ComplexNorms(), LastFigures(clipper)
    faults = FaultInjector(target="weight", steps=[4], param_pattern="^cweight$")
    trainer = make_trainer(tmp_path, max_steps=10, callbacks=[reference, clipper, faults, guard, figures])
    trainer.fit(ComplexFeatures(), regression_loader())
    assert [
        (r["step"], r["batch"], r["kind"], r["params"], r["restored"]["step"]) for r in guard.records
    ] == [(5, 4, "nonfinite_weights", ["cweight"], 4)]
    assert bool(torch.isfinite(torch.view_as_real(trainer.lightning_module.cweight)).all())
    assert [n for n, _, _ in figures.figures[0]] == pytest.approx(reference.norms, rel=1e-5)


def test_a_nan_complex_weight_never_reaches_a_checkpoint(tmp_path: Any) -> None:
    """``action="raise"``: the weights check at the end of training sees the complex NaN."""
    from lightning_clip import GradientExplosionError

    faults = FaultInjector(target="weight", steps=[5], param_pattern="^cweight$")
    trainer = make_trainer(tmp_path, max_steps=6, callbacks=[faults, ExplosionGuard(action="raise")])
    with pytest.raises(GradientExplosionError, match=r"non-finite weights at step 6 .*\n.*cweight"):
        trainer.fit(ComplexFeatures(), regression_loader())
