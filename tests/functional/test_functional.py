"""lightning_clip.functional against a naive float64 reference and against torch's own clipping utilities.

References used here, none of them the code under test:

* ``naive_norm``: every element converted to float64 and reduced with a plain formula (numpy);
* ``torch.nn.utils.get_total_norm`` / ``clip_grad_norm_`` on float32 copies;
* hand-computed matrices and ``numpy.linalg.eigvals`` for the spectral radius.
"""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

from lightning_clip import _validation, functional
from lightning_clip.functional import thresholds as statistics

NORM_TYPES = [1.0, 2.0, math.inf, 0.5, 3.0]

DTYPE_SETS = {
    "float32": [torch.float32],
    "float64": [torch.float64],
    "bfloat16": [torch.bfloat16],
    "float16": [torch.float16],
    "mixed": [torch.float32, torch.bfloat16, torch.float64, torch.float16],
}

SHAPE_SETS = {
    "scalars": [(), (), ()],
    "with_empty": [(0,), (5,), (2, 0, 3), (3, 2)],
    "one_d": [(7,), (1,), (33,)],
    "four_d": [(2, 3, 4, 5), (4, 1, 3, 3)],
    "many_small": [(3,)] * 150 + [(2, 2)] * 50,
}


def make_tensors(
    shapes: list[tuple[int, ...]], dtypes: list[torch.dtype], seed: int = 0
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(shape, generator=gen) * (1 + i % 4)).to(dtypes[i % len(dtypes)])
        for i, shape in enumerate(shapes)
    ]


def naive_norm(values: np.ndarray, p: float) -> float:
    """The p-norm of a float64 vector, straight from the definition (0 for an empty vector)."""
    values = np.abs(values.astype(np.float64).ravel())
    if values.size == 0:
        return 0.0
    if math.isinf(p):
        return float(values.max())
    return float((values**p).sum() ** (1.0 / p))


def as_f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def naive_total(tensors: list[torch.Tensor], p: float) -> float:
    """The p-norm of every element of every tensor taken together (one concatenated vector)."""
    if not tensors:
        return 0.0
    return naive_norm(np.concatenate([as_f64(t).ravel() for t in tensors]), p)


# --------------------------------------------------------------------------------------------- grad_norms
@pytest.mark.parametrize("p", NORM_TYPES, ids=lambda p: f"p={p}")
@pytest.mark.parametrize("dtypes", DTYPE_SETS.values(), ids=DTYPE_SETS.keys())
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
def test_grad_norms_match_naive_float64_loop(shapes, dtypes, p):
    tensors = make_tensors(shapes, dtypes)
    total, per_tensor = functional.grad_norms(tensors, p)

    assert total.dtype == torch.float32 and per_tensor.dtype == torch.float32
    assert total.shape == () and per_tensor.shape == (len(tensors),)
    # float32 accumulation of exactly-representable inputs: a few float32 ulps of the true value
    expected_per = [naive_norm(as_f64(t), p) for t in tensors]
    np.testing.assert_allclose(per_tensor.double().numpy(), expected_per, rtol=2e-6, atol=0)
    assert float(total) == pytest.approx(naive_total(tensors, p), rel=2e-6)
    assert float(functional.total_norm(tensors, p)) == float(total)


@pytest.mark.parametrize("p", NORM_TYPES, ids=lambda p: f"p={p}")
@pytest.mark.parametrize("dtypes", DTYPE_SETS.values(), ids=DTYPE_SETS.keys())
def test_grad_norms_match_torch_get_total_norm(dtypes, p):
    tensors = make_tensors(SHAPE_SETS["four_d"] + SHAPE_SETS["one_d"], dtypes, seed=1)
    total, _ = functional.grad_norms(tensors, p)
    # torch reduces in the tensors' own dtype (bf16 / fp16 would be coarse): give it float32 copies
    reference = torch.nn.utils.get_total_norm([t.float() for t in tensors], p)
    assert float(total) == pytest.approx(float(reference), rel=1e-6)
    # clip_grad_norm_ returns the same pre-clip total
    params = [torch.zeros_like(t, dtype=torch.float32, requires_grad=True) for t in tensors]
    for param, t in zip(params, tensors, strict=True):
        param.grad = t.float().clone()
    assert float(total) == pytest.approx(float(torch.nn.utils.clip_grad_norm_(params, 1e9, p)), rel=1e-6)


@pytest.mark.parametrize("p", NORM_TYPES, ids=lambda p: f"p={p}")
@pytest.mark.parametrize("dtypes", DTYPE_SETS.values(), ids=DTYPE_SETS.keys())
def test_the_common_case_and_the_grouped_path_agree_bit_for_bit(dtypes, p):
    # a tensor subclass (not DTensor) sends the same values down the general, grouped path
    class Tagged(torch.Tensor):
        pass

    tensors = make_tensors(SHAPE_SETS["many_small"] + SHAPE_SETS["four_d"], dtypes, seed=2)
    total, per = functional.grad_norms(tensors, p)
    tagged = [t.as_subclass(Tagged) for t in tensors]
    total_general, per_general = functional.grad_norms(tagged, p)
    assert type(per) is torch.Tensor
    assert torch.equal(per, per_general.as_subclass(torch.Tensor))
    assert torch.equal(total, total_general.as_subclass(torch.Tensor))
    assert functional.norms.plain_strided(tensors) and not functional.norms.plain_strided(tagged)


def test_float64_gradients_are_reduced_in_float64_then_reported_in_float32():
    # squares of 1e30 overflow a float32 accumulator (1e60 > 3.4e38); the norm itself fits in float32
    t = torch.full((1000,), 1e30, dtype=torch.float64)
    _, per = functional.grad_norms([t, torch.ones(3, dtype=torch.float64)])
    assert per.dtype == torch.float32
    assert per.tolist() == pytest.approx([math.sqrt(1000) * 1e30, math.sqrt(3)], rel=1e-6)
    assert math.isinf(float(torch.linalg.vector_norm(t.float(), dtype=torch.float32)))  # the trap avoided
    total, _ = functional.grad_norms([t, torch.ones(3, dtype=torch.float64)], 1.0)
    assert float(total) == pytest.approx(1000 * 1e30 + 3, rel=1e-6)


@pytest.mark.parametrize("p", NORM_TYPES, ids=lambda p: f"p={p}")
def test_zero_size_tensors_have_norm_zero_for_every_p(p):
    # torch's own _foreach_norm / get_total_norm refuse the inf-norm of an empty tensor; here it is 0
    tensors = [torch.zeros(0), torch.tensor([-3.0, 4.0]), torch.zeros(2, 0)]
    total, per = functional.grad_norms(tensors, p)
    assert per.tolist()[0] == 0.0 and per.tolist()[2] == 0.0
    assert per.tolist()[1] == pytest.approx(naive_norm(np.array([-3.0, 4.0]), p), rel=1e-6)
    assert float(total) == pytest.approx(naive_norm(np.array([-3.0, 4.0]), p), rel=1e-6)
    total, per = functional.grad_norms([torch.zeros(0), torch.zeros(0, 3)], p)
    assert float(total) == 0.0 and per.tolist() == [0.0, 0.0]


def test_empty_input_gives_zeros():
    total, per = functional.grad_norms([])
    assert float(total) == 0.0 and per.shape == (0,)
    assert float(functional.total_norm([], math.inf)) == 0.0
    assert bool(functional.all_finite([]))


def test_collect_grads_skips_none_in_parameter_order():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))
    model[1].weight.requires_grad_(False)
    unused = torch.nn.Linear(5, 5)
    params = [*model.parameters(), *unused.parameters()]
    model[:2](torch.ones(2, 3)).sum().backward()  # model[2] and `unused` get no gradient

    grads = functional.collect_grads(params)
    expected = [p.grad for p in params if p.grad is not None]
    assert len(grads) == 3 and all(g is e for g, e in zip(grads, expected, strict=True))
    total, _ = functional.grad_norms(grads)
    assert float(total) == pytest.approx(naive_total(expected, 2.0), rel=1e-6)


@pytest.mark.parametrize("p", NORM_TYPES, ids=lambda p: f"p={p}")
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_non_finite_value_makes_total_non_finite(bad, p, dtype):
    tensors = make_tensors([(4,), (3, 3), (5,)], [dtype])
    tensors[1][2, 1] = bad
    total, per = functional.grad_norms(tensors, p)
    assert not math.isfinite(float(total))
    assert [math.isfinite(v) for v in per.tolist()] == [True, False, True]
    assert not bool(functional.all_finite(tensors))


def test_norm_type_is_validated():
    with pytest.raises(
        ValueError, match=r"`norm_type` must be a real number > 0 or float\('inf'\), got 0.0\."
    ):
        functional.grad_norms([torch.ones(2)], 0.0)
    with pytest.raises(ValueError, match="got nan"):
        functional.group_norms(torch.ones(2), torch.tensor([0, 1]), 2, math.nan)


# --------------------------------------------------------------------------------------------- clipping
def _params_with_grads(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    params = []
    for t in tensors:
        param = torch.zeros_like(t, requires_grad=True)
        param.grad = t.clone()
        params.append(param)
    return params


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
def test_clip_grads_matches_clip_grad_norm(fraction, p):
    tensors = make_tensors([(4, 3), (7,), (2, 2, 2)], [torch.float32], seed=3)
    ours, theirs = _params_with_grads(tensors), _params_with_grads(tensors)
    grads = functional.collect_grads(ours)
    total = float(functional.grad_norms(grads, p)[0])
    max_norm = fraction * total

    coef = functional.clip_grads_(grads, max_norm, total)
    torch_total = torch.nn.utils.clip_grad_norm_(theirs, max_norm, p)

    assert coef == pytest.approx(max_norm / (float(torch_total) + 1e-6), rel=1e-6)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    # the clipped norm is min(norm, max_norm), up to clip_grad_norm_'s eps of 1e-6 on the norm
    clipped = naive_total([g for g in grads], p)
    assert clipped == pytest.approx(max_norm * total / (total + 1e-6), rel=1e-6)
    assert clipped == pytest.approx(min(total, max_norm), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_clip_grads_on_low_and_high_precision(dtype):
    tensors = make_tensors([(8, 8), (5,)], [dtype], seed=4)
    total = float(functional.grad_norms(tensors)[0])
    original = [t.clone() for t in tensors]
    coef = functional.clip_grads_(tensors, total / 4, total)
    assert coef == pytest.approx(0.25, rel=1e-6)
    for before, after in zip(original, tensors, strict=True):
        assert after.dtype == dtype
        torch.testing.assert_close(after, (before.double() * coef).to(dtype))


@pytest.mark.parametrize(
    ("max_norm", "total"),
    [(5.0, 5.0), (5.0, 4.999), (math.inf, 1e30), (1.0, math.nan), (1.0, math.inf)],
    ids=["equal", "below", "inf_threshold", "nan_total", "inf_total"],
)
def test_clip_grads_writes_nothing_when_not_needed(max_norm, total):
    tensors = make_tensors([(3, 3), (4,)], [torch.float32])
    versions = [t._version for t in tensors]
    values = [t.clone() for t in tensors]
    assert functional.clip_grads_(tensors, max_norm, total) == 1.0
    assert [t._version for t in tensors] == versions  # no kernel touched the memory
    for a, b in zip(tensors, values, strict=True):
        assert torch.equal(a, b)
    # the check above can fail: torch's clip_grad_norm_ multiplies even when it needs not
    params = _params_with_grads(tensors)
    before = [p.grad._version for p in params]
    torch.nn.utils.clip_grad_norm_(params, 1e9)
    assert [p.grad._version for p in params] != before


def test_clip_grads_writes_when_needed_and_rejects_bad_max_norm():
    tensors = make_tensors([(3, 3)], [torch.float32])
    version = tensors[0]._version
    functional.clip_grads_(tensors, 0.1, float(functional.grad_norms(tensors)[0]))
    assert tensors[0]._version > version
    with pytest.raises(ValueError, match=r"`max_norm` must be a number >= 0 or inf, got -1\.0\."):
        functional.clip_grads_(tensors, -1.0, 5.0)
    with pytest.raises(ValueError, match="got nan"):
        functional.clip_grads_(tensors, math.nan, 5.0)


@pytest.mark.parametrize("coef", [0.25, 2, torch.tensor(0.5), torch.tensor(3.0, dtype=torch.float64)])
def test_scale_grads(coef):
    tensors = make_tensors([(3, 2), (5,), (0,), ()], DTYPE_SETS["mixed"], seed=5)
    expected = [(t.double() * float(coef)).to(t.dtype) for t in tensors]
    functional.scale_grads_(tensors, coef)
    for got, want in zip(tensors, expected, strict=True):
        torch.testing.assert_close(got, want)
    functional.scale_grads_([], 0.5)  # nothing to do, no error


@pytest.mark.parametrize(
    ("total", "max_norm", "eps", "expected"),
    [
        (10.0, 5.0, 0.0, 0.5),
        (10.0, 5.0, 1e-6, 5.0 / (10.0 + 1e-6)),
        (1.0, 5.0, 1e-6, 1.0),
        (0.0, 0.0, 1e-6, 0.0),
    ],
)
def test_clip_coef_is_min_one_max_over_total_plus_eps(total, max_norm, eps, expected):
    for t in (total, torch.tensor(total)):
        for m in (max_norm, torch.tensor(max_norm)):
            coef = functional.clip_coef(t, m, eps=eps)
            assert coef.dtype == torch.float32 and coef.shape == ()
            assert float(coef) == pytest.approx(expected, rel=1e-7)


def test_clip_coef_matches_what_clip_grad_norm_applies():
    tensors = make_tensors([(6, 6)], [torch.float32], seed=6)
    params = _params_with_grads(tensors)
    total = torch.nn.utils.clip_grad_norm_(params, 0.3)
    ratio = params[0].grad / tensors[0]
    torch.testing.assert_close(
        ratio, torch.full_like(ratio, float(functional.clip_coef(total, 0.3))), rtol=1e-6, atol=0
    )


# --------------------------------------------------------------------------------------------- all_finite
@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        ([torch.ones(3), torch.zeros(2, 2)], True),
        ([torch.ones(3), torch.tensor([1.0, math.nan])], False),
        ([torch.tensor([math.inf])], False),
        ([torch.tensor([-math.inf], dtype=torch.float16)], False),
        ([torch.tensor([math.nan], dtype=torch.bfloat16), torch.ones(2)], False),
        ([torch.zeros(0), torch.ones(2)], True),
        ([torch.zeros(0)], True),
        # huge but finite: a float32 1- or 2-norm of these would overflow to inf
        ([torch.tensor([3e38, 3e38, -3e38])], True),
        ([torch.tensor([65504.0] * 4, dtype=torch.float16)], True),
        ([torch.tensor([1e300, -1e300], dtype=torch.float64), torch.ones(2)], True),
        ([torch.tensor([1e300, math.nan], dtype=torch.float64), torch.ones(2)], False),
    ],
    ids=[
        "finite",
        "nan",
        "inf",
        "fp16_-inf",
        "bf16_nan",
        "empty_tensor",
        "only_empty",
        "f32_huge",
        "fp16_max",
        "f64_huge",
        "f64_nan",
    ],
)
def test_all_finite(tensors, expected):
    # reference: element-wise isfinite, one tensor at a time
    assert all(bool(torch.isfinite(t).all()) for t in tensors) is expected
    result = functional.all_finite(tensors)
    assert result.dtype == torch.bool and result.shape == ()
    assert bool(result) is expected


# --------------------------------------------------------------------------------------------- group_norms
@pytest.mark.parametrize("p", NORM_TYPES, ids=lambda p: f"p={p}")
def test_group_norms_match_naive_grouping(p):
    tensors = make_tensors([(3, 4), (4,), (2, 2, 2), (5,), (1,), (6, 2)], DTYPE_SETS["mixed"], seed=7)
    groups = [0, 0, 2, 2, 2, 3]  # group 1 has no tensor: its norm is 0
    _, per = functional.grad_norms(tensors, p)
    got = functional.group_norms(per, torch.tensor(groups), 4, p)
    expected = [naive_total([t for t, g in zip(tensors, groups, strict=True) if g == k], p) for k in range(4)]
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=2e-6, atol=0)
    assert got[1] == 0.0


def test_group_norms_propagate_nan():
    got = functional.group_norms(torch.tensor([1.0, math.nan, 2.0]), torch.tensor([0, 0, 1]), 2, math.inf)
    assert math.isnan(got[0]) and float(got[1]) == 2.0
    got = functional.group_norms(torch.tensor([1.0, math.nan, 2.0]), torch.tensor([0, 0, 1]), 2, 2.0)
    assert math.isnan(got[0]) and float(got[1]) == 2.0


# --------------------------------------------------------------------------------------------- spectral radius
def test_spectral_radius_hand_cases():
    # [[0, 2], [0.5, 0]]: eigenvalues ±1
    assert float(functional.spectral_radius(torch.tensor([[0.0, 2.0], [0.5, 0.0]]))) == pytest.approx(
        1.0, rel=1e-7
    )
    # 0.9 × rotation by 30°: complex pair 0.9·e^{±iπ/6}, modulus 0.9 (a real-part-only answer would give 0.78)
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    rot = 0.9 * torch.tensor([[c, -s], [s, c]])
    assert float(functional.spectral_radius(rot)) == pytest.approx(0.9, rel=1e-6)
    # upper triangular: eigenvalues on the diagonal, the largest |.| is |-3|, not the large off-diagonal
    tri = torch.tensor([[1.0, 100.0, 5.0], [0.0, -3.0, 7.0], [0.0, 0.0, 2.0]])
    assert float(functional.spectral_radius(tri)) == pytest.approx(3.0, rel=1e-6)
    assert functional.spectral_radius(tri).dtype == torch.float32


@pytest.mark.parametrize("n", [1, 5, 32])
def test_spectral_radius_matches_numpy_eig(n):
    w = torch.randn(n, n, generator=torch.Generator().manual_seed(n)) / math.sqrt(n)
    reference = np.abs(np.linalg.eigvals(w.double().numpy())).max()
    assert float(functional.spectral_radius(w)) == pytest.approx(reference, rel=1e-6)
    assert float(functional.spectral_radius(w.to(torch.bfloat16))) == pytest.approx(
        np.abs(np.linalg.eigvals(w.to(torch.bfloat16).double().numpy())).max(), rel=1e-6
    )
    param = torch.nn.Parameter(w.clone())
    assert float(functional.spectral_radius(param)) == pytest.approx(reference, rel=1e-6)  # no grad error


@pytest.mark.parametrize("shape", [(3,), (2, 3), (2, 2, 2)])
def test_spectral_radius_rejects_non_square(shape):
    with pytest.raises(ValueError, match=r"`weight` must be a square matrix, got shape"):
        functional.spectral_radius(torch.ones(shape))


# --------------------------------------------------------------------------------------------- doctests
@pytest.mark.parametrize("module", [functional, statistics, _validation], ids=lambda m: m.__name__)
def test_docstring_examples_hold(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
