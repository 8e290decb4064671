"""fuse-norms: merge norm affine parameters into the linear layers that read them (exact).

RMSNorm/LayerNorm ``γ`` becomes ``W ← W diag(γ)``, LayerNorm ``β`` becomes ``b ← b + W β``, and a
pre-LN model's LayerNorms on the residual stream become RMSNorms after every writer to the
stream (and every embedding) is made zero-mean. BatchNorm after a convolution is folded into
the convolution. Afterwards every norm has ``γ = 1``, which is what rotations need.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from qgraph.errors import StructureError
from qgraph.graph_edits import bypass, finish, get_tensor, set_arg_tensor
from qgraph.kernels.chunked import CHUNK_BYTES, map_rows
from qgraph.model import Model
from qgraph.pass_manager import Option, Pass, register
from qgraph.structure import Linear, Norm

aten = torch.ops.aten


def _linear_bias(gm: fx.GraphModule, lin: Linear) -> torch.Tensor | None:
    return get_tensor(gm, lin.bias) if lin.bias else None


def _adds_to_a_layer_output(sv, node: fx.Node) -> bool:
    """Whether ``node`` is an add with a linear layer's output: a residual add fed by a norm's
    output, which makes the norm post-LN."""
    if node.target is not aten.add.Tensor:
        return False
    linears = {lin.node for lin in sv.linears}
    for arg in node.args:
        while isinstance(arg, fx.Node) and arg not in linears and arg.op == "call_function":
            if not arg.args or not isinstance(arg.args[0], fx.Node):
                break
            if arg.target not in (aten.view.default, aten.reshape.default, aten.to.dtype,
                                  aten.dropout.default, aten.clone.default):  # fmt: skip
                break
            arg = arg.args[0]
        if arg in linears:
            return True
    return False


def fold_affine(gm: fx.GraphModule, norm: Norm) -> None:
    """Fold γ (and β) of ``norm`` into its readers and drop them from the norm."""
    gamma = get_tensor(gm, norm.gamma).double() + norm.gamma_offset if norm.gamma else None
    beta = get_tensor(gm, norm.beta).double() if norm.beta else None
    for lin in norm.readers:
        w = get_tensor(gm, lin.weight)
        if beta is not None:
            old_b = _linear_bias(gm, lin)
            b = (
                old_b.double()
                if old_b is not None
                else torch.zeros(lin.out_features, dtype=torch.float64)
            )
            step = max(1, CHUNK_BYTES // (8 * w.shape[1]))
            wb = torch.cat([w[i : i + step].double() @ beta for i in range(0, len(w), step)])
            set_arg_tensor(gm, lin.node, 2, (b + wb).to(w.dtype), lin.name + ".bias")
        if gamma is not None:
            new_w = map_rows(lambda rows: rows.double() * gamma, w)
            set_arg_tensor(gm, lin.node, 1, new_w, lin.name + ".weight")
    if norm.kind == "rms" and norm.gamma_node is not None:
        node = norm.gamma_node
        normed = norm.nodes[norm.nodes.index(node) - 1]  # x̂ (or its cast) before the scale
        bypass(node, node.args[0] if node.args[0] is normed else node.args[1])
    elif norm.output.target in (aten.layer_norm.default, aten.rms_norm.default):
        args = list(norm.output.args)
        args[2] = None
        if norm.kind == "layer":
            args[3] = None
        norm.output.args = tuple(args)


def replace_layer_norm_with_rms(gm: fx.GraphModule, norm: Norm) -> None:
    """``layer_norm(x)`` without affine → ``x * rsqrt(mean(x²) + eps)`` (valid on a zero-mean stream)."""
    node = norm.output
    x = node.args[0]
    g = gm.graph
    with g.inserting_before(node):
        sq = g.call_function(aten.pow.Tensor_Scalar, (x, 2))
        mean = g.call_function(aten.mean.dim, (sq, [-1], True))
        add = g.call_function(aten.add.Tensor, (mean, norm.eps))
        rs = g.call_function(aten.rsqrt.default, (add,))
        out = g.call_function(aten.mul.Tensor, (x, rs))
    for n, like in ((sq, x), (mean, None), (add, None), (rs, None), (out, node)):
        if like is not None and "val" in like.meta:
            n.meta["val"] = like.meta["val"]
    bypass(node, out)


def center_stream(gm: fx.GraphModule, model: Model) -> int:
    """Make every residual writer and embedding produce zero-mean vectors (exact for pre-LN)."""
    sv = model.structure
    count = 0
    for emb in sv.residual.embeddings:
        e = get_tensor(gm, emb.weight)
        centered = map_rows(lambda r: r.double() - r.double().mean(-1, keepdim=True), e)
        set_arg_tensor(gm, emb.node, 0, centered, emb.weight)
        count += 1
    for lin in sv.residual.writers:
        w = get_tensor(gm, lin.weight)
        w64 = w.double()
        set_arg_tensor(
            gm, lin.node, 1, (w64 - w64.mean(0, keepdim=True)).to(w.dtype), lin.name + ".weight"
        )
        b = _linear_bias(gm, lin)
        if b is not None:
            b64 = b.double()
            set_arg_tensor(gm, lin.node, 2, (b64 - b64.mean()).to(b.dtype), lin.name + ".bias")
        count += 1
    return count


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold eval-mode BatchNorm that directly follows a convolution with constant weights."""
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (
            aten._native_batch_norm_legit_no_training.default,
            aten.batch_norm.default,
        ):
            continue
        conv = node.args[0]
        if not (
            isinstance(conv, fx.Node)
            and conv.target is aten.conv2d.default
            and len(conv.users) == 1
        ):
            continue
        w_node = conv.args[1]
        b_node = conv.args[2] if len(conv.args) > 2 else None
        bn_w, bn_b, mean, var = (node.args[i] for i in (1, 2, 3, 4))
        eps = node.args[7] if node.target is aten.batch_norm.default else node.args[6]
        if not all(isinstance(t, fx.Node) and t.op == "get_attr" for t in (w_node, mean, var)):
            continue
        get = lambda n: get_tensor(gm, n.target).double() if isinstance(n, fx.Node) else None  # noqa: E731
        w, mu, v = get(w_node), get(mean), get(var)
        gamma = get(bn_w) if bn_w is not None else torch.ones_like(mu)
        beta = get(bn_b) if bn_b is not None else torch.zeros_like(mu)
        b = get(b_node) if b_node is not None else torch.zeros_like(mu)
        k = gamma / torch.sqrt(v + eps)
        dtype = get_tensor(gm, w_node.target).dtype
        set_arg_tensor(gm, conv, 1, (w * k.view(-1, 1, 1, 1)).to(dtype), w_node.target)
        set_arg_tensor(gm, conv, 2, ((b - mu) * k + beta).to(dtype), w_node.target + "_bias")
        out = node
        if node.target is aten._native_batch_norm_legit_no_training.default:
            getters = [u for u in node.users if u.target.__name__ == "getitem" and u.args[1] == 0]
            for u in getters:
                bypass(u, conv)
            if not node.users:
                gm.graph.erase_node(node)
        else:
            bypass(out, conv)
        folded += 1
    return folded


@register
class FuseNorms(Pass):
    name = "fuse-norms"
    help = (
        "Merge norm scales/shifts into the linear layers that read them, convert pre-LN "
        "LayerNorms on the residual stream to RMSNorm, and fold BatchNorm into convolutions. Exact."
    )
    options = (
        Option(
            "ln-to-rms", bool, True, "convert residual-stream LayerNorms to RMSNorm (pre-LN only)"
        ),
    )
    provides = frozenset({"norms-fused"})
    forbids = frozenset({"quantized"})
    exact = True

    def run(self, model: Model) -> dict[str, Any]:
        gm = model.gm
        sv = model.structure
        folded, skipped = 0, []
        for norm in sv.norms:
            if norm.other_readers:
                names = ", ".join(n.name for n in norm.other_readers[:3])
                post_ln = any(_adds_to_a_layer_output(sv, u) for u in norm.other_readers)
                why = (
                    " (post-LN: the norm's output is the residual stream itself, as in BERT; "
                    "such models take quantization without rotation)"
                    if post_ln
                    else ""
                )
                skipped.append(
                    f"{norm.name}: its output feeds {names}, not only linear layers{why}"
                )
                continue
            if norm.gamma or norm.beta:
                fold_affine(gm, norm)
                folded += 1
        stream_ln = [n for n in sv.residual.norms if n.kind == "layer"]
        converted = centered = 0
        if stream_ln and self.opt("ln-to-rms"):
            problems = list(sv.residual.issues) + [
                s for s in skipped if any(s.startswith(n.name) for n in stream_ln)
            ]
            if sv.residual.direct_readers:
                problems.append(
                    "the residual stream is read directly by " + sv.residual.direct_readers[0].name
                )
            if problems:
                raise StructureError(
                    "fuse-norms: cannot turn the residual stream's LayerNorms into RMSNorms: "
                    + "; ".join(problems)
                    + ". Run with ln-to-rms=false to fold the affine parameters only."
                )
            centered = center_stream(gm, model)
            for norm in stream_ln:
                replace_layer_norm_with_rms(gm, norm)
                converted += 1
        batchnorms = fold_batchnorm(gm)
        finish(gm)
        if stream_ln and not converted:
            model.properties.discard("rms-stream")
        elif sv.residual.norms:
            model.properties.add("rms-stream")
        return {
            "folded_norms": folded,
            "layernorm_to_rms": converted,
            "centered_writers": centered,
            "batchnorm_folded": batchnorms,
            "not_fusable": skipped,
        }
