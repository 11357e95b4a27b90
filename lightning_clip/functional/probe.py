"""The loss-aware ceiling's probe (`StallProbe`): does a tighter step pay off while training stalls?

No Lightning and no tensors here, like `lightning_clip.functional.ceiling`, whose rule
(`~lightning_clip.functional.ceiling.LossAwareMeanThreshold`) holds the probe's state and decides when
to run it: outside an episode, once its smoothed loss has stood above its lowest (`StallProbe.stalled`)
for a `StallProbe.probe_window` of binding steps.
"""

from __future__ import annotations

import math

from lightning_clip.functional.band import LossBand

__all__ = ["FLOAT32_TINY", "StallProbe"]

FLOAT32_TINY = 1.1754943508222875e-38
"""Smallest normal float32: the loss-aware ceiling never goes below it (so it can always widen again)."""


class StallProbe:
    """A probe of the ceiling: halve it, and one window later keep it only if the loss answered.

    A base of `~lightning_clip.functional.ceiling.LossAwareMeanThreshold`, which owns the attributes
    declared here (and checkpoints them). A loss that stands where it stands whatever the step cannot
    ratchet the ceiling down: a probe it does not answer by coming down is undone.
    """

    probe_cut = 0.5
    """A probe multiplies the ceiling by this (halves it)."""

    band: LossBand
    norm_band: LossBand
    ceiling: float
    slow_start: float
    stall_steps: int  # binding steps of the current stall (`stalled`)
    probe_level: float | None  # the smoothed log loss when the open probe began
    probe_age: int  # steps of the open probe
    probe_ceiling: float | None  # the ceiling before the open probe halved it
    probes: int  # probes begun
    probe_best: float | None  # the lowest settled smoothed log loss since the last probe undone

    def stalled(self, calm: float) -> bool:
        """Whether the smoothed loss stands more than ``calm`` above the lowest it has been since the last
        probe it did not answer (`probe_best`): training is not progressing at this step size."""
        return self._above(self.probe_best, calm)

    def _above(self, low: float | None, calm: float) -> bool:
        fast = self.band.smoothed()
        return low is not None and fast is not None and fast - low > calm

    def probe_window(self) -> int:
        """How long a stall must bind before a probe, and how long a probe waits for the loss to answer:
        the longer of the loss band's and the norm band's windows (`LossBand.window`: about how long a
        change of level takes to show in the smoothed value), in whole steps (rounded up, past a 1e-6
        rounding slack)."""
        return math.ceil(max(self.band.window(), self.norm_band.window()) - 1e-6)

    def _open_probe(self, fast: float) -> None:
        """Begin a probe at the smoothed log loss ``fast``: the ceiling halved (`probe_cut`), the ceiling
        it replaced kept to go back to."""
        self.probe_level, self.probe_age, self.probe_ceiling = fast, 0, self.ceiling
        self.ceiling = max(self.probe_cut * self.ceiling, FLOAT32_TINY)
        self.stall_steps = 0
        self.probes += 1

    def _judge_probe(self, fast: float | None, calm: float) -> None:
        """One step of an open probe: after `probe_window` steps, kept when the smoothed loss fell more
        than ``calm`` below where it stood when the probe began (the tighter step paid off; the slow-start
        level comes down to the halved ceiling, so that it widens back only slowly), else undone: the
        ceiling back to where it was, and the current settled smoothed loss taken as the lowest since
        (`probe_best`) — a loss that stands where it stands whatever the step is no evidence against the
        ceiling (the widening stays held by the rule's ``drifted``, against its ``best_loss``)."""
        self.probe_age += 1
        if self.probe_age < self.probe_window() or fast is None or self.probe_level is None:
            return
        if not fast < self.probe_level - calm:
            if self.probe_ceiling is not None:
                self.ceiling = max(self.ceiling, self.probe_ceiling)
            self.probe_best = self.band.settled()
        else:  # kept: the slow-start level follows (an undone probe leaves it where it was)
            self.slow_start = min(self.slow_start, self.ceiling)
        self._close_probe()

    def _close_probe(self) -> None:
        """No probe open, and no stall counted towards one."""
        self.stall_steps, self.probe_level, self.probe_age, self.probe_ceiling = 0, None, 0, None
