"""A decoder with a key/value cache, made from the rewritten graph itself.

The traced graph maps ``input_ids [B, S]`` to logits and recomputes the whole prefix at every
step. :func:`cached_decoder` copies it and edits the copy so that each attention reads its keys
and values from a cache, ``past_key_values.{i}.key/value [B, kv_heads, P, head_dim]``, appends
the new ones, and returns them as ``present.{i}.key/value`` (the Optimum / ONNX Runtime GenAI
names). Because it edits the graph that the passes produced, everything they did survives
unchanged: quantized layers, per-token activation quantizers, online rotations (the keys are
cached *after* R3, the last op before attention, so cached and new keys live in one basis),
expansion, sparse branches.

The edits, per Llama-family graph as ``torch.export`` traces it:

- positions: every ``arange(S) + 0`` (the cache position, the past length being 0 when traced)
  becomes ``arange(S) + P``, so RoPE rotates new tokens at their true positions;
- keys and values: ``cat([past, new], dim=2)`` in front of the GQA repeat (``unsqueeze → expand
  → reshape``), whose sizes are rewritten from ``S`` to ``T = P + S``;
- the mask: a fresh causal mask ``key j ≤ query i + P``, combined with ``attention_mask [B, T]``
  (1 for a real token, 0 for padding), replaces the traced ``S × S`` one.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from operator import getitem

import torch
from torch import fx

from .errors import StructureError
from .kernels import quant as qk
from .model import Model
from .structure import gqa_source

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
PER_TOKEN = torch.ops.qgraph.quantize_per_token.default


@dataclass
class CacheLayout:
    """What the cache of a decoder looks like.

    A float cache holds ``key`` and ``value`` per layer. A quantized cache (``quantized``: the
    model quantizes its keys and values, ``quantize{kv=...}``) holds each as three tensors,
    ``.codes`` (int8), ``.scale`` and ``.zero`` (int8), one scale and zero per token and head.
    """

    layers: int
    kv_heads: int
    head_dim: int
    quantized: bool = False

    def _parts(self) -> tuple[str, ...]:
        return (".codes", ".scale", ".zero") if self.quantized else ("",)

    def names(self) -> list[str]:
        """Cache input names, in the order the decoder takes them (key, value per layer)."""
        return [
            f"past_key_values.{i}.{kv}{part}"
            for i in range(self.layers)
            for kv in ("key", "value")
            for part in self._parts()
        ]

    def output_names(self) -> list[str]:
        return [n.replace("past_key_values.", "present.") for n in self.names()]

    def empty(self, batch: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """An empty cache (past length 0)."""
        shape = (batch, self.kv_heads, 0, self.head_dim)
        if not self.quantized:
            return [torch.zeros(shape, dtype=dtype) for _ in self.names()]
        one = (batch, self.kv_heads, 0, 1)
        per_kv = [
            torch.zeros(shape, dtype=torch.int8),
            torch.zeros(one),
            torch.zeros(one, dtype=torch.int8),
        ]
        return [t.clone() for _ in range(2 * self.layers) for t in per_kv]

    def bytes_per_token(self) -> int:
        """Cache bytes one token adds (all layers, keys and values, batch 1)."""
        per_head = self.head_dim + 4 + 1 if self.quantized else 4 * self.head_dim
        return 2 * self.layers * self.kv_heads * per_head


@dataclass
class CachedDecoder:
    """``gm(input_ids, attention_mask, *past) -> (logits, *present)``."""

    gm: fx.GraphModule
    layout: CacheLayout

    @torch.no_grad()
    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if len(past) != len(self.layout.names()):
            raise ValueError(
                f"the cache has {len(self.layout.names())} tensors (key and value of "
                f"{self.layout.layers} layers); got {len(past)}"
            )
        expected = past[0].shape[2] + input_ids.shape[1]
        if attention_mask.shape != (input_ids.shape[0], expected):
            raise ValueError(
                f"attention_mask must be [batch, past + new] = [{input_ids.shape[0]}, {expected}], "
                f"got {list(attention_mask.shape)}"
            )
        out = self.gm(input_ids, attention_mask, *past)
        return out[0], list(out[1:])


def cached_decoder(model: Model, quantized_cache: bool | None = None) -> CachedDecoder:
    """A copy of ``model``'s graph that decodes with a key/value cache (see the module doc).

    ``quantized_cache`` stores keys and values as int8 codes with a scale and zero per token and
    head where the model quantizes them (``quantize{kv=...}``); ``None`` does so whenever it
    can. The decoded values are the ones the full forward computes with, to the bit.
    """
    gm = copy.deepcopy(model.gm)
    graph = gm.graph
    _drop_asserts(graph)
    attentions = [n for n in graph.nodes if n.op == "call_function" and n.target is SDPA]
    if not attentions:
        raise StructureError("no scaled_dot_product_attention in the graph: nothing to cache")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise StructureError(
            f"cached decoding needs a graph with one input (input_ids); this one has "
            f"{len(placeholders)}: {[p.name for p in placeholders]}"
        )
    (ids,) = placeholders
    output = next(n for n in graph.nodes if n.op == "output")
    sources = [[gqa_source(sdpa.args[i]) for i in (1, 2)] for sdpa in attentions]
    layout = _layout(attentions, sources)
    quantizable = all(src.target is PER_TOKEN for pair in sources for src, _ in pair)
    if quantized_cache and not quantizable:
        raise StructureError(
            "a quantized cache needs quantized keys and values (quantize{kv=int<b>}); this "
            "model caches float keys and values"
        )
    layout.quantized = quantizable if quantized_cache is None else quantized_cache

    # inputs: attention_mask, then the cache tensors in layout order
    with graph.inserting_after(ids):
        mask_in = graph.placeholder("attention_mask")
    past: list[fx.Node] = []
    last = mask_in
    for name in layout.names():
        with graph.inserting_after(last):
            last = graph.placeholder(name.replace(".", "_"))
        past.append(last)
    with graph.inserting_before(last.next):  # (inserting_after would reverse the order)
        seq = graph.call_function(aten.sym_size.int, (ids, 1))
        total = graph.call_function(aten.sym_size.int, (mask_in, 1))
        # from the mask, not the cache: a preallocated cache buffer (ONNX Runtime GenAI's
        # shared past/present) is longer than the tokens it holds
        past_len = graph.call_function(operator.sub, (total, seq))
        mask = _causal_mask(graph, mask_in, seq, total, past_len)
    _offset_positions(graph, past_len)

    parts = len(past) // (2 * len(attentions))
    presents: list[fx.Node] = []
    for i, (sdpa, pair) in enumerate(zip(attentions, sources, strict=True)):
        for slot, (src, chain) in enumerate(pair):
            mine = past[(2 * i + slot) * parts : (2 * i + slot + 1) * parts]
            consumer = chain[-1] if chain else sdpa
            with graph.inserting_before(consumer):
                if layout.quantized:  # append codes, scales and zeros; attend to their decoding
                    x, bits, symmetric = src.args
                    new = graph.call_function(qk.encode_per_token, (x, bits, symmetric))
                    stored = [
                        graph.call_function(
                            aten.cat.default, ([old, graph.call_function(getitem, (new, k))], 2)
                        )
                        for k, old in enumerate(mine)
                    ]
                    full = graph.call_function(qk.decode_per_token, tuple(stored))
                else:
                    stored = [graph.call_function(aten.cat.default, ([mine[0], src], 2))]
                    full = stored[0]
            consumer.replace_input_with(src, full)
            for node in chain:  # the repeat's sizes: S (new tokens) becomes T (all tokens)
                if node.target in (aten.expand.default, aten.reshape.default, aten.view.default):
                    sizes = [total if _is_length_of(s, ids) else s for s in node.args[1]]
                    node.args = (node.args[0], sizes, *node.args[2:])
            presents.extend(stored)
        args = list(sdpa.args)
        if len(args) > 3:
            args[3] = mask
        else:
            args.append(mask)
        sdpa.args = tuple(args)
        if sdpa.kwargs.get("is_causal"):
            sdpa.kwargs = {**sdpa.kwargs, "is_causal": False}

    (result,) = output.args
    logits = result[0] if isinstance(result, (tuple, list)) else result
    output.args = ((logits, *presents),)
    graph.eliminate_dead_code()
    graph.lint()
    graph._codegen = fx.graph.CodeGen()  # plain positional inputs/outputs, not export's pytrees
    gm.recompile()
    return CachedDecoder(gm, layout)


#: side-effect checks torch.export leaves in a graph (a program loaded from a ``.pt2`` keeps
#: them): they pin traced shapes the cache edits change, and keep dead mask code alive
ASSERTS = (
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
)


def _drop_asserts(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in ASSERTS and not node.users:
            graph.erase_node(node)


def _layout(attentions: list[fx.Node], sources) -> CacheLayout:
    """The one cache layout every attention's keys and values share."""
    layout: CacheLayout | None = None
    for sdpa, pair in zip(attentions, sources, strict=True):
        for src, _ in pair:
            val = src.meta.get("val")
            if val is None or val.dim() != 4:
                raise StructureError(f"attention {sdpa.name}: cannot read the key/value shape")
            this = CacheLayout(len(attentions), int(val.shape[1]), int(val.shape[3]))
            if layout is not None and this != layout:
                raise StructureError(
                    f"attention {sdpa.name}: key/value shape {this} differs from the first "
                    f"attention's {layout}; one cache layout per model is supported"
                )
            layout = this
    assert layout is not None
    return layout


def _is_length_of(size, ids: fx.Node) -> bool:
    """Whether ``size`` is the traced sequence length, ``sym_size(input_ids, 1)``."""
    return (
        isinstance(size, fx.Node)
        and size.target is aten.sym_size.int
        and size.args[0] is ids
        and size.args[1] == 1
    )


def _offset_positions(graph: fx.Graph, past_len: fx.Node) -> None:
    """``arange(S) + 0`` → ``arange(S) + P`` (the cache positions)."""
    found = 0
    for node in list(graph.nodes):
        if (
            node.op == "call_function"
            and node.target is aten.add.Tensor
            and node.args[1] == 0
            and isinstance(node.args[0], fx.Node)
            and node.args[0].target is aten.arange.default
        ):
            node.args = (node.args[0], past_len)
            found += 1
    if not found:
        raise StructureError(
            "no cache positions (arange(S) + 0) in the graph: this model's positions cannot be "
            "offset for cached decoding"
        )


def _causal_mask(
    graph: fx.Graph, attention_mask: fx.Node, seq: fx.Node, total: fx.Node, past_len: fx.Node
) -> fx.Node:
    """``[B, 1, S, T]`` bool: key ``j`` is visible to query ``i`` iff ``j ≤ P + i`` and the
    attention mask marks ``j`` as a real token."""
    call = graph.call_function
    keys = call(aten.arange.default, (total,), {"device": torch.device("cpu")})
    queries = call(aten.arange.default, (seq,), {"device": torch.device("cpu")})
    queries = call(aten.add.Tensor, (queries, past_len))
    causal = call(
        aten.le.Tensor,
        (call(aten.unsqueeze.default, (keys, 0)), call(aten.unsqueeze.default, (queries, 1))),
    )
    real = call(aten.ne.Scalar, (attention_mask, 0))
    real = call(aten.unsqueeze.default, (call(aten.unsqueeze.default, (real, 1)), 2))
    return call(aten.logical_and.default, (call(aten.unsqueeze.default, (causal, 0)), real))
