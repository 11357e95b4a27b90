"""One event log per run (issue 19, item 5): without a logger each run writes under
``<default_root_dir>/lightning_clip_logs/version_<N>``; ``lightning-clip report`` reads a directory holding
the event log alone; its "attach AdaptiveGradientClipping" hint appears only when the clipper is absent;
events carry the loggers' step, and the figure draws them at the metrics' x."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import pytest
from pytorch_lightning.loggers import CSVLogger

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard, GradientExplosionError, report
from lightning_clip.guard.events import EVENTS_FILENAME
from lightning_clip.report.cli import main
from lightning_clip.testing import FaultInjector
from tests.models import RegressionModel, TwoOptimizerModel, make_trainer, regression_loader

HINT = "attach AdaptiveGradientClipping to log grad/norm"


def _run(root: Path, fault_step: int, **kwargs: Any) -> ExplosionGuard:
    guard = ExplosionGuard(**kwargs)
    faults = FaultInjector(target="grad", steps=[fault_step])
    make_trainer(root, max_steps=8, callbacks=[guard, faults]).fit(RegressionModel(), regression_loader())
    return guard


def test_runs_without_logger_get_one_event_log_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = tmp_path / "root"
    first, second = _run(root, 3), _run(root, 5)
    runs = root / "lightning_clip_logs"
    assert first.events_path == str(runs / "version_0" / EVENTS_FILENAME)
    assert second.events_path == str(runs / "version_1" / EVENTS_FILENAME)
    for guard, step in ((first, 3), (second, 5)):
        assert [(e["step"], e["kind"]) for e in report.load_events(guard.events_path or "")] == [
            (step, "nonfinite_grad")
        ]
    assert os.listdir(cwd) == [] and sorted(os.listdir(root)) == ["lightning_clip_logs"]
    with pytest.raises(GradientExplosionError) as err:  # the error message sends the user to this run's file
        _run(root, 2, action="raise")
    assert str(runs / "version_2" / EVENTS_FILENAME) in str(err.value)


def test_report_summarises_a_directory_holding_only_the_event_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    guard = _run(tmp_path, 3)
    run_dir = os.path.dirname(guard.events_path or "")
    assert os.listdir(run_dir) == [EVENTS_FILENAME]
    assert main(["report", run_dir, "--out", str(tmp_path / "figures")]) == 0
    out = capsys.readouterr().out
    assert "events: 1 (nonfinite_grad 1); actions: rollback 1" in out
    assert "rollbacks: 1" in out and "last step: 3" in out
    assert HINT not in out and "no training logging step in this directory" in out
    assert (tmp_path / "figures" / "grad_norm.png").exists()  # the event line alone


def _summary(tmp_path: Path, callbacks: list[Any], log_every: int) -> str:
    logger = CSVLogger(str(tmp_path), name="run")
    trainer = make_trainer(
        tmp_path, max_steps=6, logger=logger, log_every_n_steps=log_every, callbacks=callbacks
    )
    trainer.fit(RegressionModel(), regression_loader())
    return report.format_summary(report.summarize(report.load_run(logger.log_dir)))


def test_the_attach_hint_appears_only_when_the_clipper_is_absent(tmp_path: Path) -> None:
    without = _summary(tmp_path / "a", [ExplosionGuard()], log_every=1)
    assert HINT in without
    faults = FaultInjector(target="grad", steps=[2])  # no logging step reached: the event log alone
    not_reached = _summary(
        tmp_path / "b", [AdaptiveGradientClipping(), ExplosionGuard(), faults], log_every=50
    )
    assert HINT not in not_reached and "no training logging step in this directory" in not_reached
    attached = _summary(tmp_path / "c", [AdaptiveGradientClipping(), ExplosionGuard()], log_every=1)
    assert "grad/norm: 6 logged steps" in attached and "gradient norms: none logged" not in attached


def test_manual_two_optimizer_events_carry_the_loggers_step(tmp_path: Path) -> None:
    """Manual optimization with 2 optimizers: ``global_step`` grows by 2 per batch, ``metrics.csv`` by 1.
    A NaN in the head's gradients at batch 3 is the head optimizer's step 7; its ``log_step`` is the
    ``metrics.csv`` step of the row where ``explosion/events`` first reads 1, and the figure's event line
    is drawn there."""
    guard = ExplosionGuard(action="skip")
    faults = FaultInjector(target="grad", batches=[3], param_pattern=r"^head\.")
    logger = CSVLogger(str(tmp_path), name="run")
    trainer = make_trainer(tmp_path, max_steps=12, logger=logger, callbacks=[guard, faults])
    trainer.fit(TwoOptimizerModel(), regression_loader())
    assert [(r["step"], r["log_step"], r["batch"], r["optimizer"]) for r in guard.records] == [(7, 3, 3, 1)]
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("explosion/events")]
    first = next(int(r["step"]) for r in rows if float(r["explosion/events"]) >= 1)
    assert first == 3 and max(int(r["step"]) for r in rows) == 5  # 6 batches: metrics.csv counts batches
    run = report.load_run(logger.log_dir)
    fig = report.plot_norms(run)
    lines = [line for line in fig.axes[0].get_lines() if line.get_color() == "orange"]
    assert [list(line.get_xdata()) for line in lines] == [[3, 3]]


def test_without_logger_the_event_log_and_the_figure_share_the_runs_folder(tmp_path: Path) -> None:
    from lightning_clip import VanishingGradientMonitor

    guard = ExplosionGuard()
    callbacks = [
        guard,
        VanishingGradientMonitor(check_every_n_steps=2),
        FaultInjector(target="grad", steps=[3]),
    ]
    make_trainer(tmp_path, max_steps=6, callbacks=callbacks).fit(RegressionModel(), regression_loader())
    run_dir = tmp_path / "lightning_clip_logs" / "version_0"
    assert guard.events_path == str(run_dir / EVENTS_FILENAME)
    assert sorted(os.listdir(run_dir)) == sorted([EVENTS_FILENAME, "gradient_flow.png"])
