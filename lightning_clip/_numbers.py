"""Plain-Python number helpers shared by the threshold rules and the report (no torch, no Lightning)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["median", "percentile_of_sorted"]


def percentile_of_sorted(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (``0 ≤ q ≤ 100``) of an ascending sequence, with linear interpolation
    (numpy's and ``torch.quantile``'s default); NaN when it is empty.

    Examples:
        >>> percentile_of_sorted([1.0, 2.0, 3.0, 4.0], 50)
        2.5
        >>> percentile_of_sorted([1.0, 2.0, 3.0, 4.0], 10)
        1.3
    """
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    """The median (the 50th percentile, the mean of the middle two for an even count); NaN when empty.

    Examples:
        >>> median([3.0, 1.0, 2.0]), median([4.0, 1.0, 2.0, 3.0])
        (2.0, 2.5)
    """
    return percentile_of_sorted(sorted(values), 50.0)
