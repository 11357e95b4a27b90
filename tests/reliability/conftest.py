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

import pytest

from tests.reliability.results import ROOT, RUN_ENV, summarize


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and RUN_ENV not in os.environ:
        os.environ[RUN_ENV] = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"


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
