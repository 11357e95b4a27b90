"""ExplosionGuard's decision: what one optimizer step's observations mean, and what to do. No Lightning.

The guard's hook gathers the step's local signals (`LocalSignals`), sums their flags over the
ranks in one all-reduce, and hands the result (`Observation`) to `decide`, which returns a
`Decision`. Because `decide` only sees values that are identical on every rank, every rank
takes the same decision. The shape is the one of Lightning's ``EarlyStopping``: the hook gathers, one
pure function decides, one line reduces, one line acts.

Examples:
    >>> obs = Observation(kinds=frozenset({NONFINITE_GRAD}), any_overflow=False, local_overflow=False)
    >>> d = decide(obs, GuardRules(), guard_action="rollback")
    >>> d.kinds, d.action, d.skip, d.applied
    (('nonfinite_grad',), 'rollback', True, False)
    >>> decide(Observation(frozenset(), False, False), GuardRules()).applied
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

__all__ = [
    "DIVERGENCE",
    "KINDS",
    "NEEDS_STATE",
    "NONFINITE_GRAD",
    "NONFINITE_LOSS",
    "NONFINITE_WEIGHTS",
    "PERSISTENT_OVERFLOW",
    "SCALE_COLLAPSE",
    "SPIKE",
    "STEP_KINDS",
    "Decision",
    "GuardRules",
    "LocalSignals",
    "Observation",
    "action_for",
    "decide",
    "sort_kinds",
]

# Event kinds, in the order of precedence used when several happen in one step.
NONFINITE_WEIGHTS = "nonfinite_weights"
NONFINITE_LOSS = "nonfinite_loss"
NONFINITE_GRAD = "nonfinite_grad"
SCALE_COLLAPSE = "scale_collapse"
PERSISTENT_OVERFLOW = "persistent_overflow"
DIVERGENCE = "divergence"
SPIKE = "spike"
KINDS = (
    NONFINITE_WEIGHTS,
    NONFINITE_LOSS,
    NONFINITE_GRAD,
    SCALE_COLLAPSE,
    PERSISTENT_OVERFLOW,
    DIVERGENCE,
    SPIKE,
)
STEP_KINDS = (NONFINITE_LOSS, NONFINITE_GRAD, SPIKE)
"""The kinds a rank can see on its own at a step (summed over the ranks in the step's all-reduce)."""
NEEDS_STATE = (NONFINITE_WEIGHTS, SCALE_COLLAPSE, PERSISTENT_OVERFLOW, DIVERGENCE)
"""Kinds a skip cannot repair: the state itself is bad (a divergence: the weights are already in the
runaway, skipping its steps would stall training)."""


def sort_kinds(kinds: object) -> tuple[str, ...]:
    """``kinds`` in the order of precedence (the first is the event's ``kind``)."""
    return tuple(sorted(set(kinds), key=KINDS.index))  # type: ignore[call-overload]


@dataclass(frozen=True)
class LocalSignals:
    """What one rank saw at a step, before the all-reduce.

    Attributes:
        nonfinite_loss: the mean training loss since the last step is NaN/Inf.
        nonfinite_norm: the total gradient norm is NaN/Inf.
        spike: the norm is above the spike rule's threshold.
        has_scaler: a GradScaler is in use (16-mixed): a non-finite norm is then an overflow, not an event.
    """

    nonfinite_loss: bool
    nonfinite_norm: bool
    spike: bool
    has_scaler: bool

    def flags(self) -> list[int]:
        """The integers the all-reduce sums: one per `STEP_KINDS`, then the local overflow."""
        return [
            int(self.nonfinite_loss),
            int(self.nonfinite_norm and not self.has_scaler),
            int(self.spike),
            int(self.nonfinite_norm and self.has_scaler),
        ]


@dataclass(frozen=True)
class Observation:
    """A step's signals after the all-reduce (identical on every rank), and the guard's state around it.

    Attributes:
        kinds: the `STEP_KINDS` seen on any rank.
        any_overflow: some rank's GradScaler found inf/NaN gradients (16-mixed calibration).
        local_overflow: this rank's did (the only rank-local field: it says whether this rank's scaler
            must be told to skip).
        has_scaler: a GradScaler is in use (16-mixed).
        loss_scale: the GradScaler's current scale, read only on overflow steps (``inf`` otherwise).
        overflow_streak: consecutive overflow steps before this one.
        tainted: the batch is one of ``skip_batches`` after a rollback: not learned from.
        rollback_pending: a rollback is already due at the end of this batch.
        divergence: the step's mean loss (over the ranks) or its norm is far above its healthy level,
            while finite (`lightning_clip.functional.divergence.DivergenceDetector`).
    """

    kinds: frozenset[str]
    any_overflow: bool
    local_overflow: bool
    has_scaler: bool = False
    loss_scale: float = math.inf
    overflow_streak: int = 0
    tainted: bool = False
    rollback_pending: bool = False
    divergence: bool = False

    @classmethod
    def from_flags(cls, reduced: Sequence[float], local: LocalSignals, **state: object) -> Observation:
        """Build the observation from the all-reduced `LocalSignals.flags`."""
        *kinds, overflows = reduced
        seen = frozenset(k for k, v in zip(STEP_KINDS, kinds, strict=True) if v > 0)
        local_overflow = local.nonfinite_norm and local.has_scaler
        return cls(seen, overflows > 0, local_overflow, local.has_scaler, **state)  # type: ignore[arg-type]


@dataclass(frozen=True)
class GuardRules:
    """The thresholds `decide` applies (the guard's class attributes of the same names)."""

    overflow_patience: int = 20
    min_loss_scale: float = 2.0**-8


@dataclass(frozen=True)
class Decision:
    """What to do with a step.

    Attributes:
        kinds: the new events of this step, in order of precedence (empty: none to act on).
        action: what to do about them (see `action_for`); None without a new event.
        skip: the guard drops the update (an event, a tainted batch, or a pending rollback).
        scaler_skips: every rank's GradScaler skips the step (an overflow on some rank); the update is
            not applied either, but by the scaler, and it is no event.
        force_scaler_skip: this rank's GradScaler must be told to skip although its own gradients were
            finite (another rank overflowed): keeps the ranks' scalers identical.
        overflow_streak: the consecutive-overflow count after this step.
        feed_spike_rule: the step's norm enters the spike statistics (a normal step).
    """

    kinds: tuple[str, ...]
    action: str | None
    skip: bool
    scaler_skips: bool
    force_scaler_skip: bool
    overflow_streak: int
    feed_spike_rule: bool

    def with_kind(self, kind: str, guard_action: str) -> Decision:
        """The same decision with one more kind found after the step's decision (non-finite weights)."""
        kinds = sort_kinds({*self.kinds, kind})
        return replace(self, kinds=kinds, action=action_for(kinds, guard_action))

    @property
    def applied(self) -> bool:
        """The update is applied (neither the guard nor the GradScaler drops it)."""
        return not self.skip and not self.scaler_skips


def action_for(kinds: tuple[str, ...], guard_action: str) -> str | None:
    """The action for an event of ``kinds`` under the guard's ``action``: the guard's own, except
    ``"error"`` when ``"skip"`` meets a state a skip cannot repair (`NEEDS_STATE`).

    Examples:
        >>> action_for(("nonfinite_grad",), "skip"), action_for(("nonfinite_weights",), "skip")
        ('skip', 'error')
    """
    if not kinds:
        return None
    if guard_action == "skip" and kinds[0] in NEEDS_STATE:
        return "error"
    return guard_action


def decide(obs: Observation, rules: GuardRules, guard_action: str = "rollback") -> Decision:
    """Turn a step's `Observation` into a `Decision`.

    * Under a GradScaler an overflow anywhere is loss-scale calibration: every rank's scaler skips the
      step and halves its scale. ``rules.overflow_patience`` overflows in a row are a
      ``persistent_overflow`` event, a scale below ``rules.min_loss_scale`` a ``scale_collapse``; both
      restart the streak.
    * A finite divergence (``obs.divergence``) is a ``divergence`` event.
    * Any event, a tainted batch or a pending rollback means the guard drops the update.
    * While a rollback is pending, new kinds are no separate events (the rollback covers them).
    * The action is `action_for` the new kinds under ``guard_action``.
    """
    kinds = set(obs.kinds)
    if obs.divergence:
        kinds.add(DIVERGENCE)
    scaler_skips = obs.has_scaler and obs.any_overflow
    streak = 0
    if scaler_skips:
        streak = obs.overflow_streak + 1
        if streak >= rules.overflow_patience:
            kinds.add(PERSISTENT_OVERFLOW)
        if obs.loss_scale < rules.min_loss_scale:
            kinds.add(SCALE_COLLAPSE)
    new_kinds = () if obs.rollback_pending else sort_kinds(kinds)
    if new_kinds and (PERSISTENT_OVERFLOW in kinds or SCALE_COLLAPSE in kinds):
        streak = 0
    return Decision(
        kinds=new_kinds,
        action=action_for(new_kinds, guard_action),
        skip=bool(kinds) or obs.tainted or obs.rollback_pending,
        scaler_skips=scaler_skips,
        force_scaler_skip=scaler_skips and not obs.local_overflow,
        overflow_streak=streak,
        feed_spike_rule=not kinds and not obs.any_overflow,
    )
