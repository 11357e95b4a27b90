"""Argument checks shared by every public class.

Each check raises with the message format of the project: `` `<arg>` must be <constraint>, got <value!r>. ``
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_inf: bool = False,
) -> float:
    """Check that ``value`` is a real number inside the given interval and return it as ``float``."""
    lo = "-inf" if low is None else repr(low)
    hi = "inf" if high is None else repr(high)
    interval = f"{'[' if low_inclusive else '('}{lo}, {hi}{']' if high_inclusive else ')'}"
    if not _is_real(value):
        raise TypeError(f"`{name}` must be a real number in {interval}, got {value!r}.")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"`{name}` must be a finite number in {interval}, got {value!r}.")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}.")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}.")
    return value


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Check that ``value`` is an ``int`` (not ``bool``) in ``[low, high]`` and return it."""
    lo = "-inf" if low is None else str(low)
    hi = "inf" if high is None else str(high)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"`{name}` must be an integer in [{lo}, {hi}], got {value!r}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"`{name}` must be an integer in [{lo}, {hi}], got {value!r}.")
    return value


def check_choice(name: str, value: Any, choices: Collection[str]) -> str:
    """Check that ``value`` is one of ``choices`` (strings) and return it."""
    allowed = " | ".join(repr(c) for c in choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")
    return value


def check_norm_type(name: str, value: Any) -> float:
    """A p-norm order: any real ``p > 0`` or ``float('inf')``."""
    if not _is_real(value):
        raise TypeError(f"`{name}` must be a real number > 0 or float('inf'), got {value!r}.")
    value = float(value)
    if math.isnan(value) or value <= 0:
        raise ValueError(f"`{name}` must be a real number > 0 or float('inf'), got {value!r}.")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return value
