"""ONNX lowerings of qgraph's custom ops, for ``torch.onnx.export(custom_translation_table=...)``.

Each lowering is a plain Python function of onnxscript opset-21 ops: the dynamo exporter traces
it eagerly (an ``@onnxscript.script`` function fails as a translation with torch 2.13 +
onnxscript 0.7). Scalar constants are created with explicit dtypes (the exporter's
inference of a Python number's dtype depends on whether the op's other input types are known).

* ``qlinear`` becomes ``DequantizeLinear(axis=0, block_size) → MatMul → Add``, the pattern ONNX
  Runtime fuses into ``com.microsoft::MatMulNBits``. For ``bits <= 4`` codes and zero points are
  wrapped in ``Cast(to=INT4)``; :func:`qgraph.backends.onnx_export.postprocess` folds those casts
  of constants into packed INT4 initializers, range-checked (the exporter's own optimizer folds
  only small tensors, and wraps out-of-range values silently).
* ``qconv`` becomes ``DequantizeLinear(axis=0) → Conv``.
* ``quantize_static`` at 8 bits on float32 becomes a ``QuantizeLinear → DequantizeLinear`` pair
  (the QDQ form ONNX Runtime turns into integer kernels).
* ``quantize_per_token`` / other ``quantize_static`` become standard ops that repeat the torch kernels'
  arithmetic step by step (same operation order, same eps), so ONNX Runtime and torch agree to
  float rounding. ONNX ``Round`` rounds half to even, like ``torch.round``.
* ``hadamard`` becomes one ``qgraph::Hadamard{n}…`` node; ``postprocess`` adds its model-local
  function of standard ops (see :mod:`qgraph.backends.onnx_hadamard`).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
import torch
from onnxscript import opset21 as op

import qgraph.ops  # noqa: F401  (registers torch.ops.qgraph.*)
import qgraph.sparse_ops  # noqa: F401
from qgraph.kernels import quant as qk

from .onnx_hadamard import hadamard
from .onnx_sparse import SPARSE_TRANSLATIONS

__all__ = [
    "CUSTOM_TRANSLATIONS",
    "hadamard",
    "qconv",
    "qlinear",
    "quantize_per_token",
    "quantize_static",
]


def _cast_like_if_needed(value, like):
    """Insert a CastLike only when dtypes are known to differ (keeps the fusable pattern clean)."""
    if value.dtype is not None and like.dtype is not None and value.dtype == like.dtype:
        return value
    return op.CastLike(value, like)


def qlinear(x, codes, scale, zero, bias, group_size: int, bits: int):
    """``MatMul(x, DequantizeLinear(codes, scale, zero, axis=0, block_size=group_size)) + bias``."""
    if bits <= 4:
        codes = op.Cast(codes, to=ir.DataType.INT4)
        zero = op.Cast(zero, to=ir.DataType.INT4)
    weight = op.DequantizeLinear(codes, scale, zero, axis=0, block_size=group_size)
    # torch dequantizes in scale's dtype, then converts to x's dtype: do the same.
    out = op.MatMul(x, _cast_like_if_needed(weight, x))
    if bias is not None:
        out = op.Add(out, bias)
    return out


def qconv(x, codes, scale, zero, bias, stride, padding, dilation, groups: int, bits: int):
    """``Conv(x, DequantizeLinear(codes, scale, zero, axis=0), bias)``: with a QDQ input and
    output (8-bit static activations) ONNX Runtime runs it as ``QLinearConv``."""
    if bits <= 4:
        codes = op.Cast(codes, to=ir.DataType.INT4)
        zero = op.Cast(zero, to=ir.DataType.INT4)
    elif bits == 8:
        codes, zero = unsigned_codes(codes), unsigned_codes(zero)
    weight = _cast_like_if_needed(op.DequantizeLinear(codes, scale, zero, axis=0), x)
    pads = list(padding) * 2
    args = (x, weight) if bias is None else (x, weight, bias)
    return op.Conv(*args, strides=list(stride), pads=pads, dilations=list(dilation), group=groups)


def unsigned_codes(codes):
    """int8 codes as uint8 ``codes + 128`` (with the zero point shifted alike, the same values).

    ONNX Runtime's x86 kernels multiply uint8 activations by int8 weights with ``vpmaddubsw``,
    whose 16-bit pair sums saturate (255·127·2 > 2¹⁵) on CPUs without VNNI (measured: an int8
    CNN lost 5 dB SQNR, an int8 LLM layer 0.24 in its logits on an AVX2 EPYC); uint8 × uint8
    runs the exact 16-bit path on every CPU. Constant folding stores the result as uint8."""
    wide = op.Cast(codes, to=ir.DataType.INT16)
    return op.Cast(op.Add(wide, op.Constant(value=ir.tensor(128, dtype=ir.DataType.INT16))),
                   to=ir.DataType.UINT8)  # fmt: skip


def _param_dtype(x) -> ir.DataType:
    """The dtype the torch kernels compute quantization parameters in (float32 or float64)."""
    return ir.DataType.DOUBLE if x.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT


def _const(value: float, dtype: ir.DataType):
    """A scalar constant of an explicit dtype: the exporter only infers a Python number's dtype
    from the op's other inputs when their types are already known, which is not always so."""
    return op.Constant(value=ir.tensor(value, dtype=dtype))


def _cast(value, dtype: ir.DataType):
    return value if value.dtype == dtype else op.Cast(value, to=dtype)


def _fake_quantize(xf, scale, zero, bits: int, dtype: ir.DataType):
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s``; ``zero=None`` means z = 0."""
    qmin, qmax = (_const(float(v), dtype) for v in qk.qrange(bits))
    q = op.Round(op.Div(xf, scale))
    if zero is not None:
        q = op.Add(q, zero)
    q = op.Clip(q, qmin, qmax)
    if zero is not None:
        q = op.Sub(q, zero)
    return op.Mul(q, scale)


def per_token_codes(x, bits: int, symmetric: bool):
    """Dynamic per-row quantization up to the codes, as ``qk.encode_per_token`` computes it:
    returns ``(q, scale, zero, dtype)`` with float codes ``q`` (``zero`` is None when
    symmetric). Parameters are in float32 (float64 for float64 inputs) like the kernel."""
    qmin, qmax = qk.qrange(bits)
    dtype = _param_dtype(x)
    xf = _cast(x, dtype)
    axes = op.Constant(value=ir.tensor([-1], dtype=ir.DataType.INT64))
    eps = _const(qk.SCALE_EPS, dtype)
    lo_c, hi_c = _const(float(qmin), dtype), _const(float(qmax), dtype)
    if symmetric:
        amax = op.ReduceMax(op.Abs(xf), axes, keepdims=1)
        scale = op.Max(op.Div(amax, hi_c), eps)
        zero = None
    else:
        zero_f = _const(0.0, dtype)
        lo = op.Min(op.ReduceMin(xf, axes, keepdims=1), zero_f)
        hi = op.Max(op.ReduceMax(xf, axes, keepdims=1), zero_f)
        scale = op.Max(op.Div(op.Sub(hi, lo), _const(float(2**bits - 1), dtype)), eps)
        zero = op.Clip(op.Round(op.Sub(lo_c, op.Div(lo, scale))), lo_c, hi_c)
    q = op.Round(op.Div(xf, scale))
    if zero is not None:
        q = op.Add(q, zero)
    return op.Clip(q, lo_c, hi_c), scale, zero, dtype


def quantize_per_token(x, bits: int, symmetric: bool):
    """Dynamic per-row fake quantization; mirrors ``qk.fake_quantize_per_token``: the codes of
    :func:`per_token_codes`, then ``(q - zero) * scale`` (the symmetric case skips ``- 0``,
    which cannot change a value)."""
    q, scale, zero, _ = per_token_codes(x, bits, symmetric)
    if zero is not None:
        q = op.Sub(q, zero)
    return _cast(op.Mul(q, scale), x.dtype)


def quantize_static(x, scale, zero, bits: int):
    """Static per-tensor fake quantization; mirrors ``qk.fake_quantize_static``.

    ``zero`` may be int8 or float; both are converted to the parameter dtype first.
    """
    dtype = _param_dtype(x)
    s = op.Max(_cast(scale, dtype), _const(qk.SCALE_EPS, dtype))
    if bits == 8 and x.dtype == ir.DataType.FLOAT:
        # QuantizeLinear rounds half to even and saturates like the kernel; as a QDQ pair
        # ONNX Runtime fuses it with the integer kernels around it (QLinearConv, ...)
        # uint8 codes (the signed codes + 128), the activation type ONNX Runtime's integer
        # kernels take; constant folding turns the zero point into a uint8 initializer
        z8 = op.Cast(op.Add(_cast(zero, dtype), _const(128.0, dtype)), to=ir.DataType.UINT8)
        return op.DequantizeLinear(op.QuantizeLinear(x, s, z8), s, z8)
    z = _cast(zero, dtype)
    return _cast(_fake_quantize(_cast(x, dtype), s, z, bits, dtype), x.dtype)


CUSTOM_TRANSLATIONS: dict[Callable, Callable] = {
    torch.ops.qgraph.qlinear.default: qlinear,
    torch.ops.qgraph.qconv.default: qconv,
    torch.ops.qgraph.quantize_per_token.default: quantize_per_token,
    torch.ops.qgraph.quantize_static.default: quantize_static,
    torch.ops.qgraph.hadamard.default: hadamard,
}
"""``torch.ops.qgraph.<op>.default`` → ONNX translation, for ``custom_translation_table``."""

CUSTOM_TRANSLATIONS.update(SPARSE_TRANSLATIONS)
