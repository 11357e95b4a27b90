"""Where training stands against its healthy level: the loss band and the finite-divergence detector.

No torch and no Lightning: plain objects fed host-side floats once per optimizer step (the step's mean
training loss, under DDP averaged over the ranks, and its pre-clip gradient norm), with a ``state_dict`` of
plain values (loadable with ``torch.load(weights_only=True)``).

* `LossBand` (`lightning_clip.functional.band`, re-exported here) follows one positive signal on a log
  scale: its smoothed value against its healthy level; their log ratio is the **excess**.
* `DivergenceDetector` is `ExplosionGuard`'s view of a step. A loss is not evidence on its own: many
  healthy losses rise by design (a KL warm-up, a curriculum stage, a stronger adversary, a loss trained
  towards zero that bounces back). So the verdict is ``"diverged"`` when the smoothed gradient norm is
  more than 1,000 times its own healthy level (`DIVERGED_NORM_EXCESS`), or when the smoothed loss is more
  than 4 times its healthy level (`DIVERGED_LOSS_EXCESS`) *confirmed* by the norm (more than 10 times its
  level, `HEALTHY_NORM_EXCESS`) and by the loss being above where training started (its first healthy
  level) — and *still compounding*: within `RUNAWAY_WINDOW` (20) steps of the rise, the smoothed loss
  climbs twice as high (`RUNAWAY_GROWTH`) as the highest single loss of the rise's first steps, or
  stands more than 100 times its healthy level (`WRECKED_LOSS_EXCESS`: wrecked weights). A jump by
  design (a curriculum stage: the loss and the gradients ×5 at once) settles where it jumped; a ramp takes
  hundreds of steps; a runaway compounds. ``"healthy"``
  when the smoothed norm is within 10 times its level, whatever the loss does (snapshots go on through a
  long healthy rise of the loss); ``"elevated"`` otherwise. A state is taken as known-good only after
  `HEALTHY_STREAK` healthy steps in a row (or when every step so far was healthy).

The clipper's loss-aware rule (`lightning_clip.functional.ceiling.LossAwareMeanThreshold`)
uses a `LossBand` of its own and cuts its ceiling when the excess passes `ELEVATED_EXCESS`
(twice the healthy level).

Examples:
    >>> detector = DivergenceDetector()
    >>> for loss in (1.0, 0.9, 0.8, 0.8, 0.7):
    ...     _ = detector.update(loss, norm=1.0)
    >>> detector.peek(40.0, 1.0).verdict  # one high loss is no divergence
    'healthy'
    >>> [detector.update(40.0, 1.0).verdict for _ in range(3)]  # nor one that stays up with calm gradients
    ['healthy', 'healthy', 'healthy']
    >>> [detector.update(40.0, 100.0).verdict for _ in range(4)]  # gradients >10x: elevated; a jump that
    ['healthy', 'healthy', 'elevated', 'elevated']
    >>> [detector.update(40.0 * 2**k, 100.0 * 2**k).verdict for k in range(1, 9)][-1]  # ...compounds diverges
    'diverged'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lightning_clip.functional.band import (
    CALM_FLOOR,
    ELEVATED_EXCESS,
    ELEVATED_FLOOR,
    HEALTHY_EXCESS,
    BandReading,
    LossBand,
    _log,
)

__all__ = [
    "CALM_FLOOR",
    "DETECTOR_SMOOTHING",
    "DIVERGED",
    "DIVERGED_LOSS_EXCESS",
    "DIVERGED_NORM_EXCESS",
    "ELEVATED",
    "ELEVATED_EXCESS",
    "ELEVATED_FLOOR",
    "HEALTHY",
    "HEALTHY_EXCESS",
    "HEALTHY_NORM_EXCESS",
    "HEALTHY_STREAK",
    "NEW_LEVEL_SIGMAS",
    "RUNAWAY_GROWTH",
    "RUNAWAY_WINDOW",
    "WRECKED_LOSS_EXCESS",
    "BandReading",
    "DivergenceDetector",
    "LossBand",
    "Reading",
]

DIVERGED_LOSS_EXCESS = math.log(4.0)
"""A finite divergence: the smoothed loss more than four times its healthy level."""
DIVERGED_NORM_EXCESS = math.log(1000.0)
"""... or the smoothed gradient norm more than a thousand times its own level."""
HEALTHY_NORM_EXCESS = math.log(10.0)
"""A step counts as healthy only with the smoothed norm within ten times its level."""
HEALTHY_STREAK = 10
"""Healthy steps in a row before a state may be taken as known-good (or every step so far, early on)."""
RUNAWAY_GROWTH = math.log(2.0)
"""A confirmed rise is a divergence once the smoothed loss climbs this far (×2) above the highest single
loss of the rise's first `ANCHOR_STEPS` steps: it keeps compounding. A jump by design (a curriculum stage)
settles at the level it jumped to."""
RUNAWAY_WINDOW = 20
"""... within this many steps; a rise that takes longer (a ramp) is re-anchored: it is no runaway."""
WRECKED_LOSS_EXCESS = math.log(100.0)
"""A confirmed rise to more than 100× the healthy level is a divergence whether or not it still climbs
(the weights were wrecked: no curriculum stage jumps that far)."""
ANCHOR_STEPS = 5
"""The anchor is the highest single loss of this many first steps of a confirmed rise."""
NEW_LEVEL_SIGMAS = 5.0
"""A restored known-good state's first loss stands at a new level when it is this many noise σ (and ×4)
above the healthy level (`DivergenceDetector.new_level`)."""

DETECTOR_SMOOTHING = 19.0
"""The detector's bands average at most this many steps (decay ≥ 0.9), however noisy the signal: a loss
that runs away from the first steps on makes the early noise estimate large, and a longer average would
see the divergence only orders of magnitude later."""

HEALTHY = "healthy"
ELEVATED = "elevated"
DIVERGED = "diverged"


@dataclass(frozen=True)
class Reading:
    """`DivergenceDetector`'s view of one step.

    Attributes:
        verdict: ``"healthy"`` | ``"elevated"`` | ``"diverged"``.
        loss_excess: log of the smoothed loss over its healthy level (None: the loss was not judged).
        norm_excess: the same for the gradient norm.
    """

    verdict: str
    loss_excess: float | None
    norm_excess: float | None

    @property
    def loss_ratio(self) -> float | None:
        """The smoothed loss as a multiple of its healthy level (``exp(loss_excess)``)."""
        return None if self.loss_excess is None else math.exp(self.loss_excess)

    @property
    def norm_ratio(self) -> float | None:
        """The smoothed gradient norm as a multiple of its healthy level."""
        return None if self.norm_excess is None else math.exp(self.norm_excess)


class DivergenceDetector:
    """Finite divergence: a training loss or gradient norm far above its healthy level, while still finite.

    Feed every applied step's mean loss and pre-clip norm with `update`; `peek` judges a step
    before its update is applied (so a diverged step can be dropped). See the module docstring for the
    levels. `snapshot_ok` says whether the current state may be taken as known-good.
    """

    def __init__(self) -> None:
        self.loss = LossBand(max_smoothing=DETECTOR_SMOOTHING)
        self.norm = LossBand(max_smoothing=DETECTOR_SMOOTHING)
        self.healthy_streak = 0
        self.steps = 0
        self.anchor: float | None = None  # open suspicion: the highest single log loss of its first steps
        self.suspect_age = 0  # steps since the suspicion opened (or was re-anchored)

    def _suspect(self, loss_reading: BandReading | None, norm_reading: BandReading | None) -> bool:
        """Far above the healthy level, confirmed: the loss over 4× its level and above where training
        started, the norm over 10× its own."""
        if loss_reading is None or norm_reading is None:
            return False
        return (
            loss_reading.excess > DIVERGED_LOSS_EXCESS
            and (self.loss.start_level is None or loss_reading.fast > self.loss.start_level)
            and norm_reading.excess > HEALTHY_NORM_EXCESS
        )

    def peek(self, loss: float | None, norm: float | None) -> Reading:
        """The step's `Reading` (no state change)."""
        loss_reading = self.loss.peek(loss)
        norm_reading = self.norm.peek(norm)
        le = None if loss_reading is None else loss_reading.excess
        ne = None if norm_reading is None else norm_reading.excess
        growing = False
        if loss_reading is not None and self._suspect(loss_reading, norm_reading):
            wrecked = loss_reading.excess > WRECKED_LOSS_EXCESS  # no stage of a curriculum jumps x100
            climbing = self.anchor is not None and loss_reading.fast > self.anchor + RUNAWAY_GROWTH
            growing = wrecked or climbing
        if (ne is not None and ne > DIVERGED_NORM_EXCESS) or growing:
            verdict = DIVERGED
        elif ne is None or ne <= HEALTHY_NORM_EXCESS:
            verdict = HEALTHY
        else:
            verdict = ELEVATED
        return Reading(verdict, le, ne)

    def update(self, loss: float | None, norm: float | None) -> Reading:
        """Commit an applied step; returns its `Reading`."""
        reading = self.peek(loss, norm)
        smoothed_before = self.loss.smoothed()
        loss_reading = self.loss.update(loss)
        norm_reading = self.norm.update(norm)
        if loss_reading is not None and self._suspect(loss_reading, norm_reading):
            if self.anchor is None or self.suspect_age >= RUNAWAY_WINDOW:  # open, or re-anchor a slow rise
                self.anchor, self.suspect_age = loss_reading.log_value, 0
            else:
                self.suspect_age += 1
                if self.suspect_age < ANCHOR_STEPS:  # the level a jump went to, with its noise
                    self.anchor = max(self.anchor, loss_reading.log_value)
        else:
            self.anchor, self.suspect_age = None, 0
        spiked = self._spiked(loss_reading, smoothed_before)
        self.healthy_streak = self.healthy_streak + 1 if reading.verdict == HEALTHY and not spiked else 0
        self.steps += 1
        return reading

    def new_level(self, loss: float | None) -> bool:
        """Whether the first loss of a restored, known-good state stands at a new level: more than a
        divergence's excess (`DIVERGED_LOSS_EXCESS`, ×4) and more than `NEW_LEVEL_SIGMAS` × its noise above
        the healthy level this detector (rewound with the state) knew. The weights that were healthy see
        the rise on the current batches too: it is in the data (a loss that rises by design), not in the
        steps taken since. False while the level is not set, or for a loss that is not positive and finite.

        Examples:
            >>> detector = DivergenceDetector()
            >>> for loss in (1.0, 0.9, 1.1, 1.0, 0.95, 1.05, 1.0):
            ...     _ = detector.update(loss, norm=1.0)
            >>> detector.new_level(1.3), detector.new_level(60.0)
            (False, True)
        """
        x = _log(loss)
        reference = self.loss.reference
        if x is None or reference is None:
            return False
        return x - reference > max(DIVERGED_LOSS_EXCESS, NEW_LEVEL_SIGMAS * self.loss.noise_level())

    @staticmethod
    def _spiked(loss_reading: BandReading | None, smoothed_before: float | None) -> bool:
        """Whether this step's single loss is more than 100× (`WRECKED_LOSS_EXCESS`) the smoothed loss of
        the steps before it: no known-good step, however the band reads it (a band made wide by a noisy
        loss averages one such loss away while the weights already run away). Against the smoothed loss,
        not the healthy level: a loss that rises by design for good is followed by the smoothed value
        within its window, and the streak resumes."""
        if loss_reading is None or smoothed_before is None:
            return False
        return loss_reading.log_value - smoothed_before > WRECKED_LOSS_EXCESS

    @property
    def snapshot_ok(self) -> bool:
        """The current state may be taken as known-good: `HEALTHY_STREAK` healthy steps in a row, or
        every step since the start healthy (a step whose single loss spiked 100× its smoothed level,
        `_spiked`, is not healthy)."""
        return self.healthy_streak >= min(HEALTHY_STREAK, self.steps)

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss.state_dict(),
            "norm": self.norm.state_dict(),
            "healthy_streak": self.healthy_streak,
            "steps": self.steps,
            "anchor": self.anchor,
            "suspect_age": self.suspect_age,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.load_state_dict(state.get("loss", {}))
        self.norm.load_state_dict(state.get("norm", {}))
        self.healthy_streak = int(state.get("healthy_streak", 0))
        self.steps = int(state.get("steps", 0))
        # a state saved before the loss band kept where training began
        if self.loss.start_level is None and state.get("loss_start") is not None:
            self.loss.start_level = float(state["loss_start"])
        anchor = state.get("anchor")
        self.anchor = None if anchor is None else float(anchor)
        self.suspect_age = int(state.get("suspect_age", 0))
