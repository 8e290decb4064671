"""Range (clipping threshold) choice for uniform quantizers, from observed data.

Every function works on a single calibration batch (any shape, flattened) and returns plain
Python floats: a range (lo, hi) for quant.minmax_qparams, or a KL-J threshold t. Inputs are
never modified. Degenerate data raise DataError: empty or non-finite input everywhere, and
all-zero input for the searches (mse_range, klj_threshold), which have no range to fit.
A non-zero constant is *not* an error: every method then returns the full range, which
represents it exactly (minmax/percentile/mse) or up to the last code (KL-J).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qgraph.errors import DataError
from qgraph.kernels.quant import fake_quantize_static, minmax_qparams, qrange

__all__ = [
    "klj_divergences",
    "klj_scale",
    "klj_threshold",
    "minmax_range",
    "mse_range",
    "percentile_range",
]


def _values(x: torch.Tensor | np.ndarray, what: str = "data") -> torch.Tensor:
    """x flattened to float64 (a copy-free view when possible); DataError if empty or non-finite."""
    t = torch.as_tensor(x).detach().reshape(-1)
    if t.numel() == 0:
        raise DataError(f"{what} is empty; cannot choose a quantization range")
    t = t.to(torch.float64)
    if not torch.isfinite(t).all():
        raise DataError(f"{what} contains NaN or infinite values; cannot choose a range")
    return t


def minmax_range(x: torch.Tensor) -> tuple[float, float]:
    """(min, max) of x: no clipping, every observed value representable."""
    t = _values(x)
    return float(t.min()), float(t.max())


def percentile_range(
    x: torch.Tensor, pct: float = 99.99, symmetric: bool = False
) -> tuple[float, float]:
    """Range clipping the (100 - pct) % most extreme values.

    Asymmetric: (P_{100-pct}(x), P_pct(x)); symmetric: (-t, t) with t = P_pct(|x|). Linear
    interpolation between order statistics, exactly like numpy.percentile's default.
    """
    if not 50.0 <= pct <= 100.0:
        raise ValueError(f"pct must be in [50, 100], got {pct}")
    v = _values(x).cpu().numpy()
    if symmetric:
        t = float(np.percentile(np.abs(v), pct))
        return -t, t
    lo, hi = np.percentile(v, [100.0 - pct, pct])
    return float(lo), float(hi)


def mse_range(x: torch.Tensor, bits: int, symmetric: bool, grid: int = 100) -> tuple[float, float]:
    """Range among clip ratios r = k/grid (k = 1..grid) minimising the fake-quant MSE of x.

    Candidates are (-r·max|x|, r·max|x|) when symmetric, else (r·min x, r·max x) (quant.py's
    clip_ratio convention); each is quantized per tensor with minmax_qparams /
    fake_quantize_static, in float64 so that near-ties are decided consistently. Ties keep
    the larger ratio (less clipping). The asymmetric search shrinks both ends by the same
    ratio, so outliers on one side can only be clipped as far as the other side allows.
    """
    qrange(bits)
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid!r}")
    t = _values(x)
    lo, hi, amax = t.min(), t.max(), t.abs().max()
    if float(amax) == 0.0:
        raise DataError("data is all zeros; there is no range to search")
    best = (math.inf, 0.0, 0.0)
    for k in range(grid, 0, -1):
        r = k / grid
        cand = (-amax * r, amax * r) if symmetric else (lo * r, hi * r)
        scale, zero = minmax_qparams(cand[0], cand[1], bits, symmetric)
        err = float((fake_quantize_static(t, scale, zero, bits) - t).square().mean())
        if err < best[0]:
            best = (err, float(cand[0]), float(cand[1]))
    return best[1], best[2]


def _jeffreys(p: np.ndarray, q: np.ndarray) -> float:
    """Σ (p - q) log(p / q) = KL(p‖q) + KL(q‖p); +inf where exactly one of p, q is zero."""
    pos_p, pos_q = p > 0, q > 0
    if np.any(pos_p != pos_q):
        return math.inf
    both = pos_p & pos_q
    a, b = p[both], q[both]
    return float(np.sum((a - b) * np.log(a / b)))


def _klj_histogram(x: torch.Tensor, bins: int, ignore_zeros: bool) -> tuple[np.ndarray, float]:
    a = _values(x).abs()
    amax = float(a.max())
    if amax == 0.0:
        raise DataError("data is all zeros; there is no threshold to search")
    if ignore_zeros:
        a = a[a > 0]
    hist, _ = np.histogram(a.cpu().numpy(), bins=bins, range=(0.0, amax))
    return hist.astype(np.float64), amax


def klj_divergences(
    x: torch.Tensor,
    bits: int,
    signed: bool = True,
    bins: int = 2048,
    on: str = "cdf",
    ignore_zeros: bool = True,
) -> tuple[np.ndarray, float]:
    """(J, max|x|): J[i - L] is the divergence of candidate threshold i·max|x|/bins, i = L..bins.

    The building block of klj_threshold (see there), exposed for inspection and plots.
    """
    qrange(bits)
    if on not in ("cdf", "pdf"):
        raise ValueError(f"on must be 'cdf' or 'pdf', got {on!r}")
    levels = 2 ** (bits - int(bool(signed)))
    if not isinstance(bins, int) or bins < levels:
        raise ValueError(
            f"bins must be an integer >= {levels} (levels at {bits} bits), got {bins!r}"
        )
    hist, amax = _klj_histogram(x, bins, ignore_zeros)
    tails = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tails[i] = Σ hist[i:]
    divs = np.full(bins - levels + 1, math.inf)
    for i in range(levels, bins + 1):
        inside = hist[:i]
        p = inside.copy()
        p[-1] += tails[i]
        level = (np.arange(i) * levels) // i  # bin j lies in [k·t/L, (k+1)·t/L) for k = level
        mass = np.bincount(level, weights=inside, minlength=levels)
        nonempty = p > 0
        count = np.bincount(level, weights=nonempty, minlength=levels)
        q = np.where(nonempty, mass[level] / np.maximum(count[level], 1.0), 0.0)
        q_total = q.sum()
        if q_total == 0.0:  # every value lies above the threshold
            continue
        p /= p.sum()
        q /= q_total
        if on == "cdf":
            p, q = np.cumsum(p), np.cumsum(q)
        divs[i - levels] = _jeffreys(p, q)
    return divs, amax


def klj_threshold(
    x: torch.Tensor,
    bits: int,
    signed: bool = True,
    bins: int = 2048,
    power_of_two: bool = False,
    on: str = "cdf",
    ignore_zeros: bool = True,
) -> float:
    """Clipping threshold t of |x| by the KL-J search of Settle et al. (arXiv 1805.07941).

    |x| is histogrammed into ``bins`` bins over [0, max|x|]. For every candidate i = L..bins,
    L = 2^(bits - signed) levels, with threshold t_i = i·max|x|/bins (upper edge of bin i-1):

    * P: the first i bins with the tail mass (bins >= i) added to bin i-1, i.e. the
      distribution of min(|x|, t_i);
    * Q: the in-range part (first i bins, WITHOUT the tail) merged into L levels, bin j going
      to level floor(j·L/i) (the level whose interval [k·t/L, (k+1)·t/L) holds the bin's left
      edge), then expanded back by spreading each level's mass uniformly over the bins that
      are non-empty in P. Q leaves out the tail on purpose (as in TensorRT's KL calibration):
      quantizing P itself gives Q = P whenever each level holds one bin (i = L), so the
      search would always return the smallest candidate. With Q built from the in-range
      part, clipping shows up as the mass P has, and Q lacks, at the threshold.
    * P and Q are normalised and compared by the symmetric Jeffreys divergence
      J = KL(P‖Q) + KL(Q‖P) = Σ (p - q) log(p / q).

    ``on="cdf"`` (default, as the paper, Settle et al. arXiv 1805.07941, is read here) evaluates that sum on the
    cumulative distributions P(≤ j), Q(≤ j) instead of the bin masses. Why: on the PDFs J is
    blind to *where* mass moves (permuting bins changes nothing) and is infinite whenever a
    level of Q is empty where P is not (TensorRT needs an epsilon smoothing there); on the
    CDFs every mis-placed unit of mass counts once per bin it is moved across, and the two
    CDFs are positive on the same bins, so J is always finite. Each CDF term is >= 0 and
    vanishes iff the CDFs agree, so it is a proper discrepancy even though CDF values do
    not sum to one. ``on="pdf"`` keeps the bin-mass variant (candidates with a zero/non-zero
    mismatch get J = inf, no smoothing).

    ``ignore_zeros`` (default) drops exact zeros before the histogram: 0 is represented
    exactly at every threshold, but a large spike of zeros (post-ReLU activations, padding)
    in bin 0 breaks the uniform-spreading model and drags the threshold far too low.

    Returns the t_i of least J (ties: the larger threshold), rounded up to 2^ceil(log2 t)
    when power_of_two (the paper's hardware line, where rescaling is a shift). A constant
    |x| gives max|x|. Raises DataError for empty, non-finite or all-zero data.
    """
    divs, amax = klj_divergences(x, bits, signed, bins, on, ignore_zeros)
    levels = 2 ** (bits - int(bool(signed)))
    # Smallest divergence; among exact ties the largest threshold (least clipping).
    best = len(divs) - 1 - int(np.argmin(divs[::-1]))
    if not math.isfinite(divs[best]):
        raise DataError("no finite KL-J divergence for any threshold (degenerate histogram)")
    t = (best + levels) * amax / bins
    return _pow2_ceil(t) if power_of_two else t


def _pow2_ceil(t: float) -> float:
    """2^ceil(log2 t), exact (frexp instead of a float log2)."""
    if not t > 0:
        raise ValueError(f"threshold must be positive, got {t}")
    mant, exp = math.frexp(t)  # t = mant · 2^exp, 0.5 <= mant < 1
    return math.ldexp(1.0, exp - 1) if mant == 0.5 else math.ldexp(1.0, exp)


def klj_scale(
    threshold: float, bits: int, signed: bool = True, power_of_two: bool = False
) -> float:
    """Scale t / 2^(bits - signed) of the KL-J scheme (Settle et al., arXiv 1805.07941).

    This is the paper's convention (codes -2^(b-1)..2^(b-1)-1 cover [-t, t) for signed), so
    t itself clips to the last code; it differs from quant.py's symmetric s = amax / qmax,
    which minmax_qparams(-t, t, ...) would give. With power_of_two the threshold is first
    rounded up to a power of two, making the scale a power of two as well.
    """
    qrange(bits)
    t = float(threshold)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"threshold must be positive and finite, got {threshold}")
    if power_of_two:
        t = _pow2_ceil(t)
    return t / 2 ** (bits - int(bool(signed)))
