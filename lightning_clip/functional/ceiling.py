"""The ``mean`` rule's ceiling learned from the training loss (`LossAwareMeanThreshold`).

No Lightning and no tensors here, like `lightning_clip.functional.thresholds`, whose contract the rule
keeps: host-side floats once per optimizer step, a ``state_dict`` of plain values.

**Where it applies:** only to an optimizer whose step follows the gradient's scale
(`~lightning_clip.functional.optimizers.ceiling_applies`); elsewhere ``AdaptiveGradientClipping`` keeps
its cautious start alone (`~lightning_clip.functional.cautious.CautiousMeanThreshold`).

**The loss only confirms.** The ceiling is cut only when the smoothed loss is elevated *and* the
smoothed pre-clip norm is more than twice its own healthy level (`NORM_CONFIRM_EXCESS`): a loss that
rises while the gradients stay at their scale (a KL warm-up, a harder curriculum stage, a stronger
adversary) never cuts it. Nor does a rise while the ceiling stands more than twice above the plain rule's
threshold (`RULING_FACTOR`: the plain rule bounds the steps, the start is over), or while the smoothed
loss is more than 10× below where training began (`LEARNED_FACTOR`: a run trained towards zero, whose
hard batches raise the loss and its gradients together and fall back on their own; their cuts added up
to a clip coefficient of 0.2–0.4 on a healthy SGD CNN), and cuts compound only while the runaway
escalates (`COMPOUND_FACTOR`). It may *probe* it (halve it while the clip binds and the loss stands above
its lowest), but a probe the loss does not answer by coming down is undone, and so is an episode of cuts
that the loss answers neither by coming down nor by climbing on.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from lightning_clip.functional.band import BandReading, LossBand
from lightning_clip.functional.divergence import ANCHOR_STEPS
from lightning_clip.functional.probe import FLOAT32_TINY, StallProbe
from lightning_clip.functional.thresholds import FLOAT32_MAX, MeanThreshold, _bounded

__all__ = ["COMPOUND_FACTOR", "LEARNED_FACTOR", "NORM_CONFIRM_EXCESS", "RULING_FACTOR", "LossAwareMeanThreshold"]  # fmt: skip

NORM_CONFIRM_EXCESS = math.log(2.0)
"""A loss rise cuts the ceiling only with the smoothed pre-clip norm above twice its healthy level."""
RULING_FACTOR = 2.0
"""An episode opens only with the ceiling at most this factor × the plain threshold (past its start)."""
COMPOUND_FACTOR = 2.0
"""Makes a new episode escalate: cut below the last base (`LossAwareMeanThreshold._new_base`)."""
LEARNED_FACTOR = 10.0
"""An episode opens only with the smoothed loss above a tenth of where training began (not towards zero)."""


def _undone(ceiling: float, undo: tuple[float, float]) -> tuple[float, float]:
    """The ceiling and slow-start level with ``undo`` (theirs before an episode or a tighten) restored."""
    return max(ceiling, undo[0]), undo[1]


@dataclass(frozen=True)
class _CeilingPlan:
    """What one step decides about the ceiling (computed identically in ``threshold`` and ``update``)."""

    threshold: float
    ceiling: float
    slow_start: float
    base: float | None
    age: int
    bases: int
    cut: bool
    excess: float | None
    calm: float
    undo: tuple[float, float] | None
    undone: bool


class LossAwareMeanThreshold(StallProbe, MeanThreshold):
    """The ``mean`` rule under a ceiling learned from the training loss (the default of ``mode="mean"``).

    ``threshold_t = min(factor · μ̂_{t−1}, ceiling_t, max_norm)``. ``μ̂`` is exactly `MeanThreshold`'s
    statistic (the bias-corrected EMA of the norms as the plain mean rule applies them, so with a ceiling
    that never binds this is the first release's rule). The **ceiling** is an absolute bound, fed by a
    `~lightning_clip.functional.band.LossBand` of the loss (its *excess*: the log of the
    smoothed loss over its healthy level):

    * it starts at `start` (a tenth) × the median of the finite norms so far, over the first
      `start_steps` (5) of them (a trust-region warm-up; the median, so that one outlying first batch, a
      spike or a lull, does not set it), then widens from there;
    * on a step where it binds and the loss is in its band (excess ≤ its calm band), it widens by
      `fast_rate` (a doubling per 10 steps, or per averaging window of its norm band when longer) up to
      the *slow-start level*, by `slow_growth` above it — at either pace only while the smoothed loss
      is within its calm band of the lowest *settled* value it has been (`drifted`,
      `LossBand.settled`: lucky early batches are no level the run reached);
    * outside an episode, when the smoothed loss has stood above its lowest (since the last probe undone:
      `stalled`) for a `probe_window` of binding steps, a *probe* halves the ceiling; one window later it
      is kept if the smoothed loss fell by more than its calm band, undone otherwise (`_judge_probe`):
      a loss that stands where it stands whatever the step cannot ratchet the ceiling down;
    * when the smoothed loss is elevated (above twice its healthy level for a noisy loss) *and* the smoothed
      pre-clip norm more than twice its own (`NORM_CONFIRM_EXCESS`), while the ceiling is at most twice
      the plain rule's threshold (`RULING_FACTOR`) and the smoothed loss above a tenth of where training
      began (`LEARNED_FACTOR`, the loss band's `~LossBand.start_level`: `_may_open`), an *episode* opens:
      its base is the threshold in force, no lower than the last base taken unless the runaway escalates
      (`_new_base`), the slow-start level drops to half of it, and the ceiling is cut to
      ``base × exp(−excess)`` (at most `max_cut`), following the worst excess; still open after
      `rebase_steps` steps, it is re-based on the current threshold (`episode_bases` bases in all). It
      closes when the loss is no longer elevated;
    * an episode whose loss answers none of its cuts is *undone* (`_answered`): `rebase_steps` after its
      last base, the smoothed loss neither climbs on nor came down — the loss and the norms rose for good
      (targets scaled up, a harder stage): the ceiling and the slow-start level go back to where they stood
      before the episode, and the bands take the levels they stand at as healthy (`LossBand.accept`).

    The running mean cannot ratchet the threshold up through a runaway (the ceiling does not follow the
    norms), nor the ceiling collapse with the mean. Without a loss (``loss=None``, or one not positive and
    finite) the step only widens a binding ceiling.
    `tighten` lowers the ceiling after a rollback for a divergence (`ExplosionGuard`).

    Args:
        factor: threshold = factor × running mean, ``> 1``.
        decay: EMA decay of the running mean, in ``[0, 1)``.
        warmup_steps: counted steps (``≥ 1``) before the mean's term applies (the ceiling and
            ``max_norm`` apply from the first step).
        max_norm: optional absolute cap.

    Examples:
        >>> rule = LossAwareMeanThreshold()
        >>> [round(rule.step(n, loss=1.0), 4) for n in (40.0, 10.0, 12.0, 10.0, 10.0)]  # a tenth of the median
        [4.0, 2.5, 1.2, 1.1, 1.0]
        >>> [round(rule.step(10.0, loss=0.9), 4) for _ in range(3)]  # loss in band, ceiling binding: widened
        [1.0718, 1.1487, 1.2311]
        >>> round(rule.threshold(10.0, loss=50.0), 4)  # the loss alone (norm at its level) cuts nothing
        1.3195
        >>> round(rule.step(1000.0, loss=50.0), 4)  # loss 2.5 x its level, norms confirm: ceiling cut 2.5 x
        0.5292
    """

    follows_loss = True
    """The loss cuts and probes the ceiling (`CautiousMeanThreshold`, its start alone, says False)."""
    start = 0.1
    """The ceiling starts at this fraction of the median of the first `start_steps` finite norms."""
    start_steps = 5
    """Over the first this-many finite norms, the ceiling is `start` × their median so far."""
    fast_growth = 2.0 ** (1.0 / 10.0) - 1.0
    """At most, the growth of a binding ceiling per healthy step below the slow-start level (`fast_rate`)."""
    slow_growth = 2e-3
    """Growth above the slow-start level: a doubling per ~350 steps (at 5e-4, cut ceilings stayed too low)."""
    slow_start_fraction = 0.5
    """At an episode the slow-start level becomes this fraction of the episode's base."""
    rebase_steps = 10
    """An episode still open after this many steps is re-based on the current threshold."""
    episode_bases = 3
    """At most this many bases (the first and the re-bases) per episode."""
    max_cut = 1000.0
    """One base cuts the ceiling by at most this factor."""

    def __init__(
        self, factor: float = 1.5, decay: float = 0.97, warmup_steps: int = 1, max_norm: float | None = None
    ) -> None:
        super().__init__(factor, decay, warmup_steps, max_norm)
        self.ceiling = math.inf
        self.slow_start = math.inf
        self.episode_base: float | None = None
        self.episode_age = 0
        self.episode_count = 0  # bases of the open episode
        self.cuts = 0
        self.band = LossBand()
        self.norm_band = LossBand()
        self.best_loss: float | None = None  # the lowest settled smoothed log loss since the band was set
        # the probe's state (declared and described by `StallProbe`)
        self.stall_steps, self.probe_level, self.probe_age, self.probe_ceiling = 0, None, 0, None
        self.probes, self.probe_best = 0, None
        self.episode_peak: float | None = None  # the highest smoothed log loss since the episode's base
        self.episode_anchor: float | None = None  # the highest single log loss of its first steps
        self.episode_undo: tuple[float, float] | None = None  # ceiling and slow start before the episode
        self.last_base: float | None = None  # the last base an episode took (kept once it closes)
        self.episodes_undone = 0
        self.first_norms: list[float] | None = []  # the start's norms; None once the start is over

    def mean_term(self) -> float:
        """The plain mean rule's threshold, ``min(factor · μ̂, max_norm)`` (``max_norm`` or ∞ in warm-up)."""
        return MeanThreshold.current(self)

    def current(self) -> float:
        """The threshold the next norm meets when its loss changes nothing: ``min(mean term, ceiling)``."""
        return min(self.mean_term(), self.ceiling)

    def drifted(self, calm: float) -> bool:
        """Whether the smoothed loss stands more than ``calm`` (log units) above the lowest it has been
        (`best_loss`, of the settled value, not relaxed, unlike the band's healthy level): then the
        ceiling does not widen — a wider ceiling has not paid off."""
        return self._above(self.best_loss, calm)

    def fast_rate(self) -> float:
        """The growth of a binding ceiling per healthy step below the slow-start level: `fast_growth`, but at
        most a doubling per *window* of its norm band (`LossBand.window`: 9 steps at moderate noise, 30-170
        while the norms are noisy, as early in an exploding RNN): a wider ceiling shows only after so long."""
        window = self.norm_band.window()
        return min(self.fast_growth, 2.0 ** (1.0 / window) - 1.0)

    def _plan(self, norm: float, loss: float | None) -> _CeilingPlan:
        mean_term = self.mean_term()
        ceiling, slow_start = self.ceiling, self.slow_start
        base, age, bases = self.episode_base, self.episode_age, self.episode_count
        undo = self.episode_undo
        if self.first_norms is not None and base is None and math.isfinite(norm) and norm > 0.0:
            ceiling = self.start * statistics.median([*self.first_norms, _bounded(norm)])
        reading = self.band.peek(loss)
        excess = None if reading is None else reading.excess
        cut = False
        calm = self.band.calm_excess()
        opens = reading is not None and self._may_open(reading, norm, ceiling, mean_term)
        undone = False
        if excess is not None and excess > self.band.elevated_excess() and (opens or base is not None):
            assert reading is not None
            if base is None or (age >= self.rebase_steps and bases < self.episode_bases):
                current = min(ceiling, mean_term)
                if base is None:
                    current = self._new_base(current, reading, norm, mean_term)
                if math.isfinite(current):
                    if base is None and undo is None:  # what the episode replaces (a probe it ends, too)
                        halved = self.probe_ceiling if self.probe_level is not None else None
                        undo = (ceiling if halved is None else max(ceiling, halved), slow_start)
                    base, age, bases = current, 0, bases + 1
                    slow_start = self.slow_start_fraction * base
            elif age >= self.rebase_steps and not self._answered(reading.fast, calm):
                # every base spent, and the loss stands where it jumped whatever the cuts: a new level of
                # the loss, not a runaway — the episode is undone
                undone, base, age, bases = True, None, 0, 0
                if undo is not None:
                    ceiling, slow_start = _undone(ceiling, undo)
                undo = None
            if base is not None:
                target = max(base * max(math.exp(-excess), 1.0 / self.max_cut), FLOAT32_TINY)
                if target < ceiling:
                    ceiling, cut = target, True
        else:
            base, age, bases, undo = None, 0, 0, None
        return _CeilingPlan(
            min(mean_term, ceiling), ceiling, slow_start, base, age, bases, cut, excess, calm, undo, undone
        )

    def _may_open(self, reading: BandReading, norm: float, ceiling: float, mean_term: float) -> bool:
        """Whether an elevated loss (its ``reading``) may open an episode: see the class docstring
        (`NORM_CONFIRM_EXCESS`, `RULING_FACTOR`, `LEARNED_FACTOR`)."""
        norm_reading = self.norm_band.peek(norm)
        confirmed = norm_reading is not None and norm_reading.excess > NORM_CONFIRM_EXCESS
        start = self.band.start_level
        learned = start is not None and reading.fast < start - math.log(LEARNED_FACTOR)
        return confirmed and ceiling <= RULING_FACTOR * mean_term and not learned

    def _new_base(self, current: float, reading: BandReading, norm: float, mean_term: float) -> float:
        """A new episode's base: the threshold in force ``current``, but no lower than the last base taken
        unless the runaway escalates — its norm over `COMPOUND_FACTOR` × the plain rule's threshold
        ``mean_term``, or its smoothed loss not yet 1 / `COMPOUND_FACTOR` of where training began."""
        start = self.band.start_level
        early = start is not None and reading.fast >= start - math.log(COMPOUND_FACTOR)
        if self.last_base is None or norm > COMPOUND_FACTOR * mean_term or early:
            return current
        return max(current, self.last_base)  # the cuts follow the worst excess: they do not multiply

    def _answered(self, fast: float, calm: float) -> bool:
        """Whether the loss of an open episode answers its cut: it still climbs (``fast`` above the highest
        single loss of the base's first `ANCHOR_STEPS` steps: a runaway the cut has not stopped yet), or it
        came down (more than ``calm`` below the highest smoothed value since the base)."""
        climbing = self.episode_anchor is not None and fast > self.episode_anchor
        fell = self.episode_peak is not None and fast < self.episode_peak - calm
        return climbing or fell

    def threshold(self, norm: float, loss: float | None = None) -> float:
        return self._plan(norm, loss).threshold

    def update(self, norm: float, threshold: float, loss: float | None = None) -> None:
        plan = self._plan(norm, loss)
        reading = self.band.update(loss)
        fast = self.band.smoothed() if reading is not None else None
        if plan.base is None or reading is None:
            self.episode_peak = self.episode_anchor = None
        elif plan.age == 0:
            self.episode_peak, self.episode_anchor = reading.fast, reading.log_value
        else:
            self.episode_peak = max(self.episode_peak or -math.inf, reading.fast)
            if plan.age < ANCHOR_STEPS:
                self.episode_anchor = max(self.episode_anchor or -math.inf, reading.log_value)
        if fast is not None and self.band.reference is not None:
            low = self.band.settled()  # not a lucky low of a few values averaged
            assert low is not None  # (a value was fed)
            self.best_loss = low if self.best_loss is None else min(self.best_loss, low)
            self.probe_best = low if self.probe_best is None else min(self.probe_best, low)
        self.norm_band.update(norm)
        if plan.undone:  # the levels the loss and the norms stand at are their healthy levels from here on
            self.band.accept()
            self.norm_band.accept()
            self.best_loss = self.probe_best = self.band.settled()
        self.slow_start = plan.slow_start
        self.episode_base = plan.base
        if (plan.base is not None and plan.age == 0) or plan.undone:  # a base taken, or the episode undone
            self.last_base = None if plan.undone else plan.base
        self.episode_age = plan.age + 1 if plan.base is not None else 0
        self.episode_count = plan.bases
        self.episode_undo = plan.undo
        self.ceiling = plan.ceiling
        self.cuts += int(plan.cut)
        self.episodes_undone += int(plan.undone)
        healthy = plan.excess is None or plan.excess <= plan.calm
        binding = math.isfinite(norm) and math.isfinite(self.ceiling) and norm > self.ceiling
        drifted = plan.excess is not None and self.drifted(plan.calm)
        stalled = plan.excess is not None and self.stalled(plan.calm)
        if plan.base is not None:  # an episode rules the ceiling: no probe runs or waits
            self._close_probe()
        elif self.probe_level is not None:
            self._judge_probe(fast, plan.calm)
        else:
            self.stall_steps = self.stall_steps + int(binding) if stalled else 0
            if self.stall_steps >= self.probe_window() and fast is not None:
                self._open_probe(fast)
            elif healthy and binding and not drifted:  # no widening while drifted, at either pace
                growth = self.fast_rate() if self.ceiling < self.slow_start else self.slow_growth
                self.ceiling = min(self.ceiling * (1.0 + growth), FLOAT32_MAX)
        if self.first_norms is not None and math.isfinite(norm) and norm > 0.0:
            self.first_norms.append(_bounded(norm))
            if len(self.first_norms) >= self.start_steps:
                self.first_norms = None
        super().update(norm, self.mean_term())  # the mean as the plain rule applies the norm

    def tighten(self, threshold_at_event: float, fraction: float = 0.5) -> None:
        """After a rollback for a divergence: clip tighter than when it happened.

        ``ceiling ← min(ceiling, fraction × threshold_at_event)``, the slow-start level no higher (the
        ceiling then widens only slowly), and any open episode closed (the restored state is healthy).

        Examples:
            >>> rule = LossAwareMeanThreshold()
            >>> _ = rule.step(8.0, loss=1.0)
            >>> rule.tighten(0.5)
            >>> rule.ceiling, rule.slow_start
            (0.25, 0.25)
        """
        undo = self.episode_undo if self.episode_undo is not None else (self.ceiling, self.slow_start)
        if math.isfinite(threshold_at_event) and threshold_at_event > 0.0:
            self.ceiling = min(self.ceiling, fraction * threshold_at_event)
            self.slow_start = min(self.slow_start, self.ceiling)
        self._close_episode()
        self.first_norms = None  # the tightened ceiling is not overridden by the start's estimate
        self.episode_undo = undo  # kept while the loss stays elevated (`new_level`), dropped once it is not

    def new_level(self) -> None:
        """The loss stands at a new level by design (`ExplosionGuard` found that its restored, known-good
        state sees the rise too): what was cut or tightened for it is undone — the ceiling and the slow-start
        level back to where they stood before (`episode_undo`: before the open episode, or before `tighten`)
        — and the loss's and the norms' bands, and the lowest levels, start afresh from the new level.

        Examples:
            >>> rule = LossAwareMeanThreshold()
            >>> _ = rule.step(8.0, loss=1.0)
            >>> before = rule.ceiling
            >>> rule.tighten(0.5)
            >>> rule.ceiling
            0.25
            >>> rule.new_level()
            >>> rule.ceiling == before
            True
        """
        if self.episode_undo is not None:
            self.ceiling, self.slow_start = _undone(self.ceiling, self.episode_undo)
            self.episodes_undone += 1
        self._close_episode()
        self.band, self.norm_band = LossBand(), LossBand()
        self.best_loss = self.probe_best = None

    def _close_episode(self) -> None:
        """No episode open (and no memory of what one replaced), no probe open or waiting."""
        self.episode_base, self.episode_age, self.episode_count = None, 0, 0
        self.episode_peak = self.episode_anchor = self.episode_undo = self.last_base = None
        self._close_probe()

    _OPTIONAL = ("episode_base", "best_loss", "probe_level", "probe_ceiling", "probe_best", "episode_peak",
                 "episode_anchor", "last_base")  # fmt: skip
    """State keys holding a float or None."""
    _COUNTS = ("episode_age", "episode_count", "cuts", "stall_steps", "probe_age", "probes",
               "episodes_undone")  # fmt: skip
    """State keys holding an int (0 when absent)."""

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "ceiling": self.ceiling,
            "slow_start": self.slow_start,
            **{key: getattr(self, key) for key in (*self._OPTIONAL, *self._COUNTS)},
            "loss_band": self.band.state_dict(),
            "norm_band": self.norm_band.state_dict(),
            "episode_undo": None if self.episode_undo is None else list(self.episode_undo),
            "first_norms": None if self.first_norms is None else list(self.first_norms),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.ceiling = float(state.get("ceiling", math.inf))
        self.slow_start = float(state.get("slow_start", math.inf))
        for key in self._OPTIONAL:
            value = state.get(key)
            setattr(self, key, None if value is None else float(value))
        for key in self._COUNTS:
            setattr(self, key, int(state.get(key, 0)))
        self.band.load_state_dict(state.get("loss_band", {}))
        self.norm_band.load_state_dict(state.get("norm_band", {}))
        undo = state.get("episode_undo")
        self.episode_undo = None if undo is None else (float(undo[0]), float(undo[1]))
        # a state saved without `first_norms`: the start is over once a norm was counted
        first = state.get("first_norms", [] if self.count == 0 else None)
        self.first_norms = None if first is None else [float(value) for value in first]
