"""Fused decoder ops: one node each for RMSNorm, rotary embedding and cached attention.

A traced Llama spends ~60 small ops per layer on norms, RoPE, the GQA repeat and attention. In
PyTorch that costs little; in an ONNX file every node is a kernel launch, and at 4 bits a
decode step is dominated by them (qgraph's W4A16 file ran 2025 nodes per step against the
ONNX Runtime GenAI builder's 309). :mod:`qgraph.fuse_decoder` replaces those subgraphs with the
ops below, whose ONNX lowerings (:mod:`qgraph.backends.onnx_fused`) are the opset-23
``RMSNormalization``, ``RotaryEmbedding`` and ``Attention``.

Each op's PyTorch implementation performs the replaced subgraph's own aten ops in the same
order, so a fused graph computes bit-for-bit what the unfused one does (tested).
"""

from __future__ import annotations

import torch

from .ops import LIB


@torch.library.custom_op(f"{LIB}::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x², -1) + eps))``, as Hugging Face's Llama RMSNorm traces."""
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op(f"{LIB}::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [B, H, S, D]`` in the "rotate half" convention,
    ``x·c + cat(−x₂, x₁)·s`` with ``c = cat(cos, cos)``, ``s = cat(sin, sin)``: ``cos``/``sin``
    are ``[B, S, D/2]``, the first halves of tables whose two halves are equal."""
    half = x.shape[-1] // 2
    c = torch.cat([cos, cos], dim=-1).unsqueeze(1)
    s = torch.cat([sin, sin], dim=-1).unsqueeze(1)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * c + rotated * s


@rotary.register_fake
def _rotary_fake(x, cos, sin):
    return torch.empty_like(x)


def _repeat_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, kv, T, D] → [B, kv·groups, T, D]``, each head repeated ``groups`` times in place
    (``unsqueeze → expand → reshape``, the repeat Hugging Face traces)."""
    if groups == 1:
        return t
    b, kv, length, d = t.shape
    return t.unsqueeze(2).expand(b, kv, groups, length, d).reshape(b, kv * groups, length, d)


@torch.library.custom_op(f"{LIB}::cached_attention", mutates_args=())
def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of ``q [B, H, S, D]`` over the cache and the new keys and values.

    ``k``, ``v`` are the new tokens' ``[B, kv, S, D]``, ``past_*`` the cache ``[B, kv, P, D]``,
    ``mask [B, 1, S, P + S]`` (bool, True = attend). Returns the output ``[B, H, S, D]`` and
    the grown cache ``present_k``, ``present_v``.
    """
    present_k = torch.cat([past_k, k], dim=2)
    present_v = torch.cat([past_v, v], dim=2)
    groups = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q,
        _repeat_heads(present_k, groups),
        _repeat_heads(present_v, groups),
        attn_mask=mask,
        scale=scale,
    )
    return out, present_k, present_v


@cached_attention.register_fake
def _cached_attention_fake(q, k, v, past_k, past_v, mask, scale):
    present_k = torch.cat([past_k, k], dim=2)
    present_v = torch.cat([past_v, v], dim=2)
    return torch.empty_like(q), present_k, present_v
