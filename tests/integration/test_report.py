"""`lightning_clip.report` (load, summary, plot, cli) and `lightning-clip report` on real runs written
here (short CSVLogger / TensorBoardLogger fits with real callbacks), and on malformed copies of their
files."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard, VanishingGradientMonitor, report
from lightning_clip.report import ReportError
from lightning_clip.report.cli import main
from lightning_clip.testing import FaultInjector
from tests.models import RegressionModel, make_trainer, regression_loader

STEPS = 24
FAULT_STEPS = (9, 17)


class Recorder(pl.Callback):
    """Keeps, in memory, what AdaptiveGradientClipping measured at each step (placed after it in the
    callback list): the reference the files are read against."""

    def __init__(self, clipper: AdaptiveGradientClipping) -> None:
        self.clipper = clipper
        self.rows: list[tuple[int, float, float, float]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        norm, threshold, coef = self.clipper.last[0]
        self.rows.append((trainer.global_step, norm, threshold, coef))


def _fit(
    root: Path, logger: Any, faults: bool = True
) -> tuple[Recorder, FaultInjector | None, ExplosionGuard]:
    torch.manual_seed(0)
    clipper = AdaptiveGradientClipping(factor=1.2)
    recorder = Recorder(clipper)
    guard = ExplosionGuard(snapshot_every_n_steps=5)
    monitor = VanishingGradientMonitor(check_every_n_steps=5)  # saves gradient_flow.png in the log dir
    callbacks: list[pl.Callback] = [clipper, recorder, guard, monitor]
    injector = None
    if faults:
        injector = FaultInjector(target="grad", value=float("nan"), steps=list(FAULT_STEPS))
        callbacks.append(injector)
    trainer = make_trainer(root, max_steps=STEPS, logger=logger, callbacks=callbacks)
    trainer.fit(RegressionModel(lr=0.1), regression_loader(n=64, batch_size=8))
    return recorder, injector, guard


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("csv_run")
    logger = CSVLogger(save_dir=str(root), name="", version="run")
    recorder, injector, guard = _fit(root, logger)
    return {"dir": logger.log_dir, "recorder": recorder, "injector": injector, "guard": guard}


@pytest.fixture
def run_copy(csv_run: dict[str, Any], tmp_path: Path) -> Path:
    """A private copy of the real run directory, for the tests that break its files."""
    target = tmp_path / "run"
    shutil.copytree(csv_run["dir"], target)
    return target


# ------------------------------------------------------------------------------------- reading
def test_metrics_csv_holds_the_logged_norms(csv_run: dict[str, Any]) -> None:
    run = report.load_run(csv_run["dir"])
    rows = csv_run["recorder"].rows
    assert len(rows) == STEPS
    for key, column in (("grad/norm", 1), ("grad/clip_threshold", 2), ("grad/clip_coef", 3)):
        got = run.series[key]
        assert [s for s, _ in got] == [r[0] for r in rows]
        np.testing.assert_allclose([v for _, v in got], [r[column] for r in rows], rtol=1e-6)
    assert run.sources[0].endswith("metrics.csv")
    assert run.sources[-1].endswith("lightning_clip_events.jsonl")


def test_events_match_the_injected_faults(csv_run: dict[str, Any]) -> None:
    run = report.load_run(csv_run["dir"])
    injected = [f["step"] for f in csv_run["injector"].injected]
    assert injected == list(FAULT_STEPS)
    assert [e["step"] for e in run.events] == injected
    assert {e["kind"] for e in run.events} == {"nonfinite_grad"}
    assert {e["action"] for e in run.events} == {"rollback"}


def test_summary_against_the_in_memory_record(csv_run: dict[str, Any]) -> None:
    summary = report.summarize(report.load_run(csv_run["dir"]))
    rows = csv_run["recorder"].rows
    norms = [r[1] for r in rows]
    finite = [n for n in norms if math.isfinite(n)]
    (n,) = summary.norms
    assert n.key == "grad/norm"
    assert n.logged_steps == STEPS
    assert n.nonfinite == len(FAULT_STEPS) == len(norms) - len(finite)
    for q, got in ((50, n.p50), (90, n.p90), (99, n.p99), (100, n.max)):
        assert got == pytest.approx(float(np.percentile(finite, q)), rel=1e-6)
    clipped = sum(1 for r in rows if r[3] < 1.0)
    assert 0 < clipped < STEPS  # the run exercises both cases
    assert n.clipped == clipped
    assert n.clip_rate == pytest.approx(clipped / STEPS)
    assert summary.events_by_kind == {"nonfinite_grad": len(FAULT_STEPS)}
    assert summary.actions == {"rollback": len(FAULT_STEPS)}
    assert summary.rollbacks == len(FAULT_STEPS)
    assert summary.skipped_steps == len(FAULT_STEPS)
    assert summary.last_step == STEPS - 1
    text = report.format_summary(summary)
    assert "rollbacks: 2" in text
    assert f"clipped: {clipped} of the logged steps" in text
    assert "nonfinite_grad 2" in text


def test_rollbacks_from_metrics_when_there_is_no_event_log(run_copy: Path) -> None:
    os.remove(run_copy / "lightning_clip_events.jsonl")
    summary = report.summarize(report.load_run(str(run_copy)))
    assert summary.events_by_kind == {}
    assert summary.rollbacks == len(FAULT_STEPS)  # the last logged explosion/rollbacks


def test_percentile_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 100):
        values = rng.lognormal(size=size).tolist()
        for q in (0, 10, 50, 90, 99, 100):
            assert report.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    assert math.isnan(report.percentile([], 50))


def test_tensorboard_only_run(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="", version="tb")
    recorder, _, _ = _fit(tmp_path, logger, faults=False)
    run = report.load_run(logger.log_dir)
    assert any("tfevents" in s for s in run.sources)
    got = run.series["grad/norm"]
    assert [s for s, _ in got] == [r[0] for r in recorder.rows]
    np.testing.assert_allclose([v for _, v in got], [r[1] for r in recorder.rows], rtol=1e-6)  # float32
    assert report.summarize(run).norms[0].logged_steps == STEPS


def test_csv_and_tensorboard_together(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    csv_logger = CSVLogger(save_dir=str(tmp_path), name="", version="both")
    tb_logger = TensorBoardLogger(save_dir=str(tmp_path), name="", version="both")
    recorder, _, _ = _fit(tmp_path, [csv_logger, tb_logger], faults=False)
    run = report.load_run(csv_logger.log_dir)
    assert run.sources[0].endswith("metrics.csv")
    assert any("tfevents" in s for s in run.sources)
    np.testing.assert_allclose(
        [v for _, v in run.series["grad/norm"]], [r[1] for r in recorder.rows], rtol=1e-6
    )


# -------------------------------------------------------------------------------------- figures
def test_norm_figure_marks_clips_and_rollbacks(csv_run: dict[str, Any], tmp_path: Path) -> None:
    run = report.load_run(csv_run["dir"])
    path = tmp_path / "fig.png"
    fig = report.plot_norms(run, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    event_lines = [line for line in ax.get_lines() if line.get_xdata()[0] == line.get_xdata()[1]]
    assert sorted(int(line.get_xdata()[0]) for line in event_lines) == list(FAULT_STEPS)
    clipped = sum(1 for r in csv_run["recorder"].rows if r[3] < 1.0 and math.isfinite(r[1]))
    nonfinite = len(FAULT_STEPS)
    sizes = sorted(len(c.get_offsets()) for c in ax.collections)
    assert sizes == sorted([clipped, nonfinite])


def test_write_figures_without_matplotlib(csv_run: dict[str, Any], tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without the extra sees
    with pytest.raises(ReportError, match=r"matplotlib is not installed.*lightning-clip\[plot\]"):
        report.write_figures(report.load_run(csv_run["dir"]), str(tmp_path))


# ----------------------------------------------------------------------------------------- errors
def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ReportError, match=rf"^{missing}: no such directory\.$"):
        report.load_run(str(missing))


def test_file_instead_of_directory(tmp_path: Path) -> None:
    path = _write(tmp_path / "metrics.csv", "step\n0\n")
    with pytest.raises(ReportError, match=rf"^{path}: is not a directory"):
        report.load_run(str(path))


def test_directory_without_metrics(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=rf"^{tmp_path}: holds none of metrics.csv .*, a TensorBoard event"):
        report.load_run(str(tmp_path))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"empty file"),
        ("epoch,grad/norm\n0,1.0\n", r"has no 'step' column"),
        ("step,grad/norm\n0,1.0\n1,abc\n", r"line 3, column 'grad/norm': expected a number, got 'abc'"),
        ("step,grad/norm\n0,1.0,7\n", r"line 2 has 3 fields, the header has 2"),
        ("step,grad/norm\n1.5,1.0\n", r"line 2, column 'step': expected an integer ≥ 0, got '1.5'"),
    ],
)
def test_malformed_metrics_csv(run_copy: Path, content: str, message: str) -> None:
    path = _write(run_copy / "metrics.csv", content)
    with pytest.raises(ReportError, match=rf"^{path}: .*{message}"):
        report.load_run(str(run_copy))


def test_truncated_real_metrics_csv(run_copy: Path) -> None:
    path = run_copy / "metrics.csv"
    text = path.read_text()
    _write(path, text[: text.index("\n", len(text) // 2) - 3])  # a write cut in the middle of a row
    with pytest.raises(ReportError, match=rf"^{path}: line \d+ has \d+ fields, the header has \d+"):
        report.load_run(str(run_copy))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("{not json\n", r"is not valid JSON"),
        ("[1, 2]\n", r"must be a JSON object, got list"),
        ('{"kind": "spike"}\n', r"must have an integer 'step' and a string 'kind'"),
    ],
)
def test_malformed_event_log(run_copy: Path, extra: str, message: str) -> None:
    path = run_copy / "lightning_clip_events.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        f.write(extra)
    with pytest.raises(ReportError, match=rf"^{path}: line {len(FAULT_STEPS) + 1} {message}"):
        report.load_run(str(run_copy))


# -------------------------------------------------------------------------------------------- CLI
def test_cli_report(csv_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "figs"
    assert main(["report", csv_run["dir"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"run: {csv_run['dir']}" in printed
    assert "rollbacks: 2" in printed
    assert f"figure: {out / 'grad_norm.png'}" in printed
    flow = os.path.join(csv_run["dir"], "gradient_flow.png")
    assert f"figure: {flow} (saved by VanishingGradientMonitor)" in printed
    assert (out / "grad_norm.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_no_figures(csv_run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", csv_run["dir"], "--no-figures"]) == 0
    assert "figure:" not in capsys.readouterr().out


def test_cli_errors_exit_2(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = run_copy / "missing"
    assert main(["report", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"lightning-clip report: error: {missing}: no such directory."
    _write(run_copy / "metrics.csv", "step,grad/norm\n0,x\n")
    assert main(["report", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert f"{run_copy / 'metrics.csv'}: line 2, column 'grad/norm'" in err


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "cannot be read (RecursionError"),
        ('{"step": ' + "9" * 5000 + ', "kind": "spike"}', "cannot be read (ValueError"),
        ('{"step": ' + str(10**30) + ', "kind": "spike"}', "'step' must be in [0, 2**63 - 1]"),
        ('{"step": -1, "kind": "spike"}', "'step' must be in [0, 2**63 - 1], got -1."),
        # the figure's x (issue 19's log_step): a 400-digit integer was an OverflowError in the figure
        ('{"step": 3, "log_step": ' + str(10**400) + ', "kind": "spike"}', "'log_step' must be an integer"),
        ('{"step": 3, "log_step": -2, "kind": "spike"}', "'log_step' must be an integer in [0, 2**63 - 1]"),
        ('{"step": 3, "log_step": "4", "kind": "spike"}', "'log_step' must be an integer in [0, 2**63 - 1]"),
    ],
)
def test_cli_hostile_event_log_exits_2(
    run_copy: Path, capsys: pytest.CaptureFixture[str], line: str, message: str
) -> None:
    with open(run_copy / "lightning_clip_events.jsonl", "a", encoding="utf-8") as f:
        f.write(line + "\n")
    assert main(["report", str(run_copy), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-clip report: error: ") and message in err
    assert len(err) < 2000  # the message names the problem, not the whole line


def test_cli_without_matplotlib(
    csv_run: dict[str, Any], tmp_path: Path, monkeypatch: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", csv_run["dir"], "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "rollbacks: 2" in captured.out  # the summary still comes first
    assert "matplotlib is not installed" in captured.err


def test_console_script_exit_status(csv_run: dict[str, Any]) -> None:
    """The installed entry point maps `main`'s status to the process's (the success path runs in-process above)."""
    script = Path(sys.executable).parent / "lightning-clip"
    assert script.exists(), "the console script is installed with the package (pip install -e .)"
    bad = subprocess.run(
        [str(script), "report", "/nonexistent/run"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "lightning-clip report: error: /nonexistent/run: no such directory."


HEAVY = ("torch", "pytorch_lightning", "lightning", "lightning_utilities", "numpy", "matplotlib")


def test_cli_imports_neither_torch_nor_lightning(csv_run: dict[str, Any]) -> None:
    """A fresh interpreter that runs the whole `report --no-figures` path has loaded none of the heavy
    packages (`lightning_clip/__init__.py` loads the callbacks lazily)."""
    code = (
        "import sys\n"
        "from lightning_clip.report.cli import main\n"
        f"status = main(['report', {csv_run['dir']!r}, '--no-figures'])\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
        "print('HEAVY', heavy, 'STATUS', status)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "rollbacks: 2" in done.stdout  # it did read and summarise the run
    assert done.stdout.strip().splitlines()[-1] == "HEAVY [] STATUS 0"


def test_the_callbacks_still_load_on_first_access() -> None:
    """The lazy top-level names resolve to the classes of their modules, and unknown names still fail."""
    code = (
        "import sys, lightning_clip\n"
        "assert 'torch' not in sys.modules\n"
        "from lightning_clip import AdaptiveGradientClipping, functional\n"
        "from lightning_clip.callbacks.adaptive_clipping import AdaptiveGradientClipping as A\n"
        "import lightning_clip.functional as F\n"
        "assert AdaptiveGradientClipping is A and functional is F and 'torch' in sys.modules\n"
        "assert set(lightning_clip.__all__) <= set(dir(lightning_clip))\n"
        "try:\n"
        "    lightning_clip.AdaptiveClipping\n"
        "except AttributeError as err:\n"
        "    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "module 'lightning_clip' has no attribute 'AdaptiveClipping'"
