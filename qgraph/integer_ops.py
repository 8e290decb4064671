"""Integer forms of a per-token-quantized linear layer, used only on the way to ONNX.

The torch graph keeps activation quantization as fake quantization (``quantize_per_token``
then ``qlinear``), which is what calibration and the passes need. ONNX Runtime, though, has
integer GEMM kernels (``MatMulInteger`` with a uint8 left operand runs MLAS' u8s8 kernels), so
the exporter rewrites the pair into these two ops (:mod:`qgraph.backends.onnx_integer`):

* ``quantize_per_token_u8(x, bits, symmetric) -> (u, scale, offset)``: the same codes as
  ``quantize_per_token``, shifted to unsigned (``u = q - qmin``, uint8) with
  ``offset = zero - qmin``, so that the activation is ``(u - offset) * scale``;
* ``qlinear_u8(u, scale, offset, codes, w_scale, colsum, bias)``: for symmetric per-channel
  weight codes ``[K, N]`` with ``W = codes * w_scale``,
  ``y = (u @ codes - offset * colsum) * scale * w_scale + bias`` with ``colsum = codes.sum(0)``:
  one integer product, then a per-row and a per-column scale.

Both compute the fake-quantized layer's values; only the float rounding of the product differs
(integer sums are exact).
"""

from __future__ import annotations

import torch

from .kernels import quant as qk

LIB = "qgraph"


@torch.library.custom_op(f"{LIB}::quantize_per_token_u8", mutates_args=())
def quantize_per_token_u8(
    x: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token codes of x as uint8 ``q - qmin``, the scale, and ``zero - qmin`` (float)."""
    qmin, _ = qk.qrange(bits)
    codes, scale, zero = qk.encode_per_token(x, bits, symmetric)
    u = (codes.to(torch.int16) - qmin).to(torch.uint8)
    return u, scale, zero.to(scale.dtype) - qmin


@quantize_per_token_u8.register_fake
def _quantize_per_token_u8_fake(x, bits, symmetric):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    row = (*x.shape[:-1], 1)
    return (
        x.new_empty(x.shape, dtype=torch.uint8),
        x.new_empty(row, dtype=dtype),
        x.new_empty(row, dtype=dtype),
    )


@torch.library.custom_op(f"{LIB}::qlinear_u8", mutates_args=())
def qlinear_u8(
    u: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    codes: torch.Tensor,
    w_scale: torch.Tensor,
    colsum: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``(u @ codes - offset * colsum) * scale * w_scale + bias``: the integer part exact (as
    int32 in ONNX), the scaling in float32; ``colsum`` is int32."""
    exact = u.to(torch.float64) @ codes.to(torch.float64)  # integer-valued, exact below 2^53
    exact = exact - offset.to(torch.float64) * colsum.to(torch.float64)
    out = exact.to(torch.float32) * scale.float() * w_scale.float()
    if bias is not None:
        out = out + bias
    return out


@qlinear_u8.register_fake
def _qlinear_u8_fake(u, scale, offset, codes, w_scale, colsum, bias):
    return u.new_empty((*u.shape[:-1], codes.shape[1]), dtype=torch.float32)
