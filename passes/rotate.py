"""rotate: offline orthogonal rotations folded into weights (QuaRot/SpinQuant R1 and R2). Exact.

R1 rotates the residual stream by ``Q`` (size = hidden): embeddings and writers produce ``x Q``,
readers use ``W Q``. This is exact only when every norm on the stream is an RMSNorm with
``γ = 1`` — hence ``requires = {norms-fused}`` — and every other consumer of the stream is a
linear layer or a residual add; anything else is refused with the node that breaks it.
R2 rotates each attention head's value path by ``Q_h`` (size = head dim): ``W_v ← Q_hᵀ W_v``
per head, ``W_o ← W_o blockdiag(Q_h)``. One ``Q_h`` for all heads keeps GQA consistent.

Online rotations (``online=r2+r3+r4``) stay in the graph as ``qgraph::hadamard`` ops:
R3 on queries and keys after RoPE (cancels in ``q kᵀ``), R4 on down_proj's input and the
online half of R2 on o_proj's input (``W ← W Q``). o_proj's input mixes all heads
(``heads × head_dim``), so its online rotation is one Hadamard of that size, which also covers
head counts with no Hadamard order (SmolLM2's 9). An input width with no known Hadamard order
is zero-padded to the next supported size (exact; reported in the summary).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from qgraph.errors import PipelineError, StructureError
from qgraph.graph_edits import (
    finish,
    get_attr_node,
    get_tensor,
    insert_call,
    new_attr,
    set_arg_tensor,
)
from qgraph.kernels.hadamard import hadamard_factorization, random_signs
from qgraph.kernels.rotation import Rotation, rotate_input, rotate_output
from qgraph.model import Model
from qgraph.pass_manager import Option, Pass, register
from qgraph.structure import gqa_source

from . import online_rotation

ONLINE = ("r2", "r3", "r4")
HADAMARD = torch.ops.qgraph.hadamard.default


def check_r1(model: Model) -> None:
    """Refuse (naming the node) a residual stream that a rotation would not leave exact."""
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
        "random orthogonal matrix. Exact. For 4-bit activations add online=r2+r4 (offline "
        "rotations alone leave the o_proj and down_proj inputs with their outliers); for the "
        "best 4-bit weights add online=r4 (W4A16 GPTQ 1.098x -> 1.087x float on SmolLM2, "
        "mean of 3 seeds, at the cost of one rotation per MLP in the exported file) and "
        "learn-rotations after it (1.077x)."
    )
    options = (
        Option("seed", int, 0, "seed of the random signs / random orthogonal matrices"),
        Option("kind", str, "hadamard", "rotation family", ("hadamard", "random")),
        Option(
            "precision",
            str,
            "float32",
            "arithmetic of the offline Hadamard rotations of float32 weights: float32 GEMMs "
            "(~3× faster, within a few ulp) or float64 (correctly rounded weights)",
            ("float32", "float64"),
        ),
        Option("r1", bool, True, "rotate the residual stream"),
        Option("r2", bool, True, "rotate each head's value/output path"),
        Option(
            "online",
            str,
            "none",
            "online Hadamard rotations kept in the graph: 'none', 'all' or a '+' list of "
            "r2 (o_proj input), r3 (queries and keys after RoPE), r4 (down_proj input)",
        ),
    )
    requires = frozenset({"norms-fused"})
    provides = frozenset({"rotated"})
    forbids = frozenset({"quantized"})
    exact = True

    def validate(self) -> None:
        self.online_set()

    def online_set(self) -> set[str]:
        text = self.opt("online")
        if text == "none":
            return set()
        if text == "all":
            return set(ONLINE)
        parts = set(text.split("+"))
        bad = sorted(parts - set(ONLINE))
        if bad:
            raise PipelineError(
                f"rotate: unknown online rotation(s) {bad} in online={text!r}; "
                f"use 'none', 'all' or a '+' list of {', '.join(ONLINE)}"
            )
        return parts

    def run(self, model: Model) -> dict[str, Any]:
        gm = model.gm
        sv = model.structure
        summary: dict[str, Any] = {}
        fast = self.opt("precision") == "float32"
        if self.opt("r1"):
            check_r1(model)
            rot = Rotation.make(sv.residual.hidden, self.opt("seed"), self.opt("kind"), fast)
            summary["r1"] = rot.description
            summary["r1_layers"] = apply_r1(gm, sv, rot)
        if self.opt("r2"):
            done, refused = 0, []
            for att in sv.attention:
                if not r2_possible(att):
                    refused.append(
                        att.reason or f"attention {att.node.name}: v/o projection not found"
                    )
                    continue
                rot = Rotation.make(att.head_dim, self.opt("seed") + 1, self.opt("kind"), fast)
                summary["r2"] = rot.description
                rotate_heads(gm, att, rot)
                done += 1
            summary["r2_heads_rotated_in_layers"] = done
            if refused:
                summary["r2_refused"] = refused
        online = self.online_set()
        if online:
            summary.update(_online(model, online, self.opt("seed")))
        finish(gm)
        return summary


def _online(model: Model, which: set[str], seed: int) -> dict[str, Any]:
    gm, sv = model.gm, model.structure
    out: dict[str, Any] = {}
    o_layers = [att.o for att in sv.attention if att.o is not None] if "r2" in which else []
    down_layers = [lin for lin in sv.linears if lin.role == "mlp_out"] if "r4" in which else []
    targets = [(lin, seed + 2) for lin in o_layers] + [(lin, seed + 4) for lin in down_layers]
    padded, moved = [], 0
    for lin, s in targets:
        if online_rotation.find(lin.node, gm) is not None:
            raise StructureError(f"rotate: {lin.name} already has an online rotation")
        size = online_rotation.smallest_supported(lin.in_features)
        if size != lin.in_features:
            padded.append(f"{lin.name}: {lin.in_features} → {size}")
        rot = online_rotation.insert(gm, lin.node, lin.weight, size, s, lin.name)
        if lin.role == "mlp_out" and online_rotation.move_signs_upstream(gm, rot):
            moved += 1
    if moved:
        out["r4_signs_moved_upstream"] = moved
    if "r2" in which:
        out["r2_online_layers"] = len(o_layers)
    if "r4" in which:
        out["r4_layers"] = len(down_layers)
    if padded:
        widths = Counter(p.split(": ", 1)[1] for p in padded)
        out["online_padded"] = (
            ", ".join(f"{k} ×{n}" for k, n in sorted(widths.items()))
            + " (no Hadamard matrix of the input width is known; zero-padded, exact)"
        )
        out["online_padded_layers"] = padded
    if "r3" in which:
        out["r3_attention_layers"] = _rotate_qk(gm, sv.attention, seed + 3)
    return out


def _rotate_qk(gm, attention, seed: int) -> int:
    """R3: ``q ← q Q``, ``k ← k Q`` right before attention; ``(qQ)(kQ)ᵀ = q kᵀ`` exactly."""
    if not attention:
        return 0
    head_dim = attention[0].head_dim
    decomposed = [a.node.name for a in attention if a.decomposed]
    if decomposed:
        raise StructureError(
            f"rotate: R3 rotates the queries and keys of scaled_dot_product_attention; the "
            f"attention at {decomposed[0]} is written out as MatMul/Softmax (as read from an ONNX "
            "file): leave r3 out of online="
        )
    if hadamard_factorization(head_dim) is None:
        raise StructureError(
            f"rotate: R3 needs a Hadamard matrix of the head size {head_dim}, and none is known; "
            "leave r3 out of online="
        )
    target = new_attr(gm, "r3_signs", random_signs(head_dim, seed).to(torch.float32))
    for att in attention:
        sdpa = att.node
        signs = get_attr_node(gm, sdpa, target)
        args = list(sdpa.args)
        for i in (0, 1):
            if int(args[i].meta["val"].shape[-1]) != head_dim:
                raise StructureError(f"rotate: R3 at {sdpa.name}: q/k head size differs from v's")
        args[0] = insert_call(gm, sdpa, HADAMARD, (args[0], signs, True))
        sdpa.args = tuple(args)
        # keys are rotated before their GQA repeat: fewer heads to rotate, and a key cache then
        # stores rotated keys (the repeat copies heads, which commutes with a per-head rotation)
        key, chain = gqa_source(args[1])
        reader = chain[-1] if chain else sdpa
        key_signs = get_attr_node(gm, reader, target)
        reader.replace_input_with(key, insert_call(gm, reader, HADAMARD, (key, key_signs, True)))
    return len(attention)


def r2_possible(att) -> bool:
    """Whether an attention's value path can take R2 (v and o found, nothing between them that
    a per-head rotation would not commute with)."""
    return att.v_path_ok and att.v is not None and att.o is not None


def apply_r1(gm, sv, rot: Rotation) -> int:
    """Rotate the residual stream by ``rot``: embeddings ``E Q``, readers ``W Q``, writers
    ``Qᵀ W`` (and their biases); returns the number of linear layers changed."""
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
    return len(readers) + len(sv.residual.writers)


def rotate_heads(gm, att, rot: Rotation) -> None:
    """R2 on one attention: ``W_v ← Q_hᵀ W_v`` per head, ``W_o ← W_o blockdiag(Q_h)``. An o_proj
    behind an online rotation holds ``W_o Q_online``; its un-rotated weight is rotated instead."""
    hd = att.head_dim
    v = att.v
    start, stop = att.v_rows or (0, v.out_features)  # a fused q/k/v projection: its V rows
    full = get_tensor(gm, v.weight)  # [.., d]
    w = full[start:stop]  # [kv*hd, d]
    per_head = w.reshape(-1, hd, w.shape[1])  # [kv, hd, d]
    rotated = rot.right(per_head.transpose(1, 2)).transpose(1, 2)  # Q_hᵀ W_h for every head
    new_w = full.clone()
    new_w[start:stop] = rotated.reshape(w.shape).to(w.dtype)
    set_arg_tensor(gm, v.node, 1, new_w, v.name + ".weight")
    if v.bias:
        full_b = get_tensor(gm, v.bias)
        new_b = full_b.clone()
        new_b[start:stop] = rot.right(full_b[start:stop].reshape(-1, hd)).reshape(-1)
        set_arg_tensor(gm, v.node, 2, new_b, v.name + ".bias")
    o = att.o
    stored = get_tensor(gm, o.weight)
    online = online_rotation.find(o.node, gm)
    wo = stored if online is None else online_rotation.unrotated_weight(gm, o.weight, online)
    new_o = rot.right(wo.reshape(wo.shape[0], -1, hd)).reshape(wo.shape)
    if online is not None:
        new_o = online_rotation.rotated_weight(new_o, online.size, online.signs)
    set_arg_tensor(gm, o.node, 1, new_o.to(stored.dtype), o.name + ".weight")
