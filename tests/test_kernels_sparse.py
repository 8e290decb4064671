"""Tests of qgraph.kernels.sparse_split against dense float64 references and hand numbers."""

from __future__ import annotations

import pytest
import torch

from qgraph.errors import DataError
from qgraph.formats import WeightSpec
from qgraph.kernels.gptq import rtn_error
from qgraph.kernels.quant import fake_quantize_weight, weight_qparams
from qgraph.kernels.sparse_split import (
    SparsePart,
    choose_outlier_ratio,
    count_for_ratio,
    layer_error,
    outlier_mask,
    quantize_dense,
    significant_weight_detach,
    sparse_matmul,
    split_weight,
    top_k_mask,
)

F64 = torch.float64
SPECS = [
    WeightSpec(4, "tensor", None, True),
    WeightSpec(3, "channel", None, True),
    WeightSpec(4, "channel", None, False),
    WeightSpec(3, "group", 16, False),
    WeightSpec(4, "group", 12, True),  # ragged last group for in = 40
]


def _heavy(out: int = 24, inp: int = 40, seed: int = 0, dtype=F64) -> torch.Tensor:
    """Student-t (3 dof) weights: heavy tails, like real LLM weights."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(out, inp, generator=gen, dtype=F64)
    chi2 = torch.randn(3, out, inp, generator=gen, dtype=F64).square().sum(0)
    return (z / (chi2 / 3).sqrt()).to(dtype)


def _random_mask(shape, density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) < density


# --------------------------------------------------------------------------------------
# SparsePart and sparse_matmul
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("out", "inp", "x_shape", "density"),
    [
        (7, 13, (5, 13), 0.2),
        (1, 9, (3, 9), 0.5),
        (16, 5, (2, 4, 5), 0.3),  # 3-D x
        (11, 17, (17,), 0.1),  # 1-D x
        (6, 8, (2, 3, 8), 0.0),  # empty sparse part
        (4, 6, (3, 6), 1.0),  # every entry sparse
    ],
)
def test_sparse_matmul_matches_dense(out, inp, x_shape, density):
    w = _heavy(out, inp, seed=out * inp)
    part = SparsePart.from_mask(w, _random_mask(w.shape, density, seed=inp))
    s = part.to_dense()
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    torch.testing.assert_close(sparse_matmul(x, part), x @ s.T, rtol=1e-12, atol=1e-12)
    wide = sparse_matmul(x, part, out_features=out + 3)
    torch.testing.assert_close(wide[..., :out], x @ s.T, rtol=1e-12, atol=1e-12)
    assert (wide[..., out:] == 0).all()


def test_sparse_part_layout():
    w = torch.arange(1.0, 13.0, dtype=F64).reshape(3, 4)
    mask = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    part = SparsePart.from_mask(w, mask)
    assert part.nnz == 4 and part.shape == (3, 4)
    assert part.rows.tolist() == [0, 0, 2, 2] and part.cols.tolist() == [1, 3, 0, 2]
    assert part.rows.dtype == part.cols.dtype == torch.int64
    assert part.values.tolist() == [2.0, 4.0, 9.0, 11.0]
    assert part.row_ptr().tolist() == [0, 2, 2, 4]
    torch.testing.assert_close(part.to_dense(), w * mask)
    # float32 values for low-precision weights, output keeps x's dtype
    part32 = SparsePart.from_mask(w.to(torch.bfloat16), mask)
    assert part32.values.dtype == torch.float32
    x = torch.ones(2, 4, dtype=torch.bfloat16)
    assert sparse_matmul(x, part32).dtype == torch.bfloat16


def test_sparse_matmul_bad_shapes():
    part = SparsePart.from_mask(_heavy(4, 6), _random_mask((4, 6), 0.5, 0))
    with pytest.raises(ValueError):
        sparse_matmul(torch.ones(2, 5, dtype=F64), part)
    with pytest.raises(ValueError):
        sparse_matmul(torch.ones(2, 6, dtype=F64), part, out_features=3)


# --------------------------------------------------------------------------------------
# selections
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 0.001, 0.01, 0.05, 0.29, 1.0])
def test_outlier_mask_is_exact_top_k(ratio):
    w = _heavy(20, 50, seed=1)
    k = count_for_ratio(ratio, w.numel())
    mask = outlier_mask(w, ratio)
    assert int(mask.sum()) == k
    order = torch.sort(w.abs().flatten(), descending=True, stable=True).indices
    expected = torch.zeros(w.numel(), dtype=torch.bool)
    expected[order[:k]] = True
    assert torch.equal(mask.flatten(), expected)


def test_count_for_ratio_floors_without_float_noise():
    assert count_for_ratio(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996
    assert count_for_ratio(0.0025, 1000) == 2
    assert count_for_ratio(0.0005, 1000) == 0
    with pytest.raises(ValueError):
        count_for_ratio(1.5, 10)


def test_top_k_ties_are_deterministic_and_exclusion():
    score = torch.tensor([[1.0, 3.0, 3.0], [3.0, 0.0, 3.0]])
    assert top_k_mask(score, 2).flatten().tolist() == [False, True, True, False, False, False]
    exclude = torch.tensor([[False, True, False], [False, False, False]])
    picked = top_k_mask(score, 2, exclude=exclude).flatten().tolist()
    assert picked == [False, False, True, True, False, False]
    # k larger than what is selectable: everything not excluded
    assert int(top_k_mask(score, 10, exclude=exclude).sum()) == 5
    with pytest.raises(DataError):
        top_k_mask(torch.tensor([1.0, float("nan")]), 1)


# --------------------------------------------------------------------------------------
# dense regrid and the split
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_quantize_dense_grid_ignores_masked(spec):
    w = _heavy(seed=2)
    mask = outlier_mask(w, 0.02)
    dense = quantize_dense(w, mask, spec)
    # the grid is the plain grid of the weight with the masked entries zeroed ...
    zeroed = w.masked_fill(mask, 0.0)
    scale, zero = weight_qparams(
        zeroed, spec.bits, spec.symmetric, spec.granularity, spec.group_size,
        full_range=spec.full_range,
    )  # fmt: skip
    torch.testing.assert_close(dense.scale, scale)
    assert torch.equal(dense.zero, zero)
    ref = fake_quantize_weight(
        zeroed, spec.bits, spec.symmetric, spec.granularity, spec.group_size,
        full_range=spec.full_range,
    )  # fmt: skip
    torch.testing.assert_close(dense.weight, ref, rtol=0, atol=0)
    # ... masked positions dequantize to exactly 0, and the split is exact there
    assert (dense.weight[mask] == 0).all()
    split = split_weight(w, mask, spec)
    assert torch.equal(split.weight[mask], w[mask])
    assert torch.equal(split.weight[~mask], dense.weight[~mask])
    torch.testing.assert_close(split.weight, dense.weight + split.sparse.to_dense(), rtol=0, atol=0)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_removing_huge_outlier_shrinks_scale(symmetric, granularity):
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(4), dtype=F64) * 0.1
    w[3, 17] = 25.0
    spec = WeightSpec(4, granularity, None, symmetric)
    mask = outlier_mask(w, 1 / w.numel())
    assert mask[3, 17] and int(mask.sum()) == 1
    plain = quantize_dense(w, torch.zeros_like(mask), spec)
    regrid = quantize_dense(w, mask, spec)
    row = 0 if granularity == "tensor" else 3
    assert regrid.scale[row, 0] < 0.05 * plain.scale[row, 0]
    other = [r for r in range(8) if r != 3]
    if granularity == "channel":  # rows without the outlier keep their grid
        torch.testing.assert_close(regrid.scale[other], plain.scale[other])
    assert layer_error(w, split_weight(w, mask, spec).weight) < 0.1 * layer_error(w, plain.weight)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_error_decreases_with_ratio(spec):
    w = _heavy(48, 64, seed=5)
    ratios = (0.0, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05)
    choice = choose_outlier_ratio(w, spec, ratios)
    errors = [e for _, _, e, _ in choice.table]
    assert [r for r, _, _, _ in choice.table] == list(ratios)
    assert errors[0] == choice.base_error
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    # no price: the argmin, which here is the largest ratio allowed
    assert choice.ratio == 0.05
    assert choice.split.sparse.nnz == count_for_ratio(0.05, w.numel())


def test_choose_outlier_ratio_cap_price_and_hessian():
    w = _heavy(32, 48, seed=6)
    spec = WeightSpec(3, "channel", None, True)
    capped = choose_outlier_ratio(w, spec, max_ratio=0.005)
    assert capped.ratio == 0.005 and max(capped.errors) == 0.005
    assert choose_outlier_ratio(w, spec, price=1e6).ratio == 0.0  # bits too dear
    # objective = relative error + price · r · bits_per_outlier
    priced = choose_outlier_ratio(w, spec, price=2.0, bits_per_outlier=32.0)
    for r, _, err, obj in priced.table:
        assert obj == pytest.approx(err / priced.base_error + 2.0 * r * 32.0)
    assert priced.ratio == min(priced.table, key=lambda row: row[3])[0]
    # Hessian-weighted error is rtn_error of the reconstruction
    x = torch.randn(200, 48, generator=torch.Generator().manual_seed(7), dtype=F64)
    h = x.T @ x
    hw = choose_outlier_ratio(w, spec, hessian=h)
    r, _, err, _ = hw.table[2]
    ref = split_weight(w, outlier_mask(w, r), spec).weight
    assert err == pytest.approx(rtn_error(w, h, ref), rel=1e-12)
    with pytest.raises(ValueError):
        choose_outlier_ratio(w, spec, (0.01, 0.02), max_ratio=0.005)


# --------------------------------------------------------------------------------------
# significant-weight detach
# --------------------------------------------------------------------------------------


def _spec_and_weight():
    return WeightSpec(3, "channel", None, True), _heavy(30, 40, seed=8)


def test_detach_follows_sensitivity_order_and_budget():
    spec, w = _spec_and_weight()
    n = w.numel()
    base = outlier_mask(w, 0.005)
    sens = torch.rand(w.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    res = significant_weight_detach(w, sens, spec, 0.05, 0.02, base_mask=base)
    assert len(res.steps) == 3  # 0.02, 0.04, 0.05
    assert [len(s) for s in res.steps] == [24, 24, 12]
    assert res.n_detached == count_for_ratio(0.05, n) <= 0.05 * n
    assert not (res.detached & base).any()
    assert torch.equal(res.split.mask, res.detached | base)
    # without recompute the result is the top-k of the score outside the base mask, and
    # every step takes scores no larger than the previous step's
    assert torch.equal(res.detached, top_k_mask(sens, res.n_detached, exclude=base))
    flat = sens.flatten()
    moved = torch.cat(res.steps)
    assert (flat[moved].diff() <= 0).all()
    # the final split is the plain split with the union mask
    torch.testing.assert_close(res.split.weight, split_weight(w, res.split.mask, spec).weight)


@pytest.mark.parametrize(
    ("total", "step"), [(0.0, 0.01), (0.013, 0.005), (0.02, 0.02), (0.01, 0.003)]
)
def test_detach_never_exceeds_total(total, step):
    spec, w = _spec_and_weight()
    res = significant_weight_detach(w, w.abs(), spec, total, step)
    assert res.n_detached == count_for_ratio(total, w.numel()) <= total * w.numel()
    assert sum(len(s) for s in res.steps) == res.n_detached


def test_detach_by_quantization_error_reduces_error():
    """Score = |Δw| (the error each weight would keep): detaching removes the worst errors."""
    spec, w = _spec_and_weight()
    plain = split_weight(w, torch.zeros_like(w, dtype=torch.bool), spec)
    delta = (plain.weight - w).abs()
    res = significant_weight_detach(w, delta, spec, 0.05, 0.025)
    assert torch.equal(res.detached, top_k_mask(delta, res.n_detached))
    kept_err = delta[~res.detached]
    assert kept_err.max() <= delta[res.detached].min()
    assert layer_error(w, res.split.weight) < layer_error(w, plain.weight)


def test_detach_recompute_between_steps():
    spec, w = _spec_and_weight()
    calls = []

    def recompute(split):
        calls.append(split.mask.clone())
        return (split.weight - w).abs()  # fresh score from the current reconstruction

    sens = w.abs()
    res = significant_weight_detach(w, sens, spec, 0.03, 0.01, recompute=recompute)
    assert len(calls) == 2  # not after the last step
    k = count_for_ratio(0.01, w.numel())
    assert torch.equal(
        calls[0].flatten().nonzero().squeeze(1).sort().values, res.steps[0].sort().values
    )
    assert len(res.steps[0]) == k
    # step 2 is the top-k of the recomputed score among the weights not yet sparse
    split1 = split_weight(w, calls[0], spec)
    second = top_k_mask((split1.weight - w).abs(), k, exclude=calls[0])
    assert torch.equal(
        second.flatten().nonzero().squeeze(1).sort().values, res.steps[1].sort().values
    )
    with pytest.raises(ValueError):
        significant_weight_detach(w, sens, spec, 0.03, 0.01, recompute=lambda s: sens[:2])


def test_detach_bad_inputs():
    spec, w = _spec_and_weight()
    with pytest.raises(ValueError):
        significant_weight_detach(w, w.abs()[:, :3], spec, 0.01, 0.01)
    with pytest.raises(ValueError):
        significant_weight_detach(w, w.abs(), spec, 0.01, 0.0)
    with pytest.raises(ValueError):
        significant_weight_detach(w, w.abs(), spec, 0.01, 0.01, base_mask=torch.zeros(w.shape))
