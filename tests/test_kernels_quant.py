"""Tests of qgraph.kernels.quant against a plain numpy float64 reimplementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qgraph.errors import DataError
from qgraph.kernels import quant
from qgraph.kernels.quant import SCALE_EPS

BITS = range(2, 9)
GRANULARITIES = [("tensor", None), ("channel", None), ("group", 8), ("group", 32)]

# --------------------------------------------------------------------------------------
# numpy reference (written from the conventions, not from the implementation)
# --------------------------------------------------------------------------------------


def _np_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _np_params(lo: np.ndarray, hi: np.ndarray, amax: np.ndarray, bits: int, symmetric: bool):
    qmin, qmax = _np_range(bits)
    if symmetric:
        s = np.maximum(amax / qmax, SCALE_EPS)
        return s, np.zeros_like(s)
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)
    s = np.maximum((hi - lo) / (2**bits - 1), SCALE_EPS)
    z = np.clip(np.rint(qmin - lo / s), qmin, qmax)
    return s, z


def _np_fake(x: np.ndarray, s: np.ndarray, z: np.ndarray, bits: int) -> np.ndarray:
    qmin, qmax = _np_range(bits)
    q = np.clip(np.rint(x / s) + z, qmin, qmax)
    return (q - z) * s


def _np_groups(w: np.ndarray, granularity: str, group_size: int | None) -> np.ndarray:
    out, inp = w.shape
    if granularity == "tensor":
        return w.reshape(1, 1, -1)
    if granularity == "channel":
        return w.reshape(out, 1, inp)
    return w.reshape(out, inp // group_size, group_size)


def _np_weight_params(w, bits, symmetric, granularity, group_size):
    g = _np_groups(w, granularity, group_size)
    return _np_params(g.min(-1), g.max(-1), np.abs(g).max(-1), bits, symmetric)


def _np_fake_weight(w, bits, symmetric, granularity, group_size):
    s, z = _np_weight_params(w, bits, symmetric, granularity, group_size)
    out, inp = w.shape
    g = w.reshape(out, s.shape[1], -1) if granularity != "tensor" else w.reshape(out, 1, -1)
    return _np_fake(g, s[..., None], z[..., None], bits).reshape(out, inp)


def _np_per_token(x: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    lo = x.min(-1, keepdims=True)
    hi = x.max(-1, keepdims=True)
    s, z = _np_params(lo, hi, np.abs(x).max(-1, keepdims=True), bits, symmetric)
    return _np_fake(x, s, z, bits)


def _weight(out: int = 6, inp: int = 64, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    w[1] *= 10.0  # rows with very different ranges
    w[2] = w[2].abs() + 0.5  # strictly positive row: asymmetric range must still include 0
    w[3] = -w[3].abs()
    w[4, :8] = 0.0  # one all-zero group (group size 8)
    return w.to(dtype)


def _expand(p: torch.Tensor, inp: int) -> torch.Tensor:
    return p.repeat_interleave(inp // p.shape[1], dim=1)


# --------------------------------------------------------------------------------------
# qrange and parameters
# --------------------------------------------------------------------------------------


def test_qrange():
    assert quant.qrange(2) == (-2, 1)
    assert quant.qrange(4) == (-8, 7)
    assert quant.qrange(8) == (-128, 127)
    for bad in (0, 1, 9, 16, 4.0, True):
        with pytest.raises(ValueError):
            quant.qrange(bad)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_weight_qparams_shapes_and_dtypes(symmetric, granularity, group_size):
    w = _weight(dtype=torch.float32)
    scale, zero = quant.weight_qparams(w, 4, symmetric, granularity, group_size)
    expected = {"tensor": (1, 1), "channel": (6, 1), "group": (6, 64 // (group_size or 1))}
    assert scale.shape == expected[granularity] == zero.shape
    assert scale.dtype == torch.float32 and zero.dtype == torch.int8
    assert torch.all(scale > 0)
    if symmetric:
        assert torch.all(zero == 0)
    qmin, qmax = quant.qrange(4)
    assert torch.all((zero >= qmin) & (zero <= qmax))
    s64, _ = quant.weight_qparams(w.double(), 4, symmetric, granularity, group_size)
    assert s64.dtype == torch.float64


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_weight_qparams_match_numpy(bits, symmetric, granularity, group_size):
    w = _weight()
    scale, zero = quant.weight_qparams(w, bits, symmetric, granularity, group_size)
    s_ref, z_ref = _np_weight_params(w.numpy(), bits, symmetric, granularity, group_size)
    np.testing.assert_array_equal(scale.numpy(), s_ref)
    np.testing.assert_array_equal(zero.numpy().astype(np.float64), z_ref)


def test_symmetric_int4_scale_is_amax_over_7():
    w = torch.tensor([[0.7, -0.35, 0.0, 0.1]], dtype=torch.float64)
    scale, zero = quant.weight_qparams(w, 4, True, "channel")
    assert scale.item() == pytest.approx(0.1, rel=1e-15)
    codes = quant.quantize_weight(w, scale, zero, 4)
    assert codes.tolist() == [[7, -4, 0, 1]]  # -3.5 rounds half to even -> -4


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_full_range_grid_is_amax_over_half_the_codes(bits, granularity, group_size):
    """full_range: s = amax / 2^(b-1); every code is reachable, +amax saturates at qmax."""
    w = _weight()
    scale, zero = quant.weight_qparams(w, bits, True, granularity, group_size, full_range=True)
    g = _np_groups(w.numpy(), granularity, group_size)
    np.testing.assert_array_equal(
        scale.numpy(), np.maximum(np.abs(g).max(-1) / 2 ** (bits - 1), quant.SCALE_EPS)
    )
    assert not zero.any()
    codes = quant.quantize_weight(w, scale, zero, bits, group_size)
    qmin, qmax = quant.qrange(bits)
    assert int(codes.min()) == qmin or int(codes.max()) == qmax
    # asymmetric grids already use every code: the flag changes nothing
    a = quant.weight_qparams(w, bits, False, granularity, group_size, full_range=True)
    b = quant.weight_qparams(w, bits, False, granularity, group_size)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_full_range_int4_codes():
    w = torch.tensor([[0.8, -0.8, -0.4, 0.1]], dtype=torch.float64)
    scale, zero = quant.weight_qparams(w, 4, True, "channel", full_range=True)
    assert scale.item() == pytest.approx(0.1, rel=1e-15)
    # +amax saturates at 7, -amax uses the code the narrow grid leaves unused
    assert quant.quantize_weight(w, scale, zero, 4).tolist() == [[7, -8, -4, 1]]


def test_round_half_to_even_before_adding_zero_point():
    # Asymmetric int4 over [-3, 12]: s = 15 / 15 = 1, z = round(-8 + 3) = -5.
    w = torch.tensor([[-3.0, 12.0, 0.5, 1.5, 2.5, -0.5, -1.5, 0.0]], dtype=torch.float64)
    scale, zero = quant.weight_qparams(w, 4, False, "channel")
    assert scale.item() == 1.0 and zero.item() == -5
    codes = quant.quantize_weight(w, scale, zero, 4)
    # ONNX QuantizeLinear: round(x / s) + z, not round(x / s + z).
    assert codes.tolist() == [[-8, 7, -5, -3, -3, -5, -7, -5]]
    deq = quant.dequantize_weight(codes, scale, zero)
    assert deq.tolist() == [[-3.0, 12.0, 0.0, 2.0, 2.0, 0.0, -2.0, 0.0]]


# --------------------------------------------------------------------------------------
# Weight quantization
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_codes_in_range_and_round_trip_error(bits, symmetric, granularity, group_size):
    w = _weight()
    scale, zero = quant.weight_qparams(w, bits, symmetric, granularity, group_size)
    codes = quant.quantize_weight(w, scale, zero, bits)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    qmin, qmax = quant.qrange(bits)
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    deq = quant.dequantize_weight(codes, scale, zero)
    assert deq.dtype == torch.float64 and torch.isfinite(deq).all()
    s = _expand(scale.expand(w.shape[0], -1), w.shape[1])
    assert torch.all((deq - w).abs() <= s / 2 * (1 + 1e-9))
    # Codes computed independently: clamp(rint(x / s) + z).
    z = _expand(zero.expand(w.shape[0], -1), w.shape[1]).double()
    ref = np.clip(np.rint(w.numpy() / s.numpy()) + z.numpy(), qmin, qmax)
    np.testing.assert_array_equal(codes.numpy(), ref)
    if symmetric:
        assert int(codes.min()) >= -qmax  # the most negative code stays unused


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_fake_quantize_weight_matches_numpy(bits, symmetric, granularity, group_size):
    w = _weight(seed=bits)
    got = quant.fake_quantize_weight(w, bits, symmetric, granularity, group_size)
    ref = _np_fake_weight(w.numpy(), bits, symmetric, granularity, group_size)
    assert got.dtype == torch.float64
    np.testing.assert_array_equal(got.numpy(), ref)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_weight_float32(bits, symmetric):
    w = _weight(seed=11, dtype=torch.float32)
    got = quant.fake_quantize_weight(w, bits, symmetric, "group", 16)
    assert got.dtype == torch.float32
    ref = _np_fake_weight(w.double().numpy(), bits, symmetric, "group", 16)
    scale, _ = quant.weight_qparams(w, bits, symmetric, "group", 16)
    s = _expand(scale, 64).double().numpy()
    diff = np.abs(got.double().numpy() - ref)
    # float32 vs float64 can only disagree near rounding ties (one step, rarely);
    # elsewhere they differ by float32 rounding of the result.
    assert np.all(diff <= s * (1 + 1e-5))
    step = diff > s / 2
    assert np.mean(step) < 0.01
    assert np.all(diff[~step] <= 1e-6 * (np.abs(ref[~step]) + s[~step]))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_asymmetric_represents_zero_exactly(bits, granularity, group_size):
    w = _weight(seed=3) + 0.37  # shift so that ranges are lopsided
    w[:, 5] = 0.0
    deq = quant.fake_quantize_weight(w, bits, False, granularity, group_size)
    assert torch.all(deq[:, 5] == 0.0)
    scale, zero = quant.weight_qparams(w, bits, False, granularity, group_size)
    zeros = torch.zeros_like(w, dtype=torch.int8) + _expand(zero.expand(6, -1), 64)
    assert torch.all(quant.dequantize_weight(zeros, scale, zero) == 0.0)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_zero_groups_give_zeros_not_nan(symmetric, granularity, group_size):
    w = torch.zeros(4, 64, dtype=torch.float32)
    out = quant.fake_quantize_weight(w, 4, symmetric, granularity, group_size)
    assert torch.equal(out, w)
    scale, _ = quant.weight_qparams(w, 4, symmetric, granularity, group_size)
    assert torch.all(scale >= SCALE_EPS)
    w = _weight()  # row 4 has a zero group of 8
    out = quant.fake_quantize_weight(w, 4, symmetric, "group", 8)
    assert torch.isfinite(out).all() and torch.all(out[4, :8] == 0)


def test_clip_ratio_shrinks_range_and_saturates():
    w = torch.tensor([[1.0, 0.5, -0.2, 0.05]], dtype=torch.float64)
    scale, zero = quant.weight_qparams(w, 4, True, "channel", clip_ratio=0.5)
    assert scale.item() == pytest.approx(0.5 / 7)
    codes = quant.quantize_weight(w, scale, zero, 4)
    assert codes[0, 0].item() == 7 and codes[0, 1].item() == 7  # clipped
    scale_a, zero_a = quant.weight_qparams(w, 4, False, "channel", clip_ratio=0.5)
    assert scale_a.item() == pytest.approx((0.5 + 0.1) / 15)
    with pytest.raises(ValueError):
        quant.weight_qparams(w, 4, True, "channel", clip_ratio=0.0)


def test_tensor_granularity_uses_one_scale():
    w = _weight()
    scale, zero = quant.weight_qparams(w, 8, True, "tensor")
    assert scale.shape == (1, 1)
    assert scale.item() == pytest.approx(w.abs().max().item() / 127, rel=1e-15)
    codes = quant.quantize_weight(w, scale, zero, 8)
    np.testing.assert_array_equal(
        quant.dequantize_weight(codes, scale, zero).numpy(), codes.double().numpy() * scale.item()
    )


def test_weight_validation_errors():
    w = _weight()
    with pytest.raises(ValueError):
        quant.weight_qparams(w, 4, True, "group")  # no group size
    with pytest.raises(ValueError):
        quant.weight_qparams(w, 4, True, "row")
    with pytest.raises(ValueError):
        quant.weight_qparams(w[0], 4, True, "channel")  # 1-D
    with pytest.raises(ValueError):
        quant.weight_qparams(w, 9, True, "channel")
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(DataError):
        quant.weight_qparams(bad, 4, True, "channel")
    scale, zero = quant.weight_qparams(w, 4, True, "group", 16)
    with pytest.raises(ValueError):
        quant.quantize_weight(w[:, :42], scale, zero, 4)  # 4 groups do not divide 42


@pytest.mark.parametrize("symmetric", [True, False])
def test_ragged_last_group_matches_numpy(symmetric):
    """64 inputs in groups of 7: nine full groups and a last group of 1, each with its own range."""
    w = _weight(dtype=torch.float64)
    scale, zero = quant.weight_qparams(w, 4, symmetric, "group", 7)
    assert scale.shape == (w.shape[0], 10)
    ref = w.numpy()
    qmin, qmax = -8, 7
    out = np.empty_like(ref)
    for g in range(10):
        cols = ref[:, g * 7 : (g + 1) * 7]
        if symmetric:
            s = np.maximum(np.abs(cols).max(1) / qmax, quant.SCALE_EPS)
            z = np.zeros_like(s)
        else:
            lo, hi = np.minimum(cols.min(1), 0), np.maximum(cols.max(1), 0)
            s = np.maximum((hi - lo) / (2**4 - 1), quant.SCALE_EPS)
            z = np.clip(np.round(qmin - lo / s), qmin, qmax)
        np.testing.assert_allclose(scale[:, g].numpy(), s, rtol=1e-12)
        q = np.clip(np.round(cols / s[:, None]) + z[:, None], qmin, qmax)
        out[:, g * 7 : (g + 1) * 7] = (q - z[:, None]) * s[:, None]
    codes = quant.quantize_weight(w, scale, zero, 4, group_size=7)
    np.testing.assert_allclose(
        quant.dequantize_weight(codes, scale, zero, 7).numpy(), out, atol=1e-12
    )
    with pytest.raises(ValueError):
        quant.dequantize_weight(codes, scale, zero)  # ragged groups need the group size


def test_functions_are_pure():
    w = _weight(dtype=torch.float32)
    w_before = w.clone()
    scale, zero = quant.weight_qparams(w, 4, False, "group", 16)
    s_before, z_before = scale.clone(), zero.clone()
    codes = quant.quantize_weight(w, scale, zero, 4)
    c_before = codes.clone()
    quant.dequantize_weight(codes, scale, zero)
    quant.fake_quantize_weight(w, 4, False, "group", 16)
    x = torch.randn(3, 5, 32)
    x_before = x.clone()
    quant.fake_quantize_per_token(x, 8, False)
    quant.fake_quantize_static(x, scale[0, 0], zero[0, 0], 8)
    for a, b in [(w, w_before), (scale, s_before), (zero, z_before), (codes, c_before)]:
        assert torch.equal(a, b)
    assert torch.equal(x, x_before)


# --------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_token_matches_numpy(bits, symmetric):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 5, 48, generator=gen, dtype=torch.float64) * torch.linspace(0.01, 30, 48)
    x[0, 1] = 0.0  # an all-zero token
    x[1, 2] = x[1, 2].abs()  # all-positive token
    scale, zero = quant.per_token_qparams(x, bits, symmetric)
    assert scale.shape == zero.shape == (2, 5, 1)
    assert zero.is_floating_point() and torch.equal(zero, zero.round())
    got = quant.fake_quantize_per_token(x, bits, symmetric)
    ref = _np_per_token(x.numpy(), bits, symmetric)
    assert got.shape == x.shape and got.dtype == x.dtype
    np.testing.assert_array_equal(got.numpy(), ref)
    assert torch.all(got[0, 1] == 0)
    assert torch.all((got - x).abs() <= scale / 2 * (1 + 1e-9))


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_token_float32_and_low_precision(symmetric):
    x = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(0))
    got = quant.fake_quantize_per_token(x, 8, symmetric)
    assert got.dtype == torch.float32
    ref = _np_per_token(x.double().numpy(), 8, symmetric)
    scale, _ = quant.per_token_qparams(x, 8, symmetric)
    assert np.all(np.abs(got.double().numpy() - ref) <= scale.double().numpy() * (1 + 1e-5))
    for dtype in (torch.float16, torch.bfloat16):
        out = quant.fake_quantize_per_token(x.to(dtype), 4, symmetric)
        assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_minmax_and_static_match_numpy(bits, symmetric):
    x = torch.randn(3, 7, 20, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    x = x * 3 + 1.0
    lo, hi = float(x.min()), float(x.max())
    f64 = torch.float64
    scale, zero = quant.minmax_qparams(
        torch.tensor(lo, dtype=f64), torch.tensor(hi, dtype=f64), bits, symmetric
    )
    assert scale.dim() == 0 and zero.dim() == 0 and zero.dtype == torch.int8
    s_ref, z_ref = _np_params(
        np.float64(lo), np.float64(hi), np.float64(max(abs(lo), abs(hi))), bits, symmetric
    )
    assert scale.item() == s_ref and zero.item() == z_ref
    got = quant.fake_quantize_static(x, scale, zero, bits)
    assert got.dtype == x.dtype and got.shape == x.shape
    np.testing.assert_array_equal(got.numpy(), _np_fake(x.numpy(), s_ref, z_ref, bits))
    assert torch.all((got - x).abs() <= scale / 2 * (1 + 1e-9))
    # Float bounds give float32 parameters; a float zero point works as well.
    s32, z32 = quant.minmax_qparams(lo, hi, bits, symmetric)
    assert s32.dtype == torch.float32
    out = quant.fake_quantize_static(x.float(), s32, float(z32), bits)
    assert out.dtype == torch.float32


def test_static_outside_range_saturates_and_zero_scale_is_safe():
    scale, zero = quant.minmax_qparams(-1.0, 2.0, 8, False)
    x = torch.tensor([-5.0, 0.0, 10.0])
    out = quant.fake_quantize_static(x, scale, zero, 8)
    qmin, qmax = quant.qrange(8)
    z = int(zero)
    assert out[1].item() == 0.0
    assert out[0].item() == pytest.approx((qmin - z) * scale.item())
    assert out[2].item() == pytest.approx((qmax - z) * scale.item())
    scale0, zero0 = quant.minmax_qparams(0.0, 0.0, 8, True)
    assert scale0.item() >= SCALE_EPS * (1 - 1e-6)
    assert torch.equal(quant.fake_quantize_static(torch.zeros(5), scale0, zero0, 8), torch.zeros(5))
    out = quant.fake_quantize_static(torch.ones(3), 0.0, 0, 8)  # degenerate scale: no NaN
    assert torch.isfinite(out).all()


def test_minmax_validation():
    with pytest.raises(ValueError):
        quant.minmax_qparams(1.0, -1.0, 8, True)
    with pytest.raises(DataError):
        quant.minmax_qparams(float("-inf"), 1.0, 8, False)
    with pytest.raises(ValueError):
        quant.minmax_qparams(0.0, 1.0, 1, False)
    with pytest.raises(ValueError):
        quant.fake_quantize_static(torch.ones(2), torch.ones(2), 0, 8)
