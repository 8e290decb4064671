"""rotate: offline orthogonal rotations folded into weights (QuaRot/SpinQuant R1 and R2). Exact.

R1 rotates the residual stream by ``Q`` (size = hidden): embeddings and writers produce ``x Q``,
readers use ``W Q``. This is exact only when every norm on the stream is an RMSNorm with
``γ = 1`` — hence ``requires = {norms-fused}`` — and every other consumer of the stream is a
linear layer or a residual add; anything else is refused with the node that breaks it.
R2 rotates each attention head's value path by ``Q_h`` (size = head dim): ``W_v ← Q_hᵀ W_v``
per head, ``W_o ← W_o blockdiag(Q_h)``. One ``Q_h`` for all heads keeps GQA consistent.
"""

from __future__ import annotations

from typing import Any

from qgraph.errors import StructureError
from qgraph.graph_edits import finish, get_tensor, set_arg_tensor
from qgraph.kernels.rotation import Rotation, rotate_input, rotate_output
from qgraph.model import Model
from qgraph.pass_manager import Option, Pass, register


def _check_r1(model: Model) -> None:
    sv = model.structure
    res = sv.residual
    problems = list(res.issues)
    if not res.embeddings:
        problems.append("no embedding feeds a residual stream")
    for norm in res.norms:
        if norm.kind != "rms":
            problems.append(
                f"norm {norm.name} on the stream is a LayerNorm (run fuse-norms with ln-to-rms=true)"
            )
        elif norm.gamma or norm.beta:
            problems.append(f"norm {norm.name} still has a scale γ (run fuse-norms first)")
        if norm.other_readers:
            problems.append(
                f"norm {norm.name} output feeds {norm.other_readers[0].name}, which is not a linear layer"
            )
    if problems:
        raise StructureError(
            "rotate: the residual stream cannot be rotated exactly: " + "; ".join(problems)
        )


@register
class Rotate(Pass):
    name = "rotate"
    help = (
        "Fold orthogonal rotations into weights: R1 on the residual stream and R2 per attention "
        "head on the value path. Randomized Hadamard (seeded) where an order is known, else a "
        "random orthogonal matrix. Exact."
    )
    options = (
        Option("seed", int, 0, "seed of the random signs / random orthogonal matrices"),
        Option("kind", str, "hadamard", "rotation family", ("hadamard", "random")),
        Option("r1", bool, True, "rotate the residual stream"),
        Option("r2", bool, True, "rotate each head's value/output path"),
    )
    requires = frozenset({"norms-fused"})
    provides = frozenset({"rotated"})
    forbids = frozenset({"quantized"})
    exact = True

    def run(self, model: Model) -> dict[str, Any]:
        gm = model.gm
        sv = model.structure
        summary: dict[str, Any] = {}
        if self.opt("r1"):
            _check_r1(model)
            rot = Rotation.make(sv.residual.hidden, self.opt("seed"), self.opt("kind"))
            summary["r1"] = rot.description
            for emb in sv.residual.embeddings:
                e = get_tensor(gm, emb.weight)
                set_arg_tensor(gm, emb.node, 0, rotate_input(e, rot), emb.weight)
            readers = sv.stream_readers()
            for lin in readers:
                w = get_tensor(gm, lin.weight)
                set_arg_tensor(gm, lin.node, 1, rotate_input(w, rot), lin.name + ".weight")
            for lin in sv.residual.writers:
                w = get_tensor(gm, lin.weight)
                set_arg_tensor(gm, lin.node, 1, rotate_output(w, rot), lin.name + ".weight")
                if lin.bias:
                    b = get_tensor(gm, lin.bias)
                    set_arg_tensor(gm, lin.node, 2, rotate_output(b, rot), lin.name + ".bias")
            summary["r1_layers"] = len(readers) + len(sv.residual.writers)
        if self.opt("r2"):
            done, refused = 0, []
            for att in sv.attention:
                if not att.v_path_ok or att.v is None or att.o is None:
                    refused.append(
                        att.reason or f"attention {att.node.name}: v/o projection not found"
                    )
                    continue
                rot = Rotation.make(att.head_dim, self.opt("seed") + 1, self.opt("kind"))
                summary["r2"] = rot.description
                _rotate_heads(gm, att, rot)
                done += 1
            summary["r2_heads_rotated_in_layers"] = done
            if refused:
                summary["r2_refused"] = refused
        finish(gm)
        return summary


def _rotate_heads(gm, att, rot: Rotation) -> None:
    hd = att.head_dim
    v = att.v
    w = get_tensor(gm, v.weight)  # [kv*hd, d]
    per_head = w.reshape(-1, hd, w.shape[1])  # [kv, hd, d]
    rotated = rot.right(per_head.transpose(1, 2)).transpose(1, 2)  # Q_hᵀ W_h for every head
    set_arg_tensor(
        gm, v.node, 1, rotated.reshape(w.shape).contiguous().to(w.dtype), v.name + ".weight"
    )
    if v.bias:
        b = get_tensor(gm, v.bias)
        set_arg_tensor(
            gm,
            v.node,
            2,
            rot.right(b.reshape(-1, hd)).reshape(b.shape).to(b.dtype),
            v.name + ".bias",
        )
    o = att.o
    wo = get_tensor(gm, o.weight)  # [d, H*hd]
    new_o = rot.right(wo.reshape(wo.shape[0], -1, hd)).reshape(wo.shape).to(wo.dtype)
    set_arg_tensor(gm, o.node, 1, new_o, o.name + ".weight")
