"""Tests of the independent references in :mod:`tests.reference` (by hand), before the clipping tests rely on them."""

from __future__ import annotations

import math

import pytest

from tests.reference import (
    autoclip_applied,
    expected_applied,
    mean_thresholds,
    zclip_applied,
)


def test_mean_thresholds_by_hand() -> None:
    # factor 2, decay 0.5, warm-up 1. Step 1: inf; m1 = 0.5·4 = 2, μ̂1 = 2/0.5 = 4 → c2 = 8.
    # Step 2: n=100 enters as 8: m2 = 1 + 4 = 5, μ̂2 = 5/0.75 → c3 = 13.333…; NaN: no update → c4 = c3.
    got = mean_thresholds([4.0, 100.0, float("nan"), 1.0], factor=2.0, decay=0.5)
    assert got == pytest.approx([math.inf, 8.0, 40.0 / 3.0, 40.0 / 3.0])
    assert mean_thresholds([9.0, 9.0], 2.0, 0.5, warmup_steps=2, max_norm=3.0) == [3.0, 3.0]


def test_peer_references_by_hand() -> None:
    # autoclip: first step unclipped; 3 is cut to the median of [1]; 10 to the median of [1, 3] (pre-clip).
    assert autoclip_applied([1.0, 3.0, 10.0], percentile=50.0, window=10) == pytest.approx(
        [1.0, 1.0, 2.0], rel=1e-5
    )
    # ZClip warm-up with max_grad_norm=2: the norms are capped at 2.
    assert zclip_applied([1.0, 5.0], 2.5, 0.9, warmup_steps=5, max_norm=2.0) == pytest.approx(
        [1.0, 2.0], rel=1e-5
    )
    assert expected_applied([1.0, 4.0], [2.0, 2.0]) == pytest.approx([1.0, 2.0])
