"""Constructor fuzzing (hypothesis) of every public class: any argument values (ints, floats including
NaN and ±Inf, bools, None, strings, lists, and the valid values) give either a working object or a
``ValueError`` / ``TypeError`` whose message names the argument in the project's format
`` `<arg>` must be <constraint>, got <value!r>. `` — never another exception. Working objects round-trip
their ``state_dict`` and run in a real short fit.
"""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_clip.callbacks.adaptive_clipping import AdaptiveGradientClipping
from lightning_clip.callbacks.explosion_guard import ExplosionGuard
from lightning_clip.callbacks.vanishing_monitor import VanishingGradientMonitor
from lightning_clip.exceptions import GradientExplosionError, LightningClipWarning
from lightning_clip.testing import FaultInjector
from tests.models import RegressionModel, make_trainer, regression_loader

CLASSES = (AdaptiveGradientClipping, ExplosionGuard, VanishingGradientMonitor, FaultInjector)

scalar = st.one_of(
    st.integers(-(10**6), 10**6),
    st.integers(),  # big ints too
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
)
anything = st.one_of(scalar, st.lists(scalar, max_size=4), st.tuples(scalar, scalar))

# valid values, so that working objects are drawn often enough to be exercised
VALID: dict[str, st.SearchStrategy[Any]] = {
    "mode": st.sampled_from(["mean", "zscore", "percentile", "adagc", "mean_per_tensor"]),
    "factor": st.floats(1.01, 10.0),
    "decay": st.floats(0.0, 0.999),
    "z_threshold": st.floats(0.1, 5.0),
    "percentile": st.floats(0.0, 100.0),
    "window": st.integers(1, 2000),
    "warmup_steps": st.one_of(st.none(), st.integers(1, 50)),
    "max_norm": st.one_of(st.none(), st.floats(1e-3, 1e3)),
    "norm_type": st.one_of(st.just(float("inf")), st.floats(0.5, 4.0)),
    "loss_aware": st.booleans(),
    "action": st.sampled_from(["rollback", "skip", "raise"]),
    "spike_factor": st.one_of(st.none(), st.floats(1.01, 100.0)),
    "snapshot_every_n_steps": st.integers(0, 100),
    "max_rollbacks": st.integers(0, 10),
    "skip_batches": st.integers(0, 5),
    "lr_factor": st.floats(0.01, 1.0),
    "trust_checkpoints": st.booleans(),
    "detect_divergence": st.booleans(),
    "schedulers_after_rollback": st.sampled_from(["fast_forward", "restore"]),
    "check_every_n_steps": st.integers(1, 50),
    "patience": st.integers(1, 10),
    "depth_threshold": st.floats(1e-9, 0.99),
    "time_threshold": st.floats(1e-9, 0.99),
    "log_layer_metrics": st.booleans(),
    "save_figure": st.just(False),
    "measure_causes": st.booleans(),
    "target": st.sampled_from(["loss", "grad", "weight", "input"]),
    "value": st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    "steps": st.one_of(st.none(), st.lists(st.integers(0, 5), max_size=3)),
    "batches": st.one_of(st.none(), st.lists(st.integers(0, 5), max_size=3)),
    "param_pattern": st.one_of(st.none(), st.sampled_from([r"weight$", r"^net\.0\.", "(", "[a-"])),
    "rank": st.one_of(st.none(), st.integers(0, 1)),
}

MESSAGE = re.compile(r"^`(?P<arg>\w+)` must be (?P<constraint>.+), got (?P<value>.*)\.$", re.DOTALL)


def params(cls: type) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(cls).parameters.items() if n != "self"}


def kwargs_for(cls: type, valid_only: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    names = params(cls)
    if valid_only:
        return st.fixed_dictionaries({}, optional={n: VALID[n] for n in names})
    return st.fixed_dictionaries({}, optional={n: st.one_of(VALID[n], anything) for n in names})


def construct(cls: type, kwargs: dict[str, Any]) -> Any:
    """Build ``cls(**kwargs)``; an argument error must name the argument and echo its value."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        message = str(err)
        m = MESSAGE.match(message)
        assert m is not None, f"{cls.__name__}({kwargs!r}): message not in the project format: {message!r}"
        arg = m["arg"]
        signature = params(cls)
        assert arg in signature, f"{cls.__name__}: the message names no argument: {message!r}"
        value = kwargs.get(arg, signature[arg].default)
        assert m["value"] == repr(value), f"{cls.__name__}({kwargs!r}): {message!r} echoes another value"
        return None


def check_working(obj: Any, cls: type, kwargs: dict[str, Any]) -> None:
    if cls is FaultInjector:
        assert obj.target in ("loss", "grad", "weight", "input", "forward")
        return
    assert isinstance(obj.state_key, str) and cls.__name__ in obj.state_key
    fresh = cls(**kwargs)
    fresh.load_state_dict(obj.state_dict())
    assert fresh.state_dict() == obj.state_dict()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_arguments_give_an_object_or_a_named_argument_error(cls: type, data: st.DataObject) -> None:
    kwargs = data.draw(kwargs_for(cls))
    obj = construct(cls, kwargs)
    if obj is not None:
        check_working(obj, cls, kwargs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_objects_work_in_a_real_fit(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    callbacks = []
    for cls in CLASSES:
        obj = construct(cls, data.draw(kwargs_for(cls, valid_only=True), label=cls.__name__))
        if obj is not None:
            callbacks.append(obj)
    tmp_path = tmp_path_factory.mktemp("fit")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    trainer = make_trainer(tmp_path, callbacks=[*callbacks, ckpt], max_steps=4, enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LightningClipWarning)  # e.g. vanishing-gradient diagnoses
        try:
            trainer.fit(RegressionModel(optimizer="adam"), regression_loader(n=32))
        except GradientExplosionError:  # a fuzzed FaultInjector against a guard that must give up
            assert any(isinstance(c, FaultInjector) for c in callbacks)
            return
    assert trainer.global_step == 4
