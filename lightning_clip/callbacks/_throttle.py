"""The clipper's persistent-throttle watch (`ThrottleWatch`) and the warning it gives (`throttle_message`).

Only a warning depends on them: nothing here is saved in checkpoints or changes a threshold.
"""

from __future__ import annotations

__all__ = ["ThrottleWatch", "throttle_message"]


class ThrottleWatch:
    """The last ``window`` clip coefficients of one optimizer, judged every ``window`` steps.

    `add` returns True when an episode of persistent throttling starts: the median of a full window below
    ``low`` while no episode is open. The episode closes when a window's median is above ``release``.
    (Only a warning depends on it: it is not saved in checkpoints.)

    Examples:
        >>> watch = ThrottleWatch(window=4)
        >>> [watch.add(c, low=0.1, release=0.5) for c in (0.05, 0.02, 0.03, 0.04, 0.01, 0.02, 0.02, 0.02)]
        [False, False, False, True, False, False, False, False]
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.values: list[float] = []
        self.open = False
        self.median = 1.0

    def add(self, coef: float, low: float, release: float) -> bool:
        self.values.append(coef)
        if len(self.values) < self.window:
            return False
        ordered = sorted(self.values)
        self.values = []
        self.median = ordered[len(ordered) // 2]
        if self.open:
            self.open = self.median <= release
            return False
        self.open = self.median < low
        return self.open


def throttle_message(
    index: int, optimizer: str, watch: ThrottleWatch, window: int, threshold: float, norm: float
) -> str:
    """The warning for optimizer ``index`` (class name ``optimizer``) throttled for ``window`` steps.

    Examples:
        >>> watch = ThrottleWatch(window=2)
        >>> watch.add(0.01, low=0.1, release=0.5), watch.add(0.01, low=0.1, release=0.5)
        (False, True)
        >>> "throttled optimizer 0 (SGD) for 2 steps" in throttle_message(0, "SGD", watch, 2, 0.1, 10.0)
        True
    """
    return (
        f"AdaptiveGradientClipping has throttled optimizer {index} ({optimizer}) for {window} steps: its"
        f" median clip coefficient is {watch.median:.2g} (the gradients are scaled to {watch.median:.2g} ×"
        f" their norm; threshold now {threshold:.3g}, norm {norm:.3g}). If this run is healthy and its loss"
        " rises by design (an adversarial objective, a KL warm-up, a curriculum), pass `loss_aware=False` for"
        " the plain running-mean rule, or `max_norm` with a bound you know to be safe. If the norms really grew"
        " (a runaway), lower the learning rate."
    )
