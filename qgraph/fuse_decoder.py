"""Replace a cached decoder's norms, rotary embeddings and attentions with fused ops.

Used on the graph an ONNX decoder is exported from (:func:`qgraph.kv_cache.cached_decoder`),
so that the file runs one ``RMSNormalization``, ``RotaryEmbedding`` and ``Attention`` node where
the trace had ~60 small ops per layer (:mod:`qgraph.fused_ops`). Matching is structural and
conservative: a subgraph that does not have exactly the expected form (e.g. partial rotary,
a norm over another axis, a cache that is not a plain float concatenation) is left as it is,
and the fused graph computes bit-for-bit what the unfused one does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import accumulate
from operator import getitem

import torch
from torch import fx

from . import fused_ops  # noqa: F401  (registers torch.ops.qgraph.rms_norm, ...)
from .graph_edits import get_attr_node, get_tensor, new_attr
from .structure import gqa_source

aten = torch.ops.aten
qg = torch.ops.qgraph
SDPA = aten.scaled_dot_product_attention.default
QLINEAR = qg.qlinear.default


@dataclass
class FusionCounts:
    """How many subgraphs each fusion replaced."""

    norms: int = 0
    residual_norms: int = 0
    rotaries: int = 0
    attentions: int = 0
    flat: int = 0
    group_query: int = 0
    rotary_in_attention: int = 0
    packed_qkv: int = 0
    r3_cancelled: int = 0
    skipped: list[str] = field(default_factory=list)
    packed: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    """Packed q/k/v layers: the packed codes' attribute -> ``(part's codes attribute, first
    column, end column)`` per part, so the export can say which layers a packed node holds."""

    def as_dict(self) -> dict:
        return {
            "rms_norm": self.norms,
            "add_rms_norm": self.residual_norms,
            "rotary": self.rotaries,
            "attention": self.attentions,
            "heads_flat": self.flat,
            "group_query_attention": self.group_query,
            "rotary_in_attention": self.rotary_in_attention,
            "packed_qkv": self.packed_qkv,
            "r3_cancelled": self.r3_cancelled,
            "skipped": list(self.skipped),
        }


ATTENTIONS = ("gqa", "standard")
"""How attention is lowered: ONNX Runtime's ``GroupQueryAttention`` (cache positions from
``attention_mask``'s row sums; right padding only), or the opset-23 ``Attention`` with
qgraph's general boolean mask (any padding)."""


def fuse_decoder(
    gm: fx.GraphModule,
    attention: str = "standard",
    rope_positions: int | None = None,
    pack_qkv: bool = False,
) -> FusionCounts:
    """Fuse ``gm`` in place (norms, then rotaries, then attentions); returns the counts.

    ``attention="gqa"`` turns each flat attention into :func:`~qgraph.fused_ops.group_query_attention`,
    whose sequence lengths come from the graph input ``attention_mask`` (computed once). With
    ``rope_positions`` it also takes over the rotary embedding of queries and keys that feed it
    directly, from cos/sin tables of that many positions computed by the graph's own RoPE.
    ``pack_qkv`` merges quantized q/k/v projections into one layer (:func:`_pack_qkv`)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    counts = FusionCounts()
    graph = gm.graph
    counts.norms = _fuse_norms(gm)
    graph.eliminate_dead_code()
    counts.residual_norms = _fuse_residual_adds(graph)
    counts.norms -= counts.residual_norms
    counts.rotaries = _fuse_rotaries(graph, counts.skipped)
    counts.attentions = _fuse_attentions(graph, counts.skipped)
    graph.eliminate_dead_code()  # the replaced subgraphs, so that user counts are true
    counts.flat = _flatten_heads(graph, counts.skipped)
    graph.eliminate_dead_code()
    counts.r3_cancelled = _cancel_unquantized_r3(graph)
    graph.eliminate_dead_code()
    if attention == "gqa":
        counts.group_query = _group_query(graph, counts.skipped)
        graph.eliminate_dead_code()
        if rope_positions:
            counts.rotary_in_attention = _rotary_into_attention(gm, rope_positions)
            graph.eliminate_dead_code()
        if pack_qkv:
            counts.packed_qkv = _pack_qkv(gm, counts.packed)
            graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return counts


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _val(node: fx.Node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _other(node: fx.Node, known: fx.Node):
    """The argument of a binary ``node`` that is not ``known`` (None if neither is)."""
    a, b = node.args[:2]
    return b if a is known else a if b is known else None


# ---------------------------------------------------------------------------------------- norms


def _fuse_norms(gm: fx.GraphModule) -> int:
    """``x * rsqrt(mean(x², -1, keepdim) + eps)`` [→ ``to(x.dtype)``] [→ ``* weight``]."""
    graph = gm.graph
    fused = 0
    ones: dict[int, str] = {}  # width -> the weight of norms that have none (one buffer each)
    for rs in [n for n in graph.nodes if _is(n, aten.rsqrt.default)]:
        added = rs.args[0]
        if not _is(added, aten.add.Tensor) or not isinstance(added.args[1], float):
            continue
        mean = added.args[0]
        if not _is(mean, aten.mean.dim) or list(mean.args[1]) != [-1] or not _keepdim(mean):
            continue
        sq = mean.args[0]
        if not _is(sq, aten.pow.Tensor_Scalar) or sq.args[1] != 2:
            continue
        x = sq.args[0]
        users = list(rs.users)
        if len(users) != 1 or not _is(users[0], aten.mul.Tensor) or _other(users[0], rs) is not x:
            continue
        normed = users[0]
        xv = _val(x)
        if xv is None or xv.dtype != torch.float32:
            continue
        last, weight = normed, None
        nxt = list(last.users)
        if len(nxt) == 1 and _is_noop_to(nxt[0], xv):
            last = nxt[0]
            nxt = list(last.users)
        if len(nxt) == 1 and _is(nxt[0], aten.mul.Tensor):
            w = _other(nxt[0], last)
            is_attr = isinstance(w, fx.Node) and w.op == "get_attr"
            wv = get_tensor(gm, w.target) if is_attr else None
            if isinstance(wv, torch.Tensor) and wv.dim() == 1 and wv.shape[0] == xv.shape[-1]:
                last, weight = nxt[0], w
        with graph.inserting_before(last):
            if weight is None:
                width = xv.shape[-1]
                if width not in ones:
                    ones[width] = new_attr(gm, f"rms_ones_{width}", torch.ones(width))
                weight = graph.get_attr(ones[width])
            node = graph.call_function(qg.rms_norm.default, (x, weight, float(added.args[1])))
        node.meta["val"] = _val(last)
        last.replace_all_uses_with(node)
        fused += 1
    return fused


def _fuse_residual_adds(graph: fx.Graph) -> int:
    """``rms_norm(add(x, r) [→ to(same dtype)])`` → ``add_rms_norm(x, r)``, whose second output
    (the sum) takes over the add's other uses (the next residual add)."""
    fused = 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    for norm in [n for n in graph.nodes if _is(n, qg.rms_norm.default)]:
        total = norm.args[0]
        add = total.args[0] if _is_noop_to(total, _val(total)) else total
        if not _is(add, aten.add.Tensor) or (add is not total and len(add.users) != 1):
            continue
        if any(order[u] < order[norm] for u in total.users if u is not norm):
            continue  # the sum is read before the norm: the fused node could not feed it
        x, r = add.args[:2]
        xv, rv = _val(x), _val(r)
        if xv is None or rv is None or xv.shape != rv.shape or xv.dtype != rv.dtype:
            continue
        with graph.inserting_before(norm):
            node = graph.call_function(qg.add_rms_norm.default, (x, r, *norm.args[1:]))
            normed = graph.call_function(getitem, (node, 0))
            summed = graph.call_function(getitem, (node, 1))
        normed.meta["val"], summed.meta["val"] = _val(norm), _val(total)
        norm.replace_all_uses_with(normed)
        total.replace_all_uses_with(summed)
        fused += 1
    return fused


def _keepdim(mean: fx.Node) -> bool:
    return bool(mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))


def _is_noop_to(node: fx.Node, like) -> bool:
    """``x.to(dtype)`` that converts to ``like``'s dtype (a no-op)."""
    if not _is(node, aten.to.dtype):
        return False
    return node.args[1] == like.dtype


# -------------------------------------------------------------------------------------- rotary


def _fuse_rotaries(graph: fx.Graph, skipped: list[str]) -> int:
    """``x·cos_u + cat(−x[..., D/2:], x[..., :D/2])·sin_u`` with ``cos_u = cos.unsqueeze(1)``.

    The op takes the first halves of ``cos``/``sin`` at the batch size (what ONNX's
    ``RotaryEmbedding`` reads); they are sliced and expanded once per distinct ``cos``/``sin``,
    not once per layer."""
    ids = next(n for n in graph.nodes if n.op == "placeholder")
    halves: dict[fx.Node, fx.Node] = {}
    fused = 0
    for add in [n for n in graph.nodes if _is(n, aten.add.Tensor)]:
        match = _match_rotary(add)
        if match is None:
            continue
        x, cos, sin = match
        if not (_halves_equal(cos) and _halves_equal(sin)):
            skipped.append(f"{add.name}: rotary cos/sin are not two equal halves")
            continue
        half = _val(x).shape[-1] // 2
        for t in (cos, sin):
            if t not in halves:
                with graph.inserting_after(t):
                    first = graph.call_function(aten.slice.Tensor, (t, -1, 0, half))
                with graph.inserting_after(first):
                    batch = graph.call_function(aten.sym_size.int, (ids, 0))
                with graph.inserting_after(batch):
                    seq = graph.call_function(aten.sym_size.int, (t, 1))
                with graph.inserting_after(seq):
                    halves[t] = graph.call_function(
                        aten.expand.default, (first, [batch, seq, half])
                    )
        with graph.inserting_before(add):
            node = graph.call_function(qg.rotary.default, (x, halves[cos], halves[sin]))
        node.meta["val"] = _val(add)
        add.replace_all_uses_with(node)
        fused += 1
    return fused


def _match_rotary(add: fx.Node):
    a, b = add.args[:2]
    if not (_is(a, aten.mul.Tensor) and _is(b, aten.mul.Tensor)):
        return None
    for plain, turned in ((a, b), (b, a)):
        cat = next((t for t in turned.args[:2] if _is(t, aten.cat.default)), None)
        if cat is None:
            continue
        sin_u = _other(turned, cat)
        parts, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else 0
        if len(parts) != 2 or dim not in (-1, 3) or not _is(parts[0], aten.neg.default):
            continue
        hi, lo = parts[0].args[0], parts[1]
        if not (_is(hi, aten.slice.Tensor) and _is(lo, aten.slice.Tensor)):
            continue
        x = lo.args[0]
        xv = _val(x)
        if hi.args[0] is not x or xv is None or xv.dim() != 4 or xv.shape[-1] % 2:
            continue
        half = xv.shape[-1] // 2
        if tuple(lo.args[1:4]) != (3, 0, half) and tuple(lo.args[1:4]) != (-1, 0, half):
            continue
        if hi.args[1] not in (3, -1) or hi.args[2] != half or hi.args[3] < xv.shape[-1]:
            continue
        cos_u = _other(plain, x)
        if cos_u is None or not (_unsqueezed_1(cos_u) and _unsqueezed_1(sin_u)):
            continue
        return x, cos_u.args[0], sin_u.args[0]
    return None


def _unsqueezed_1(node) -> bool:
    if not _is(node, aten.unsqueeze.default) or node.args[1] != 1:
        return False
    val = _val(node.args[0])
    return val is not None and val.dim() == 3


def _halves_equal(node: fx.Node) -> bool:
    """Whether ``node`` is ``f(cat([a, a], -1))`` for elementwise ``f`` (cos/sin, scaling and
    dtype casts), so its two halves along the last dim are equal."""
    while True:
        if _is(node, aten.to.dtype) or (
            _is(node, aten.mul.Tensor) and isinstance(node.args[1], (int, float))
        ):
            node = node.args[0]
        elif _is(node, aten.cos.default) or _is(node, aten.sin.default):
            node = node.args[0]
        else:
            break
    if not _is(node, aten.cat.default):
        return False
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    return len(parts) == 2 and parts[0] is parts[1] and dim in (-1, 2)


# ----------------------------------------------------------------------------------- attention


def _fuse_attentions(graph: fx.Graph, skipped: list[str]) -> int:
    """``sdpa(q, repeat(cat([past_k, k], 2)), repeat(cat([past_v, v], 2)), mask)``."""
    fused = 0
    for sdpa in [n for n in graph.nodes if _is(n, SDPA)]:
        q, k_arg, v_arg = sdpa.args[:3]
        mask = sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")
        extra = {k: v for k, v in sdpa.kwargs.items() if k not in ("scale", "attn_mask")}
        if len(sdpa.args) > 4 or any(
            extra.get(k) for k in ("dropout_p", "is_causal", "enable_gqa")
        ):
            skipped.append(f"{sdpa.name}: attention with dropout, is_causal or enable_gqa")
            continue
        if not _bool_4d(mask):
            skipped.append(f"{sdpa.name}: attention mask is not a 4-D bool tensor")
            continue
        (k_cat, k_chain), (v_cat, v_chain) = gqa_source(k_arg), gqa_source(v_arg)
        if any(chain and chain[-1].args[1] != 2 for chain in (k_chain, v_chain)):
            skipped.append(f"{sdpa.name}: the key/value head repeat is not kv-head-major")
            continue
        caches = [_cache_concat(c) for c in (k_cat, v_cat)]
        if None in caches:
            skipped.append(f"{sdpa.name}: keys/values are not cat([past, new], 2)")
            continue
        (past_k, k), (past_v, v) = caches
        qv = _val(q)
        scale = sdpa.kwargs.get("scale")
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(qv.shape[-1])
        with graph.inserting_before(sdpa):
            node = graph.call_function(
                qg.cached_attention.default, (q, k, v, past_k, past_v, mask, scale)
            )
            out, present_k, present_v = (graph.call_function(getitem, (node, i)) for i in range(3))
        out.meta["val"] = _val(sdpa)
        present_k.meta["val"], present_v.meta["val"] = _val(k_cat), _val(v_cat)
        sdpa.replace_all_uses_with(out)
        graph.erase_node(sdpa)  # dead code elimination keeps it: it is tagged as random
        # only the graph output: the repeat chains feeding the replaced attention die with it
        k_cat.replace_all_uses_with(present_k, delete_user_cb=lambda user: user.op == "output")
        v_cat.replace_all_uses_with(present_v, delete_user_cb=lambda user: user.op == "output")
        fused += 1
    return fused


def _bool_4d(mask) -> bool:
    """A ``[B, 1, S, T]`` bool mask: by its traced value, or as the ``logical_and`` that
    :func:`qgraph.kv_cache.cached_decoder` builds (which has none)."""
    val = _val(mask)
    if val is not None:
        return val.dtype == torch.bool and val.dim() == 4
    return _is(mask, aten.logical_and.default)


def _cache_concat(node: fx.Node):
    """``(past, new)`` of ``cat([past, new], 2)`` with ``past`` a graph input, else None."""
    if not _is(node, aten.cat.default):
        return None
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    if len(parts) != 2 or dim not in (2, -2) or parts[0].op != "placeholder":
        return None
    return parts[0], parts[1]


# ------------------------------------------------------------------------------------- R3


def _cancel_unquantized_r3(graph: fx.Graph) -> int:
    """Drop R3 where nothing quantizes queries or keys after it.

    R3 turns every query and key head by one orthogonal ``Q``, and ``(qQ)(kQ)ᵀ = qkᵀ``: it
    only matters to a quantizer between it and attention (a quantized key cache). Without one,
    the file attends, and caches keys, in the unrotated basis; the function is the same up to
    float rounding, and the step saves two Hadamards and four reshapes per layer."""
    cancelled = 0
    for att in [n for n in graph.nodes if _is(n, qg.cached_attention.default)]:
        q, k = (_r3_of(t) for t in att.args[:2])
        if q is None or k is None:
            continue
        (q_src, q_had), (k_src, k_had) = q, k
        if not _same_rotation(graph, q_had, k_had):
            continue
        att.replace_input_with(att.args[0], q_src)
        att.replace_input_with(att.args[1], k_src)
        cancelled += 1
    return cancelled


def _same_rotation(graph: fx.Graph, a: fx.Node, b: fx.Node) -> bool:
    """Whether two ``hadamard`` nodes apply the same normalized, forward rotation (equal signs,
    which the trace may hold in two attributes)."""
    (_, sa, *ra), (_, sb, *rb) = a.args, b.args
    if ra != rb or ra[:1] != [True] or any(ra[1:]):
        return False
    if sa is None or sb is None:
        return sa is sb
    if sa.op != "get_attr" or sb.op != "get_attr":
        return sa is sb
    ta, tb = (get_tensor(graph.owning_module, n.target) for n in (sa, sb))
    return ta.shape == tb.shape and torch.equal(ta, tb)


def _r3_of(t: fx.Node):
    """``(x, hadamard)`` when ``t = view(hadamard(view(x, [B, S, H, D])), [B, S, H·D])`` with
    single users throughout (R3 on the flat layout, nothing after it), else None."""
    if not _is(t, aten.view.default) or len(t.users) != 1:
        return None
    had = t.args[0]
    if not _is(had, qg.hadamard.default) or len(had.users) != 1:
        return None
    inner = had.args[0]
    if not _is(inner, aten.view.default) or len(inner.users) != 1:
        return None
    return inner.args[0], had


# ------------------------------------------------------------------------------ group query


def _group_query(graph: fx.Graph, skipped: list[str]) -> int:
    """Flat ``cached_attention`` → ``group_query_attention``, with ``seqlens_k = Σ mask − 1``
    (int32, per row) and ``total = mask.shape[1]`` computed once from ``attention_mask``."""
    atts = [n for n in graph.nodes if _is(n, qg.cached_attention.default) and len(n.args) >= 9]
    masks = [n for n in graph.nodes if n.op == "placeholder" and n.name == "attention_mask"]
    if not atts:
        return 0
    if len(masks) != 1:
        skipped.append("group query attention: the graph has no attention_mask input")
        return 0
    (mask,) = masks
    call = graph.call_function
    with graph.inserting_before(atts[0]):
        seqlens = call(aten.sub.Tensor, (call(aten.sum.dim_IntList, (mask, [1])), 1))
        seqlens = call(aten._to_copy.default, (seqlens,), {"dtype": torch.int32})
        length = call(aten.sym_size.int, (mask, 1))
        total = call(aten.scalar_tensor.default, (length,), {"dtype": torch.int32})
    for att in atts:
        q, k, v, past_k, past_v, _, scale, heads, kv_heads = att.args[:9]
        with graph.inserting_before(att):
            node = call(
                qg.group_query_attention.default,
                (q, k, v, past_k, past_v, seqlens, total, scale, heads, kv_heads),
            )
        node.meta["val"] = att.meta.get("val")
        att.replace_all_uses_with(node)
        graph.erase_node(att)
    return len(atts)


def _rotary_into_attention(gm: fx.GraphModule, positions: int) -> int:
    """``gqa(rotary(q, c, s), rotary(k, c, s), ...)`` → ``gqa(q, k, ..., cos_cache, sin_cache)``.

    ``GroupQueryAttention`` rotates by position from ``[positions, D/2]`` tables; they are the
    graph's own ``c``/``s`` evaluated for positions ``0 … positions − 1`` (so any RoPE scaling the
    model computes is kept), taken once per distinct pair."""
    graph = gm.graph
    tables: dict[tuple[fx.Node, fx.Node], tuple[fx.Node, fx.Node]] = {}
    done = 0
    for att in [n for n in graph.nodes if _is(n, qg.group_query_attention.default)]:
        q, k = att.args[:2]
        if len(att.args) > 10 or not all(
            _is(t, qg.rotary.default) and len(t.users) == 1 for t in (q, k)
        ):
            continue
        if q.args[1:3] != k.args[1:3]:
            continue
        pair = (q.args[1], q.args[2])
        if pair not in tables:
            values = _evaluate(gm, list(pair), positions)
            if values is None:
                return done
            cos, sin = (
                get_attr_node(gm, att, new_attr(gm, name, value[0].contiguous()))
                for name, value in zip(("rope_cos_cache", "rope_sin_cache"), values, strict=True)
            )
            tables[pair] = (cos, sin)
        att.args = (q.args[0], k.args[0], *att.args[2:10], *tables[pair])
        done += 1
    return done


def _pack_qkv(gm: fx.GraphModule, packed_parts: dict | None = None) -> int:
    """One quantized projection for queries, keys and values where all three feed
    ``group_query_attention`` straight from ``qlinear`` layers on one input with one grid.

    ``x @ [Wq | Wk | Wv]`` is the three products side by side, bit for bit per column, and
    ``GroupQueryAttention`` takes the packed ``[B, S, (H + 2·KV)·D]`` tensor as its query, so
    the step runs one ``MatMulNBits`` where it ran three (as the GenAI builder's files do).
    ``packed_parts`` receives each packed layer's parts (:attr:`FusionCounts.packed`)."""
    graph = gm.graph
    packed = 0
    for att in [n for n in graph.nodes if _is(n, qg.group_query_attention.default)]:
        projections = att.args[:3]
        if not all(
            _is(p, QLINEAR) and len(p.users) == 1 and p.args[0] is projections[0].args[0]
            for p in projections
        ):
            continue
        if len({tuple(p.args[5:7]) for p in projections}) != 1:
            continue  # group size and bits must match
        q = projections[0]
        names = ["codes", "scale", "zero", "bias"]
        stored = [[p.args[i] for p in projections] for i in (1, 2, 3, 4)]
        if all(b is None for b in stored[3]):  # no biases: the packed layer has none either
            names, stored = names[:3], stored[:3]
        merged = [_concatenated(gm, args) for args in stored]
        if any(m is None for m in merged):
            continue
        parts = [
            get_attr_node(gm, att, new_attr(gm, f"{q.args[1].target}_qkv_{name}", value))
            for name, value in zip(names, merged, strict=True)
        ]
        parts += [None] * (4 - len(parts))
        if packed_parts is not None:
            ends = list(accumulate(get_tensor(gm, p.args[2].target).shape[-1] for p in projections))
            packed_parts[parts[0].target] = [
                (p.args[1].target, start, end)
                for p, start, end in zip(projections, [0, *ends[:2]], ends, strict=True)
            ]
        with graph.inserting_before(att):
            qkv = graph.call_function(QLINEAR, (q.args[0], *parts, *q.args[5:7]))
        att.args = (qkv, None, None, *att.args[3:])
        packed += 1
    return packed


def _concatenated(gm: fx.GraphModule, args: list) -> torch.Tensor | None:
    """The stored tensors behind ``args`` (get_attr nodes of one dtype) side by side along
    their last (output) axis, else None."""
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in args):
        return None
    tensors = [get_tensor(gm, a.target) for a in args]
    if len({t.dtype for t in tensors}) != 1:
        return None
    return torch.cat(tensors, dim=-1)


def _evaluate(gm: fx.GraphModule, nodes: list[fx.Node], positions: int):
    """The values of ``nodes`` for a ``positions``-token prompt without cache (they must depend
    on the graph inputs only through ``input_ids`` and ``attention_mask``), else None."""
    needed: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    feeds = []
    for node in gm.graph.nodes:
        if node not in needed:
            continue
        if node.op == "placeholder":
            if node.name == "input_ids":
                feeds.append(torch.zeros(1, positions, dtype=torch.long))
            elif node.name == "attention_mask":
                feeds.append(torch.ones(1, positions, dtype=torch.long))
            else:
                return None
        env[node] = sub.node_copy(node, lambda n: env[n])
    sub.output(tuple(env[n] for n in nodes))
    with torch.no_grad():
        return fx.GraphModule(gm, sub)(*feeds)


# ------------------------------------------------------------------------------- flat heads

#: ops between a projection and attention that act on each (token, head) row alone, so they
#: commute with the projection's ``view → transpose`` to ``[B, H, S, D]``
PER_HEAD = (qg.rotary.default, qg.hadamard.default, qg.quantize_per_token.default)


def _flatten_heads(graph: fx.Graph, skipped: list[str]) -> int:
    """Run each fused attention on its projections' own ``[B, S, H·D]`` layout.

    The trace views each projection as ``[B, S, H, D]`` and transposes it to ``[B, H, S, D]``
    before RoPE and attention, and transposes the output back; in the file that is a reshape
    and a transpose per tensor. Here the transposes go: ``rotary`` and ``cached_attention``
    take the flat layout (with their head counts), and the per-head ops in between
    (``hadamard``, ``quantize_per_token``) see a ``[B, S, H, D]`` view.
    """
    done = 0
    for att in [n for n in graph.nodes if _is(n, qg.cached_attention.default)]:
        q, k, v = att.args[:3]
        sides = [_projection_side(t) for t in (q, k, v)]
        out_chain = _output_side(att)
        if None in sides or out_chain is None:
            skipped.append(f"{att.name}: heads kept first (unexpected layout around attention)")
            continue
        flat = []
        for src, heads, chain in sides:
            cur = src
            with graph.inserting_before(att):
                b = graph.call_function(aten.sym_size.int, (src, 0))
                s_ = graph.call_function(aten.sym_size.int, (src, 1))
                for node in chain:  # innermost (next to the transpose) first
                    if node.target is qg.rotary.default:
                        cur = graph.call_function(node.target, (cur, *node.args[1:3], heads))
                    else:
                        view = graph.call_function(aten.view.default, (cur, [b, s_, heads, -1]))
                        per_head = graph.call_function(node.target, (view, *node.args[1:]))
                        cur = graph.call_function(aten.view.default, (per_head, [b, s_, -1]))
            flat.append((cur, heads))
        (fq, heads), (fk, kv_heads), (fv, _) = flat
        users = {u.args[1]: u for u in att.users}
        last = out_chain
        with graph.inserting_before(att):
            node = graph.call_function(
                qg.cached_attention.default,
                (fq, fk, fv, *att.args[3:7], heads, kv_heads),
            )
            outs = [graph.call_function(getitem, (node, i)) for i in range(3)]
        outs[0].meta["val"] = _val(last)
        for i in (1, 2):
            outs[i].meta["val"] = _val(users[i]) if i in users else None
            if i in users:
                users[i].replace_all_uses_with(outs[i])
        last.replace_all_uses_with(outs[0])
        done += 1
    return done


def _projection_side(t: fx.Node):
    """``(src, heads, chain)`` when ``t = chain(transpose(view(src, [B, S, H, D]), 1, 2))`` with
    only per-head single-user ops in ``chain`` (returned innermost first), else None."""
    chain: list[fx.Node] = []
    node = t
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in PER_HEAD:
        if len(node.users) != 1:
            return None
        chain.append(node)
        node = node.args[0]
    if not _is(node, aten.transpose.int) or sorted(node.args[1:3]) != [1, 2]:
        return None
    if len(node.users) != 1:
        return None
    view = node.args[0]
    if not (_is(view, aten.view.default) or _is(view, aten.reshape.default)):
        return None
    src = view.args[0]
    sv, vv = _val(src), _val(view)
    if sv is None or vv is None or sv.dim() != 3 or vv.dim() != 4 or len(view.users) != 1:
        return None
    return src, int(vv.shape[2]), chain[::-1]


def _output_side(att: fx.Node):
    """The last node of the attention output's ``[reshape →] transpose(1, 2) → reshape`` to
    ``[B, S, H·D]``, whose uses the flat output takes over (None if it is not that)."""
    outs = [u for u in att.users if u.args[1] == 0]
    if len(outs) != 1 or len(outs[0].users) != 1:
        return None
    node = next(iter(outs[0].users))
    if _is(node, aten.reshape.default) or _is(node, aten.view.default):
        val = _val(node)
        if val is None or val.dim() != 4 or len(node.users) != 1:
            return None
        node = next(iter(node.users))
    if not _is(node, aten.transpose.int) or sorted(node.args[1:3]) != [1, 2]:
        return None
    if len(node.users) != 1:
        return None
    last = next(iter(node.users))
    if not (_is(last, aten.reshape.default) or _is(last, aten.view.default)):
        return None
    val = _val(last)
    if val is None or val.dim() != 3:
        return None
    return last
