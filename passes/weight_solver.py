"""The shared driver of passes that re-solve quantized weights layer by layer (gptq,
learn-rounding): walk the quantized linear layers in graph order, in groups that share an
input, hand each layer its float weight, its grid and the Hessian ``XᵀX`` of its input as the
current graph produces it, and write the solver's codes back before the run moves on."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx
from tqdm import tqdm

from qgraph.calibration import ResumableRun, input_hessian
from qgraph.errors import DataError
from qgraph.graph_edits import set_tensor
from qgraph.model import Model

from .quantize import WeightSpec, to_storage

QLINEAR = torch.ops.qgraph.qlinear.default

#: solve(node, float weight [out, in], spec, hessian) -> (codes, scale, zero) in quant.py layout
Solver = Callable[[fx.Node, torch.Tensor, WeightSpec, torch.Tensor], tuple]


def quantized_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Quantized linear nodes grouped by their (shared) input, in graph order."""
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is QLINEAR and "qgraph_quant" in node.meta:
            by_input.setdefault(node.args[0], []).append(node)
    return list(by_input.values())


def layer_spec(node: fx.Node) -> WeightSpec:
    info = node.meta["qgraph_quant"]
    return WeightSpec(info["bits"], info["granularity"], info["group_size"], info["symmetric"])


def solve_in_graph_order(model: Model, windows: int, desc: str, solve: Solver) -> tuple[int, int]:
    """Run ``solve`` on every quantized layer; returns (groups, calibration tokens)."""
    if model.calibration is None:
        raise DataError(f"{desc}: needs calibration data (Model.set_calibration or --calib-text)")
    batch = model.calibration[:windows]
    gm = model.gm
    groups = quantized_groups(gm)
    first = {g[0]: g for g in groups}
    left = len(groups)
    bar = tqdm(total=len(groups), desc=desc, unit="group", leave=False, disable=None)

    def before(node: fx.Node, run: ResumableRun) -> None:
        nonlocal left
        group = first.get(node)
        if group is None:
            return
        h = input_hessian(run.env[node.args[0]])
        for q in group:
            spec = layer_spec(q)
            codes, scale, zero = solve(q, q.meta["qgraph_quant"]["float_weight"], spec, h)
            stored = to_storage(codes, scale, zero, spec)[:3]
            for arg, value in zip(q.args[1:4], stored, strict=True):
                set_tensor(gm, arg.target, value)
                arg.meta["val"] = value
                run.refresh_attr(arg)
        bar.update(1)
        left -= 1
        if left == 0:
            run.stop()  # nothing after the last layer needs the calibration batch

    with torch.inference_mode():
        ResumableRun(gm, before).run(batch)
    bar.close()
    gm.recompile()
    return len(groups), int(batch.numel())
