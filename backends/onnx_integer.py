"""Integer activation paths for ONNX Runtime: per-token-quantized linear layers as
``MatMulInteger``.

A per-token activation quantizer feeding per-channel symmetric weights is, in the torch graph,
float arithmetic (``quantize_per_token`` → ``qlinear``). :func:`integer_activation_graph`
rewrites a copy of such a graph into :mod:`qgraph.integer_ops`, and the lowerings here turn
those into ``DynamicQuantize``-style standard ops plus one ``MatMulInteger`` per layer with a
uint8 left operand (an int8 left operand falls back to a reference loop ~15× slower, measured)
and the weight codes shifted to uint8 with zero point 128 (:func:`unsigned_codes`: MLAS' u8s8
GEMM saturates on x86 CPUs without VNNI). The activation's row zero point and the unsigned
shift are taken out of the integer product with the weight codes' column sums, so the
activation side needs no zero point. The quantizer is computed once even when several
layers share it (q/k/v, gate/up).

Eligible: activation bits ≤ 8 and weights symmetric with one scale per output channel (a group
grid would need one product per group). Other layers keep the float path.
"""

from __future__ import annotations

import operator

import onnx_ir as ir
import torch
from onnxscript import opset21 as op
from torch import fx

import qgraph.integer_ops  # noqa: F401  (registers torch.ops.qgraph.*_u8)
from qgraph.graph_edits import get_tensor
from qgraph.kernels import quant as qk

from .onnx_lowering import _cast, _const, per_token_codes, unsigned_codes

__all__ = ["INTEGER_TRANSLATIONS", "integer_activation_graph"]

PER_TOKEN = torch.ops.qgraph.quantize_per_token.default
QLINEAR = torch.ops.qgraph.qlinear.default
PER_TOKEN_U8 = torch.ops.qgraph.quantize_per_token_u8.default
QLINEAR_U8 = torch.ops.qgraph.qlinear_u8.default


def _attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads, None for any other argument."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = get_tensor(gm, node.target)
    return value if isinstance(value, torch.Tensor) else None


def _integer_weight(gm: fx.GraphModule, user: fx.Node, source: fx.Node) -> bool:
    """Whether ``user`` is a qlinear on ``source`` with symmetric per-channel weights."""
    if user.target is not QLINEAR or user.args[0] is not source or user.kwargs:
        return False
    codes, scale, zero = (_attr(gm, a) for a in user.args[1:4])
    if codes is None or scale is None or zero is None or codes.dtype != torch.int8:
        return False
    # per-channel scales are stored as identical row blocks (formats.storage_group) so that
    # ONNX Runtime can fuse the float path into MatMulNBits: one distinct row is per channel
    return torch.equal(scale, scale[:1].expand_as(scale)) and not bool(zero.any())


def integer_activation_graph(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` whose eligible per-token quantized layers use the integer ops, and how
    many layers were rewritten. ``gm`` itself is not changed (the copy shares its tensors)."""
    graph = fx.Graph()
    env = graph.graph_copy(gm.graph, {})
    if env is not None:
        graph.output(env)
    copy = fx.GraphModule(gm, graph)
    rewritten = 0
    for node in list(copy.graph.nodes):
        if node.op != "call_function" or node.target is not PER_TOKEN:
            continue
        x, bits, symmetric = node.args
        users = list(node.users)
        if bits > 8 or not users or not all(_integer_weight(copy, u, node) for u in users):
            continue
        with copy.graph.inserting_after(node):
            quant = copy.graph.call_function(PER_TOKEN_U8, (x, bits, symmetric))
        with copy.graph.inserting_after(quant):
            parts = [copy.graph.call_function(operator.getitem, (quant, i)) for i in range(3)]
        for user in users:
            codes_node = user.args[1]
            codes, scale = _attr(copy, codes_node), _attr(copy, user.args[2])
            colsum_name, scale_name = f"_qgraph_colsum_{rewritten}", f"_qgraph_wscale_{rewritten}"
            copy.register_buffer(colsum_name, codes.to(torch.int32).sum(0, dtype=torch.int32))
            copy.register_buffer(scale_name, scale[:1].clone())
            with copy.graph.inserting_before(user):
                colsum = copy.graph.get_attr(colsum_name)
                w_scale = copy.graph.get_attr(scale_name)
                fused = copy.graph.call_function(
                    QLINEAR_U8, (*parts, codes_node, w_scale, colsum, user.args[4])
                )
            user.replace_all_uses_with(fused)
            copy.graph.erase_node(user)
            rewritten += 1
        copy.graph.erase_node(node)
    copy.graph.lint()
    copy.recompile()
    return copy, rewritten


def quantize_per_token_u8(x, bits: int, symmetric: bool):
    """The float path's per-token quantizer (:func:`onnx_lowering.per_token_codes`), stopped at
    the codes: returns ``(uint8 q - qmin, scale, zero - qmin)``."""
    q, scale, zero, dtype = per_token_codes(x, bits, symmetric)
    qmin = _const(float(qk.qrange(bits)[0]), dtype)
    offset = op.Expand(op.Neg(qmin), op.Shape(scale)) if zero is None else op.Sub(zero, qmin)
    return op.Cast(op.Sub(q, qmin), to=ir.DataType.UINT8), scale, offset


def qlinear_u8(u, scale, offset, codes, w_scale, colsum, bias):
    """``MatMulInteger(u, codes)`` (uint8 × int8 → int32) minus ``offset · colsum`` in int32
    (exact: a float32 difference of two sums above 2^24 would round), then the two scales in
    float32."""
    no_zero = op.Constant(value=ir.tensor(0, dtype=ir.DataType.UINT8))
    weight_zero = op.Constant(value=ir.tensor(128, dtype=ir.DataType.UINT8))
    product = op.MatMulInteger(u, unsigned_codes(codes), no_zero, weight_zero)
    shift = op.Mul(op.Cast(offset, to=ir.DataType.INT32), colsum)
    out = op.Cast(op.Sub(product, shift), to=ir.DataType.FLOAT)
    out = op.Mul(op.Mul(out, _cast(scale, ir.DataType.FLOAT)), _cast(w_scale, ir.DataType.FLOAT))
    if bias is not None:
        out = op.Add(out, bias)
    return out


INTEGER_TRANSLATIONS = {
    PER_TOKEN_U8: quantize_per_token_u8,
    QLINEAR_U8: qlinear_u8,
}
