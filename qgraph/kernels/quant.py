"""Uniform integer quantizers as pure tensor functions.

Conventions (shared by every pass and exporter, so they must not drift):

* codes are signed integers in [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1], b in 2..8,
  stored as torch.int8;
* dequantization is x_hat = (q - z) * s, quantization q = clamp(round(x / s) + z),
  with torch.round (half to even) applied *before* adding z, exactly like ONNX
  QuantizeLinear / DequantizeLinear;
* symmetric: z = 0 and either the narrow grid s = amax / qmax (int4: amax / 7, code -8 unused)
  or, for weights with ``full_range``, the full grid s = amax / 2^(b-1) (int4: amax / 8) over
  every code -8..7: a positive weight near +amax clips to 7s (error up to s), every other
  weight gets a grid 8/7 finer, which measured far better for 3-4-bit weights;
* asymmetric: the range [min, max] is widened to contain 0, s = (max - min) / (2^b - 1),
  z = clamp(round(qmin - min / s)); zero is therefore represented exactly;
* scales are clamped below by SCALE_EPS, so an all-zero group quantizes to zeros instead
  of 0 / 0 = NaN (the clamped scale only widens the grid, so the s/2 error bound holds).

Low-precision inputs (float16/bfloat16) get their parameters computed in float32; float64
stays float64. No function modifies its inputs.
"""

from __future__ import annotations

import torch

from qgraph.errors import DataError

__all__ = [
    "SCALE_EPS",
    "decode_per_token",
    "dequantize_weight",
    "encode_per_token",
    "expand_groups",
    "fake_quantize_per_token",
    "fake_quantize_static",
    "fake_quantize_weight",
    "minmax_qparams",
    "per_token_qparams",
    "qrange",
    "quantize_weight",
    "weight_qparams",
]

#: Smallest scale ever produced. Absolute, and representable in float32, so a scale
#: exported to ONNX never underflows to 0.
SCALE_EPS = 1e-10

_GRANULARITIES = ("tensor", "channel", "group")


def qrange(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of signed b-bit codes."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bit width must be an integer in 2..8, got {bits!r}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _param_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _symmetric(
    amax: torch.Tensor, bits: int, full_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) from a non-negative absolute maximum; zero is all zeros (float).

    ``full_range`` divides by 2^(b-1) instead of qmax = 2^(b-1) - 1 (see the module docstring).
    """
    qmin, qmax = qrange(bits)
    scale = (amax / (-qmin if full_range else qmax)).clamp_min(SCALE_EPS)
    return scale, torch.zeros_like(scale)


def _asymmetric(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) from a range; zero is a float tensor holding integers in [qmin, qmax]."""
    qmin, qmax = qrange(bits)
    lo = xmin.clamp_max(0.0)
    hi = xmax.clamp_min(0.0)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(SCALE_EPS)
    zero = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    return scale, zero


def _quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Float tensor of integer codes: clamp(round(x / s) + z, qmin, qmax)."""
    qmin, qmax = qrange(bits)
    return (torch.round(x / scale) + zero).clamp(qmin, qmax)


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"weight must be floating point, got {w.dtype}")


def _group_view(w: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """w viewed as [rows, G, in / G] with rows = 1 for 'tensor'."""
    out, inp = w.shape
    if granularity == "tensor":
        return w.reshape(1, 1, out * inp)
    if granularity == "channel":
        return w.reshape(out, 1, inp)
    if granularity == "group":
        if group_size is None or group_size < 1:
            raise ValueError(f"granularity 'group' needs a positive group_size, got {group_size}")
        groups = -(-inp // group_size)
        if groups * group_size != inp:
            # Ragged last group: pad with zeros, which never widen a range (every range here
            # contains zero), so the short group gets the parameters of its own values.
            w = torch.nn.functional.pad(w, (0, groups * group_size - inp))
        return w.reshape(out, groups, group_size)
    raise ValueError(f"unknown granularity {granularity!r}; use one of {_GRANULARITIES}")


def weight_qparams(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    granularity: str,
    group_size: int | None = None,
    clip_ratio: float = 1.0,
    full_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) for a weight [out, in]; shapes [1, 1] / [out, 1] / [out, in // group_size].

    scale is float32 (float64 for float64 weights), zero int8 (zeros when symmetric).
    clip_ratio < 1 shrinks the range (amax * r, or min * r and max * r), trading clipping
    error on outliers for a finer grid. full_range picks the symmetric full grid amax / 2^(b-1)
    (no effect on asymmetric grids, which always use all 2^b codes).
    """
    _check_weight(w)
    qrange(bits)
    if not clip_ratio > 0:
        raise ValueError(f"clip_ratio must be positive, got {clip_ratio}")
    g = _group_view(w.detach().to(_param_dtype(w.dtype)), granularity, group_size)
    if symmetric:
        scale, zero = _symmetric(g.abs().amax(dim=-1) * clip_ratio, bits, full_range)
    else:
        scale, zero = _asymmetric(g.amin(dim=-1) * clip_ratio, g.amax(dim=-1) * clip_ratio, bits)
    if not torch.isfinite(scale).all():
        raise DataError("weight contains NaN or infinite values; cannot choose a scale")
    return scale, zero.to(torch.int8)


def expand_groups(param: torch.Tensor, inp: int, group_size: int | None = None) -> torch.Tensor:
    """[rows, G] group parameters -> [rows, inp].

    Each parameter applies to ``group_size`` contiguous columns (the last group may be shorter:
    G = ceil(inp / group_size)); without ``group_size`` the G groups must divide ``inp``.
    """
    if param.dim() != 2:
        raise ValueError(f"scale/zero must be 2-D [out or 1, G], got shape {tuple(param.shape)}")
    groups = param.shape[1]
    if group_size is not None and groups > 1:
        if groups != -(-inp // group_size):
            raise ValueError(f"{groups} groups of {group_size} do not cover {inp} inputs")
        return param.repeat_interleave(group_size, dim=1)[:, :inp]
    if groups < 1 or inp % groups:
        raise ValueError(f"{groups} groups do not divide the input dimension {inp}")
    return param.repeat_interleave(inp // groups, dim=1)


def quantize_weight(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int | None = None,
) -> torch.Tensor:
    """int8 codes [out, in] of w for the given (scale, zero) from weight_qparams
    (``group_size`` is needed only when the last group is ragged)."""
    _check_weight(w)
    inp = w.shape[1]
    s = expand_groups(scale, inp, group_size)
    z = expand_groups(zero, inp, group_size).to(s.dtype)
    return _quantize(w.to(s.dtype), s, z, bits).to(torch.int8)


def dequantize_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int | None = None,
) -> torch.Tensor:
    """(codes - zero) * scale, in scale's dtype."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
    inp = codes.shape[1]
    s = expand_groups(scale, inp, group_size)
    z = expand_groups(zero, inp, group_size).to(s.dtype)
    return (codes.to(s.dtype) - z) * s


def fake_quantize_weight(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    granularity: str,
    group_size: int | None = None,
    clip_ratio: float = 1.0,
    full_range: bool = False,
) -> torch.Tensor:
    """dequantize(quantize(w)) in w's dtype: the weight the quantized model really uses."""
    scale, zero = weight_qparams(
        w, bits, symmetric, granularity, group_size, clip_ratio, full_range
    )
    gs = group_size if granularity == "group" else None
    codes = quantize_weight(w, scale, zero, bits, gs)
    return dequantize_weight(codes, scale, zero, gs).to(w.dtype)


def per_token_qparams(
    x: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic (scale, zero), each [..., 1], over the last dim of x.

    Unlike weight_qparams, zero is a float tensor (holding integers in [qmin, qmax]):
    it is computed at run time per token and used immediately, never stored as int8.
    """
    if x.dim() == 0:
        raise ValueError("per-token quantization needs at least one dimension")
    xf = x.detach().to(_param_dtype(x.dtype))
    if symmetric:
        return _symmetric(xf.abs().amax(dim=-1, keepdim=True), bits)
    return _asymmetric(xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True), bits)


def encode_per_token(
    x: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (last dim) dynamic quantization: (codes int8, scale [..., 1], zero int8
    [..., 1]), what a quantized key/value cache stores."""
    scale, zero = per_token_qparams(x, bits, symmetric)
    q = _quantize(x.to(scale.dtype), scale, zero, bits)
    return q.to(torch.int8), scale, zero.to(torch.int8)


def decode_per_token(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) * scale`` in scale's dtype: the inverse of :func:`encode_per_token`."""
    return (codes.to(scale.dtype) - zero.to(scale.dtype)) * scale


def fake_quantize_per_token(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Per-token (last dim) dynamic fake quantization; same shape and dtype as x."""
    return decode_per_token(*encode_per_token(x, bits, symmetric)).to(x.dtype)


def _as_scalar(v: float | torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    # Python/numpy numbers go through float64 (via float32 they would lose precision).
    t = v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=torch.float64)
    if t.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(t.shape)}")
    return t.reshape(()).to(dtype)


def fake_quantize_static(
    x: torch.Tensor, scale: float | torch.Tensor, zero: float | torch.Tensor, bits: int
) -> torch.Tensor:
    """Per-tensor fake quantization with calibrated scalar (scale, zero); keeps x's dtype.

    zero may be int8 (from minmax_qparams) or float holding an integer. The scale is
    clamped by SCALE_EPS like everywhere else, so a zero scale cannot produce NaN.
    """
    dtype = _param_dtype(x.dtype)
    s = _as_scalar(scale, dtype, "scale").to(x.device).clamp_min(SCALE_EPS)
    z = _as_scalar(zero, dtype, "zero").to(x.device)
    q = _quantize(x.to(dtype), s, z, bits)
    return ((q - z) * s).to(x.dtype)


def minmax_qparams(
    xmin: float | torch.Tensor, xmax: float | torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar (scale, zero int8) for an observed range [xmin, xmax] (static activations).

    scale is float64 when either bound is a float64 tensor, else float32.
    """
    qrange(bits)
    dtype = torch.float32
    for v in (xmin, xmax):
        if isinstance(v, torch.Tensor) and v.dtype == torch.float64:
            dtype = torch.float64
    lo = _as_scalar(xmin, dtype, "xmin")
    hi = _as_scalar(xmax, dtype, "xmax")
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise DataError(f"observed range [{lo.item()}, {hi.item()}] is not finite")
    if lo > hi:
        raise ValueError(f"observed range is empty: xmin {lo.item()} > xmax {hi.item()}")
    if symmetric:
        scale, zero = _symmetric(torch.maximum(lo.abs(), hi.abs()), bits)
    else:
        scale, zero = _asymmetric(lo, hi, bits)
    return scale, zero.to(torch.int8)
