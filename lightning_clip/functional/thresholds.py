"""Running statistics that turn a stream of gradient norms into clipping thresholds.

No Lightning and no tensors here: each rule is a small object fed host-side floats once per optimizer step
(the pre-clip norm, and the step's training loss for the default ``mean`` rule), with a ``state_dict`` of
plain values. Every rule obeys the same contract:

* `ThresholdRule.step` takes the pre-clip norm ``n_t`` (and optionally the step's loss) and returns the
  threshold that applies to it (``math.inf`` when nothing caps it); the gradient is clipped to
  ``min(n_t, threshold)``. Only `LossAwareMeanThreshold` (``mode="mean"``) uses the loss.
* A non-finite norm never enters the statistics and never makes a threshold non-finite: the rule
  returns the threshold it would apply and leaves its state untouched.
* ``max_norm`` (optional absolute cap) always applies, during warm-up too.
* Norms are float32 measurements: a finite value above the float32 range (only possible when a rule is
  fed by hand) enters the statistics as the largest float32, so no statistic can overflow.

Examples:
    >>> rule = MeanThreshold(factor=2.0, decay=0.5)
    >>> rule.step(4.0)  # warm-up step: nothing caps it
    inf
    >>> rule.step(100.0)  # 2 × bias-corrected mean of [4.0]; enters the mean clipped to 8
    8.0
    >>> rule.step(float("nan"))  # ignored, threshold unchanged by it
    13.333333333333334
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any

from lightning_clip._numbers import percentile_of_sorted
from lightning_clip._validation import check_bool, check_choice, check_int, check_number

__all__ = [
    "MODES",
    "RULE_DEFAULTS",
    "MeanThreshold",
    "PercentileThreshold",
    "ThresholdRule",
    "ZScoreThreshold",
    "check_max_norm",
    "make_rule",
]

MODES = ("mean", "zscore", "percentile")

FLOAT32_MAX = 3.4028234663852886e38
"""Largest finite float32: no measured norm exceeds it, and values entering the statistics are kept below."""


RULE_DEFAULTS: dict[str, Any] = {
    "factor": 1.5,
    "decay": 0.97,
    "z_threshold": 2.5,
    "percentile": 10.0,
    "window": 1000,
    "warmup_steps": None,
    "max_norm": None,
    "loss_aware": True,
}
"""The threshold arguments `make_rule` takes besides ``mode``, with their defaults."""


def check_max_norm(max_norm: Any) -> float | None:
    """``max_norm`` as a float ``> 0``, or None (the optional absolute cap)."""
    return None if max_norm is None else check_number("max_norm", max_norm, low=0.0, low_inclusive=False)


def _bounded(value: float) -> float:
    return value if value <= FLOAT32_MAX else FLOAT32_MAX


def _cap(value: float, max_norm: float | None) -> float:
    return value if max_norm is None else min(value, max_norm)


class ThresholdRule:
    """Base class: a threshold rule fed one norm per step.

    `step` is `threshold` (pure) followed by `update`; a caller that learns only later
    whether the step's update was applied (the callback, when another callback may skip the step) calls
    the two apart and leaves out `update` for a step that was not applied.
    """

    max_norm: float | None

    def threshold(self, norm: float, loss: float | None = None) -> float:  # pragma: no cover - abstract
        """The threshold that applies to this step's pre-clip ``norm`` (no state change). ``loss``: the
        step's training loss (mean over the ranks), used by the loss-aware rule only."""
        raise NotImplementedError

    def update(
        self, norm: float, threshold: float, loss: float | None = None
    ) -> None:  # pragma: no cover - abstract
        """Feed the step's ``norm`` (the ``threshold`` it met, its ``loss``) into the statistics."""
        raise NotImplementedError

    def step(self, norm: float, loss: float | None = None) -> float:
        """Return the threshold for this step's pre-clip ``norm`` and update the statistics."""
        threshold = self.threshold(norm, loss)
        self.update(norm, threshold, loss)
        return threshold

    def state_dict(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class MeanThreshold(ThresholdRule):
    """``threshold_t = min(factor · μ̂_{t−1}, max_norm)``, μ̂ the bias-corrected EMA of the norms as applied.

    The plain statistic of the first release (no loss feedback): the spike rule of
    `ExplosionGuard` and the warm-up of the ``zscore`` and ``percentile`` modes use it, and
    `~lightning_clip.functional.ceiling.LossAwareMeanThreshold` (``mode="mean"``) puts a loss-driven ceiling over it.

    ``m_t = decay·m_{t−1} + (1−decay)·min(n_t, threshold_t)``, ``m_0 = 0``, ``μ̂_t = m_t / (1 − decay^t)``,
    counting finite, non-zero norms only (a zero norm, e.g. a batch with no valid target, carries no
    scale and would pin the threshold at 0 for good). During the first ``warmup_steps`` counted steps
    the threshold is ``max_norm`` (∞ when None). A spike never inflates its own statistics (it enters clipped), and
    because ``factor > 1`` the mean can still follow norms that grow steadily.

    Examples:
        >>> r = MeanThreshold(factor=1.5, decay=0.9, max_norm=10.0)
        >>> [round(r.step(n), 4) for n in (2.0, 2.0, 50.0, 2.0)]
        [10.0, 3.0, 3.0, 3.5535]
    """

    def __init__(
        self, factor: float = 1.5, decay: float = 0.97, warmup_steps: int = 1, max_norm: float | None = None
    ) -> None:
        self.factor = check_number("factor", factor, low=1.0, low_inclusive=False)
        self.decay = check_number("decay", decay, low=0.0, high=1.0, high_inclusive=False)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=1)
        self.max_norm = check_max_norm(max_norm)
        self.count = 0
        self.ema = 0.0

    def current(self) -> float:
        """The threshold the next norm will meet (no update)."""
        if self.count + 1 <= self.warmup_steps:
            return math.inf if self.max_norm is None else self.max_norm
        mean = self.ema / (1.0 - self.decay**self.count)
        return _cap(self.factor * mean, self.max_norm)

    def threshold(self, norm: float, loss: float | None = None) -> float:
        return self.current()

    def update(self, norm: float, threshold: float, loss: float | None = None) -> None:
        if math.isfinite(norm) and norm > 0.0:  # a zero norm carries no scale: it would pin the mean at 0
            self.count += 1
            self.ema = self.decay * self.ema + (1.0 - self.decay) * _bounded(min(norm, threshold))

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "ema": self.ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("count", 0))
        self.ema = float(state.get("ema", 0.0))


class ZScoreThreshold(ThresholdRule):
    """ZClip's z-score rule (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training").

    Reproduces ``zclip.ZClip(mode="zscore", clip_option="adaptive_scaling", clip_factor=1.0)`` 1.0.0: the
    first ``warmup_steps`` finite norms fill a buffer, then EMA mean μ and variance σ² start from the
    buffer's mean and variance. After that, with ``z = (n − μ) / (σ + eps)``: if ``z > z_threshold`` the
    threshold is ``μ + z_threshold·σ / (z / z_threshold)`` and the EMA is fed that threshold, otherwise the
    norm is not clipped (the returned threshold is the detection boundary ``μ + z_threshold·(σ + eps)``)
    and the EMA is fed the norm. ``max_norm`` caps every threshold.

    Differences from ZClip, on purpose: a non-finite norm is ignored (ZClip's EMA turns NaN for good), and
    without ``max_norm`` the warm-up steps are protected by the ``mean`` rule (from the second step on)
    and fill the buffer with the norms as applied, so that a warm-up spike cannot inflate the start.
    ``eps`` (ZClip's, default 1e-6) must be ``> 0``: with constant norms ``σ = 0`` and ``z`` divides by it.
    """

    def __init__(
        self,
        z_threshold: float = 2.5,
        decay: float = 0.97,
        warmup_steps: int = 25,
        max_norm: float | None = None,
        factor: float = 1.5,
        *,
        eps: float = 1e-6,
    ) -> None:
        self.z_threshold = check_number("z_threshold", z_threshold, low=0.0, low_inclusive=False)
        self.decay = check_number("decay", decay, low=0.0, high=1.0, high_inclusive=False)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=1)
        self.max_norm = check_max_norm(max_norm)
        self.eps = check_number("eps", eps, low=0.0, low_inclusive=False)
        self._warmup_rule = MeanThreshold(factor=factor, decay=decay, warmup_steps=1)
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var: float | None = None

    def _decide(self, norm: float, mean: float, var: float) -> tuple[float, float]:
        """After warm-up: ``(threshold before the max_norm cap, value fed to the EMA)`` for ``norm``."""
        std = var**0.5
        boundary = mean + self.z_threshold * (std + self.eps)
        if not math.isfinite(norm):
            return boundary, math.nan
        z = (norm - mean) / (std + self.eps)
        if z > self.z_threshold:
            adaptive = mean + (self.z_threshold * std) / (z / self.z_threshold)
            return adaptive, adaptive
        return boundary, norm

    def threshold(self, norm: float, loss: float | None = None) -> float:
        if self.mean is None or self.var is None:
            return self.max_norm if self.max_norm is not None else self._warmup_rule.threshold(norm)
        return _cap(self._decide(norm, self.mean, self.var)[0], self.max_norm)

    def update(self, norm: float, threshold: float, loss: float | None = None) -> None:
        if not math.isfinite(norm):
            return
        if self.mean is None or self.var is None:
            if self.max_norm is not None:
                entry = norm
            else:
                self._warmup_rule.update(norm, threshold)
                entry = min(norm, threshold)
            self.buffer.append(_bounded(entry))
            if len(self.buffer) >= self.warmup_steps:
                mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - mean) * (x - mean) for x in self.buffer) / len(self.buffer)
                self.mean = mean
                self.buffer = []
            return
        _, fed = self._decide(norm, self.mean, self.var)
        self.mean = self.decay * self.mean + (1.0 - self.decay) * fed
        self.var = self.decay * self.var + (1.0 - self.decay) * (fed - self.mean) * (fed - self.mean)

    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer": list(self.buffer),
            "mean": self.mean,
            "var": self.var,
            "warmup_rule": self._warmup_rule.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = [float(x) for x in state.get("buffer", [])]
        self.mean = None if state.get("mean") is None else float(state["mean"])
        self.var = None if state.get("var") is None else float(state["var"])
        self._warmup_rule.load_state_dict(state.get("warmup_rule", {}))


class PercentileThreshold(ThresholdRule):
    """AutoClip's percentile rule (Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping").

    The threshold is the ``percentile``-th percentile (linear interpolation, as ``torch.quantile``) of the
    last ``window`` pre-clip norms. Reproduces ``autoclip.torch.QuantileClip(quantile=percentile/100,
    history_length=window, global_threshold=True)`` 0.2.1 with ``warmup_steps=1``. During the first
    ``warmup_steps`` finite steps the threshold is ``max_norm`` or, without it, the ``mean`` rule (from the
    second step on). Non-finite norms are never recorded.
    """

    def __init__(
        self,
        percentile: float = 10.0,
        window: int = 1000,
        warmup_steps: int = 1,
        max_norm: float | None = None,
        factor: float = 1.5,
        decay: float = 0.97,
    ) -> None:
        self.percentile = check_number("percentile", percentile, low=0.0, high=100.0)
        self.window = check_int("window", window, low=1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=1)
        self.max_norm = check_max_norm(max_norm)
        self._warmup_rule = MeanThreshold(factor=factor, decay=decay, warmup_steps=1)
        self.count = 0
        self._history: deque[float] = deque()
        self._sorted: list[float] = []

    def _quantile(self) -> float:
        return percentile_of_sorted(self._sorted, self.percentile)

    def _warmup_uses_mean_rule(self) -> bool:
        return self.count < self.warmup_steps and self.max_norm is None and self.warmup_steps > 1

    def threshold(self, norm: float, loss: float | None = None) -> float:
        if self.count < self.warmup_steps:
            if self.max_norm is not None:
                return self.max_norm
            if self.warmup_steps == 1:
                return math.inf
            return self._warmup_rule.threshold(norm)
        return _cap(self._quantile(), self.max_norm)

    def update(self, norm: float, threshold: float, loss: float | None = None) -> None:
        if self._warmup_uses_mean_rule():
            self._warmup_rule.update(norm, threshold)
        if math.isfinite(norm):
            norm = _bounded(norm)
            self.count += 1
            self._history.append(norm)
            bisect.insort(self._sorted, norm)
            if len(self._history) > self.window:
                old = self._history.popleft()
                del self._sorted[bisect.bisect_left(self._sorted, old)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "history": list(self._history),
            "warmup_rule": self._warmup_rule.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("count", 0))
        history = [float(x) for x in state.get("history", [])]
        self._history = deque(
            history[len(history) - self.window :] if len(history) > self.window else history
        )
        self._sorted = sorted(self._history)
        self._warmup_rule.load_state_dict(state.get("warmup_rule", {}))


def make_rule(mode: str, **arguments: Any) -> ThresholdRule:
    """Build the rule for ``mode`` from `AdaptiveGradientClipping`'s arguments.

    ``arguments``: any of ``loss_aware`` (True: ``mean`` is `~lightning_clip.functional.ceiling.LossAwareMeanThreshold`, False: the plain
    `MeanThreshold`), ``factor`` (1.5), ``decay`` (0.97), ``z_threshold`` (2.5), ``percentile`` (10.0),
    ``window`` (1000), ``warmup_steps`` (None: 1, or 25 for ``zscore``, ZClip's default) and ``max_norm``
    (None), with the meanings and ranges of `AdaptiveGradientClipping`. Every argument
    is validated, also those the chosen mode does not use, so a typo never passes silently; an unknown name
    is a ``TypeError``.

    Examples:
        >>> make_rule("zscore").warmup_steps
        25
        >>> make_rule("mean", window=0)
        Traceback (most recent call last):
        ...
        ValueError: `window` must be an integer >= 1, got 0.
    """
    check_choice("mode", mode, MODES)
    unknown = sorted(set(arguments) - set(RULE_DEFAULTS))
    if unknown:
        raise TypeError(f"make_rule() got unknown argument(s) {unknown}; allowed: {sorted(RULE_DEFAULTS)}.")
    a = {**RULE_DEFAULTS, **arguments}
    loss_aware = check_bool("loss_aware", a["loss_aware"])
    factor, decay, z_threshold, percentile = a["factor"], a["decay"], a["z_threshold"], a["percentile"]
    window, warmup_steps, max_norm = a["window"], a["warmup_steps"], a["max_norm"]
    check_number("factor", factor, low=1.0, low_inclusive=False)
    check_number("decay", decay, low=0.0, high=1.0, high_inclusive=False)
    check_number("z_threshold", z_threshold, low=0.0, low_inclusive=False)
    check_number("percentile", percentile, low=0.0, high=100.0)
    check_int("window", window, low=1)
    if warmup_steps is not None:
        check_int("warmup_steps", warmup_steps, low=1, optional=True)
    max_norm = check_max_norm(max_norm)
    if mode == "mean":
        from lightning_clip.functional.ceiling import LossAwareMeanThreshold  # it builds on MeanThreshold

        rule = LossAwareMeanThreshold if loss_aware else MeanThreshold
        return rule(factor, decay, 1 if warmup_steps is None else warmup_steps, max_norm)
    if mode == "zscore":
        return ZScoreThreshold(
            z_threshold, decay, 25 if warmup_steps is None else warmup_steps, max_norm, factor
        )
    return PercentileThreshold(
        percentile, window, 1 if warmup_steps is None else warmup_steps, max_norm, factor, decay
    )
