"""Campaign bookkeeping: every scenario test appends one JSON line (its facts, or ``"outcome": "other"``
when it failed) to ``build/reliability/<run>/``; at the end of the session the counts are written to
``build/reliability/summary-<run>.json`` and ``build/reliability/latest.json`` and printed.

Under pytest-xdist the controller names the run (an environment variable inherited by the workers) and
writes the summary; without xdist the single process does both.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

RUN_ENV = "LIGHTNING_CLIP_RELIABILITY_RUN"
ROOT = Path(__file__).resolve().parents[2] / "build" / "reliability"


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and RUN_ENV not in os.environ:
        os.environ[RUN_ENV] = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"


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
    return {
        "scenarios": len(rows),
        "ddp_scenarios": sum(1 for r in rows if r.get("ddp")),
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
    }


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput") or RUN_ENV not in os.environ:
        return
    path = ROOT / os.environ[RUN_ENV]
    if not path.is_dir():
        return
    rows = [
        json.loads(line) for f in sorted(path.glob("results-*.jsonl")) for line in f.read_text().splitlines()
    ]
    if not rows:
        return
    summary = summarize(rows)
    text = json.dumps(summary, indent=2)
    (ROOT / f"summary-{os.environ[RUN_ENV]}.json").write_text(text + "\n")
    (ROOT / "latest.json").write_text(text + "\n")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"reliability campaign summary ({ROOT / 'latest.json'}):")
        for line in text.splitlines():
            reporter.write_line(line)
