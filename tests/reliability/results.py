"""Campaign results: every scenario appends one JSON line to ``build/reliability/<run>/``; :func:`summarize`
counts them. Shared by the campaign's conftest and tests (a helper module, not a test module)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

RUN_ENV = "LIGHTNING_CLIP_RELIABILITY_RUN"
ROOT = Path(__file__).resolve().parents[2] / "build" / "reliability"


def results_dir() -> Path:
    run = os.environ.setdefault(RUN_ENV, time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")
    path = ROOT / run
    path.mkdir(parents=True, exist_ok=True)
    return path


def record(result: dict[str, Any]) -> None:
    """Append one scenario's facts (one line, appended in one write: safe across xdist workers)."""
    with open(results_dir() / f"results-{os.getpid()}.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    outcomes = Counter(r["outcome"] for r in rows)
    error_reasons = {k: v for k, v in outcomes.items() if k not in ("completed", "other")}
    recovered = sum(1 for r in rows if r["outcome"] == "completed" and r.get("events", 0) > 0)
    runaway = [r for r in rows if r.get("runaway")]
    return {
        "scenarios": len(rows),
        "runaway_scenarios": len(runaway),
        "runaway_completed": sum(r["outcome"] == "completed" for r in runaway),
        "runaway_completed_with_rollbacks": sum(
            r["outcome"] == "completed" and r.get("rollbacks", 0) > 0 for r in runaway
        ),
        "runaway_budget_errors": sum(r["outcome"] == "budget" for r in runaway),
        "runaway_divergence_events": sum(r.get("divergence_events", 0) for r in runaway),
        "divergence_events_outside_runaways": sum(
            r.get("divergence_events", 0) for r in rows if not r.get("runaway")
        ),
        "ddp_scenarios": sum(1 for r in rows if r.get("ddp") and not r.get("fsdp")),
        "fsdp_scenarios": sum(1 for r in rows if r.get("fsdp")),
        "faults_injected": sum(r.get("faults_injected", 0) for r in rows),
        "events_detected": sum(r.get("events", 0) for r in rows),
        "rollbacks": sum(r.get("rollbacks", 0) for r in rows),
        "skipped_steps": sum(r.get("skipped_steps", 0) for r in rows),
        "completed": outcomes.get("completed", 0),
        "recovered": recovered,
        "budget_errors": outcomes.get("budget", 0),
        "gradient_explosion_errors": error_reasons,
        "anything_else": outcomes.get("other", 0),
        "checkpoints_scanned": sum(r.get("checkpoints_scanned", 0) for r in rows),
        "checkpoints_truncated": sum(r.get("checkpoints_truncated", 0) for r in rows),
        "unreadable_checkpoint_warnings": sum(r.get("unreadable_checkpoint", 0) for r in rows),
        "vanishing_warnings": sum(r.get("vanishing", 0) for r in rows),
        "hazards": dict(Counter(r["hazard"] for r in rows if r.get("hazard"))),
        "foreign_checkpoint_warnings": sum(r.get("foreign_checkpoint", 0) for r in rows),
    }
