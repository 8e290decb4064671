"""Online rotations of a linear layer's input: ``x → pad(x) Q`` in the graph, ``W ← W_pad Q``.

Shared by ``rotate`` (R4 on down_proj, the online half of R2 on o_proj) and ``expand`` (which
widens such a rotation from ``N`` to a larger Hadamard size ``M``). ``Q = diag(s) H_M / √M`` is
a randomized Hadamard applied by the ``qgraph::hadamard`` op in O(M log M); zero-padding ``x``
and ``W``'s input axis from ``N`` to ``M`` first keeps the layer exact:
``(x_pad Q)(W_pad Q)ᵀ = x_pad W_padᵀ = x Wᵀ``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qgraph.errors import StructureError
from qgraph.graph_edits import (
    get_attr_node,
    get_tensor,
    insert_call,
    new_attr,
    online_rotation_input,
    set_arg_tensor,
    set_tensor,
)
from qgraph.kernels.hadamard import (
    fast_hadamard_transform,
    hadamard_factorization,
    random_signs,
)

HADAMARD = torch.ops.qgraph.hadamard.default
PAD = torch.ops.aten.constant_pad_nd.default
LINEAR = torch.ops.aten.linear.default
MUL = torch.ops.aten.mul.Tensor
META = "qgraph_online"


@dataclass
class OnlineRotation:
    """An online rotation feeding a linear layer: where it is and what it applies."""

    node: fx.Node  # the hadamard node
    pad: fx.Node | None  # the constant_pad_nd before it, when expanded
    source: fx.Node  # the layer's original input
    in_features: int  # N: the layer's width before expansion
    size: int  # M: the rotation's size (== N unless expanded)
    signs: torch.Tensor


def find(lin_node: fx.Node, gm: fx.GraphModule) -> OnlineRotation | None:
    """The online rotation directly feeding ``lin_node``'s input, or None."""
    h = online_rotation_input(lin_node)
    if h is None:
        return None
    src = h.args[0]
    pad = src if isinstance(src, fx.Node) and src.target is PAD else None
    source = pad.args[0] if pad is not None else src
    size = int(h.meta["val"].shape[-1])
    n_in = int(h.meta.get(META, {}).get("in_features", size))
    signs_node = h.args[1]
    signs = get_tensor(gm, signs_node.target) if signs_node is not None else torch.ones(size)
    return OnlineRotation(h, pad, source, n_in, size, signs)


def next_sizes(n: int, count: int, multiple: int = 32) -> list[int]:
    """The ``count`` smallest sizes ``M > n`` with a known Hadamard order that are multiples of
    ``multiple`` (expansion steps 1, 2, ...)."""
    out: list[int] = []
    m = (n // multiple + 1) * multiple
    while len(out) < count:
        if hadamard_factorization(m) is not None:
            out.append(m)
        m += multiple
    return out


def smallest_supported(n: int, multiple: int = 32) -> int:
    """``n`` itself when a Hadamard matrix of order ``n`` is known, else the next supported size."""
    return n if hadamard_factorization(n) is not None else next_sizes(n, 1, multiple)[0]


def insert(
    gm: fx.GraphModule,
    lin_node: fx.Node,
    weight_target: str,
    size: int,
    seed: int,
    hint: str,
    source: fx.Node | None = None,
    weight: torch.Tensor | None = None,
) -> OnlineRotation:
    """Rotate the input of the linear ``lin_node`` online with a size-``size`` Hadamard.

    ``weight`` is the layer's un-rotated float weight ``[out, N]`` (default: its current one)
    and ``source`` the tensor it multiplies (default: its current input).
    """
    current = get_tensor(gm, weight_target)
    w = current if weight is None else weight
    n_in = int(w.shape[1])
    if size < n_in or hadamard_factorization(size) is None:
        raise StructureError(f"{hint}: no online rotation of size {size} for input width {n_in}")
    origin = lin_node.args[0] if source is None else source
    x = origin
    if size > n_in:
        x = insert_call(gm, lin_node, PAD, (origin, [0, size - n_in], 0.0))
    signs = random_signs(size, seed).to(torch.float32)
    signs_node = get_attr_node(gm, lin_node, new_attr(gm, hint + "_signs", signs))
    h = insert_call(gm, lin_node, HADAMARD, (x, signs_node, True))
    h.meta[META] = {"in_features": n_in, "size": size, "seed": seed}
    rotated = rotated_weight(w, size, signs).to(current.dtype)
    set_arg_tensor(gm, lin_node, 1, rotated, hint + ".weight")
    lin_node.args = (h, *lin_node.args[1:])
    return OnlineRotation(h, x if size > n_in else None, origin, n_in, size, signs)


def rotated_weight(w: torch.Tensor, size: int, signs: torch.Tensor) -> torch.Tensor:
    """``W_pad Q`` in float64: the weight a layer holds behind a size-``size`` online rotation."""
    w64 = torch.nn.functional.pad(w.double(), (0, size - int(w.shape[1])))
    return fast_hadamard_transform(w64, True, signs.double())


def unrotated_weight(gm: fx.GraphModule, weight_target: str, rot: OnlineRotation) -> torch.Tensor:
    """The layer's ``[out, N]`` weight without its online rotation, in float64."""
    w = get_tensor(gm, weight_target).double()
    return fast_hadamard_transform(w, True, rot.signs.double(), transpose=True)[
        :, : rot.in_features
    ]


def move_signs_upstream(gm: fx.GraphModule, rot: OnlineRotation) -> bool:
    """Move the rotation's signs into the output rows of the linear layer that feeds its input
    through an elementwise product (the MLP's up projection: ``s ⊙ (silu(g) ⊙ u) = silu(g) ⊙
    (s ⊙ u)``, exact). The online part is then a sign-free Hadamard, which the ONNX export folds
    into static matrices, while the rotation keeps its independent random signs (rank-one signs,
    which fold as they are, measured worse on W4A4). Returns whether the signs moved."""
    src = rot.source
    if rot.node.args[1] is None or src.op != "call_function" or src.target is not MUL:
        return False
    if len(src.users) != 1 or len(src.args) != 2:
        return False
    n = rot.in_features
    for arg in src.args:
        if not (isinstance(arg, fx.Node) and arg.target is LINEAR and len(arg.users) == 1):
            continue
        weight, bias = arg.args[1], arg.args[2] if len(arg.args) > 2 else None
        if not isinstance(weight, fx.Node) or weight.op != "get_attr":
            continue
        bias_ok = bias is None or (isinstance(bias, fx.Node) and bias.op == "get_attr")
        w = get_tensor(gm, weight.target)
        if not bias_ok or w.dim() != 2 or w.shape[0] != n:
            continue
        signs = rot.signs[:n].to(w.dtype)
        set_arg_tensor(gm, arg, 1, w * signs[:, None], f"{weight.target}_signed")
        if bias is not None:
            set_arg_tensor(gm, arg, 2, get_tensor(gm, bias.target) * signs, f"{bias.target}_signed")
        set_tensor(gm, rot.node.args[1].target, torch.ones_like(rot.signs))
        rot.signs = torch.ones_like(rot.signs)
        return True
    return False
