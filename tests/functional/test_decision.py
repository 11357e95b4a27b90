"""ExplosionGuard's pure decision (lightning_clip.guard.decision), driven directly: each rule of the
guard's documented behaviour, written out as a table of hand-computed cases."""

from __future__ import annotations

import math

import pytest

from lightning_clip import ExplosionGuard
from lightning_clip.guard.decision import (
    DIVERGENCE,
    NONFINITE_GRAD,
    NONFINITE_LOSS,
    NONFINITE_WEIGHTS,
    PERSISTENT_OVERFLOW,
    SCALE_COLLAPSE,
    SPIKE,
    GuardRules,
    LocalSignals,
    Observation,
    action_for,
    decide,
    sort_kinds,
)

RULES = GuardRules(overflow_patience=3, min_loss_scale=1.0)


def obs(*kinds: str, **kw: object) -> Observation:
    return Observation(kinds=frozenset(kinds), any_overflow=bool(kw.pop("overflow", False)), **kw)  # type: ignore[arg-type]


def test_a_clean_step_is_applied_and_feeds_the_spike_rule() -> None:
    d = decide(obs(local_overflow=False), RULES)
    assert (d.kinds, d.action, d.skip, d.applied, d.feed_spike_rule) == ((), None, False, True, True)


@pytest.mark.parametrize("action", ["rollback", "skip", "raise"])
def test_an_event_is_skipped_and_gets_the_guard_action(action: str) -> None:
    d = decide(obs(SPIKE, NONFINITE_LOSS, local_overflow=False), RULES, action)
    assert d.kinds == (NONFINITE_LOSS, SPIKE)  # precedence order: the loss first
    assert (d.action, d.skip, d.applied, d.feed_spike_rule) == (action, True, False, False)


def test_skip_cannot_repair_a_bad_state() -> None:
    assert action_for((NONFINITE_WEIGHTS, NONFINITE_GRAD), "skip") == "error"
    assert action_for((NONFINITE_GRAD,), "skip") == "skip"
    d = decide(obs(NONFINITE_GRAD, local_overflow=False), RULES, "skip").with_kind(NONFINITE_WEIGHTS, "skip")
    assert (d.kinds, d.action) == ((NONFINITE_WEIGHTS, NONFINITE_GRAD), "error")


def test_a_tainted_batch_or_a_pending_rollback_drops_the_update_without_a_new_event() -> None:
    for state in ({"tainted": True}, {"rollback_pending": True}):
        d = decide(obs(**state, local_overflow=False), RULES)
        assert (d.kinds, d.skip, d.applied) == ((), True, False)
    d = decide(obs(NONFINITE_GRAD, rollback_pending=True, local_overflow=False), RULES)
    assert (d.kinds, d.action, d.skip) == ((), None, True)  # the pending rollback covers it


def test_fp16_overflow_is_calibration_until_it_persists() -> None:
    streak = 0
    seen = []
    for _ in range(4):  # patience 3: the third overflow in a row is an event, and the streak restarts
        d = decide(
            obs(overflow=True, local_overflow=True, has_scaler=True, loss_scale=64.0, overflow_streak=streak),
            RULES,
        )
        streak = d.overflow_streak
        seen.append((d.kinds, d.skip, d.scaler_skips, streak))
    assert seen == [
        ((), False, True, 1),
        ((), False, True, 2),
        ((PERSISTENT_OVERFLOW,), True, True, 0),
        ((), False, True, 1),
    ]


def test_an_overflow_on_another_rank_forces_this_rank_to_skip_and_a_low_scale_collapses() -> None:
    d = decide(obs(overflow=True, local_overflow=False, has_scaler=True, loss_scale=64.0), RULES)
    assert (d.force_scaler_skip, d.scaler_skips, d.applied, d.feed_spike_rule) == (True, True, False, False)
    d = decide(obs(overflow=True, local_overflow=True, has_scaler=True, loss_scale=0.5), RULES)
    assert (d.kinds, d.force_scaler_skip, d.overflow_streak) == ((SCALE_COLLAPSE,), False, 0)
    d = decide(obs(local_overflow=False, has_scaler=True, overflow_streak=5), RULES)
    assert d.overflow_streak == 0  # a clean step ends the streak


def test_local_signals_flags_and_their_reduction() -> None:
    a = LocalSignals(nonfinite_loss=False, nonfinite_norm=True, spike=False, has_scaler=False)
    b = LocalSignals(nonfinite_loss=True, nonfinite_norm=False, spike=True, has_scaler=False)
    assert a.flags() == [0, 1, 0, 0] and b.flags() == [1, 0, 1, 0]
    reduced = [x + y for x, y in zip(a.flags(), b.flags(), strict=True)]  # the all-reduce (sum)
    o = Observation.from_flags(reduced, a)
    assert o.kinds == {NONFINITE_LOSS, NONFINITE_GRAD, SPIKE} and not o.any_overflow
    scaled = LocalSignals(nonfinite_loss=False, nonfinite_norm=True, spike=False, has_scaler=True)
    assert scaled.flags() == [0, 0, 0, 1]  # a non-finite norm under a GradScaler is an overflow
    o = Observation.from_flags(scaled.flags(), scaled, loss_scale=8.0)
    assert (o.kinds, o.any_overflow, o.local_overflow, o.has_scaler) == (frozenset(), True, True, True)
    assert math.isinf(Observation(frozenset(), False, False).loss_scale)


def test_sort_kinds_uses_the_documented_precedence() -> None:
    assert sort_kinds([SPIKE, NONFINITE_WEIGHTS, NONFINITE_GRAD]) == (
        NONFINITE_WEIGHTS,
        NONFINITE_GRAD,
        SPIKE,
    )


def test_the_callback_decides_with_its_own_settings() -> None:
    guard = ExplosionGuard(action="skip")
    guard.overflow_patience = 2
    d = guard.decide(
        obs(overflow=True, local_overflow=True, has_scaler=True, loss_scale=64.0, overflow_streak=1)
    )
    assert (d.kinds, d.action) == ((PERSISTENT_OVERFLOW,), "error")


@pytest.mark.parametrize(
    ("action", "expected"), [("rollback", "rollback"), ("skip", "error"), ("raise", "raise")]
)
def test_a_finite_divergence_is_an_event_a_skip_cannot_repair(action: str, expected: str) -> None:
    d = decide(obs(local_overflow=False, divergence=True), RULES, action)
    assert (d.kinds, d.action, d.skip, d.applied, d.feed_spike_rule) == (
        (DIVERGENCE,),
        expected,
        True,
        False,
        False,
    )
    # with a non-finite kind of the same step, that one leads (and a skip handles it)
    d = decide(obs(NONFINITE_GRAD, local_overflow=False, divergence=True), RULES, "skip")
    assert (d.kinds, d.action) == ((NONFINITE_GRAD, DIVERGENCE), "skip")
    # a pending rollback covers it
    assert decide(obs(local_overflow=False, divergence=True, rollback_pending=True), RULES).kinds == ()
