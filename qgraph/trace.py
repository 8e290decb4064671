"""Tracing models to FX graphs with torch.export (non-strict), with errors that name the cause."""

from __future__ import annotations

import torch
from torch import fx

from .errors import TraceError
from .graph_edits import finish


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
    finish(gm)  # drop constants nothing reads (e.g. the tied copy of an embedding)
    return gm


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
