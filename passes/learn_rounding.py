"""learn-rounding: learn each quantized weight's up/down rounding (AdaRound, arXiv 2004.10568).

Gradient-based PTQ (Yvinec et al., arXiv 2308.07662) on the grid ``quantize`` chose: the
scale and zero of every layer stay as they are (including an MSE-clipped grid, ``clip=mse``)
and only the rounding direction of each weight is optimised, on the Hessian proxy
``tr(ΔW XᵀX ΔWᵀ)`` of the layer's output error. Like ``gptq``, layers are visited in graph
order in groups sharing an input, and the calibration batch runs through the *current* graph,
so each group's ``XᵀX`` comes from inputs as the layer sees them: rotated, activation-quantized
and produced by the layers before it with their learned rounding already in place.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import fx
from tqdm import tqdm

from qgraph.calibration import ResumableRun, input_hessian
from qgraph.errors import DataError, PipelineError
from qgraph.graph_edits import set_tensor
from qgraph.kernels.adaround import learn_rounding
from qgraph.kernels.gptq import mse_clip_search
from qgraph.kernels.quant import weight_qparams
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
class LearnRounding(Pass):
    name = "learn-rounding"
    help = (
        "Learn the up/down rounding of quantized linear weights (AdaRound) on the grid quantize "
        "chose, layer group by layer group in graph order, on the Hessian of calibration inputs "
        "as the rewritten graph produces them."
    )
    options = (
        Option("iters", int, 200, "Adam iterations per layer"),
        Option("lr", float, 1e-2, "Adam learning rate on the soft rounding variables"),
        Option(
            "reg",
            float,
            1.0,
            "weight of the rounding regulariser (reconstruction term in grid-step units)",
        ),
        Option(
            "calib-windows", int, 16, "calibration windows used (of the model's calibration data)"
        ),
    )
    requires = frozenset({"quantized"})
    provides = frozenset({"learned-rounding"})
    forbids = frozenset({"gptq", "learned-rounding"})

    def validate(self) -> None:
        if self.opt("iters") < 0:
            raise PipelineError(f"learn-rounding: iters must be >= 0, got {self.opt('iters')}")
        if not self.opt("lr") > 0:
            raise PipelineError(f"learn-rounding: lr must be positive, got {self.opt('lr')}")
        if not self.opt("reg") >= 0:
            raise PipelineError(f"learn-rounding: reg must be >= 0, got {self.opt('reg')}")
        if self.opt("calib-windows") < 1:
            raise PipelineError(
                f"learn-rounding: calib-windows must be >= 1, got {self.opt('calib-windows')}"
            )

    def run(self, model: Model) -> dict[str, Any]:
        if model.calibration is None:
            raise DataError(
                "learn-rounding: needs calibration data (Model.set_calibration or --calib-text)"
            )
        start = time.perf_counter()
        batch = model.calibration[: self.opt("calib-windows")]
        gm = model.gm
        groups = _groups(gm)
        first = {g[0]: g for g in groups}
        bar = tqdm(
            total=len(groups), desc="learn-rounding", unit="group", leave=False, disable=None
        )
        stats = {"layers": 0, "rtn_error": 0.0, "learned_error": 0.0, "fell_back": 0}

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
            "mean_learned_proxy_error": stats["learned_error"] / n,
            "layers_kept_rtn": stats["fell_back"],
            "calibration_tokens": int(batch.numel()),
            "seconds": round(time.perf_counter() - start, 3),
        }

    def _solve(self, gm, q: fx.Node, h: torch.Tensor, run: ResumableRun, stats: dict) -> None:
        info = q.meta["qgraph_quant"]
        w = info["float_weight"].float()
        spec = WeightSpec(info["bits"], info["granularity"], info["group_size"], info["symmetric"])
        # the grid quantize chose (RTN's, or the MSE-clipped one); only the rounding is learned
        qparams = mse_clip_search if info.get("clip") == "mse" else weight_qparams
        scale, zero = qparams(w, spec.bits, spec.symmetric, spec.granularity, spec.group_size)
        res = learn_rounding(
            w, h, spec.bits, spec.symmetric, spec.granularity, spec.group_size,
            iters=self.opt("iters"), lr=self.opt("lr"), reg=self.opt("reg"),
            scale=scale, zero=zero,
        )  # fmt: skip
        codes, scale, zero, _, _ = to_storage(res.codes, res.scale, res.zero, spec)
        for arg, value in zip(q.args[1:4], (codes, scale, zero), strict=True):
            set_tensor(gm, arg.target, value)
            arg.meta["val"] = value
            run.refresh_attr(arg)
        stats["layers"] += 1
        stats["learned_error"] += res.error
        stats["rtn_error"] += res.rtn_error
        stats["fell_back"] += int(res.fell_back)
