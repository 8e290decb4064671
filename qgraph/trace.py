"""Tracing models to FX graphs with torch.export (non-strict), with errors that name the cause."""

from __future__ import annotations

import torch
from torch import fx

from .errors import TraceError
from .graph_edits import finish, get_tensor, set_tensor


class CausalLMLogits(torch.nn.Module):
    """Wraps a Hugging Face causal LM so that the traced graph maps ``input_ids`` → ``logits``."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def trace(
    module: torch.nn.Module,
    example_inputs: tuple,
    dynamic_shapes: dict | tuple | None = None,
) -> fx.GraphModule:
    """Trace ``module`` with torch.export and return a runnable GraphModule.

    Parameters of the returned graph share storage with ``module``; qgraph's passes never
    write to them in place (they register new tensors), so the user's model stays unchanged.
    """
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(
                module, tuple(example_inputs), dynamic_shapes=dynamic_shapes, strict=False
            )
    except Exception as exc:  # export raises many error types; all mean "cannot trace"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TraceError(
            f"cannot trace {type(module).__name__} with torch.export: {type(exc).__name__}: "
            f"{first}. Data-dependent Python control flow (an `if` on tensor values) and "
            "unsupported ops are the usual causes; rewrite that branch with torch.cond/torch.where "
            "or trace a wrapper that avoids it."
        ) from exc
    finally:
        for m, training in modes.items():  # the user's module keeps its train/eval flags
            m.training = training
    gm = program.module()
    drop_guards(gm)
    addmm_to_linear(gm)
    finish(gm)  # drop constants nothing reads (e.g. the tied copy of an embedding)
    return gm


def addmm_to_linear(gm: fx.GraphModule) -> int:
    """Rewrite ``view(addmm(b, view(x, [-1, in]), W), [..., out])`` with a constant ``W [in, out]``
    (GPT-2's ``Conv1D``) into ``linear(x, Wᵀ, b)``, so the structure view sees a linear layer.
    The weight attribute is rebound to its transposed copy (the user's tensor is untouched);
    linear on a 2-D view is the same addmm. Returns how many were rewritten."""
    rewritten = 0
    aten = torch.ops.aten
    views = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.addmm.default or node.kwargs:
            continue
        bias, flat, weight = node.args[:3]
        if not all(isinstance(a, fx.Node) for a in (bias, flat, weight)):
            continue
        if bias.op != "get_attr" or weight.op != "get_attr" or len(weight.users) != 1:
            continue
        if flat.target not in views or len(node.users) != 1:
            continue
        out = next(iter(node.users))
        if out.target not in views:
            continue
        x = flat.args[0]
        w = get_tensor(gm, weight.target)
        if w.dim() != 2 or x.meta["val"].shape[-1] != w.shape[0]:
            continue
        set_tensor(gm, weight.target, w.T.contiguous())
        weight.meta["val"] = get_tensor(gm, weight.target)
        with gm.graph.inserting_before(out):
            lin = gm.graph.call_function(aten.linear.default, (x, weight, bias))
        lin.meta["val"] = out.meta.get("val")
        out.replace_all_uses_with(lin)
        rewritten += 1
    if rewritten:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return rewritten


def drop_guards(gm: fx.GraphModule) -> None:
    """Remove the input-guard call that torch.export inserts; shapes are checked by our callers."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def trace_causal_lm(lm: torch.nn.Module, example_len: int = 16) -> fx.GraphModule:
    """Trace a HF causal LM with dynamic batch and sequence length."""
    ids = torch.zeros((2, example_len), dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=8192)
    return trace(CausalLMLogits(lm), (ids,), {"input_ids": {0: batch, 1: seq}})
