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
    return _rms(x, weight, eps)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op(f"{LIB}::add_rms_norm", mutates_args=())
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum ``s = x + residual`` and its :func:`rms_norm`; returns both
    ``(normed, s)`` (the sum goes on along the residual stream)."""
    total = x + residual
    return _rms(total, weight, eps), total


@add_rms_norm.register_fake
def _add_rms_norm_fake(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op(f"{LIB}::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int = 0) -> torch.Tensor:
    """Rotary embedding in the "rotate half" convention, ``x·c + cat(−x₂, x₁)·s`` with
    ``c = cat(cos, cos)``, ``s = cat(sin, sin)``; ``cos``/``sin`` are ``[B, S, D/2]``, the first
    halves of tables whose two halves are equal.

    ``x`` is ``[B, H, S, D]``, or ``[B, S, H·D]`` with ``heads = H`` (the projection's own
    layout, which spares the file a transpose and a reshape per tensor)."""
    if x.dim() == 3:
        b, length, width = x.shape
        out = _rotate(x.view(b, length, heads, width // heads), cos, sin, head_dim=2)
        return out.reshape(b, length, width)
    return _rotate(x, cos, sin, head_dim=1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The rotation of a 4-D ``x`` whose heads are on ``head_dim`` (the op order of the trace:
    ``x·c``, then ``rotate_half(x)·s``, then the sum)."""
    half = x.shape[-1] // 2
    c = torch.cat([cos, cos], dim=-1).unsqueeze(head_dim)
    s = torch.cat([sin, sin], dim=-1).unsqueeze(head_dim)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * c + rotated * s


@rotary.register_fake
def _rotary_fake(x, cos, sin, heads=0):
    return torch.empty_like(x)


def _repeat_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, kv, T, D] → [B, kv·groups, T, D]``, each head repeated ``groups`` times in place
    (``unsqueeze → expand → reshape``, the repeat Hugging Face traces)."""
    if groups == 1:
        return t
    b, kv, length, d = t.shape
    return t.unsqueeze(2).expand(b, kv, groups, length, d).reshape(b, kv * groups, length, d)


def _heads_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, S, H·D]`` → ``[B, H, S, D]`` (a view)."""
    b, length, width = t.shape
    return t.view(b, length, heads, width // heads).transpose(1, 2)


@torch.library.custom_op(f"{LIB}::cached_attention", mutates_args=())
def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    heads: int = 0,
    kv_heads: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over the cache and the new keys and values.

    ``q [B, H, S, D]``, ``k``/``v [B, kv, S, D]`` (or all three ``[B, S, heads·D]`` with
    ``heads``/``kv_heads`` given, and then the output is too), ``past_* [B, kv, P, D]``,
    ``mask [B, 1, S, P + S]`` (bool, True = attend). Returns the output and the grown cache
    ``present_k``, ``present_v`` ``[B, kv, P + S, D]``.
    """
    flat = q.dim() == 3
    if flat:
        q, k, v = _heads_first(q, heads), _heads_first(k, kv_heads), _heads_first(v, kv_heads)
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
    if flat:
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
    return out, present_k, present_v


@cached_attention.register_fake
def _cached_attention_fake(q, k, v, past_k, past_v, mask, scale, heads=0, kv_heads=0):
    if q.dim() == 3:
        k, v = _heads_first(k, kv_heads), _heads_first(v, kv_heads)
    present_k = torch.cat([past_k, k], dim=2)
    present_v = torch.cat([past_v, v], dim=2)
    return torch.empty_like(q), present_k, present_v


@torch.library.custom_op(f"{LIB}::group_query_attention", mutates_args=())
def group_query_attention(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    seqlens_k: torch.Tensor,
    total: torch.Tensor,
    scale: float,
    heads: int,
    kv_heads: int,
    cos_cache: torch.Tensor | None = None,
    sin_cache: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX Runtime's ``GroupQueryAttention`` on the flat ``[B, S, H·D]`` layout: what a decoder
    exported with ``attention="gqa"`` runs. With ``k`` and ``v`` None, ``q`` is the packed
    ``[B, S, (H + 2·KV)·D]`` output of one q/k/v projection.

    With ``cos_cache``/``sin_cache`` (``[positions, D/2]``) it first applies the rotary
    embedding to queries and keys, as :func:`rotary` does, at the kernel's positions: ``i`` for
    a first prompt, ``L − S + i`` after a cache.

    Unlike :func:`cached_attention` it takes no mask: row ``b`` holds ``L = seqlens_k[b] + 1``
    real tokens, all at the start of the cache (right padding only), and ``total`` (a 0-d
    int32 tensor) is the longest row's length. The new keys and values are written at
    ``L − S`` (at 0 for a first prompt, ``S == total``) into a cache of ``max(total, P)``
    entries, so a ``past_*`` buffer longer than ``total`` is written in place by ONNX Runtime
    (``past_present_share_buffer``) and grown by concatenation otherwise.
    """
    q, k, v = _unpacked(q, k, v, heads, kv_heads)
    b, length, _ = q.shape
    qh, kh, vh = _heads_first(q, heads), _heads_first(k, kv_heads), _heads_first(v, kv_heads)
    if cos_cache is not None and sin_cache is not None:
        positions = _gqa_positions(seqlens_k, length, int(total))
        cos, sin = cos_cache[positions], sin_cache[positions]  # [B, S, D/2]
        qh = _rotate(qh, cos, sin, head_dim=1)
        kh = _rotate(kh, cos, sin, head_dim=1)
    size = max(int(total), past_k.shape[2])
    present_k = past_k.new_zeros(b, kv_heads, size, past_k.shape[3])
    present_v = past_v.new_zeros(b, kv_heads, size, past_v.shape[3])
    first_prompt = length == int(total)
    out = torch.zeros_like(qh)
    groups = heads // kv_heads
    for row in range(b):
        real = int(seqlens_k[row]) + 1
        past = 0 if first_prompt else real - length
        present_k[row, :, :past] = past_k[row, :, :past]
        present_v[row, :, :past] = past_v[row, :, :past]
        present_k[row, :, past : past + length] = kh[row]
        present_v[row, :, past : past + length] = vh[row]
        keys = torch.arange(past + length)
        mask = keys[None, :] <= past + torch.arange(length)[:, None]
        out[row] = torch.nn.functional.scaled_dot_product_attention(
            qh[row : row + 1],
            _repeat_heads(present_k[row : row + 1, :, : past + length], groups),
            _repeat_heads(present_v[row : row + 1, :, : past + length], groups),
            attn_mask=mask,
            scale=scale,
        )[0]
    return out.transpose(1, 2).reshape(b, length, -1), present_k, present_v


def _gqa_positions(seqlens_k: torch.Tensor, length: int, total: int) -> torch.Tensor:
    """``[B, S]`` rotary positions as ``GroupQueryAttention`` derives them from ``seqlens_k``."""
    steps = torch.arange(length)
    if length == total:  # a first prompt
        return steps.expand(seqlens_k.shape[0], length)
    return (seqlens_k.long() + 1 - length)[:, None] + steps


def _unpacked(q, k, v, heads: int, kv_heads: int):
    """``(q, k, v)``; with ``k`` and ``v`` None, ``q`` is the packed ``[B, S, (H + 2·KV)·D]``
    projection and is split (``GroupQueryAttention``'s packed-QKV input)."""
    if k is not None and v is not None:
        return q, k, v
    head = q.shape[-1] // (heads + 2 * kv_heads)
    return q.split([heads * head, kv_heads * head, kv_heads * head], dim=-1)


@group_query_attention.register_fake
def _group_query_attention_fake(
    q,
    k,
    v,
    past_k,
    past_v,
    seqlens_k,
    total,
    scale,
    heads,
    kv_heads,
    cos_cache=None,
    sin_cache=None,
):
    # traced with a cache grown by concatenation: ``total = P + S``
    q, k, v = _unpacked(q, k, v, heads, kv_heads)
    k, v = _heads_first(k, kv_heads), _heads_first(v, kv_heads)
    out = q.new_empty(q.shape)
    return out, torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
