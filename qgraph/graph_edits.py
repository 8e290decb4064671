"""The few graph edits passes are allowed to make. None of them writes into an existing tensor:
new values are registered as new attributes, so tensors shared with the user's model stay intact."""

from __future__ import annotations

import re

import torch
from torch import fx

from .memory import released


def get_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _owner(gm: fx.GraphModule, target: str) -> tuple[torch.nn.Module, str]:
    *path, leaf = target.split(".")
    mod = gm
    for part in path:
        mod = getattr(mod, part)
    return mod, leaf


def set_tensor(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Rebind attribute ``target`` to ``value`` (the old tensor object is left untouched)."""
    mod, leaf = _owner(gm, target)
    value = value.detach()
    old = getattr(mod, leaf, None)
    dropped = old.nbytes if isinstance(old, torch.Tensor) else 0
    del old
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    if leaf in mod._buffers:
        del mod._buffers[leaf]
    if hasattr(mod, leaf):
        delattr(mod, leaf)
    mod.register_buffer(leaf, value)
    released(dropped)


def new_attr(gm: fx.GraphModule, hint: str, value: torch.Tensor) -> str:
    """Register ``value`` under a fresh top-level name derived from ``hint``; returns the target."""
    base = "qg_" + re.sub(r"[^0-9a-zA-Z_]", "_", hint)
    name, i = base, 1
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, value.detach())
    return name


def get_attr_node(gm: fx.GraphModule, before: fx.Node, target: str) -> fx.Node:
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    node.meta["val"] = get_tensor(gm, target)
    return node


def set_arg_tensor(
    gm: fx.GraphModule, user: fx.Node, index: int, value: torch.Tensor, hint: str
) -> str:
    """Give ``user``'s argument ``index`` the tensor ``value``.

    If the current get_attr feeds only ``user`` its attribute is rebound; if it is shared
    (tied weights) a new attribute is made for ``user`` alone, which unties the pair.
    Returns the attribute target now used.
    """
    args = list(user.args)
    while len(args) <= index:
        args.append(None)
    cur = args[index]
    if isinstance(cur, fx.Node) and cur.op == "get_attr" and len(cur.users) == 1:
        set_tensor(gm, cur.target, value)
        cur.meta["val"] = value
        return cur.target
    target = new_attr(gm, hint, value)
    args[index] = get_attr_node(gm, _first_input(gm), target)
    user.args = tuple(args)
    return target


def _first_input(gm: fx.GraphModule) -> fx.Node:
    """Constants are placed at the top of the graph, before the first non-placeholder node."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            return node
    raise ValueError("empty graph")


def bypass(node: fx.Node, replacement: fx.Node) -> None:
    """Replace every use of ``node`` by ``replacement`` and erase ``node``."""
    node.replace_all_uses_with(replacement)
    node.graph.erase_node(node)


def erase_unused_attrs(gm: fx.GraphModule) -> int:
    """Drop get_attr nodes nobody reads and attributes no node references; returns how many."""
    graph = gm.graph
    removed = 0
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            mod, leaf = _owner(gm, name)
            mod._parameters.pop(leaf, None)
            mod._buffers.pop(leaf, None)
            removed += 1
    return removed


def forget_erased_nodes(graph: fx.Graph) -> int:
    """Drop erased nodes from ``graph``'s name table; returns how many.

    torch.fx's ``Graph.erase_node`` unlinks a node but leaves it in the graph's ``_Namespace``
    (``_obj_to_name``), so every erased node stays alive with its ``meta`` for the life of the
    graph. A get_attr node's ``meta["val"]`` is the tensor itself, so the float weight of every
    layer ``quantize`` replaced stayed alive after ``gptq`` dropped it from its record: SmolLM2
    W4A16 kept 0.4 GB of float weights through evaluation and saving, the whole run's peak. The
    names stay reserved (``_used_names`` is untouched), so later nodes are named as before.
    A no-op if torch's private layout changes."""
    table = getattr(getattr(graph, "_graph_namespace", None), "_obj_to_name", None)
    if not isinstance(table, dict):
        return 0
    erased = [o for o in table if isinstance(o, fx.Node) and getattr(o, "_erased", False)]
    for node in erased:
        del table[node]
    return len(erased)


def finish(gm: fx.GraphModule) -> None:
    """Clean up and regenerate code after a batch of edits."""
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    erase_unused_attrs(gm)
    gm.graph.lint()
    gm.recompile()


def insert_call(
    gm: fx.GraphModule, before: fx.Node, target, args: tuple, meta: dict | None = None
) -> fx.Node:
    """Insert ``target(*args)`` just before ``before``; ``meta['val']`` is computed on the fake
    values of the arguments so that analyses see the new node's shape."""
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(target, args)
    fake_args = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in args]
    node.meta["val"] = _fake_call(target, fake_args)
    node.meta.update(meta or {})
    return node


def _fake_call(target, args: list):
    """Evaluate ``target`` on fake (or real) tensors, under the arguments' own fake mode."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor

    mode = detect_fake_mode(tuple(a for a in args if isinstance(a, torch.Tensor)))
    if mode is None:
        return target(*args)
    args = [
        mode.from_tensor(a) if isinstance(a, torch.Tensor) and not isinstance(a, FakeTensor) else a
        for a in args
    ]
    with mode:
        return target(*args)


def online_rotation_input(node: fx.Node) -> fx.Node | None:
    """The ``qgraph::hadamard`` node that feeds ``node``'s first argument, if any."""
    src = node.args[0] if node.args else None
    if isinstance(src, fx.Node) and src.op == "call_function":
        if src.target is torch.ops.qgraph.hadamard.default:
            return src
    return None
