"""Tests of qgraph.kernels.gptq against a deliberately naive float64 GPTQ written here.

The reference follows the update rule of Frantar et al. (arXiv 2210.17323) literally: one
column at a time, the full inverse Hessian downdated after every column, no Cholesky, no
blocks, no lazy batches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qgraph.errors import DataError
from qgraph.kernels import quant
from qgraph.kernels.gptq import (
    DEFAULT_CLIP_GRID,
    GPTQResult,
    float_target_weights,
    gptq_quantize,
    mse_clip_search,
    refit_scales,
    rtn_error,
)

OUT, INP, SAMPLES = 32, 64, 512

# (bits, symmetric, granularity, group_size, act_order)
CONFIGS = [
    (4, True, "channel", None, False),
    (3, True, "channel", None, False),
    (4, False, "group", 16, False),
    (4, True, "channel", None, True),
    (3, False, "channel", None, True),
    (4, False, "group", 16, True),
    (4, True, "group", 32, True),
]


def _data(seed: int, n: int = SAMPLES, inp: int = INP) -> torch.Tensor:
    """Correlated inputs with uneven column scales (what makes GPTQ and act_order matter)."""
    gen = torch.Generator().manual_seed(1000)  # the mixing is fixed: same distribution
    mix = torch.randn(inp, inp, generator=gen, dtype=torch.float64) / inp**0.5
    mix += torch.eye(inp, dtype=torch.float64)
    col_scale = torch.logspace(-1, 1, inp, dtype=torch.float64)[torch.randperm(inp, generator=gen)]
    z = torch.randn(n, inp, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z @ mix) * col_scale


def _weight(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(OUT, INP, generator=gen, dtype=torch.float64).to(dtype)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * x.T @ x


def _reference(w, h, bits, symmetric, granularity, group_size, act_order, damp=0.01):
    """Naive GPTQ in float64; returns codes [out, in] in original column order."""
    w = w.double().clone()
    h = h.double().clone()
    out, inp = w.shape
    gs = group_size if granularity == "group" else inp
    dead = torch.diagonal(h) == 0
    for j in torch.nonzero(dead).flatten().tolist():
        h[j, j] = 1.0
        w[:, j] = 0.0
    if granularity == "channel":
        s0, z0 = quant.weight_qparams(w, bits, symmetric, "channel")
    order = list(range(inp))
    if act_order:
        order = sorted(range(inp), key=lambda c: -float(h[c, c]))  # stable: ties keep index
    w = w[:, order]
    h = h[order][:, order]
    h += damp * torch.diagonal(h).mean() * torch.eye(inp, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    params: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    codes = torch.zeros(out, inp, dtype=torch.int8)
    for j in range(inp):
        col = order[j]
        g = col // gs
        if g not in params:
            if granularity == "channel":
                params[g] = (s0, z0)
            else:
                members = [order.index(c) for c in range(g * gs, (g + 1) * gs)]
                params[g] = quant.weight_qparams(w[:, members], bits, symmetric, "channel")
        s, z = params[g]
        q = quant.quantize_weight(w[:, j : j + 1], s, z, bits)
        q_hat = quant.dequantize_weight(q, s, z)[:, 0]
        codes[:, col] = q[:, 0]
        e = (w[:, j] - q_hat) / hinv[j, j]
        w[:, j + 1 :] -= torch.outer(e, hinv[j, j + 1 :])
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return codes


def _rtn(w, bits, symmetric, granularity, group_size):
    return quant.fake_quantize_weight(w, bits, symmetric, granularity, group_size)


def _kwargs(bits, symmetric, granularity, group_size, act_order):
    return dict(
        bits=bits,
        symmetric=symmetric,
        granularity=granularity,
        group_size=group_size,
        act_order=act_order,
    )


@pytest.fixture(scope="module")
def layer():
    x = _data(seed=1)
    return _weight(), _hessian(x), x


@pytest.fixture(scope="module")
def references(layer):
    w, h, _ = layer
    return {cfg: _reference(w, h, *cfg) for cfg in CONFIGS}


# --------------------------------------------------------------------------------------
# Agreement with the naive reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("block_size", [1, 8, 24, 64])
def test_matches_naive_reference(layer, references, cfg, block_size):
    w, h, _ = layer
    res = gptq_quantize(w, h, block_size=block_size, **_kwargs(*cfg))
    ref_codes = references[cfg]
    assert (res.codes == ref_codes).double().mean() >= 0.99
    ref_error = rtn_error(w, h, quant.dequantize_weight(ref_codes, res.scale, res.zero))
    assert res.error == pytest.approx(ref_error, rel=1e-6)


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2], CONFIGS[5]])
def test_float32_close_to_reference(layer, references, cfg):
    w, h, _ = layer
    res = gptq_quantize(w.float(), h.float(), block_size=16, **_kwargs(*cfg))
    assert res.weight.dtype == torch.float32 and res.scale.dtype == torch.float32
    assert (res.codes == references[cfg]).double().mean() >= 0.98
    ref = gptq_quantize(w, h, block_size=16, **_kwargs(*cfg))
    assert res.error == pytest.approx(ref.error, rel=2e-2)


# --------------------------------------------------------------------------------------
# GPTQ beats round-to-nearest on the same grid
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS)
def test_beats_rtn_proxy_and_heldout(layer, cfg):
    w, h, _ = layer
    bits, symmetric, granularity, group_size, _ = cfg
    res = gptq_quantize(w, h, **_kwargs(*cfg))
    w_rtn = _rtn(w, bits, symmetric, granularity, group_size)
    assert res.error < 0.9 * rtn_error(w, h, w_rtn)
    x_test = _data(seed=2)
    ref_out = x_test @ w.T
    gptq_err = (x_test @ res.weight.T - ref_out).norm()
    rtn_err = (x_test @ w_rtn.T - ref_out).norm()
    assert gptq_err < 0.95 * rtn_err


def test_error_is_rtn_error_of_the_result(layer):
    w, h, _ = layer
    res = gptq_quantize(w, h, 4)
    assert res.error == pytest.approx(rtn_error(w, h, res.weight), rel=1e-12)


# --------------------------------------------------------------------------------------
# Storage: codes + scale/zero reproduce the weight exactly
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[2], CONFIGS[6]])
def test_codes_reproduce_weight_exactly(layer, dtype, cfg):
    w, h, _ = layer
    res = gptq_quantize(w.to(dtype), h.to(dtype), block_size=16, **_kwargs(*cfg))
    assert isinstance(res, GPTQResult)
    bits, symmetric, granularity, group_size, _ = cfg
    groups = 1 if granularity == "channel" else INP // group_size
    assert res.weight.dtype == dtype and res.weight.shape == w.shape
    assert res.codes.dtype == torch.int8
    assert res.scale.shape == (OUT, groups) == res.zero.shape
    assert res.zero.dtype == torch.int8
    if symmetric:
        assert torch.all(res.zero == 0)
    qmin, qmax = quant.qrange(bits)
    assert int(res.codes.min()) >= qmin and int(res.codes.max()) <= qmax
    rebuilt = quant.dequantize_weight(res.codes, res.scale, res.zero).to(dtype)
    assert torch.equal(rebuilt, res.weight)


def test_act_order_permutation(layer):
    w, h, _ = layer
    res = gptq_quantize(w, h, 4, act_order=True)
    assert res.perm is not None
    assert sorted(res.perm.tolist()) == list(range(INP))
    d = torch.diagonal(h)[res.perm]
    assert torch.all(d[:-1] >= d[1:])
    assert gptq_quantize(w, h, 4).perm is None


def test_group_params_in_original_column_order(layer):
    """With act_order, group g still means original columns [g*gs, (g+1)*gs)."""
    w, h, _ = layer
    res = gptq_quantize(
        w, h, 4, symmetric=False, granularity="group", group_size=16, act_order=True
    )
    for g in range(INP // 16):
        cols = slice(g * 16, (g + 1) * 16)
        s, z = res.scale[:, g : g + 1], res.zero[:, g : g + 1]
        assert torch.equal(quant.dequantize_weight(res.codes[:, cols], s, z), res.weight[:, cols])


# --------------------------------------------------------------------------------------
# Hessian handling
# --------------------------------------------------------------------------------------


def test_hessian_scale_invariance(layer):
    w, h, x = layer
    a = gptq_quantize(w, h, 4, granularity="group", group_size=16, act_order=True)
    b = gptq_quantize(w, x.T @ x * 37.0, 4, granularity="group", group_size=16, act_order=True)
    assert (a.codes == b.codes).double().mean() >= 0.99
    assert a.error == pytest.approx(b.error, rel=1e-6)
    assert rtn_error(w, h, a.weight) == pytest.approx(rtn_error(w, 5.0 * h, a.weight), rel=1e-12)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dead_inputs(symmetric, act_order):
    x = _data(seed=3)
    dead = [0, 5, 17, 63]
    x[:, dead] = 0.0
    w, h = _weight(seed=4), _hessian(x)
    cfg = (4, symmetric, "group", 16, act_order)
    res = gptq_quantize(w, h, block_size=8, **_kwargs(*cfg))
    assert torch.isfinite(res.weight).all()
    assert torch.all(res.weight[:, dead] == 0)
    ref = _reference(w, h, *cfg)
    assert (res.codes == ref).double().mean() >= 0.99
    assert res.error < rtn_error(w, h, _rtn(w, 4, symmetric, "group", 16))


def test_cholesky_failure_suggests_damping():
    w = torch.randn(3, 2, dtype=torch.float64)
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(w, indefinite, 4, damp=0.0)


def test_singular_hessian_is_rescued_by_damping():
    x = _data(seed=5, n=16)  # rank 16 < 64 inputs
    w = _weight(seed=6)
    res = gptq_quantize(w, _hessian(x), 4, damp=0.01)
    assert torch.isfinite(res.weight).all()


# --------------------------------------------------------------------------------------
# Validation and purity
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("act_order", [False, True])
def test_ragged_last_group(layer, act_order):
    """A group size that does not divide the input: the last group is shorter, the stored
    parameters reproduce the weight exactly, and GPTQ still beats RTN on the same grid."""
    w, h, _ = layer
    gs = 24 if w.shape[1] % 24 else 28
    assert w.shape[1] % gs
    res = gptq_quantize(w, h, 4, False, "group", gs, act_order=act_order)
    assert res.scale.shape == (w.shape[0], -(-w.shape[1] // gs))
    assert torch.equal(
        quant.dequantize_weight(res.codes, res.scale, res.zero, gs).to(w.dtype), res.weight
    )
    rtn = quant.fake_quantize_weight(w, 4, False, "group", gs)
    assert res.error < rtn_error(w, h, rtn)


def test_invalid_arguments(layer):
    w, h, _ = layer
    with pytest.raises(ValueError, match="tensor"):  # the message lists the granularities
        gptq_quantize(w, h, 4, granularity="row")
    with pytest.raises(ValueError):
        gptq_quantize(w, h, 4, granularity="group")
    with pytest.raises(ValueError):
        gptq_quantize(w, h[:10, :10], 4)
    with pytest.raises(ValueError):
        gptq_quantize(w, h, 9)
    with pytest.raises(ValueError):
        gptq_quantize(w, h, 4, block_size=0)
    with pytest.raises(ValueError):
        gptq_quantize(w, h, 4, damp=-1.0)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(DataError):
        gptq_quantize(bad, h, 4)
    bad_h = h.clone()
    bad_h[1, 2] = float("inf")
    with pytest.raises(DataError):
        gptq_quantize(w, bad_h, 4)
    with pytest.raises(DataError):
        gptq_quantize(w, torch.zeros_like(h), 4)
    with pytest.raises(ValueError):
        rtn_error(w, h, w[:, :3])


def test_inputs_not_modified(layer):
    w, h, _ = layer
    h = h.clone()
    h[:, 3] = h[3, :] = 0.0  # a dead input: the kernel must not write diag 1 into it
    w0, h0 = w.clone(), h.clone()
    gptq_quantize(w, h, 4, act_order=True, granularity="group", group_size=16, clip="output")
    assert torch.equal(w, w0) and torch.equal(h, h0)


def test_rtn_error_formula(layer):
    w, h, x = layer
    w_hat = _rtn(w, 4, True, "channel", None)
    delta = (w - w_hat).numpy()
    xn = x.numpy()
    expected = np.linalg.norm(xn @ delta.T) ** 2 / (OUT * np.linalg.norm(xn) ** 2)
    assert rtn_error(w, x.T @ x, w_hat) == pytest.approx(expected, rel=1e-10)
    assert rtn_error(w, h, w) == 0.0
    eye = torch.eye(INP, dtype=torch.float64)
    assert rtn_error(w, eye, w_hat) == pytest.approx(float((w - w_hat).square().mean()), rel=1e-12)


# --------------------------------------------------------------------------------------
# MSE clip search
# --------------------------------------------------------------------------------------


def _np_fake(w, s, z, bits):
    qmin, qmax = quant.qrange(bits)
    return (np.clip(np.rint(w / s) + z, qmin, qmax) - z) * s


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("granularity", "group_size"), [("channel", None), ("group", 16)])
def test_mse_clip_search_matches_brute_force(symmetric, granularity, group_size):
    w = _weight(seed=7)
    w[0, 3] = 9.0  # outliers make clipping worthwhile
    w[5, 40] = -7.0
    bits = 3
    scale, zero = mse_clip_search(w, bits, symmetric, granularity, group_size)
    rows, groups = scale.shape
    wn = w.numpy().reshape(rows, groups, -1)
    for r in range(rows):
        for g in range(groups):
            best = None
            for ratio in DEFAULT_CLIP_GRID:
                s, z = quant.weight_qparams(
                    w[r : r + 1], bits, symmetric, granularity, group_size, clip_ratio=ratio
                )
                s, z = float(s[0, g]), float(z[0, g])
                err = float(np.sum((wn[r, g] - _np_fake(wn[r, g], s, z, bits)) ** 2))
                if best is None or err < best[0]:
                    best = (err, s, z)
            assert float(scale[r, g]) == best[1] and float(zero[r, g]) == best[2]
    assert zero.dtype == torch.int8
    plain = quant.weight_qparams(w, bits, symmetric, granularity, group_size)
    only_one = mse_clip_search(w, bits, symmetric, granularity, group_size, grid=(1.0,))
    assert torch.equal(only_one[0], plain[0]) and torch.equal(only_one[1], plain[1])
    with pytest.raises(ValueError):
        mse_clip_search(w, bits, symmetric, granularity, group_size, grid=())


@pytest.mark.parametrize("full_range", [False, True])
def test_weighted_clip_search_matches_brute_force(full_range):
    """With an importance per input column the search minimises Σ_j d_j (w_j - ŵ_j)² per row."""
    w = _weight(seed=3)
    w[2, 5] = 8.0
    d = torch.rand(w.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    d[5] = 50.0  # the outlier's column is the important one: it must not be clipped away
    scale, _ = mse_clip_search(w, 3, True, "channel", None, full_range=full_range, importance=d)
    for r in range(w.shape[0]):
        errs = []
        for ratio in DEFAULT_CLIP_GRID:
            s, z = quant.weight_qparams(
                w[r : r + 1], 3, True, "channel", clip_ratio=ratio, full_range=full_range
            )
            wr = w[r : r + 1].numpy()
            errs.append((float(np.sum(d.numpy() * (wr - _np_fake(wr, float(s), 0.0, 3)) ** 2)), s))
        best = min(range(len(errs)), key=lambda k: (errs[k][0], k))
        assert float(scale[r, 0]) == float(errs[best][1])
    plain, _ = mse_clip_search(w, 3, True, "channel", None, full_range=full_range)
    assert float(scale[2, 0]) > float(plain[2, 0])  # unweighted MSE clips the outlier row
    with pytest.raises(ValueError, match="importance"):
        mse_clip_search(w, 3, True, "channel", None, importance=d[:3])


def test_gptq_full_range_uses_every_code(layer):
    w, h, _ = layer
    res = gptq_quantize(w, h, 4, full_range=True, act_order=True)
    assert int(res.codes.min()) == -8
    assert torch.allclose(res.scale[:, 0], w.abs().amax(1).float().to(res.scale.dtype) / 8)
    assert torch.equal(quant.dequantize_weight(res.codes, res.scale, res.zero), res.weight)


def test_gptq_clip_search(layer):
    w, h, _ = layer
    w = w.clone()
    w[:, 7] *= 6.0  # a heavy column: clipping its extremes pays off
    base = gptq_quantize(w, h, 3)
    searched = gptq_quantize(w, h, 3, clip="output")
    assert torch.equal(
        quant.dequantize_weight(searched.codes, searched.scale, searched.zero), searched.weight
    )
    assert searched.error < rtn_error(w, h, _rtn(w, 3, True, "channel", None))
    assert not torch.equal(searched.scale, base.scale)
    same = gptq_quantize(w, h, 3, clip="output", clip_grid=(1.0,))
    assert torch.equal(same.codes, base.codes)
    plain = gptq_quantize(w, h, 3, clip="mse")  # unweighted: another grid
    assert not torch.equal(plain.scale, searched.scale)
    with pytest.raises(ValueError, match="clip"):
        gptq_quantize(w, h, 3, clip="kl")
    grouped = gptq_quantize(w, h, 3, granularity="group", group_size=16, clip="output")
    assert torch.equal(
        quant.dequantize_weight(grouped.codes, grouped.scale, grouped.zero), grouped.weight
    )


def _lstsq_scales(w, h, a, groups):
    """Reference: per row, the scales s minimising (w - Σ_g s_g a_g) H (...)ᵀ, by numpy lstsq
    on the factor L of H = L Lᵀ (float64)."""
    lt = np.linalg.cholesky(h.numpy() + 1e-9 * np.eye(h.shape[0])).T
    out = []
    for i in range(w.shape[0]):
        basis = np.stack([lt @ (a[i].numpy() * (groups == g)) for g in range(groups.max() + 1)], 1)
        out.append(np.linalg.lstsq(basis, lt @ w[i].numpy(), rcond=None)[0])
    return np.array(out)


@pytest.mark.parametrize("granularity,group_size", [("channel", None), ("group", 16)])
def test_refit_scales_is_the_least_squares_solution(layer, granularity, group_size):
    w, h, _ = layer
    res = gptq_quantize(w, h, 4, granularity=granularity, group_size=group_size, act_order=True)
    s = refit_scales(w, h, res.codes, res.scale, res.zero, group_size)
    a = res.codes.double() - quant.expand_groups(res.zero, INP, group_size).double()
    groups = np.arange(INP) // (group_size or INP)
    np.testing.assert_allclose(s.numpy(), _lstsq_scales(w, h, a, groups), rtol=1e-6)
    refit = gptq_quantize(
        w, h, 4, granularity=granularity, group_size=group_size, act_order=True, refit_scale=True
    )
    assert torch.equal(refit.codes, res.codes)
    assert refit.error < res.error
    assert torch.equal(quant.dequantize_weight(refit.codes, refit.scale, refit.zero, group_size),
                       refit.weight)  # fmt: skip


def test_refit_scales_never_increases_error(layer):
    w, h, _ = layer
    res = gptq_quantize(w, h, 4, granularity="tensor")
    s = refit_scales(w, h, res.codes, res.scale, res.zero)
    assert s.shape == (1, 1)
    refit = quant.dequantize_weight(res.codes, s, res.zero)
    assert rtn_error(w, h, refit) <= res.error
    # codes that are all zero in a row give no equation: that row keeps its scale
    codes = res.codes.clone()
    codes[0] = 0
    scale = torch.full((OUT, 1), 0.1, dtype=res.scale.dtype)
    kept = refit_scales(w, h, codes, scale, torch.zeros_like(scale, dtype=torch.int8))
    assert kept[0, 0] == scale[0, 0] and torch.isfinite(kept).all()


def test_float_target_weight_turns_the_float_output_into_a_layer_target():
    """For every Q, ‖X̃Wᵀ − XQᵀ‖² − ‖X(W' − Q)ᵀ‖² is one constant (float64 normal equations,
    numpy as the reference), so a solver aiming at ``W'`` on ``X`` aims at the float output."""
    gen = np.random.default_rng(0)
    x = gen.standard_normal((300, 24))
    x_float = x + 0.1 * gen.standard_normal((300, 24))
    w = gen.standard_normal((6, 24))
    targets = float_target_weights(
        [torch.from_numpy(w[:2]), torch.from_numpy(w[2:])], torch.from_numpy(x.T @ x),
        torch.from_numpy(x.T @ (x_float - x)), damp=0.0,
    )  # a group of two layers sharing the input, solved with one factorisation  # fmt: skip
    target = torch.cat(targets).numpy()
    expected = np.linalg.lstsq(x, x_float @ w.T, rcond=None)[0].T  # the projection, directly
    np.testing.assert_allclose(target, expected, rtol=1e-9, atol=1e-9)
    gaps = []
    for seed in range(3):
        q = np.random.default_rng(seed + 1).standard_normal((6, 24))
        float_error = np.square(x_float @ w.T - x @ q.T).sum()
        gaps.append(float_error - np.square(x @ (target - q).T).sum())
    np.testing.assert_allclose(gaps, gaps[0], rtol=1e-9)


def test_float_target_weight_without_upstream_error_is_the_weight():
    w = torch.randn(4, 8)
    (same,) = float_target_weights([w], torch.eye(8, dtype=torch.float64), torch.zeros(8, 8))
    assert same is w
