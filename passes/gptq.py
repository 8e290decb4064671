"""gptq: re-solve the weights of quantized linear layers with GPTQ (arXiv 2210.17323).

Runs after ``quantize`` (which chose the grid: bits, granularity, symmetry, activation
quantizers) and replaces each layer's round-to-nearest codes by GPTQ's. Layers are processed
in graph order in groups that share an input (q/k/v, then o, then gate/up, then down, ...):
the calibration batch is interpreted through the *current* graph, so each group's Hessian
``XᵀX`` comes from inputs exactly as the layer sees them — rotated, activation-quantized and
produced by the already-GPTQ-quantized layers before it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from tqdm import tqdm

from qgraph.calibration import ResumableRun, input_hessian
from qgraph.errors import DataError
from qgraph.graph_edits import set_tensor
from qgraph.kernels.gptq import gptq_quantize, rtn_error
from qgraph.kernels.quant import fake_quantize_weight
from qgraph.model import Model
from qgraph.pass_manager import Option, Pass, register

from .quantize import WeightSpec, to_storage

QLINEAR = torch.ops.qgraph.qlinear.default


def _groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Quantized linear nodes grouped by their (shared) input, in graph order."""
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is QLINEAR and "qgraph_quant" in node.meta:
            by_input.setdefault(node.args[0], []).append(node)
    return list(by_input.values())


@register
class GPTQ(Pass):
    name = "gptq"
    help = (
        "Re-solve quantized linear weights with GPTQ, layer group by layer group in graph order, "
        "on calibration inputs as the rewritten graph produces them."
    )
    options = (
        Option("damp", float, 0.01, "Hessian damping as a fraction of its mean diagonal"),
        Option("act-order", bool, False, "process columns by decreasing Hessian diagonal"),
        Option("block-size", int, 128, "columns per lazy-update block"),
        Option("mse", bool, False, "per-channel clip search minimising weight MSE"),
        Option(
            "calib-windows", int, 16, "calibration windows used (of the model's calibration data)"
        ),
    )
    requires = frozenset({"quantized"})
    provides = frozenset({"gptq"})
    forbids = frozenset({"gptq", "learned-rounding"})

    def run(self, model: Model) -> dict[str, Any]:
        if model.calibration is None:
            raise DataError("gptq: needs calibration data (Model.set_calibration or --calib-text)")
        batch = model.calibration[: self.opt("calib-windows")]
        gm = model.gm
        groups = _groups(gm)
        first = {g[0]: g for g in groups}
        bar = tqdm(total=len(groups), desc="gptq", unit="group", leave=False, disable=None)
        stats = {"layers": 0, "rtn_error": 0.0, "gptq_error": 0.0}

        def before(node: fx.Node, run: ResumableRun) -> None:
            group = first.get(node)
            if group is None:
                return
            h = input_hessian(run.env[node.args[0]])
            for q in group:
                self._solve(gm, q, h, run, stats)
            bar.update(1)

        with torch.inference_mode():
            ResumableRun(gm, before).run(batch)
        bar.close()
        gm.recompile()
        n = max(1, stats["layers"])
        return {
            "layers": stats["layers"],
            "groups": len(groups),
            "mean_rtn_proxy_error": stats["rtn_error"] / n,
            "mean_gptq_proxy_error": stats["gptq_error"] / n,
            "calibration_tokens": int(batch.numel()),
        }

    def _solve(self, gm, q: fx.Node, h: torch.Tensor, run: ResumableRun, stats: dict) -> None:
        info = q.meta["qgraph_quant"]
        w = info["float_weight"]
        spec = WeightSpec(info["bits"], info["granularity"], info["group_size"], info["symmetric"])
        res = gptq_quantize(
            w, h, spec.bits, spec.symmetric, spec.granularity, spec.group_size,
            damp=self.opt("damp"), act_order=self.opt("act-order"),
            block_size=self.opt("block-size"), mse_search=self.opt("mse"),
        )  # fmt: skip
        codes, scale, zero, _, _ = to_storage(res.codes, res.scale, res.zero, spec)
        for arg, value in zip(q.args[1:4], (codes, scale, zero), strict=True):
            set_tensor(gm, arg.target, value)
            arg.meta["val"] = value
            run.refresh_attr(arg)
        stats["layers"] += 1
        stats["gptq_error"] += res.error
        stats["rtn_error"] += rtn_error(w, h, _rtn_weight(w, spec))


def _rtn_weight(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    return fake_quantize_weight(
        w.float(), spec.bits, spec.symmetric, spec.granularity, spec.group_size
    )
