"""ONNX lowerings of the fused decoder ops (:mod:`qgraph.fused_ops`), as opset-23 ops.

* ``rms_norm`` → ``RMSNormalization(axis=-1, stash_type=1)``;
* ``rotary`` → ``RotaryEmbedding`` on ``[B, H, S, D]`` with the first halves of the graph's own
  ``cos``/``sin`` (``[B, S, D/2]``, no position ids), so any RoPE scaling the model computes is
  kept;
* ``cached_attention`` → ``Attention`` on 4-D inputs with the bool mask and the cache as
  ``past_key``/``past_value``; its ``present_key``/``present_value`` are the grown cache.

A file containing them needs opset 23 (ONNX Runtime ≥ 1.23 runs all three on CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from onnxscript import opset23 as op

import qgraph.fused_ops  # noqa: F401  (registers the ops)

OPSET = 23
"""The opset a file with fused decoder ops is exported at."""


def rms_norm(x, weight, eps: float):
    return op.RMSNormalization(x, weight, axis=-1, epsilon=eps, stash_type=1)


def rotary(x, cos, sin):
    return op.RotaryEmbedding(x, cos, sin)


def cached_attention(q, k, v, past_k, past_v, mask, scale: float):
    outputs = op.Attention(q, k, v, mask, past_k, past_v, scale=scale)
    out, present_k, present_v = outputs[:3]
    return out, present_k, present_v


FUSED_TRANSLATIONS: dict[Callable, Callable] = {
    torch.ops.qgraph.rms_norm.default: rms_norm,
    torch.ops.qgraph.rotary.default: rotary,
    torch.ops.qgraph.cached_attention.default: cached_attention,
}
