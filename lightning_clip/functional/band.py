"""The healthy level of a positive signal on a log scale: `LossBand`, which the divergence detector
(`lightning_clip.functional.divergence`) and the clipper's loss-aware ceiling
(`lightning_clip.functional.ceiling`) read.

No torch and no Lightning: host-side floats once per optimizer step, a ``state_dict`` of plain values.

`LossBand` follows one positive signal (a training loss, a gradient norm) on a log scale (so its units do
not matter): ``fast``, a bias-corrected EMA of ``log(value)`` whose averaging adapts to the noise (nine
steps at moderate noise: it averages minibatch noise and the step-to-step oscillation of a runaway), and
``reference``, the lowest ``fast`` seen, allowed to rise by ``1e-3`` per step (a factor 2 in ~700 steps: a
loss that settles higher for good is accepted in the end, a runaway — a factor 10 or more within tens of
steps — is not). The **excess** ``fast − reference`` is the log of the ratio between the smoothed value and
its healthy level. Values that are not positive and finite are not judged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["CALM_FLOOR", "ELEVATED_EXCESS", "ELEVATED_FLOOR", "HEALTHY_EXCESS", "BandReading", "LossBand"]

FLOAT32_MAX = 3.4028234663852886e38
LOG2 = math.log(2.0)

ELEVATED_EXCESS = math.log(2.0)
"""The loss is *elevated* when its smoothed value is more than twice its healthy level (the clipper cuts
its ceiling; the guard takes no snapshot)."""
ELEVATED_FLOOR = math.log(1.25)
"""The least excess that counts as elevated, for a calm loss (see `LossBand.elevated_excess`)."""
CALM_FLOOR = math.log(1.1)
"""The least excess that still counts as in band, for a calm loss (see `LossBand.calm_excess`)."""
HEALTHY_EXCESS = 0.5 * math.log(2.0)
"""The loss is *in its band* when its smoothed value is within √2 of its healthy level (the clipper's
ceiling may widen)."""


def _log(value: float | None) -> float | None:
    """``log(value)`` for a positive finite value (capped at the largest float32), else None."""
    if value is None or not (value > 0.0 and math.isfinite(value)):
        return None
    return math.log(min(value, FLOAT32_MAX))


@dataclass(frozen=True)
class BandReading:
    """One value as a `LossBand` sees it (logs, natural base).

    Attributes:
        log_value: ``log(value)``.
        fast: the smoothed log after this value.
        reference: the healthy level after this value.
    """

    log_value: float
    fast: float
    reference: float

    @property
    def excess(self) -> float:
        """``fast − reference``: the log of the ratio between the smoothed value and its healthy level."""
        return self.fast - self.reference


class LossBand:
    """The healthy level of a positive signal (a training loss, a gradient norm), on a log scale.

    With ``x_t = log(value_t)``:

    * ``fast_t`` is a bias-corrected EMA of ``x`` whose decay adapts to the signal's noise: `fast_decay`
      (0.8, about nine steps of averaging) while the step-to-step noise is moderate, more averaging for a
      noisier signal, so that a doubling of the level stands out of the noise (``n_eff = min(max(9,
      (5·σ / log 2)²), max_smoothing)`` steps, ``decay = 1 − 2 / (n_eff + 1)``).
    * ``σ``, the noise, is √π/2 × the bias-corrected EMA (decay 0.98) of ``|x_t − x_{t−1}|`` over calm
      steps (excess at most log(2)/2, and every step before the reference is set), each term capped at
      4 × the estimate once it has five terms.
    * ``reference_t = min(fast_t + early_t, reference_{t−1} + relax)``: the lowest smoothed level seen,
      allowed to rise by `relax` per step. ``early_t = √(spread_t² − s²)`` is how much more ``fast_t``
      is still spread by the noise than it will be once it averages its full window (``spread_t =
      σ·√(Σw²)/Σw`` with ``w`` the EMA's weights, ``s = σ·√((1 − d)/(1 + d))`` its steady value): while
      only a few values are averaged, a lucky low batch is not taken for the healthy level. The reference
      is set once the noise has `noise_warmup` terms; until then the excess is 0.
    * ``start_level`` is the first reference set: the level the signal began at (`accept` leaves it; the
      divergence detector and the loss-aware ceiling read it as where training began).

    The **excess** ``fast − reference`` is the log of the ratio between the smoothed value and its healthy
    level. A value that is not positive and finite is not judged (`peek` returns None) and leaves the state
    untouched.

    Examples:
        >>> band = LossBand()
        >>> for loss in (2.0, 1.0, 1.0, 1.0, 1.0, 1.0):
        ...     _ = band.update(loss)
        >>> round(math.exp(band.reference), 3), round(band.peek(8.0).excess, 3)
        (1.125, 0.48)
    """

    fast_decay = 0.8
    """Decay of the smoothed log at moderate noise (the most responsive it gets)."""
    relax = 1e-3
    """How far the reference may rise per step (log units: a factor 2 in ~700 steps)."""
    noise_decay = 0.98
    """EMA decay of the noise estimate."""
    noise_excess = HEALTHY_EXCESS
    """Once the reference is set, the noise estimate is fed only on steps whose excess is at most this."""
    noise_warmup = 3
    """Noise terms before the reference is set."""
    noise_cap_after = 5
    """Noise terms before each new term is capped at 4 × the estimate."""
    noise_sigmas = 5.0
    """The smoothing keeps the noise of ``fast`` this many times below log 2."""
    early_spreads = 1.0
    """While few values are averaged, the reference is taken this many early spreads above ``fast``."""

    def __init__(self, max_smoothing: float = math.inf) -> None:
        self.max_smoothing = max_smoothing
        """The most steps the smoothed log averages (``n_eff``), however noisy the signal."""
        self.count = 0
        self.ema = 0.0
        self.weight = 0.0  # the EMA's total weight (its bias correction, for a varying decay)
        self.weight2 = 0.0  # the sum of its squared weights (how many values it really averages)
        self.reference: float | None = None
        self.start_level: float | None = None  # the first reference set: where the signal began
        self.noise = 0.0
        self.noise_count = 0
        self.last: float | None = None

    def noise_level(self) -> float:
        """σ: the estimated standard deviation of ``log(value)`` from one step to the next (0 until known)."""
        if self.noise_count == 0:
            return 0.0
        return 0.886226925452758 * self.noise / (1.0 - self.noise_decay**self.noise_count)

    def fast_noise(self) -> float:
        """The standard deviation of ``fast`` that the noise alone gives once it averages its full window,
        ``σ·√((1 − d)/(1 + d))``."""
        d = self.decay()
        return self.noise_level() * math.sqrt((1.0 - d) / (1.0 + d))

    def elevated_excess(self) -> float:
        """The excess above which the smoothed value is *elevated*: 5 × the noise of ``fast``, kept in
        ``[ln 1.25, ln 2]`` (a calm loss — a cross-entropy far above its floor — is elevated at +25%, a
        noisy one only at twice its level)."""
        return min(max(ELEVATED_FLOOR, 5.0 * self.fast_noise()), ELEVATED_EXCESS)

    def calm_excess(self) -> float:
        """The excess at most which the smoothed value is *in its band*: 3 × the noise of ``fast``, kept in
        ``[ln 1.1, ln(2)/2]``."""
        return min(max(CALM_FLOOR, 3.0 * self.fast_noise()), HEALTHY_EXCESS)

    def window(self) -> float:
        """``n_eff``: how many steps the next smoothed value averages (9 at moderate noise, more for a
        noisier signal, at most ``max_smoothing``) — about how long a change of level takes to show."""
        n_eff = max(2.0 / (1.0 - self.fast_decay) - 1.0, (self.noise_sigmas * self.noise_level() / LOG2) ** 2)
        return min(n_eff, self.max_smoothing)

    def decay(self) -> float:
        """The decay the next value is smoothed with."""
        return 1.0 - 2.0 / (self.window() + 1.0)

    def smoothed(self) -> float | None:
        """The smoothed log value after the values fed so far (None before the first)."""
        return self.ema / self.weight if self.weight > 0.0 else None

    def settled(self) -> float | None:
        """The smoothed log value plus its early spreads (`_early_spread`, as the reference candidate
        takes them; 0 once the average holds its full window): the level a lowest-so-far may take — a
        lucky low of a few values averaged is not taken for the lowest the signal has been. None before
        the first value."""
        fast = self.smoothed()
        if fast is None:
            return None
        return fast + self.early_spreads * self._early_spread(self.weight, self.weight2)

    def _early_spread(self, weight: float, weight2: float) -> float:
        """How much more the noise spreads an average of total weight ``weight`` (squared weights
        ``weight2``) than a full window's: ``√(spread² − s²)``, ``spread = σ·√weight2 / weight``."""
        spread = self.noise_level() * math.sqrt(weight2) / weight
        return math.sqrt(max(0.0, spread**2 - self.fast_noise() ** 2))

    def accept(self) -> None:
        """Take the level the signal stands at as its healthy level: the reference becomes the
        `settled` smoothed value (a no-op before the reference is set)."""
        if self.reference is not None:
            settled = self.settled()
            assert settled is not None
            self.reference = settled

    def peek(self, value: float | None) -> BandReading | None:
        """The reading after feeding ``value``, without changing the state (None: not judged)."""
        x = _log(value)
        if x is None:
            return None
        d = self.decay()
        weight = d * self.weight + (1.0 - d)
        fast = (d * self.ema + (1.0 - d) * x) / weight
        if self.noise_count < self.noise_warmup:
            return BandReading(x, fast, fast)
        candidate = fast + self.early_spreads * self._early_spread(
            weight, d * d * self.weight2 + (1.0 - d) ** 2
        )
        reference = candidate if self.reference is None else min(candidate, self.reference + self.relax)
        return BandReading(x, fast, reference)

    def update(self, value: float | None) -> BandReading | None:
        """Feed ``value``; returns its reading (None when not judged)."""
        reading = self.peek(value)
        if reading is None:
            return None
        judged = self.noise_count >= self.noise_warmup  # the reading's reference was computed
        if self.last is not None and (not judged or reading.excess <= self.noise_excess):
            step = abs(reading.log_value - self.last)
            if self.noise_count >= self.noise_cap_after:
                step = min(step, 4.0 * self.noise / (1.0 - self.noise_decay**self.noise_count))
            self.noise = self.noise_decay * self.noise + (1.0 - self.noise_decay) * step
            self.noise_count += 1
        d = self.decay()
        self.last = reading.log_value
        self.count += 1
        self.ema = d * self.ema + (1.0 - d) * reading.log_value
        self.weight = d * self.weight + (1.0 - d)
        self.weight2 = d * d * self.weight2 + (1.0 - d) ** 2
        if judged:
            self.reference = reading.reference
            if self.start_level is None:
                self.start_level = reading.reference
        return reading

    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "ema": self.ema,
            "weight": self.weight,
            "weight2": self.weight2,
            "reference": self.reference,
            "start_level": self.start_level,
            "noise": self.noise,
            "noise_count": self.noise_count,
            "last": self.last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("count", 0))
        self.ema = float(state.get("ema", 0.0))
        self.weight = float(state.get("weight", 1.0 - self.fast_decay**self.count))
        self.weight2 = float(state.get("weight2", 0.0))
        reference = state.get("reference")
        self.reference = None if reference is None else float(reference)
        start = state.get("start_level")
        self.start_level = None if start is None else float(start)
        self.noise = float(state.get("noise", 0.0))
        self.noise_count = int(state.get("noise_count", 0))
        last = state.get("last")
        self.last = None if last is None else float(last)
