"""The adding-problem demo (`examples/adding_problem.py`): its data against the task's definition, and a
tiny real run of every variant through `main` (the default run is `make demo`)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("adding_problem", ROOT / "examples" / "adding_problem.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["adding_problem"] = module
    spec.loader.exec_module(module)
    return module


demo = _load()

TINY = demo.Settings(
    short_len=10,
    long_len=30,
    explode_steps=40,
    long_steps=30,
    vanishing_steps=30,
    val_every=10,
    val_size=64,
    fault_steps=(15, 25),
    monitor_every=5,
)


def test_batch_follows_the_definition() -> None:
    x, y = demo.adding_batch(500, 12, torch.Generator().manual_seed(1))
    values, markers = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values <= 1)).all()
    for row in range(500):  # naive loop: exactly one marker in each half, target = sum of marked values
        first = [t for t in range(6) if markers[row, t] == 1]
        second = [t for t in range(6, 12) if markers[row, t] == 1]
        assert len(first) == 1 and len(second) == 1
        assert markers[row].sum() == 2
        assert float(y[row, 0]) == pytest.approx(
            float(values[row, first[0]] + values[row, second[0]]), abs=1e-6
        )


def test_trivial_predictor_scores_one_sixth() -> None:
    _, y = demo.adding_batch(40000, 20, torch.Generator().manual_seed(2))
    mse = float(((y - 1.0) ** 2).mean())
    # Var(U1 + U2) = 1/6; the estimate's standard error is sqrt((1/15 - 1/36) / 40000) ≈ 0.001
    assert mse == pytest.approx(1 / 6, abs=0.005)
    assert pytest.approx(1 / 6) == demo.TRIVIAL_MSE


def test_evaluate_is_the_mean_squared_error() -> None:
    torch.manual_seed(0)
    model = demo.SequenceRegressor("lstm", hidden=8)
    data = demo.validation_set(130, 15)
    with torch.no_grad():
        x, y = data.tensors
        naive = sum(float((model(x[i : i + 1]) - y[i : i + 1]).pow(2).sum()) for i in range(130)) / 130
    assert demo.evaluate(model, data, batch_size=50) == pytest.approx(naive, rel=1e-5)


def test_spectral_radius_is_set() -> None:
    torch.manual_seed(0)
    model = demo.SequenceRegressor("rnn", hidden=16, spectral_radius=1.2)
    eig = torch.linalg.eigvals(model.rnn.weight_hh_l0.detach().double()).abs()
    assert torch.allclose(eig, torch.full_like(eig, 1.2), atol=1e-5)  # orthogonal × 1.2


def test_gradient_through_time_vanishes_for_small_radius_only() -> None:
    data = demo.validation_set(64, 40)
    torch.manual_seed(0)
    small = demo.gradient_through_time(demo.SequenceRegressor("rnn", 16, spectral_radius=0.5), data)
    torch.manual_seed(0)
    lstm = demo.gradient_through_time(demo.SequenceRegressor("lstm", 16), data)
    assert len(small) == len(lstm) == 40
    assert small[0] < 1e-8 * small[-1]  # 0.5^39 ≈ 2e-12 times the tanh derivatives
    assert lstm[0] > small[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("demo")
    results = demo.main(["--out", str(out)], settings=TINY)
    return {"out": out, "results": {r.name: r for r in results}}


def test_every_variant_runs(tiny_run: dict[str, Any]) -> None:
    assert list(tiny_run["results"]) == [
        "rnn_unclipped",
        "rnn_clip_val",
        "rnn_adaptive_nocap",
        "rnn_adaptive",
        "rnn_guard",
        "rnn_vanishing",
        "lstm",
    ]
    for name, r in tiny_run["results"].items():
        assert (Path(r.run_dir) / "metrics.csv").exists(), name


def test_unclipped_run_explodes_and_is_reported(tiny_run: dict[str, Any]) -> None:
    r = tiny_run["results"]["rnn_unclipped"]
    assert r.status.startswith(("diverged at step", "NaN loss at step"))
    assert r.steps_to_solve is None
    assert not (r.final_mse < demo.TRIVIAL_MSE)  # no better than the mean (or NaN)


def test_clipped_runs_stay_finite(tiny_run: dict[str, Any]) -> None:
    for name in ("rnn_clip_val", "rnn_adaptive_nocap", "rnn_adaptive", "rnn_guard"):
        r = tiny_run["results"][name]
        assert r.status == "finished", name
        assert math.isfinite(r.final_mse), name
        assert r.clip_fraction is not None and r.clip_fraction > 0, name


def test_guard_rolls_back_each_injected_fault(tiny_run: dict[str, Any]) -> None:
    r = tiny_run["results"]["rnn_guard"]
    assert r.rollbacks == len(TINY.fault_steps)
    events = (Path(r.run_dir) / "lightning_clip_events.jsonl").read_text().splitlines()
    assert len(events) == len(TINY.fault_steps)


def test_vanishing_rnn_warns(tiny_run: dict[str, Any]) -> None:
    r = tiny_run["results"]["rnn_vanishing"]
    assert r.vanishing_warnings >= 1
    assert "rnn" in r.warning_messages[0]
    assert r.through_time["init"][0] < 1e-8 * r.through_time["init"][-1]


def test_table_and_figures(tiny_run: dict[str, Any]) -> None:
    results = list(tiny_run["results"].values())
    table = demo.format_table(results).splitlines()
    assert len(table) == 2 + len(results)
    assert all(line.count("|") == 10 for line in table)
    figures = Path(tiny_run["out"]) / "figures"
    names = {p.name for p in figures.glob("*.png")}
    assert {f"{r.name}_grad_norm.png" for r in results} <= names
    assert {"validation_mse.png", "gradient_through_time.png", "rnn_vanishing_gradient_flow.png"} <= names
    for p in figures.glob("*.png"):
        assert p.read_bytes()[:4] == b"\x89PNG", p


def test_docs_copies_are_small_palette_pngs(tiny_run: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    figures = Path(tiny_run["out"]) / "figures"
    written = demo.save_docs_copies(str(figures), str(tmp_path))
    assert sorted(Path(p).name for p in written) == sorted(demo.DOCS_FIGURES.values())
    for source, name in demo.DOCS_FIGURES.items():
        with Image.open(tmp_path / name) as small, Image.open(figures / source) as big:
            assert small.mode == "P" and small.size == big.size
        assert (tmp_path / name).stat().st_size < (figures / source).stat().st_size
