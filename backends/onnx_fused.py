"""ONNX lowerings of the fused decoder ops (:mod:`qgraph.fused_ops`), as opset-23 ops.

* ``rms_norm`` → ``RMSNormalization(axis=-1, stash_type=1)``;
* ``add_rms_norm`` → ONNX Runtime's ``com.microsoft::SkipSimplifiedLayerNormalization`` (the
  residual add and the norm in one kernel; ONNX has no standard op for it);
* ``rotary`` → ``RotaryEmbedding`` on ``[B, S, H·D]`` (``num_heads``) or ``[B, H, S, D]``, with
  the first halves of the graph's own ``cos``/``sin`` (``[B, S, D/2]``, no position ids), so
  any RoPE scaling the model computes is kept;
* ``cached_attention`` → ``Attention`` on the same layouts (head counts as attributes for the
  3-D one) with the bool mask and the cache as ``past_key``/``past_value``; its
  ``present_key``/``present_value`` are the grown cache;
* ``group_query_attention`` → ONNX Runtime's ``com.microsoft::GroupQueryAttention``, which
  writes new keys and values in place when the runtime binds one buffer as past and present;
  with cos/sin tables it also applies RoPE (``do_rotary=1``), where no R3 sits in between.

A file containing them needs opset 23 (ONNX Runtime ≥ 1.23 runs all three on CPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import onnx
import torch
from onnxscript import opset23 as op
from onnxscript import values

import qgraph.fused_ops  # noqa: F401  (registers the ops)

MS_DOMAIN = "com.microsoft"
OPSET = 23
"""The opset a file with fused decoder ops is exported at."""


def rms_norm(x, weight, eps: float):
    return op.RMSNormalization(x, weight, axis=-1, epsilon=eps, stash_type=1)


@functools.cache
def _skip_norm_op() -> values.Op:
    """``com.microsoft::SkipSimplifiedLayerNormalization`` (ONNX Runtime's fused residual add +
    RMSNorm): the exporter's recorder needs a schema, and contrib ops have none in ``onnx``."""
    param = onnx.defs.OpSchema.FormalParameter
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    schema = onnx.defs.OpSchema(
        "SkipSimplifiedLayerNormalization",
        MS_DOMAIN,
        1,
        inputs=[param("input", "T"), param("skip", "T"), param("gamma", "T")],
        outputs=[
            param("output", "T"),
            param("mean", "U", param_option=optional),
            param("inv_std_var", "U", param_option=optional),
            param("input_skip_bias_sum", "T", param_option=optional),
        ],
        type_constraints=[("T", ["tensor(float)"], ""), ("U", ["tensor(float)"], "")],
        attributes=[onnx.defs.OpSchema.Attribute("epsilon", onnx.defs.OpSchema.AttrType.FLOAT)],
    )
    return values.Op(values.Opset(MS_DOMAIN, 1), "SkipSimplifiedLayerNormalization", schema)


def add_rms_norm(x, residual, weight, eps: float):
    outputs = _skip_norm_op()(x, residual, weight, epsilon=eps)
    return outputs[0], outputs[3]


def rotary(x, cos, sin, heads: int = 0):
    if heads > 0:  # [B, S, H·D]
        return op.RotaryEmbedding(x, cos, sin, num_heads=heads)
    return op.RotaryEmbedding(x, cos, sin)


def cached_attention(
    q, k, v, past_k, past_v, mask, scale: float, heads: int = 0, kv_heads: int = 0
):
    heads_attrs = {"q_num_heads": heads, "kv_num_heads": kv_heads} if heads > 0 else {}
    outputs = op.Attention(q, k, v, mask, past_k, past_v, scale=scale, **heads_attrs)
    out, present_k, present_v = outputs[:3]
    return out, present_k, present_v


@functools.cache
def _group_query_op() -> values.Op:
    """``com.microsoft::GroupQueryAttention`` with the inputs a decoder uses (schema as for
    :func:`_skip_norm_op`)."""
    param = onnx.defs.OpSchema.FormalParameter
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    attr = onnx.defs.OpSchema.Attribute
    kind = onnx.defs.OpSchema.AttrType
    schema = onnx.defs.OpSchema(
        "GroupQueryAttention",
        MS_DOMAIN,
        1,
        inputs=[param("query", "T")]
        + [param(n, "T", param_option=optional) for n in ("key", "value")]  # packed QKV: none
        + [param(n, "T") for n in ("past_key", "past_value")]
        + [param("seqlens_k", "M"), param("total_sequence_length", "M")]
        + [param(n, "T", param_option=optional) for n in ("cos_cache", "sin_cache")],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[
            attr("num_heads", kind.INT),
            attr("kv_num_heads", kind.INT),
            attr("scale", kind.FLOAT),
            attr("do_rotary", kind.INT),
        ],
    )
    return values.Op(values.Opset(MS_DOMAIN, 1), "GroupQueryAttention", schema)


def group_query_attention(
    q, k, v, past_k, past_v, seqlens_k, total, scale: float, heads: int, kv_heads: int,
    cos_cache=None, sin_cache=None,
):  # fmt: skip
    if cos_cache is None:
        outputs = _group_query_op()(
            q, k, v, past_k, past_v, seqlens_k, total,
            num_heads=heads, kv_num_heads=kv_heads, scale=scale, do_rotary=0,
        )  # fmt: skip
    else:  # rotary inside, non-interleaved ("rotate half", as qgraph.fused_ops.rotary)
        outputs = _group_query_op()(
            q, k, v, past_k, past_v, seqlens_k, total, cos_cache, sin_cache,
            num_heads=heads, kv_num_heads=kv_heads, scale=scale, do_rotary=1,
        )  # fmt: skip
    return outputs[0], outputs[1], outputs[2]


FUSED_TRANSLATIONS: dict[Callable, Callable] = {
    torch.ops.qgraph.add_rms_norm.default: add_rms_norm,
    torch.ops.qgraph.rms_norm.default: rms_norm,
    torch.ops.qgraph.rotary.default: rotary,
    torch.ops.qgraph.cached_attention.default: cached_attention,
    torch.ops.qgraph.group_query_attention.default: group_query_attention,
}
