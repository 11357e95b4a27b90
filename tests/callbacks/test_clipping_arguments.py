"""Every invalid argument of AdaptiveGradientClipping: the exception type and the exact message.

Messages follow `` `<arg>` must be <constraint>, got <value!r>. ``: they name the argument, state the
allowed range and echo the value exactly as received (``1`` stays ``1``, ``'2'`` stays ``'2'``).
Wrong type -> ``TypeError``; right type, out of range -> ``ValueError``.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from lightning_clip.callbacks.adaptive_clipping import AdaptiveGradientClipping

MODES = "one of 'mean' | 'zscore' | 'percentile' | 'adagc' | 'mean_per_tensor'"
NORM = "a real number > 0 or float('inf')"

CASES = [
    # (kwargs, exception, message)
    (dict(mode="median"), ValueError, f"`mode` must be {MODES}, got 'median'."),
    (dict(mode="Mean"), ValueError, f"`mode` must be {MODES}, got 'Mean'."),
    (dict(mode=None), TypeError, f"`mode` must be {MODES}, got None."),
    (dict(mode=1), TypeError, f"`mode` must be {MODES}, got 1."),
    (dict(mode=True), TypeError, f"`mode` must be {MODES}, got True."),
    (dict(factor=1.0), ValueError, "`factor` must be a number > 1, got 1.0."),
    (dict(factor=1), ValueError, "`factor` must be a number > 1, got 1."),
    (dict(factor=0.5), ValueError, "`factor` must be a number > 1, got 0.5."),
    (dict(factor=-2.0), ValueError, "`factor` must be a number > 1, got -2.0."),
    (dict(factor=math.nan), ValueError, "`factor` must be a finite number > 1, got nan."),
    (dict(factor=math.inf), ValueError, "`factor` must be a finite number > 1, got inf."),
    (dict(factor="2"), TypeError, "`factor` must be a real number > 1, got '2'."),
    (dict(factor=True), TypeError, "`factor` must be a real number > 1, got True."),
    (dict(factor=None), TypeError, "`factor` must be a real number > 1, got None."),
    (dict(decay=1.0), ValueError, "`decay` must be a number in [0, 1), got 1.0."),
    (dict(decay=1), ValueError, "`decay` must be a number in [0, 1), got 1."),
    (dict(decay=-0.1), ValueError, "`decay` must be a number in [0, 1), got -0.1."),
    (dict(decay=math.nan), ValueError, "`decay` must be a finite number in [0, 1), got nan."),
    (dict(decay="0.9"), TypeError, "`decay` must be a real number in [0, 1), got '0.9'."),
    (dict(decay=False), TypeError, "`decay` must be a real number in [0, 1), got False."),
    (dict(z_threshold=0.0), ValueError, "`z_threshold` must be a number > 0, got 0.0."),
    (dict(z_threshold=-2.5), ValueError, "`z_threshold` must be a number > 0, got -2.5."),
    (dict(z_threshold=math.inf), ValueError, "`z_threshold` must be a finite number > 0, got inf."),
    (dict(z_threshold=True), TypeError, "`z_threshold` must be a real number > 0, got True."),
    (dict(z_threshold=[2.5]), TypeError, "`z_threshold` must be a real number > 0, got [2.5]."),
    (dict(percentile=-1.0), ValueError, "`percentile` must be a number in [0, 100], got -1.0."),
    (dict(percentile=100.5), ValueError, "`percentile` must be a number in [0, 100], got 100.5."),
    (dict(percentile=0.9 * 1000), ValueError, "`percentile` must be a number in [0, 100], got 900.0."),
    (dict(percentile=math.nan), ValueError, "`percentile` must be a finite number in [0, 100], got nan."),
    (dict(percentile="10"), TypeError, "`percentile` must be a real number in [0, 100], got '10'."),
    (dict(window=0), ValueError, "`window` must be an integer >= 1, got 0."),
    (dict(window=-5), ValueError, "`window` must be an integer >= 1, got -5."),
    (dict(window=10.0), TypeError, "`window` must be an integer >= 1, got 10.0."),
    (dict(window=True), TypeError, "`window` must be an integer >= 1, got True."),
    (dict(window=None), TypeError, "`window` must be an integer >= 1, got None."),
    (dict(warmup_steps=0), ValueError, "`warmup_steps` must be an integer >= 1 or None, got 0."),
    (dict(warmup_steps=-1), ValueError, "`warmup_steps` must be an integer >= 1 or None, got -1."),
    (dict(warmup_steps=2.5), TypeError, "`warmup_steps` must be an integer >= 1 or None, got 2.5."),
    (dict(warmup_steps=25.0), TypeError, "`warmup_steps` must be an integer >= 1 or None, got 25.0."),
    (dict(warmup_steps=True), TypeError, "`warmup_steps` must be an integer >= 1 or None, got True."),
    (dict(warmup_steps="25"), TypeError, "`warmup_steps` must be an integer >= 1 or None, got '25'."),
    (dict(max_norm=0.0), ValueError, "`max_norm` must be a number > 0, got 0.0."),
    (dict(max_norm=0), ValueError, "`max_norm` must be a number > 0, got 0."),
    (dict(max_norm=-1.0), ValueError, "`max_norm` must be a number > 0, got -1.0."),
    (dict(max_norm=math.nan), ValueError, "`max_norm` must be a finite number > 0, got nan."),
    (dict(max_norm=math.inf), ValueError, "`max_norm` must be a finite number > 0, got inf."),
    (dict(max_norm="1.0"), TypeError, "`max_norm` must be a real number > 0, got '1.0'."),
    (dict(max_norm=True), TypeError, "`max_norm` must be a real number > 0, got True."),
    (dict(norm_type=0), ValueError, f"`norm_type` must be {NORM}, got 0."),
    (dict(norm_type=0.0), ValueError, f"`norm_type` must be {NORM}, got 0.0."),
    (dict(norm_type=-2.0), ValueError, f"`norm_type` must be {NORM}, got -2.0."),
    (dict(norm_type=-math.inf), ValueError, f"`norm_type` must be {NORM}, got -inf."),
    (dict(norm_type=math.nan), ValueError, f"`norm_type` must be {NORM}, got nan."),
    (dict(norm_type="2"), TypeError, f"`norm_type` must be {NORM}, got '2'."),
    (dict(norm_type=True), TypeError, f"`norm_type` must be {NORM}, got True."),
    (dict(norm_type=None), TypeError, f"`norm_type` must be {NORM}, got None."),
]


def _id(case) -> str:
    kwargs, exc, _ = case
    [(name, value)] = kwargs.items()
    return f"{name}={value!r}-{exc.__name__}"


@pytest.mark.parametrize(("kwargs", "exc", "message"), CASES, ids=[_id(c) for c in CASES])
def test_invalid_argument_message(kwargs, exc, message):
    with pytest.raises(exc) as info:
        AdaptiveGradientClipping(**kwargs)
    assert type(info.value) is exc  # not a subclass standing in for the other kind
    assert str(info.value) == message
    [(name, value)] = kwargs.items()
    # the shape every argument error shares: names the argument, a constraint, echoes the value received
    assert re.fullmatch(rf"`{name}` must be .+, got {re.escape(repr(value))}\.", str(info.value))


@pytest.mark.parametrize("mode", ["mean", "zscore", "percentile"])
@pytest.mark.parametrize(
    "kwargs",
    [dict(factor=1.0), dict(decay=1.0), dict(z_threshold=0.0), dict(percentile=101.0), dict(window=0)],
    ids=lambda kw: next(iter(kw)),
)
def test_every_argument_is_checked_whatever_the_mode(mode, kwargs):
    # an argument the mode does not use is still validated: a typo never passes silently
    [name] = kwargs
    with pytest.raises(ValueError, match=rf"^`{name}` must be "):
        AdaptiveGradientClipping(mode=mode, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="zscore"),
        dict(mode="percentile"),
        dict(factor=1.0001),
        dict(decay=0.0),
        dict(decay=0),
        dict(decay=0.999999),
        dict(z_threshold=1e-9),
        dict(percentile=0.0),
        dict(percentile=100),
        dict(window=1),
        dict(warmup_steps=1),
        dict(warmup_steps=None),
        dict(max_norm=1e-12),
        dict(max_norm=5),
        dict(norm_type=math.inf),
        dict(norm_type=0.5),
        dict(norm_type=1),
        dict(factor=np.float64(2.0), decay=np.float32(0.9), window=np.int64(50), warmup_steps=np.int32(3)),
    ],
    ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()),
)
def test_boundary_values_are_accepted(kwargs):
    callback = AdaptiveGradientClipping(**kwargs)
    assert callback.rule() is not None
    for name, value in kwargs.items():
        assert getattr(callback, name) == value
