"""qgraph's custom ops, defined once with torch.library.

Each op has a reference implementation (the math kernels in :mod:`qgraph.kernels.quant`), a
fake kernel for tracing, and a straight-through autograd. Their ONNX lowerings live in
:mod:`qgraph.backends.onnx_lowering`. Importing this module registers the ops.

Weight layout: ``qlinear`` stores weight codes as ``[in, out]`` (``K × N``), the layout of an
ONNX ``MatMul`` right operand, so that the ONNX lowering is a plain
``DequantizeLinear → MatMul`` that ONNX Runtime fuses into ``MatMulNBits``.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager

import torch

from .kernels import quant as qk
from .kernels.hadamard import fast_hadamard_transform

LIB = "qgraph"


@torch.library.custom_op(f"{LIB}::qlinear", mutates_args=())
def qlinear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    bits: int,
) -> torch.Tensor:
    """``x @ W + bias`` with ``W[k, n] = (codes[k, n] - zero[g, n]) * scale[g, n]``, ``g = k // group_size``."""
    weight = _cached_weight(codes, scale, zero, group_size, x.numel() // x.shape[-1]).to(x.dtype)
    out = x @ weight
    if bias is not None:
        out = out + bias
    return out


@qlinear.register_fake
def _qlinear_fake(x, codes, scale, zero, bias, group_size, bits):
    return x.new_empty((*x.shape[:-1], codes.shape[1]))


def _qlinear_setup(ctx, inputs, output):
    x, codes, scale, zero, bias, group_size, bits = inputs
    ctx.save_for_backward(codes, scale, zero)
    ctx.group_size = group_size
    ctx.has_bias = bias is not None


def _qlinear_backward(ctx, grad):
    codes, scale, zero = ctx.saved_tensors
    weight = dequantize_kn(codes, scale, zero, ctx.group_size).to(grad.dtype)
    grad_x = grad @ weight.T
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, grad_bias, None, None


qlinear.register_autograd(_qlinear_backward, setup_context=_qlinear_setup)


def _version(t: torch.Tensor) -> int:
    """In-place edit counter; inference tensors have none (they are never edited by qgraph)."""
    return -1 if t.is_inference() else t._version


CACHE_MAX_ROWS = 64
"""Calls with at most this many input rows (decode steps) memoize the dequantized weight."""


_RECENT: OrderedDict | None = None  # id(codes) -> (codes, key, weight) while reuse is on
_RECENT_SIZE = 0


@contextmanager
def reuse_dequantized(layers: int = 4):
    """Keep the dequantized weights of the last ``layers`` layers called, whatever the rows.

    The weight solver runs calibration windows one at a time through the same few layers
    (one window through a segment of the graph, then the next): without this every window
    dequantizes every layer again (SmolLM2 GPTQ: 3 s of 16 windows × 210 layers). The memory
    is bounded by ``layers`` float weights."""
    global _RECENT, _RECENT_SIZE
    saved = _RECENT, _RECENT_SIZE
    _RECENT, _RECENT_SIZE = OrderedDict(), layers
    try:
        yield
    finally:
        _RECENT, _RECENT_SIZE = saved


def drop_dequantized() -> None:
    """Empty :func:`reuse_dequantized`'s cache now: for a caller that knows the layers in it
    will not be called again (the weight solver, once every window has passed them)."""
    if _RECENT is not None:
        _RECENT.clear()


def _cached_weight(codes, scale, zero, group_size: int, rows: int) -> torch.Tensor:
    """Dequantized weight, memoized per codes tensor for calls with few rows.

    A decode step multiplies one token by the weight, so dequantizing on every call would cost
    more than the product; there the weight is kept (a float copy of the layer: generation
    trades memory for speed). A call with many rows (calibration, evaluation windows) spends
    far longer in the product than in dequantizing, so it keeps nothing: a float copy of every
    layer would double the process's memory during GPTQ and evaluation.

    Stored on the ``codes`` tensor object itself (so it is freed with it) and checked against
    the versions and identities of all three tensors, so an edited tensor never serves a stale
    weight.
    """
    key = (_version(codes), id(scale), _version(scale), id(zero), _version(zero), group_size)
    hit = getattr(codes, "_qgraph_dequant", None)
    if hit is not None and hit[0] == key:
        return hit[1]
    if _RECENT is not None and rows > CACHE_MAX_ROWS:
        recent = _RECENT.get(id(codes))
        if recent is not None and recent[0] is codes and recent[1] == key:
            _RECENT.move_to_end(id(codes))
            return recent[2]
        weight = dequantize_kn(codes, scale, zero, group_size)
        _RECENT[id(codes)] = (codes, key, weight)
        while len(_RECENT) > _RECENT_SIZE:
            _RECENT.popitem(last=False)
        return weight
    weight = dequantize_kn(codes, scale, zero, group_size)
    if rows <= CACHE_MAX_ROWS:
        codes._qgraph_dequant = (key, weight)
    elif hit is not None:
        del codes._qgraph_dequant  # stale
    return weight


def dequantize_kn(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Dequantize ``[K, N]`` codes whose scale/zero rows cover ``group_size`` input rows each."""
    rows = (
        codes.to(scale.dtype)
        - zero.to(scale.dtype).repeat_interleave(group_size, 0)[: codes.shape[0]]
    )
    return rows * scale.repeat_interleave(group_size, 0)[: codes.shape[0]]


@torch.library.custom_op(f"{LIB}::qconv", mutates_args=())
def qconv(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    bits: int,
) -> torch.Tensor:
    """Convolution (1-3 spatial dims) with ``W = (codes - zero[o]) * scale[o]``: int codes in
    the conv weight's own layout ``[out, in / groups, *kernel]``, one scale per output channel,
    so the ONNX lowering is ``DequantizeLinear(axis=0) → Conv``."""
    weight = dequantize_conv_weight(codes, scale, zero).to(x.dtype)
    conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d}.get(
        codes.dim(), torch.nn.functional.conv3d
    )
    return conv(x, weight, bias, stride, padding, dilation, groups)


@qconv.register_fake
def _qconv_fake(x, codes, scale, zero, bias, stride, padding, dilation, groups, bits):
    spatial = codes.dim() - 2
    sizes = [
        (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (codes.shape[2 + i] - 1) - 1) // stride[i]
        + 1
        for i in range(spatial)
    ]
    return x.new_empty((x.shape[0], codes.shape[0], *sizes))


def dequantize_conv_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:
    """``(codes - zero[o]) * scale[o]`` with per-output-channel ``scale``/``zero`` ``[out]``."""
    view = (-1,) + (1,) * (codes.dim() - 1)
    return (codes.to(scale.dtype) - zero.to(scale.dtype).view(view)) * scale.view(view)


@torch.library.custom_op(f"{LIB}::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Dynamic per-token (last-dim row) fake quantization of activations."""
    return qk.fake_quantize_per_token(x, bits, symmetric)


@quantize_per_token.register_fake
def _quantize_per_token_fake(x, bits, symmetric):
    return torch.empty_like(x)


def _ste_setup(ctx, inputs, output):
    pass


def _ste_backward_per_token(ctx, grad):
    return grad, None, None


quantize_per_token.register_autograd(_ste_backward_per_token, setup_context=_ste_setup)


@torch.library.custom_op(f"{LIB}::quantize_static", mutates_args=())
def quantize_static(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Static per-tensor fake quantization with calibrated ``scale``/``zero`` (0-d tensors)."""
    return qk.fake_quantize_static(x, scale, zero, bits)


@quantize_static.register_fake
def _quantize_static_fake(x, scale, zero, bits):
    return torch.empty_like(x)


def _static_setup(ctx, inputs, output):
    x, scale, zero, bits = inputs
    lo, hi = qk.qrange(bits)
    ctx.save_for_backward(x, scale, zero)
    ctx.lo, ctx.hi = lo, hi


def _static_backward(ctx, grad):
    # Straight-through inside the representable range, zero where the value was clipped.
    x, scale, zero = ctx.saved_tensors
    q = torch.round(x / scale.clamp_min(qk.SCALE_EPS)) + zero
    inside = (q >= ctx.lo) & (q <= ctx.hi)
    return grad * inside, None, None, None


quantize_static.register_autograd(_static_backward, setup_context=_static_setup)


@torch.library.custom_op(f"{LIB}::hadamard", mutates_args=())
def hadamard(
    x: torch.Tensor, signs: torch.Tensor | None, normalize: bool, transpose: bool = False
) -> torch.Tensor:
    """``(x * signs) @ H_n`` over the last dim (``/ sqrt(n)`` when normalized), in O(n log n).

    ``n = K·2^k`` with a known order ``K`` (:func:`qgraph.kernels.hadamard.hadamard_matrix`);
    the online rotation of a layer input is ``hadamard(x, s, True) = x @ Q`` with
    ``Q = diag(s) H_n / sqrt(n)`` orthogonal, and ``Qᵀ`` is folded into the layer's weight.
    ``transpose=True`` applies the adjoint ``(x @ H_nᵀ) * signs`` (the inverse when
    normalized); H_n is not symmetric when its order-K factor is not.
    """
    return fast_hadamard_transform(x, normalize, signs, transpose)


@hadamard.register_fake
def _hadamard_fake(x, signs, normalize, transpose=False):
    return torch.empty_like(x)


def _hadamard_setup(ctx, inputs, output):
    _, signs, normalize, transpose = inputs
    ctx.save_for_backward(signs)
    ctx.has_signs = signs is not None
    ctx.normalize = normalize
    ctx.transpose = transpose


def _hadamard_backward(ctx, grad):
    # y = x A with A = D H c (or its adjoint): dL/dx = dL/dy Aᵀ, the other direction, exactly
    (signs,) = ctx.saved_tensors
    grad_x = hadamard(grad, signs if ctx.has_signs else None, ctx.normalize, not ctx.transpose)
    return grad_x, None, None, None


hadamard.register_autograd(_hadamard_backward, setup_context=_hadamard_setup)
