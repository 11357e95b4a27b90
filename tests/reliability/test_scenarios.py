"""The reliability campaign: seeded scenarios with injected faults (see ``scenarios.py`` for what is drawn
and what each end must look like). 20 single-process scenarios, 4 runaway scenarios (the demo's exploding
RNN at drawn radii and learning rates, see `generate_runaway`), one 2-rank DDP and one 2-rank FSDP2
scenario run in the normal suite; the full campaign (300 single-process + 60 runaway + 30 DDP + 30 FSDP2
scenarios) is marked ``slow``:

    .venv/bin/python -m pytest -m slow --run-slow tests/reliability -n 2 -p no:cacheprovider

Its counts are written to ``build/reliability/latest.json`` and printed at the end of the session.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.results import record
from tests.reliability.scenarios import (
    generate,
    generate_runaway,
    run_ddp_scenario,
    run_fsdp_scenario,
    run_runaway_scenario,
    run_scenario,
)

NORMAL = range(20)
CAMPAIGN = range(1000, 1300)
RUNAWAY_NORMAL = range(3000, 3004)
RUNAWAY_CAMPAIGN = range(3100, 3160)
DDP_NORMAL = (7,)
DDP_CAMPAIGN = range(2000, 2030)
FSDP_NORMAL = (3001,)
FSDP_CAMPAIGN = range(3000, 3030)


def _run(sc: Any, tmp_path: Path, runner: Callable[[Any, Path], dict[str, Any]]) -> None:
    try:
        result = runner(sc, tmp_path)
    except BaseException as err:
        record(
            {
                "seed": sc.seed,
                "ddp": getattr(sc, "ddp", False),  # a runaway scenario has neither
                "fsdp": getattr(sc, "fsdp", False),
                "outcome": "other",
                "error": f"{type(err).__name__}: {err}"[:500],
            }
        )
        raise AssertionError(f"scenario failed: {sc.describe()}") from err
    record(result)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", NORMAL)
def test_scenario(tmp_path: Path, seed: int) -> None:
    _run(generate(seed), tmp_path, run_scenario)


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", DDP_NORMAL)
def test_ddp_scenario(tmp_path: Path, seed: int) -> None:
    _run(generate(seed, ddp=True), tmp_path, run_ddp_scenario)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", RUNAWAY_NORMAL)
def test_runaway_scenario(tmp_path: Path, seed: int) -> None:
    _run(generate_runaway(seed), tmp_path, run_runaway_scenario)


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("seed", RUNAWAY_CAMPAIGN)
def test_campaign_runaway_scenario(tmp_path: Path, seed: int) -> None:
    _run(generate_runaway(seed), tmp_path, run_runaway_scenario)


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("seed", CAMPAIGN)
def test_campaign_scenario(tmp_path: Path, seed: int) -> None:
    _run(generate(seed), tmp_path, run_scenario)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", DDP_CAMPAIGN)
def test_campaign_ddp_scenario(tmp_path: Path, seed: int) -> None:
    _run(generate(seed, ddp=True), tmp_path, run_ddp_scenario)


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", FSDP_NORMAL)
def test_fsdp_scenario(tmp_path: Path, seed: int) -> None:
    _run(generate(seed, fsdp=True), tmp_path, run_fsdp_scenario)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", FSDP_CAMPAIGN)
def test_campaign_fsdp_scenario(tmp_path: Path, seed: int) -> None:
    _run(generate(seed, fsdp=True), tmp_path, run_fsdp_scenario)
