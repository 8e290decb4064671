"""Tests of qgraph.kernels.ranges against brute-force numpy references written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qgraph.errors import DataError
from qgraph.kernels import quant
from qgraph.kernels.ranges import (
    klj_divergences,
    klj_scale,
    klj_threshold,
    minmax_range,
    mse_range,
    percentile_range,
)


def _gauss(n: int = 20000, seed: int = 0, outliers: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    x[:outliers] *= 25.0
    return x.float()


# --------------------------------------------------------------------------------------
# min/max and percentile
# --------------------------------------------------------------------------------------


def test_minmax_range():
    x = _gauss().reshape(40, 500) + 0.3
    lo, hi = minmax_range(x)
    assert (lo, hi) == (float(x.numpy().min()), float(x.numpy().max()))
    assert isinstance(lo, float) and isinstance(hi, float)
    assert minmax_range(torch.full((7,), 2.5)) == (2.5, 2.5)
    assert minmax_range(np.array([1.0, -3.0])) == (-3.0, 1.0)


@pytest.mark.parametrize("pct", [99.99, 99.0, 90.0, 100.0])
def test_percentile_range_matches_numpy(pct):
    x = _gauss(outliers=5) + 0.2
    xn = x.numpy().astype(np.float64)
    lo, hi = percentile_range(x, pct)
    assert lo == pytest.approx(np.percentile(xn, 100 - pct), rel=1e-12, abs=1e-12)
    assert hi == pytest.approx(np.percentile(xn, pct), rel=1e-12)
    lo_s, hi_s = percentile_range(x, pct, symmetric=True)
    assert hi_s == pytest.approx(np.percentile(np.abs(xn), pct), rel=1e-12) and lo_s == -hi_s
    if pct == 100.0:
        assert (lo, hi) == minmax_range(x)
    with pytest.raises(ValueError):
        percentile_range(x, 40.0)


# --------------------------------------------------------------------------------------
# MSE search
# --------------------------------------------------------------------------------------


def _np_mse_range(x: np.ndarray, bits: int, symmetric: bool, grid: int):
    qmin, qmax = quant.qrange(bits)
    best = None
    for k in range(grid, 0, -1):
        r = k / grid
        if symmetric:
            a = np.abs(x).max() * r
            lo, hi = -a, a
            s = max(a / qmax, quant.SCALE_EPS)
            z = 0.0
        else:
            lo, hi = x.min() * r, x.max() * r
            s = max((max(hi, 0.0) - min(lo, 0.0)) / (2**bits - 1), quant.SCALE_EPS)
            z = float(np.clip(np.rint(qmin - min(lo, 0.0) / s), qmin, qmax))
        err = np.mean(((np.clip(np.rint(x / s) + z, qmin, qmax) - z) * s - x) ** 2)
        if best is None or err < best[0]:
            best = (err, lo, hi)
    return best[1], best[2]


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_range_matches_brute_force(bits, symmetric):
    x = _gauss(n=4000, outliers=3) * 0.7 + 0.4
    lo, hi = mse_range(x, bits, symmetric, grid=50)
    ref = _np_mse_range(x.numpy().astype(np.float64), bits, symmetric, 50)
    assert lo == pytest.approx(ref[0], rel=1e-12) and hi == pytest.approx(ref[1], rel=1e-12)
    if symmetric:
        assert lo == -hi
        if bits <= 4:  # low bit widths clip the outliers
            assert hi < 0.5 * float(x.abs().max())


def test_mse_range_full_range_when_nothing_to_clip():
    x = torch.tensor([-1.0, 1.0] * 50)
    assert mse_range(x, 4, True) == (-1.0, 1.0)
    assert mse_range(torch.full((10,), 3.0), 4, False) == (3.0, 3.0)


# --------------------------------------------------------------------------------------
# KL-J
# --------------------------------------------------------------------------------------


def _ref_divergence(hist: np.ndarray, i: int, levels: int, on: str) -> float:
    """Divergence of candidate i, one bin and one level at a time (see klj_threshold)."""
    n = len(hist)
    p = [float(hist[j]) for j in range(i)]
    p[i - 1] += float(sum(hist[j] for j in range(i, n)))
    q = [0.0] * i
    for k in range(levels):
        members = [j for j in range(i) if k * i <= j * levels < (k + 1) * i]
        mass = sum(float(hist[j]) for j in members)
        nonempty = [j for j in members if p[j] > 0]
        for j in nonempty:
            q[j] = mass / len(nonempty)
    if sum(q) == 0:
        return math.inf
    p_tot, q_tot = sum(p), sum(q)
    p = [v / p_tot for v in p]
    q = [v / q_tot for v in q]
    if on == "cdf":
        p = list(np.cumsum(p))
        q = list(np.cumsum(q))
    total = 0.0
    for a, b in zip(p, q, strict=True):
        if a > 0 and b > 0:
            total += (a - b) * math.log(a / b)
        elif a > 0 or b > 0:
            return math.inf
    return total


def _ref_threshold(x: np.ndarray, bits: int, signed: bool, bins: int, on: str) -> float:
    a = np.abs(x.astype(np.float64))
    amax = a.max()
    a = a[a > 0]
    hist, _ = np.histogram(a, bins=bins, range=(0.0, amax))
    levels = 2 ** (bits - int(signed))
    best_i, best_d = None, math.inf
    for i in range(levels, bins + 1):
        d = _ref_divergence(hist, i, levels, on)
        if d <= best_d:  # ties: the larger threshold
            best_i, best_d = i, d
    return best_i * amax / bins


@pytest.mark.parametrize(
    ("bits", "signed"), [(8, True), (6, True), (4, True), (4, False), (3, True)]
)
@pytest.mark.parametrize("on", ["cdf", "pdf"])
def test_klj_matches_brute_force(bits, signed, on):
    x = _gauss(n=5000, seed=bits, outliers=4).numpy()
    x = np.where(np.arange(x.size) % 7 == 0, 0.0, x)  # exact zeros are ignored
    got = klj_threshold(torch.from_numpy(x), bits, signed=signed, bins=256, on=on)
    assert got == pytest.approx(_ref_threshold(x, bits, signed, 256, on), rel=1e-12)
    divs, amax = klj_divergences(torch.from_numpy(x), bits, signed=signed, bins=256, on=on)
    levels = 2 ** (bits - int(signed))
    hist, _ = np.histogram(np.abs(x)[x != 0], bins=256, range=(0.0, amax))
    for i in sorted({levels, levels + 1, max(levels, 150), 200, 256}):
        assert divs[i - levels] == pytest.approx(_ref_divergence(hist, i, levels, on), rel=1e-9)


@pytest.mark.parametrize("on", ["cdf", "pdf"])
def test_klj_clips_outliers(on):
    x = _gauss(n=20000, seed=3, outliers=5)
    amax = float(x.abs().max())
    t = klj_threshold(x, 8, on=on)
    assert 2.5 < t < 0.4 * amax  # well inside: the outliers are clipped, the bulk is kept
    t4 = klj_threshold(x, 4, on=on)
    assert t4 < t  # fewer levels: clip more


def test_klj_zeros_spike_is_ignored():
    gen = torch.Generator().manual_seed(4)
    relu = torch.randn(20000, generator=gen).clamp_min(0.0)  # half exact zeros
    t = klj_threshold(relu, 8)
    assert t > 0.5 * float(relu.max())
    t_with_zeros = klj_threshold(relu, 8, ignore_zeros=False)
    assert t_with_zeros < t


def test_klj_power_of_two_and_scale():
    x = _gauss(n=5000, outliers=2)
    t = klj_threshold(x, 8, bins=512)
    t2 = klj_threshold(x, 8, bins=512, power_of_two=True)
    assert t2 == 2.0 ** math.ceil(math.log2(t)) and t <= t2 < 2 * t
    assert klj_threshold(torch.tensor([-4.0, 4.0, 1.0]), 2, bins=4, power_of_two=True) == 4.0
    assert klj_scale(t, 8) == t / 128
    assert klj_scale(t, 8, signed=False) == t / 256
    assert klj_scale(3.0, 4, power_of_two=True) == 4.0 / 8
    assert klj_scale(4.0, 4, power_of_two=True) == 0.5
    assert klj_scale(0.3, 8, power_of_two=True) == 0.5 / 128
    with pytest.raises(ValueError):
        klj_scale(0.0, 8)
    with pytest.raises(ValueError):
        klj_scale(1.0, 9)


def test_klj_constant_gives_max():
    assert klj_threshold(torch.full((100,), -3.0), 8) == 3.0
    assert klj_threshold(torch.tensor([0.0, 2.0, 0.0, -2.0]), 4, bins=64) == 2.0


def test_klj_argument_errors():
    x = _gauss(n=100)
    with pytest.raises(ValueError):
        klj_threshold(x, 8, bins=64)  # fewer bins than the 128 levels
    with pytest.raises(ValueError):
        klj_threshold(x, 8, on="pmf")
    with pytest.raises(ValueError):
        klj_threshold(x, 1)


# --------------------------------------------------------------------------------------
# Degenerate data and purity
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda x: minmax_range(x),
        lambda x: percentile_range(x),
        lambda x: mse_range(x, 8, True),
        lambda x: klj_threshold(x, 8),
    ],
)
def test_degenerate_inputs(call):
    for bad in (
        torch.tensor([1.0, float("nan")]),
        torch.tensor([float("inf"), 0.0]),
        torch.empty(0),
    ):
        with pytest.raises(DataError):
            call(bad)


def test_all_zeros_rejected_by_searches():
    zeros = torch.zeros(100)
    for call in (lambda: mse_range(zeros, 8, False), lambda: klj_threshold(zeros, 8)):
        with pytest.raises(DataError):
            call()
    assert minmax_range(zeros) == (0.0, 0.0)


def test_inputs_not_modified():
    x = _gauss(n=2000, outliers=2)
    x[::5] = 0.0
    x0 = x.clone()
    minmax_range(x)
    percentile_range(x, symmetric=True)
    mse_range(x, 4, False, grid=10)
    klj_threshold(x, 4, bins=128)
    assert torch.equal(x, x0)
