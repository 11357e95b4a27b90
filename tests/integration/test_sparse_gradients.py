"""Sparse gradients (issue 19, item 1): ``nn.Embedding(sparse=True)`` with SGD, and ``SparseAdam`` + ``Adam``
in manual optimization, measured, clipped, guarded and monitored correctly. References: the same fit with
a dense embedding (the dense path is tested on its own), and a plain PyTorch loop that measures the dense
form of each gradient in float64."""

from __future__ import annotations

import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

from lightning_clip import AdaptiveGradientClipping, ExplosionGuard, VanishingGradientMonitor
from lightning_clip.functional import all_finite, grad_norms, scale_grads_
from lightning_clip.testing import FaultInjector
from tests.models import make_trainer
from tests.reference import LastFigures
from tests.setup_models import BagOfEmbeddings, SparseAdamModel, token_loader

EPS = 1e-6


def _dense_norm(grads: list[torch.Tensor]) -> float:
    """The 2-norm of the dense tensors the gradients stand for, float64."""
    return math.sqrt(sum(float(g.to_dense().double().pow(2).sum()) for g in grads))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_functional_sparse_norm_clip_and_finite_check_match_dense() -> None:
    emb = nn.Embedding(12, 4, sparse=True)
    emb(torch.tensor([[1, 1, 3], [3, 7, 1]])).pow(2).sum().backward()
    grad = emb.weight.grad
    assert grad is not None and grad.layout == torch.sparse_coo and not grad.is_coalesced()
    dense = grad.to_dense()
    for p in (1.0, 2.0, 3.0, math.inf):
        total, per = grad_norms([grad, torch.ones(2)], p)
        ref = torch.linalg.vector_norm(dense.double(), p)
        assert float(per[0]) == pytest.approx(float(ref), rel=1e-6)
        assert float(total) == pytest.approx(
            float(
                torch.linalg.vector_norm(
                    torch.stack([ref, torch.linalg.vector_norm(torch.ones(2, dtype=torch.float64), p)]), p
                )
            ),
            rel=1e-6,
        )
    scale_grads_([grad], 0.25)
    assert torch.allclose(grad.to_dense(), 0.25 * dense)
    assert bool(all_finite([grad]))
    grad._values()[0, 0] = float("nan")
    assert not bool(all_finite([grad]))
    csr = dense.to_sparse_csr()
    with pytest.raises(ValueError, match="sparse_csr"):
        grad_norms([csr])


def _fit_twin(tmp_path: Any, sparse: bool, faults: list[Any] | None = None, **guard: Any) -> tuple[Any, ...]:
    model = BagOfEmbeddings(sparse=sparse)
    clipper = AdaptiveGradientClipping()
    monitor = VanishingGradientMonitor(check_every_n_steps=3, save_figure=False)
    guard_cb = ExplosionGuard(**guard)
    figures = LastFigures(clipper)
    trainer = make_trainer(
        tmp_path / ("sparse" if sparse else "dense"),
        max_steps=18,
        callbacks=[clipper, guard_cb, monitor, figures, *(faults or [])],
    )
    trainer.fit(model, token_loader())
    return model, clipper, monitor, guard_cb, figures


def test_sparse_embedding_sgd_fit_matches_its_dense_twin(tmp_path: Any) -> None:
    """All three callbacks on nn.Embedding(sparse=True) + SGD: every pre-clip norm, threshold and
    coefficient, the monitor's per-layer norms and the final weights equal those of the dense twin."""
    sparse = _fit_twin(tmp_path, sparse=True)
    dense = _fit_twin(tmp_path, sparse=False)
    s_fig, d_fig = sparse[4].figures[0], dense[4].figures[0]
    assert len(s_fig) == len(d_fig) == 18
    for s, d in zip(s_fig, d_fig, strict=True):
        assert s == pytest.approx(d, rel=1e-5)
    assert sum(1 for _, _, coef in s_fig if coef < 1.0) >= 3  # the clipping did act on sparse gradients
    s_hist, d_hist = sparse[2].history, dense[2].history
    assert [h["step"] for h in s_hist] == [h["step"] for h in d_hist] == [0, 3, 6, 9, 12, 15]
    for s, d in zip(s_hist, d_hist, strict=True):
        assert s["layers"] == d["layers"] and s["norms"] == pytest.approx(d["norms"], rel=1e-5)
    for (name, p), (_, q) in zip(sparse[0].named_parameters(), dense[0].named_parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name
    assert sparse[3].records == []


def test_sparse_nan_gradient_is_skipped_and_named_like_the_dense_twin(tmp_path: Any) -> None:
    """A NaN in the sparse embedding gradient at step 5: the guard skips that update and names
    ``emb.weight``; the run ends with the dense twin's weights (same fault, same skip)."""

    def faults() -> list[Any]:
        return [FaultInjector(target="grad", steps=[5], param_pattern=r"^emb\.")]

    sparse = _fit_twin(tmp_path, sparse=True, faults=faults(), action="skip")
    dense = _fit_twin(tmp_path, sparse=False, faults=faults(), action="skip")
    for guard in (sparse[3], dense[3]):
        assert [(r["step"], r["kind"], r["params"], r["action"]) for r in guard.records] == [
            (5, "nonfinite_grad", ["emb.weight"], "skip")
        ]
    for (name, p), (_, q) in zip(sparse[0].named_parameters(), dense[0].named_parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name
        assert bool(torch.isfinite(p).all()), name


class _PlainLoopReference:
    """SparseAdam + Adam in a plain loop: each optimizer's gradients measured in their dense form (float64)
    and scaled to ``max_norm`` when above it, as ``AdaptiveGradientClipping(max_norm=...)`` should."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm
        self.norms: dict[int, list[float]] = {0: [], 1: []}

    def run(self, model: SparseAdamModel, steps: int) -> None:
        opts = model.configure_optimizers()
        batches = [b for _, b in zip(range(steps), token_loader(), strict=False)]
        for tokens, y in batches:
            loss = nn.functional.mse_loss(model(tokens), y)
            loss.backward()
            for i, opt in enumerate(opts):
                grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
                norm = _dense_norm(grads)
                self.norms[i].append(norm)
                if norm > self.max_norm:
                    for g in grads:
                        g.mul_(self.max_norm / (norm + EPS))
                opt.step()
                opt.zero_grad()


def test_sparse_adam_manual_fit_matches_a_plain_loop(tmp_path: Any) -> None:
    """SparseAdam (sparse embedding) + Adam (head) in manual optimization, all three callbacks, clipping to
    an absolute cap below every norm: the callback's pre-clip norms and the final weights equal a plain
    loop's (dense float64 norms, hand-scaled sparse values)."""
    max_norm = 0.01
    model = SparseAdamModel()
    reference_model = SparseAdamModel()
    reference_model.load_state_dict(model.state_dict())
    clipper = AdaptiveGradientClipping(max_norm=max_norm, loss_aware=False)
    figures = LastFigures(clipper)
    guard = ExplosionGuard()
    monitor = VanishingGradientMonitor(check_every_n_steps=2, save_figure=False)
    trainer = make_trainer(tmp_path, max_steps=12, callbacks=[clipper, guard, monitor, figures])
    trainer.fit(model, token_loader())  # 6 batches, 2 optimizer steps each
    reference = _PlainLoopReference(max_norm)
    reference.run(reference_model, steps=6)
    for i in (0, 1):
        got = [norm for norm, _, _ in figures.figures[i]]
        assert got == pytest.approx(reference.norms[i], rel=1e-5)
        assert min(reference.norms[i]) > max_norm  # every step was clipped
    for (name, p), (_, q) in zip(model.named_parameters(), reference_model.named_parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name
    assert guard.records == [] and len(monitor.history) == 6  # 3 checks per optimizer


class _SparseParameter(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.ones(2), (4,)))


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("callback", [AdaptiveGradientClipping, ExplosionGuard, VanishingGradientMonitor])
def test_a_sparse_parameter_is_refused_at_setup_naming_it(tmp_path: Any, callback: Any) -> None:
    trainer = make_trainer(tmp_path, callbacks=[callback()])
    with pytest.raises(ValueError, match=r"parameter `w` has layout torch\.sparse_coo"):
        callback().setup(trainer, _SparseParameter(), "fit")


def test_sparse_gradients_are_refused_under_model_parallel_at_setup(tmp_path: Any) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=ModelParallelStrategy(),
        logger=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match=r"sparse gradients under `ModelParallelStrategy`: emb \(Embedding"):
        AdaptiveGradientClipping().setup(trainer, BagOfEmbeddings(sparse=True), "fit")
    AdaptiveGradientClipping().setup(trainer, BagOfEmbeddings(sparse=False), "fit")  # dense: accepted
