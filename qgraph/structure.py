"""The structure view: what rewrites need to know about a traced graph, derived from dataflow.

Nothing here looks at module names or model families: linear layers are ``aten.linear`` nodes
with constant weights, norms are matched by their arithmetic (``x * rsqrt(mean(x²) + eps)`` or
``aten.layer_norm``), and the residual stream is everything reachable from the embedding
outputs through residual adds and shape-only ops. A new architecture with the same dataflow
works without an adapter; a structure that is not safe to rewrite is listed in ``issues``
with the node that makes it unsafe.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field

import torch
from torch import fx

from . import ops  # noqa: F401  (torch.ops.qgraph.hadamard is matched below)

aten = torch.ops.aten

LINEAR = aten.linear.default
CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
EMBEDDING = aten.embedding.default
SDPA = aten.scaled_dot_product_attention.default
LAYER_NORM = aten.layer_norm.default
RMS_NORM = aten.rms_norm.default

# Ops that pass a tensor through without mixing its last (feature) dimension.
_CASTS = {
    aten.to.dtype,
    aten.type_as.default,  # type_as(x, ref): x is the data, ref only gives the dtype
    aten.to.dtype_layout,
    aten.alias.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.detach.default,
    aten.dropout.default,
    aten._to_copy.default,
}
_SHAPE_OPS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.flatten.using_ints,
}
# Head-layout ops allowed between v_proj, attention and o_proj (they move whole heads).
_HEAD_OPS = (
    _SHAPE_OPS
    | _CASTS
    | {
        aten.transpose.int,
        aten.permute.default,
        aten.expand.default,
        aten.repeat_interleave.self_int,
    }
)
_IGNORED = {aten._assert_tensor_metadata.default}
# An online rotation (and the zero padding of an expansion) in front of a layer's input.
_ONLINE = {torch.ops.qgraph.hadamard.default, aten.constant_pad_nd.default}


def _constant_weight_and_bias(node: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    """(weight, bias) get_attr nodes of a linear/conv call whose weight and bias (if any) are
    constants; (None, None) otherwise."""
    w = node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None, None
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return None, None
    return w, b


def _decomposed_attention(node: fx.Node) -> fx.Node | None:
    """For ``matmul(softmax(matmul(q, kᵀ)·c + mask), v)`` written out (an ONNX file's attention),
    given the outer matmul: the inner score matmul; None for anything else."""
    if not _is(node, aten.matmul.default) or _rank(node) != 4:
        return None
    probs = node.args[0]
    while isinstance(probs, fx.Node) and _is(probs, aten.where.ScalarSelf, *_CASTS):
        probs = probs.args[2] if _is(probs, aten.where.ScalarSelf) else probs.args[0]
    if not _is(probs, aten.softmax.int, aten._softmax.default):
        return None
    scores = probs.args[0]
    while isinstance(scores, fx.Node) and _is(
        scores, aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor, *_CASTS
    ):
        scores = scores.args[0]
    return scores if _is(scores, aten.matmul.default) and _rank(scores) == 4 else None


def _split_readers(node: fx.Node) -> list[fx.Node]:
    """The readers of ``node``, looking through a ``split`` to its ``getitem``s."""
    out = []
    for u in users(node):
        if _is(u, aten.split.Tensor, aten.split_with_sizes.default):
            out.extend(users(u))
        else:
            out.append(u)
    return out


def _last_dim_part(node: fx.Node) -> tuple[tuple[int, int], fx.Node] | None:
    """``((start, stop), source)`` when ``node`` is a contiguous part of ``source``'s last dim:
    ``getitem(split(source, sizes, -1), i)`` or ``slice(source, -1, start, stop)``."""
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        split = node.args[0]
        if not _is(split, aten.split.Tensor, aten.split_with_sizes.default):
            return None
        source, sizes = split.args[0], split.args[1]
        dim = split.args[2] if len(split.args) > 2 else 0
        size = last_dim(source)
        if size is None or dim not in (-1, _rank(source) - 1):
            return None
        if isinstance(sizes, int):
            sizes = [min(sizes, size - k) for k in range(0, size, sizes)]
        start = sum(sizes[: node.args[1]])
        return (start, start + sizes[node.args[1]]), source
    if _is(node, aten.slice.Tensor):
        source = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else 0
        size = last_dim(source)
        if size is None or dim not in (-1, _rank(source) - 1):
            return None
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        stop = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
        step = node.args[4] if len(node.args) > 4 else 1
        if not (isinstance(start, int) and isinstance(stop, int)) or step != 1:
            return None
        return (max(start, 0), min(stop, size)), source
    return None


def _val(node: fx.Node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def last_dim(node: fx.Node) -> int | None:
    v = _val(node)
    if isinstance(v, torch.Tensor) and v.dim() > 0:
        size = v.shape[-1]
        return int(size) if isinstance(size, int) else None
    return None


def is_feature_transparent(node: fx.Node) -> bool:
    """True for ops that keep the last dimension's features as they are (casts, views, slices)."""
    if node.op != "call_function":
        return False
    if node.target in _CASTS:
        return True
    if node.target in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor) and len(node.args) == 2:
        # times a constant scalar (Gemma's embedding scale √d): commutes with every rotation
        return _is_constant_scalar(node.args[1])  # the data path stays args[0]
    if node.target in _SHAPE_OPS:
        src = node.args[0]
        if not isinstance(src, fx.Node) or last_dim(src) is None:
            return False
        if last_dim(node) != last_dim(src):
            return False
        if node.target in (aten.slice.Tensor, aten.select.int):
            dim = node.args[1] if len(node.args) > 1 else 0
            rank = _val(src).dim()
            return dim % rank != rank - 1
        return True
    return False


def _scale_vector(value) -> tuple[str, float] | None:
    """``(γ target, offset)`` when ``value`` is a constant vector γ, or ``γ + c`` (possibly cast):
    the scale an RMSNorm multiplies by."""
    offset = 0.0
    if _is(value, aten.add.Tensor) and isinstance(value.args[1], (int, float)):
        offset, value = float(value.args[1]), value.args[0]
    while isinstance(value, fx.Node) and value.op == "call_function" and value.target in _CASTS:
        value = value.args[0]
    if isinstance(value, fx.Node) and value.op == "get_attr" and _val(value).dim() == 1:
        return value.target, offset
    return None


def _is_constant_scalar(value) -> bool:
    """A Python number, or a 0-d constant tensor (possibly cast)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    while isinstance(value, fx.Node) and value.op == "call_function" and value.target in _CASTS:
        value = value.args[0]
    if not isinstance(value, fx.Node) or value.op != "get_attr":
        return False
    val = _val(value)
    return isinstance(val, torch.Tensor) and val.dim() == 0


def users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not (u.op == "call_function" and u.target in _IGNORED)]


#: The ops of the GQA repeat of keys and values in front of attention (``repeat_kv``).
GQA_REPEAT = (aten.unsqueeze.default, aten.expand.default, aten.reshape.default, aten.view.default)


def gqa_source(arg: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The ``[B, kv_heads, S, head_dim]`` tensor an attention's key or value argument was
    repeated from, and the repeat ops between them, outermost first (``[]`` without a repeat).
    The repeat is ``unsqueeze → expand → reshape``; a chain of these ops that does not start
    with the unsqueeze is not a repeat and is left alone."""
    chain: list[fx.Node] = []
    node = arg
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in GQA_REPEAT:
        chain.append(node)
        node = node.args[0]
    if not chain or chain[-1].target is not aten.unsqueeze.default:
        return arg, []
    return node, chain


def _expand(value, dims: int, default: int) -> list[int]:
    """A conv argument (int, list or None) as one int per spatial dim."""
    if value is None:
        return [default] * dims
    if isinstance(value, int):
        return [value] * dims
    values = [int(v) for v in value]
    return values * dims if len(values) == 1 else values


def weight_name(target: str) -> str:
    """A readable layer name from a parameter path (``m.model.layers.0.q_proj.weight`` → ``model.layers.0.q_proj``)."""
    name = re.sub(r"\.(weight|bias)$", "", target)
    return re.sub(r"^(lm|m)\.", "", name)


@dataclass(eq=False)
class Linear:
    node: fx.Node
    weight: str  # get_attr target of the weight [out, in]
    bias: str | None
    in_features: int
    out_features: int
    role: str = "other"
    layer: int | None = None
    kind: str = "linear"  # linear | conv
    conv: tuple | None = None  # (stride, padding, dilation, groups) of a convolution

    @property
    def name(self) -> str:
        return weight_name(self.weight)


@dataclass(eq=False)
class Norm:
    kind: str  # "rms" or "layer"
    input: fx.Node  # the tensor the norm reads
    output: fx.Node  # the node whose users are the norm's readers
    gamma: str | None
    beta: str | None
    eps: float
    gamma_node: fx.Node | None  # the ``mul(γ, x̂)`` node of a matched RMSNorm, if any
    nodes: list[fx.Node] = field(default_factory=list)
    readers: list[Linear] = field(default_factory=list)
    other_readers: list[fx.Node] = field(default_factory=list)
    gamma_offset: float = 0.0  # the scale is γ + offset (Gemma's ``x̂ · (1 + γ)``)

    @property
    def name(self) -> str:
        return weight_name(self.gamma) if self.gamma else self.output.name


@dataclass(eq=False)
class Embedding:
    node: fx.Node
    weight: str
    tied_linears: list[Linear] = field(default_factory=list)


@dataclass(eq=False)
class Attention:
    node: fx.Node
    q: Linear | None
    k: Linear | None
    v: Linear | None
    o: Linear | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_path_ok: bool
    reason: str = ""
    v_rows: tuple[int, int] | None = None  # rows of a fused q/k/v projection that make V
    decomposed: bool = False  # MatMul/Softmax/MatMul (e.g. from an ONNX file), not SDPA


@dataclass
class Residual:
    embeddings: list[Embedding]
    values: set[fx.Node]
    writers: list[Linear]
    norms: list[Norm]  # norms that read the stream
    direct_readers: list[Linear]  # linears reading the stream without a norm
    hidden: int | None
    issues: list[str]


class StructureView:
    """Linear layers, norms, embeddings, attention and the residual stream of an FX graph."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.linears: list[Linear] = []
        self.convs: list[Linear] = []  # convolutions with constant weights (kind "conv")
        self.norms: list[Norm] = []
        self.embeddings: list[Embedding] = []
        self.attention: list[Attention] = []
        self.issues: list[str] = []
        self._linear_by_node: dict[fx.Node, Linear] = {}
        self._find_linears()
        self._find_convs()
        self._find_embeddings()
        self._find_norms()
        self._find_attention()
        self.residual = self._walk_residual()
        self._assign_roles()

    # -- discovery ---------------------------------------------------------------------------
    def _find_linears(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op != "call_function" or node.target is not LINEAR:
                continue
            w, b = _constant_weight_and_bias(node)
            if w is None:
                continue
            shape = _val(w).shape
            lin = Linear(
                node, w.target, b.target if b is not None else None, int(shape[1]), int(shape[0])
            )
            m = re.search(r"\.(\d+)\.", lin.weight)
            lin.layer = int(m.group(1)) if m else None
            self.linears.append(lin)
            self._linear_by_node[node] = lin

    def _find_convs(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op != "call_function" or node.target not in CONVS:
                continue
            w, b = _constant_weight_and_bias(node)
            if w is None:
                continue
            dims = _val(w).dim() - 2
            extra = list(node.args[3:]) + [None] * (4 - len(node.args[3:]))
            stride, padding, dilation, groups = (
                _expand(extra[0], dims, 1),
                _expand(extra[1], dims, 0),
                _expand(extra[2], dims, 1),
                int(extra[3]) if extra[3] is not None else 1,
            )
            shape = _val(w).shape
            conv = Linear(
                node,
                w.target,
                b.target if b is not None else None,
                int(math.prod(shape[1:])),
                int(shape[0]),
                role="conv",
                kind="conv",
                conv=(stride, padding, dilation, groups),
            )
            self.convs.append(conv)

    def _find_embeddings(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "call_function" and node.target is EMBEDDING:
                w = node.args[0]
                if isinstance(w, fx.Node) and w.op == "get_attr":
                    emb = Embedding(node, w.target)
                    emb.tied_linears = [lin for lin in self.linears if lin.weight == w.target]
                    self.embeddings.append(emb)

    def _find_norms(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op != "call_function":
                continue
            norm = None
            if node.target is aten.rsqrt.default:
                norm = self._match_rms(node, node.args[0])
            elif (
                node.target is aten.reciprocal.default
                and _is(node.args[0], aten.sqrt.default)
                and len(users(node.args[0])) == 1
            ):  # 1 / sqrt(·), as ONNX files spell rsqrt
                norm = self._match_rms(node, node.args[0].args[0], node.args[0])
            elif node.target is LAYER_NORM:
                w, b = (list(node.args) + [None, None, None])[2:4]
                eps = node.args[4] if len(node.args) > 4 else 1e-5
                norm = Norm(
                    "layer", node.args[0], node, _attr(w), _attr(b), float(eps), None, [node]
                )
            elif node.target is RMS_NORM:
                w = node.args[2] if len(node.args) > 2 else None
                eps = node.args[3] if len(node.args) > 3 else None
                norm = Norm("rms", node.args[0], node, _attr(w), None, eps or 0.0, None, [node])
            if norm is not None:
                self._collect_readers(norm)
                self.norms.append(norm)

    def _match_rms(self, rsqrt: fx.Node, add: fx.Node, sqrt: fx.Node | None = None) -> Norm | None:
        """``x * rsqrt(mean(x², -1) + eps)`` (``rsqrt`` may be ``reciprocal(sqrt(·))``)."""
        if not _is(add, aten.add.Tensor) or not isinstance(add.args[1], (int, float)):
            return None
        mean = add.args[0]
        if not _is(mean, aten.mean.dim) or list(mean.args[1]) not in ([-1], [_rank(mean) - 1]):
            return None
        sq = mean.args[0]
        if _is(sq, aten.pow.Tensor_Scalar) and sq.args[1] == 2:
            x = sq.args[0]
        elif _is(sq, aten.mul.Tensor) and sq.args[0] is sq.args[1]:
            x = sq.args[0]
        else:
            return None
        normed = next((u for u in users(rsqrt) if _is(u, aten.mul.Tensor) and x in u.args), None)
        if normed is None or len(users(rsqrt)) != 1:
            return None
        nodes = [sq, mean, add, *([sqrt] if sqrt is not None else []), rsqrt, normed]
        out = normed
        while len(users(out)) == 1 and _is(users(out)[0], *_CASTS):
            out = users(out)[0]
            nodes.append(out)
        gamma_node = None
        gamma = None
        offset = 0.0
        if len(users(out)) == 1 and _is(users(out)[0], aten.mul.Tensor):
            cand = users(out)[0]
            other = cand.args[0] if cand.args[1] is out else cand.args[1]
            found = _scale_vector(other)
            if found is not None:
                (gamma, offset), gamma_node = found, cand
                nodes.append(cand)
                out = cand
                while len(users(out)) == 1 and _is(users(out)[0], *_CASTS):
                    out = users(out)[0]
                    nodes.append(out)
        norm = Norm("rms", x, out, gamma, None, float(add.args[1]), gamma_node, nodes)
        norm.gamma_offset = offset
        return norm

    def _collect_readers(self, norm: Norm) -> None:
        for reader, via in _forward_through(norm.output, is_feature_transparent):
            lin = self._linear_by_node.get(reader)
            if lin is not None and reader.args[0] is via:
                norm.readers.append(lin)
            else:
                norm.other_readers.append(reader)

    def _find_attention(self) -> None:
        for node in self.gm.graph.nodes:
            decomposed = _decomposed_attention(node)
            if not _is(node, SDPA) and decomposed is None:
                continue
            if decomposed is not None:  # probs @ v: q and k are the score matmul's inputs
                q_node, k_node = decomposed.args[:2]
                q_val, k_val, v_val = _val(q_node), _val(node.args[1]), _val(node.args[1])
            else:
                q_val, k_val, v_val = (_val(a) for a in node.args[:3])
            num_heads, head_dim = int(q_val.shape[1]), int(v_val.shape[-1])
            v_arg = node.args[1] if decomposed is not None else node.args[2]
            v_lin, v_ok, reason, v_rows = self._trace_back_linear(v_arg, head_dim)
            o_lin, o_ok, o_reason = self._trace_forward_linear(node, head_dim)
            v_size = (v_rows[1] - v_rows[0]) if v_rows else (v_lin.out_features if v_lin else 0)
            num_kv = v_size // head_dim if v_lin else int(k_val.shape[1])
            att = Attention(
                node,
                None,
                None,
                v_lin,
                o_lin,
                num_heads,
                num_kv,
                head_dim,
                v_ok and o_ok,
                reason or o_reason,
                v_rows,
                decomposed is not None,
            )
            if v_lin is not None and v_rows is None:
                q_arg, k_arg = (decomposed if decomposed is not None else node).args[:2]
                for lin in self.linears:
                    if lin is v_lin or lin.node.args[0] is not v_lin.node.args[0]:
                        continue
                    if _reaches(lin.node, q_arg):
                        att.q = lin
                    elif _reaches(lin.node, k_arg):
                        att.k = lin
            self.attention.append(att)

    def _trace_back_linear(
        self, node: fx.Node, head_dim: int
    ) -> tuple[Linear | None, bool, str, tuple[int, int] | None]:
        """The linear layer that computes V, whether R2 can rotate it, why not, and the rows of
        its output that are V when it is a fused q/k/v projection (split or sliced on the last
        dim: GPT-2's ``c_attn``, Phi-3's ``qkv_proj``)."""
        cur = node
        rows: tuple[int, int] | None = None
        while isinstance(cur, fx.Node) and cur not in self._linear_by_node:
            part = _last_dim_part(cur)
            if part is not None:
                if rows is not None:
                    return None, False, f"value path is sliced twice (at {cur.name})", None
                rows, cur = part
                continue
            if not _is(cur, *_HEAD_OPS):
                return None, False, f"value path passes through {cur.name} ({_target(cur)})", None
            if last_dim(cur) not in (head_dim, None) and cur.target not in _SHAPE_OPS:
                return None, False, f"value path changes the head dim at {cur.name}", None
            cur = cur.args[0]
        lin = self._linear_by_node.get(cur)
        if lin is None:
            return None, False, "no v projection found", None
        if rows is None and len(users(lin.node)) != 1:
            return lin, False, f"{lin.name} output has other readers", None
        if rows is not None and ((rows[1] - rows[0]) % head_dim or rows[0] % head_dim):
            return lin, False, f"{lin.name}: the value rows are not whole heads", None
        if rows is not None and not all(_last_dim_part(u) for u in _split_readers(lin.node)):
            return lin, False, f"{lin.name} output has readers besides its q/k/v parts", None
        return lin, True, "", rows

    def _trace_forward_linear(
        self, node: fx.Node, head_dim: int
    ) -> tuple[Linear | None, bool, str]:
        cur = node
        while True:
            us = users(cur)
            if len(us) != 1:
                return None, False, f"attention output {cur.name} has {len(us)} readers"
            nxt = us[0]
            if nxt in self._linear_by_node and nxt.args[0] is cur:
                lin = self._linear_by_node[nxt]
                if lin.in_features % head_dim:
                    return lin, False, f"{lin.name} input is not a whole number of heads"
                return lin, True, ""
            if _is(nxt, *_ONLINE):  # o_proj's online rotation: the layer after it is o
                lin = self._online_reader(nxt)
                if lin is None:
                    return None, False, f"online rotation {nxt.name} does not feed a linear layer"
                return lin, lin.in_features == cur.meta["val"].shape[-1], ""
            if not _is(nxt, *_HEAD_OPS):
                return None, False, f"attention output passes through {nxt.name} ({_target(nxt)})"
            cur = nxt

    def _online_reader(self, node: fx.Node) -> Linear | None:
        while _is(node, *_ONLINE) and len(users(node)) == 1:
            node = users(node)[0]
        return self._linear_by_node.get(node)

    def _walk_residual(self) -> Residual:
        issues: list[str] = []
        norm_nodes: dict[fx.Node, Norm] = {}
        for norm in self.norms:
            for n in norm.nodes:
                norm_nodes[n] = norm
        embeds = [e for e in self.embeddings if last_dim(e.node)]
        values: set[fx.Node] = {e.node for e in embeds}
        writers: list[Linear] = []
        readers: list[Norm] = []
        direct: list[Linear] = []
        hidden = last_dim(embeds[0].node) if embeds else None
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        frontier = sorted(values, key=order.get)
        while frontier:
            val = frontier.pop(0)
            for u in users(val):
                if u in values:
                    continue
                if _is(u, aten.type_as.default) and u.args[0] is not val:
                    continue  # reads only the dtype of the stream
                if is_feature_transparent(u):
                    values.add(u)
                    frontier.append(u)
                elif _is(u, aten.add.Tensor) and all(isinstance(a, fx.Node) for a in u.args):
                    other = u.args[1] if u.args[0] is val else u.args[0]
                    if other in values or _back_through(other, is_feature_transparent) in values:
                        values.add(u)
                        frontier.append(u)
                        continue
                    src = _back_through(other, is_feature_transparent)
                    if src in self._linear_by_node:
                        writers.append(self._linear_by_node[src])
                        values.add(u)
                        frontier.append(u)
                    else:
                        if src in norm_nodes:
                            issues.append(
                                f"residual add {u.name} adds the output of norm "
                                f"{norm_nodes[src].name}, a norm after the layer (a sandwich "
                                "norm, as in Gemma 2/3): its scale acts on the layer's output "
                                "features, so a rotation of the stream cannot be undone there"
                            )
                        else:
                            issues.append(
                                f"residual add {u.name} adds {src.name} ({_target(src)}), not a "
                                "linear layer's output: a rotation of the stream would not be "
                                "undone there"
                            )
                        values.add(u)
                        frontier.append(u)
                elif u in norm_nodes and norm_nodes[u].input is val:
                    norm = norm_nodes[u]
                    if norm not in readers:
                        readers.append(norm)
                elif u in self._linear_by_node and u.args[0] is val:
                    direct.append(self._linear_by_node[u])
                elif u.op == "output":
                    continue
                else:
                    issues.append(
                        f"residual stream value {val.name} is read by {u.name} ({_target(u)}), "
                        "which is neither a norm, a linear layer nor a residual add"
                    )
        writers.sort(key=lambda lin: order[lin.node])
        readers.sort(key=lambda n: order[n.output])
        return Residual(embeds, values, writers, readers, direct, hidden, issues)

    def _assign_roles(self) -> None:
        for att in self.attention:
            for role, lin in (
                ("attn_q", att.q),
                ("attn_k", att.k),
                ("attn_v" if att.v_rows is None else "attn_qkv", att.v),
                ("attn_o", att.o),
            ):
                if lin is not None:
                    lin.role = role
        for norm in self.residual.norms:
            for lin in norm.readers:
                if lin.role == "other":
                    # a stream reader whose output is the graph's output is the output head
                    out = _forward_through(lin.node, is_feature_transparent)
                    lin.role = "lm_head" if any(u.op == "output" for u, _ in out) else "mlp_in"
        for lin in self.residual.writers:
            if lin.role == "other":
                lin.role = "mlp_out"
        for emb in self.embeddings:
            for lin in emb.tied_linears:
                lin.role = "lm_head"
        for lin in self.residual.direct_readers:
            if lin.role == "other":
                lin.role = "lm_head"
        self.issues = list(self.residual.issues)

    # -- queries -----------------------------------------------------------------------------
    def stream_readers(self) -> list[Linear]:
        """Linear layers that read the residual stream (through a norm or directly)."""
        out = [lin for norm in self.residual.norms for lin in norm.readers]
        return out + [lin for lin in self.residual.direct_readers if lin not in out]

    def summary(self) -> dict:
        roles: dict[str, int] = {}
        for lin in self.linears:
            roles[lin.role] = roles.get(lin.role, 0) + 1
        att = self.attention[0] if self.attention else None
        return {
            "linears": len(self.linears),
            "convs": len(self.convs),
            "roles": roles,
            "norms": {k: sum(n.kind == k for n in self.norms) for k in ("rms", "layer")},
            "embeddings": [
                {"weight": e.weight, "tied": [lin.name for lin in e.tied_linears]}
                for e in self.embeddings
            ],
            "hidden": self.residual.hidden,
            "residual_writers": len(self.residual.writers),
            "residual_norms": len(self.residual.norms),
            "attention": (
                {
                    "layers": len(self.attention),
                    "heads": att.num_heads,
                    "kv_heads": att.num_kv_heads,
                    "head_dim": att.head_dim,
                }
                if att
                else None
            ),
            "issues": self.issues,
        }


def _attr(node) -> str | None:
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _rank(node: fx.Node) -> int:
    v = _val(node)
    return v.dim() if isinstance(v, torch.Tensor) else -1


def _target(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_function" and hasattr(t, "__name__"):
        return getattr(t, "__name__", str(t)) if t is not operator.getitem else "getitem"
    return f"{node.op}:{t}"


def _back_through(node: fx.Node, transparent) -> fx.Node:
    while isinstance(node, fx.Node) and transparent(node):
        node = node.args[0]
    return node


def _forward_through(node: fx.Node, transparent) -> list[tuple[fx.Node, fx.Node]]:
    """(reader, value it reads) pairs past transparent ops."""
    out: list[tuple[fx.Node, fx.Node]] = []
    stack = [node]
    while stack:
        cur = stack.pop()
        for u in users(cur):
            if transparent(u) and u.args[0] is cur:
                stack.append(u)
            else:
                out.append((u, cur))
    return out


def _reaches(src: fx.Node, dst: fx.Node, limit: int = 40) -> bool:
    """Whether ``dst`` is reachable from ``src`` within ``limit`` steps (for q/k identification)."""
    frontier, seen = [src], {src}
    for _ in range(limit):
        nxt = []
        for n in frontier:
            if n is dst:
                return True
            for u in n.users:
                if u not in seen:
                    seen.add(u)
                    nxt.append(u)
        frontier = nxt
    return False
