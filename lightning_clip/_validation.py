"""Argument checks shared by every public class.

Each check raises with the message format of the project: `` `<arg>` must be <constraint>, got <value!r>. ``
where ``<value!r>`` is the value exactly as received. A value of the wrong type raises ``TypeError``; a
value of the right type outside the allowed range raises ``ValueError``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fmt(bound: float) -> str:
    return f"{bound:g}"


def _range_text(
    low: float | None, high: float | None, low_inclusive: bool, high_inclusive: bool, allow_inf: bool
) -> str:
    """``> 1``, ``>= 0``, ``in [0, 1)``, or ``in (0, inf]`` when ``allow_inf``."""
    if high is None and low is not None and not allow_inf:
        return f"{'>=' if low_inclusive else '>'} {_fmt(low)}"
    lo = "-inf" if low is None else _fmt(low)
    hi = "inf" if high is None else _fmt(high)
    left = "[" if low_inclusive and low is not None else "("
    right = "]" if (high is None and allow_inf) or (high is not None and high_inclusive) else ")"
    return f"in {left}{lo}, {hi}{right}"


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
    """Check that ``value`` is a real number inside the given interval and return it as ``float``.

    Examples:
        >>> check_number("factor", 1, low=1.0, low_inclusive=False)
        Traceback (most recent call last):
        ...
        ValueError: `factor` must be a number > 1, got 1.
    """
    constraint = _range_text(low, high, low_inclusive, high_inclusive, allow_inf)
    if not _is_real(value):
        raise TypeError(f"`{name}` must be a real number {constraint}, got {value!r}.")
    number = float(value)
    if math.isnan(number) or (math.isinf(number) and not allow_inf):
        raise ValueError(f"`{name}` must be a finite number {constraint}, got {value!r}.")
    if low is not None and (number < low or (number == low and not low_inclusive)):
        raise ValueError(f"`{name}` must be a number {constraint}, got {value!r}.")
    if high is not None and (number > high or (number == high and not high_inclusive)):
        raise ValueError(f"`{name}` must be a number {constraint}, got {value!r}.")
    return number


def check_int(
    name: str, value: Any, *, low: int | None = None, high: int | None = None, optional: bool = False
) -> int:
    """Check that ``value`` is an integer (not ``bool``) in ``[low, high]`` and return it as ``int``.

    ``optional=True`` only adds "or None" to the message: the caller handles ``None`` itself.

    Examples:
        >>> check_int("window", 0, low=1)
        Traceback (most recent call last):
        ...
        ValueError: `window` must be an integer >= 1, got 0.
    """
    if high is None and low is not None:
        constraint = f">= {low}"
    else:
        constraint = f"in [{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    if optional:
        constraint += " or None"
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"`{name}` must be an integer {constraint}, got {value!r}.")
    number = int(value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"`{name}` must be an integer {constraint}, got {value!r}.")
    return number


def check_choice(name: str, value: Any, choices: Collection[str]) -> str:
    """Check that ``value`` is one of ``choices`` (strings) and return it.

    A non-string raises ``TypeError``, an unknown string ``ValueError``.
    """
    allowed = " | ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be one of {allowed}, got {value!r}.")
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")
    return value


def check_norm_type(name: str, value: Any) -> float:
    """A p-norm order: any real ``p > 0`` or ``float('inf')``."""
    if not _is_real(value):
        raise TypeError(f"`{name}` must be a real number > 0 or float('inf'), got {value!r}.")
    number = float(value)
    if math.isnan(number) or number <= 0:
        raise ValueError(f"`{name}` must be a real number > 0 or float('inf'), got {value!r}.")
    return number


def check_bool(name: str, value: Any) -> bool:
    """Check that ``value`` is ``True`` or ``False`` and return it."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return value
