"""The per-tensor modes of AdaptiveGradientClipping (``mode="adagc"``, ``mode="mean_per_tensor"``):
arguments, a real fit against the naive per-tensor loop of :mod:`tests.per_tensor_reference`, the saved
state (pinned key, ``weights_only`` round trip, bit-exact resume), a rollback rewinding the statistics, the
logged keys and the report's table of the most clipped tensors."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard
from lightning_clip.report.load import load_run
from lightning_clip.report.summary import format_summary, summarize
from lightning_clip.testing import FaultInjector
from tests.models import RegressionModel, assert_same, make_trainer, regression_loader
from tests.per_tensor_reference import NaivePerTensor, reference_fit

MODES = "one of 'mean' | 'zscore' | 'percentile' | 'adagc' | 'mean_per_tensor'"


# ------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        (dict(mode="AdaGC"), ValueError, f"`mode` must be {MODES}, got 'AdaGC'."),
        (dict(mode="adagc", factor=1.0), ValueError, "`factor` must be a number > 1, got 1.0."),
        (dict(mode="adagc", decay=1.0), ValueError, "`decay` must be a number in [0, 1), got 1.0."),
        (dict(mode="adagc", max_norm=0.0), ValueError, "`max_norm` must be a number > 0, got 0.0."),
        (
            dict(mode="adagc", warmup_steps=0),
            ValueError,
            "`warmup_steps` must be an integer >= 1 or None, got 0.",
        ),
        (dict(mode="mean_per_tensor", factor="2"), TypeError, "`factor` must be a real number > 1, got '2'."),
        (dict(mode="mean_per_tensor", window=0), ValueError, "`window` must be an integer >= 1, got 0."),
        (
            dict(mode="mean_per_tensor", norm_type=0),
            ValueError,
            "`norm_type` must be a real number > 0 or float('inf'), got 0.",
        ),
    ],
)
def test_argument_errors(kwargs: dict[str, Any], exc: type[Exception], message: str) -> None:
    with pytest.raises(exc) as info:
        AdaptiveGradientClipping(**kwargs)
    assert str(info.value) == message


def test_warmup_defaults() -> None:
    assert AdaptiveGradientClipping(mode="adagc")._per_tensor.rule().warmup_steps == 99  # type: ignore[union-attr]
    assert AdaptiveGradientClipping(mode="mean_per_tensor")._per_tensor.rule().warmup_steps == 1  # type: ignore[union-attr]


# --------------------------------------------------------------------------------- fit vs naive loop
class Deep(RegressionModel):
    """Five parameter tensors of different scales; SGD without momentum (its update is the gradient)."""

    def __init__(self) -> None:
        super().__init__(optimizer="sgd", lr=0.1)
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16),
            torch.nn.Tanh(),
            torch.nn.Linear(16, 8),
            torch.nn.Tanh(),
            torch.nn.Linear(8, 1),
        )

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


class Coefs(pl.Callback):
    """Per step: the per-tensor coefficient actually applied (post / pre gradient norm). List one instance
    before the clipper (``pre``) and one after it, sharing ``rows``."""

    def __init__(self, pre: Coefs | None = None) -> None:
        self.pre_of = pre
        self.saved: list[torch.Tensor] = []
        self.rows: list[list[float]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters()]
        if self.pre_of is None:
            self.saved = [g.detach().clone() for g in grads]
            return
        row = [float(g.norm() / s.norm()) for g, s in zip(grads, self.pre_of.saved, strict=True)]
        self.rows.append(row)


CASES = [
    ("mean_per_tensor", dict(factor=1.2, decay=0.8)),
    ("mean_per_tensor", dict(factor=1.2, decay=0.8, warmup_steps=3, max_norm=0.5)),
    ("adagc", dict(factor=1.05, decay=0.9, warmup_steps=4, max_norm=0.3)),
]


@pytest.mark.parametrize(("mode", "kwargs"), CASES)
def test_fit_matches_the_naive_per_tensor_loop(tmp_path: Any, mode: str, kwargs: dict[str, Any]) -> None:
    steps = 16
    loader = regression_loader(n=steps * 4, batch_size=4)
    clipper = AdaptiveGradientClipping(mode=mode, **kwargs)
    before = Coefs()
    coefs = Coefs(before)
    model = Deep()
    trainer = make_trainer(tmp_path, callbacks=[before, clipper, coefs], max_steps=steps)
    trainer.fit(model, loader)
    naive = NaivePerTensor(
        mode,
        warmup_steps=kwargs.get("warmup_steps", 1),
        max_norm=kwargs.get("max_norm"),
        factor=kwargs["factor"],
        decay=kwargs["decay"],
    )
    ref_model = Deep()
    expected = reference_fit(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.1), loader, _loss, naive)
    clipped = sum(c < 1.0 - 1e-6 for row in expected for c in row["coefs"])
    assert clipped >= 5  # the thresholds matter
    assert "max_norm" in kwargs or any(c == 1.0 for row in expected for c in row["coefs"])  # not all
    for step, (ours, ref) in enumerate(zip(coefs.rows, expected, strict=True)):
        assert ours == pytest.approx(ref["coefs"], rel=1e-4), step
    for name, w in expected[-1]["weights"].items():
        torch.testing.assert_close(model.state_dict()[name], w, rtol=1e-5, atol=1e-6)
    thresholds = clipper.tensor_thresholds()
    assert thresholds is not None
    assert thresholds.tolist() == pytest.approx(naive.thresholds(len(thresholds)), rel=1e-4)


def test_a_nan_step_changes_nothing_and_is_not_clipped() -> None:
    from lightning_clip.functional.per_tensor import AdaGCRule, MeanPerTensorRule

    for rule in (MeanPerTensorRule(), AdaGCRule(warmup_steps=1)):
        norms = torch.tensor([1.0, 2.0])
        rule.commit(rule.plan(norms, torch.linalg.vector_norm(norms)), finite=True)
        before = rule.state_dict()
        bad = torch.tensor([float("nan"), 50.0])
        plan = rule.plan(bad, torch.linalg.vector_norm(bad))
        assert plan.coefs.tolist() == [1.0, 1.0]
        rule.commit(plan, finite=False)
        assert_same(rule.state_dict(), before)


@pytest.mark.parametrize("mode", ["adagc", "mean_per_tensor"])
def test_the_limits_kept_from_the_plan_are_those_of_the_statistics(mode: str) -> None:
    """The next step's limits are made in the plan and kept by `commit` (not made again). Reference: the
    same rule with that cache dropped before every step, which makes them from its statistics. Over whole
    steps, steps where some tensors have no gradient, NaN steps, steps never committed, a tensor added
    mid-run and a resume through `state_dict`, every plan must agree bit for bit."""
    from lightning_clip.functional.per_tensor import make_per_tensor_rule

    def new() -> Any:
        return make_per_tensor_rule(mode, 1.5 if mode != "adagc" else 1.05, 0.9, 2, 3.0)

    cached, fresh = new(), new()
    g = torch.Generator().manual_seed(0)
    size = 3
    for step in range(40):
        if step == 20:
            size = 4  # a parameter joins the optimizer
        if step == 30:  # resume both from a checkpoint of the cached one
            state = cached.state_dict()
            cached, fresh = new(), new()
            cached.load_state_dict(state)
            fresh.load_state_dict(state)
        norms = torch.rand(size, generator=g) * (10.0 if step % 7 == 3 else 1.0)
        positions = None
        if step % 5 == 4:  # tensor 1 has no gradient on this step
            positions = torch.tensor([i for i in range(size) if i != 1])
            norms = norms[positions]
        if step % 11 == 6:
            norms[0] = float("nan")
        total = torch.linalg.vector_norm(norms)
        fresh._limits = None  # the reference: limits made from its statistics
        ours = cached.plan(norms, total, positions, size)
        ref = fresh.plan(norms, total, positions, size)
        for field in ("coefs", "new_stats", "summary"):
            a, b = getattr(ours, field), getattr(ref, field)
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{step} {field}")
        if step % 13 != 12:  # sometimes the step's update is dropped: no commit
            finite = bool(torch.isfinite(total))
            cached.commit(ours, finite, float(total))
            fresh.commit(ref, finite, float(total))
        assert torch.equal(cached.thresholds(), fresh.thresholds()), step
    assert cached.steps == fresh.steps >= 25


@pytest.mark.parametrize("resume", [False, True])
def test_a_tensor_that_joins_late_starts_with_adagc_warm_up_rule(resume: bool) -> None:
    """AdaGC clips a tensor it has never seen with the warm-up's global coefficient, however late it comes
    (reference: the naive loop, `NaivePerTensor`): a parameter added to the optimizer, or one that had no
    gradient until then, also right after a resume."""
    from lightning_clip.functional.per_tensor import AdaGCRule

    rule, naive = AdaGCRule(1.05, 0.9, 2, 1.0), NaivePerTensor("adagc", 1.05, 0.9, 2, 1.0)
    g = torch.Generator().manual_seed(1)
    for step in range(14):
        if resume and step == 10:
            state = rule.state_dict()
            rule = AdaGCRule(1.05, 0.9, 2, 1.0)
            rule.load_state_dict(state)
        # steps 0-3: three parameters; 4-9: a fourth one, without a gradient; from 10 on, with one
        size = 3 if step < 4 else 4
        norms = torch.rand(size if step >= 10 else 3, generator=g) * 3.0
        positions = torch.arange(3) if 4 <= step < 10 else None
        plan = rule.plan(norms, torch.linalg.vector_norm(norms), positions, size)
        expected = naive.coefs(norms.tolist())
        assert plan.coefs.tolist() == pytest.approx(expected, rel=1e-6), step
        if step == 10:  # by hand: the newcomer is scaled by the global warm-up coefficient
            total = math.sqrt(sum(n * n for n in norms.tolist()))
            assert float(plan.coefs[3]) == pytest.approx(min(1.0, 1.0 / (total + 1e-8)), rel=1e-6)
        rule.commit(plan, finite=True)
        naive.update(norms.tolist(), expected)


# ------------------------------------------------------------------------------------------------ state
def test_state_key_is_pinned() -> None:
    assert AdaptiveGradientClipping(mode="adagc", factor=1.05, decay=0.98, max_norm=1.0).state_key == (
        "AdaptiveGradientClipping{'mode': 'adagc', 'factor': 1.05, 'decay': 0.98, 'z_threshold': 2.5, "
        "'percentile': 10.0, 'window': 1000, 'warmup_steps': None, 'max_norm': 1.0, 'loss_aware': True, "
        "'norm_type': 2.0}"
    )
    assert AdaptiveGradientClipping(mode="mean_per_tensor").state_key != AdaptiveGradientClipping().state_key


def _fit(
    tmp_path: Any,
    steps: int,
    mode: str,
    callbacks: tuple[Any, ...] = (),
    ckpt_path: str | None = None,
    **kwargs: Any,
) -> Any:
    pl.seed_everything(0, verbose=False)
    clipper = AdaptiveGradientClipping(mode=mode, factor=1.1, decay=0.8, warmup_steps=2)
    trainer = make_trainer(tmp_path, callbacks=[clipper, *callbacks], max_steps=steps, **kwargs)
    model = RegressionModel(optimizer="adam", lr=0.05)
    trainer.fit(model, regression_loader(n=48, batch_size=4), ckpt_path=ckpt_path)
    return clipper, model, trainer


@pytest.mark.parametrize("mode", ["adagc", "mean_per_tensor"])
def test_state_round_trip_weights_only_and_exact_resume(tmp_path: Any, mode: str) -> None:
    full, full_model, _ = _fit(tmp_path / "full", 20, mode)
    state = full.state_dict()
    stats = state["rules"]["0"]["stats"]
    assert isinstance(stats, torch.Tensor) and stats.shape == (2, 4) and stats.dtype == torch.float32
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = AdaptiveGradientClipping(mode=mode, factor=1.1, decay=0.8, warmup_steps=2)
    fresh.load_state_dict(loaded)
    assert_same(fresh.state_dict(), state)

    # saved at an epoch's end (12 batches an epoch): the data order resumes exactly too
    every = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), every_n_train_steps=12, save_top_k=-1)
    _fit(tmp_path / "first", 14, mode, callbacks=(every,), enable_checkpointing=True)
    path = next((tmp_path / "ckpts").glob("*step=12.ckpt"))
    resumed, resumed_model, _ = _fit(tmp_path / "resumed", 20, mode, ckpt_path=str(path))
    assert_same(resumed.state_dict(), state)
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


class StateAtEnd(pl.Callback):
    def __init__(self, clipper: AdaptiveGradientClipping) -> None:
        self.clipper = clipper
        self.states: dict[int, Any] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.states[trainer.global_step] = self.clipper.state_dict()


@pytest.mark.parametrize("mode", ["adagc", "mean_per_tensor"])
def test_rollback_rewinds_the_per_tensor_statistics(tmp_path: Any, mode: str) -> None:
    pl.seed_everything(0, verbose=False)
    clipper = AdaptiveGradientClipping(mode=mode, factor=1.1, decay=0.8, warmup_steps=2)
    guard = ExplosionGuard(action="rollback", snapshot_every_n_steps=4)
    record = StateAtEnd(clipper)
    faults = FaultInjector(target="grad", steps=[9])
    trainer = make_trainer(tmp_path, callbacks=[faults, guard, clipper, record], max_steps=12)
    trainer.fit(RegressionModel(optimizer="adam"), regression_loader(n=96, batch_size=4))
    assert guard.rollbacks == 1
    snapshot_step = 8  # the newest snapshot before the fault (taken at the end of step 8)
    assert_same(record.states[10], record.states[snapshot_step])  # rewound, the bad step never counted
    assert not torch.equal(record.states[8]["rules"]["0"]["stats"], record.states[4]["rules"]["0"]["stats"])


# ----------------------------------------------------------------------------------- logging + report
def test_logged_keys_and_the_report_table(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    pl.seed_everything(0, verbose=False)
    clipper = AdaptiveGradientClipping(mode="adagc", factor=1.05, decay=0.9, warmup_steps=3, max_norm=0.5)
    logger = CSVLogger(str(tmp_path), name="run", version=0)
    trainer = make_trainer(tmp_path, callbacks=[clipper], max_steps=30, logger=logger, log_every_n_steps=1)
    trainer.fit(RegressionModel(optimizer="adam"), regression_loader(n=120, batch_size=4))
    run = load_run(logger.log_dir)
    assert len(run.series["grad/clipped_fraction"]) == 30
    fractions = [v for _, v in run.series["grad/clipped_fraction"]]
    assert all(0.0 <= f <= 1.0 for f in fractions) and max(fractions) > 0
    most = {k: v for k, v in run.series.items() if k.startswith("grad/most_clipped/")}
    names = {k.removeprefix("grad/most_clipped/") for k in most}
    assert names <= {n for n, _ in trainer.lightning_module.named_parameters()} and names
    # every logged step with a clip names exactly one tensor, with its coefficient
    steps = sorted(s for series in most.values() for s, _ in series)
    assert len(steps) == len(set(steps)) == sum(f > 0 for f in fractions)
    assert all(0.0 < v < 1.0 for series in most.values() for _, v in series)
    summary = summarize(run)
    text = format_summary(summary)
    top = max(names, key=lambda n: len(most[f"grad/most_clipped/{n}"]))
    assert "most clipped tensors" in text and top in text
    assert not math.isnan(summary.norms[0].p50)


@pytest.mark.parametrize("mode", ["adagc", "mean_per_tensor"])
def test_manual_optimization_with_two_optimizers(tmp_path: Any, mode: str) -> None:
    """Each optimizer has its own statistics (its own tensors); the second optimizer's step, after the
    same backward, is clipped too."""
    from tests.models import TwoOptimizerModel

    pl.seed_everything(0, verbose=False)
    clipper = AdaptiveGradientClipping(mode=mode, factor=1.1, decay=0.8, warmup_steps=2, max_norm=0.5)
    trainer = make_trainer(tmp_path, callbacks=[clipper], max_steps=12)  # 6 batches, 2 steps each
    trainer.fit(TwoOptimizerModel(), regression_loader(n=48, batch_size=8))
    assert clipper._per_tensor is not None
    for i in (0, 1):
        rule = clipper._per_tensor.rule(i)
        assert rule.steps == 6 and rule.stats is not None and rule.stats.shape == (2, 2)
        assert torch.equal(rule.stats[1], torch.full((2,), 6.0))  # both tensors counted each step
    assert set(clipper.last) == {0, 1} and all(coef <= 1.0 for _, _, coef in clipper.last.values())
