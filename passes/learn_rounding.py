"""learn-rounding: learn each quantized weight's up/down rounding (AdaRound, arXiv 2004.10568).

Gradient-based PTQ (Yvinec et al., arXiv 2308.07662) on the grid ``quantize`` chose: the
scale and zero of every layer stay as they are (including a clipped grid, ``clip=output`` or
``clip=mse``) and only the rounding direction of each weight is optimised, on the Hessian proxy
``tr(ΔW XᵀX ΔWᵀ)`` of the layer's output error. Like ``gptq``, layers are visited in graph
order in groups sharing an input, and the calibration batch runs through the *current* graph,
so each group's ``XᵀX`` comes from inputs as the layer sees them: rotated, activation-quantized
and produced by the layers before it with their learned rounding already in place.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from qgraph.errors import PipelineError
from qgraph.formats import choose_grid
from qgraph.kernels.adaround import learn_rounding
from qgraph.model import Model
from qgraph.pass_manager import Option, Pass, register
from qgraph.quantized import QuantizedLayer
from qgraph.selection import selector_options

from .weight_solver import check_solvable, solve_in_graph_order


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
        *selector_options("", "quantized layers"),
    )
    requires = frozenset({"quantized", "float-weights"})
    provides = frozenset({"learned-rounding"})
    forbids = frozenset({"gptq", "learned-rounding", "qat"})
    resolves_grids = True
    preserves = frozenset({"structure", "quantized-layers"})  # only codes change

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

    def check(self, model: Model) -> None:
        check_solvable(self, model)

    def run(self, model: Model) -> dict[str, Any]:
        start = time.perf_counter()
        stats = {"layers": 0, "rtn_error": 0.0, "learned_error": 0.0, "fell_back": 0}

        def solve(rec: QuantizedLayer, w: torch.Tensor, h: torch.Tensor):
            w, spec = w.float(), rec.weight
            # the grid quantize chose (RTN's or a clipped one); only the rounding is learned.
            # clip=output weighs columns by E[x_j²]: the Hessian's diagonal, up to a factor
            importance = h.diagonal().float() if rec.clip == "output" else None
            scale, zero = choose_grid(w, spec, rec.clip, importance)
            res = learn_rounding(
                w, h, spec.bits, spec.symmetric, spec.granularity, spec.group_size,
                iters=self.opt("iters"), lr=self.opt("lr"), reg=self.opt("reg"),
                scale=scale, zero=zero,
            )  # fmt: skip
            stats["layers"] += 1
            stats["learned_error"] += res.error
            stats["rtn_error"] += res.rtn_error
            stats["fell_back"] += int(res.fell_back)
            return res.codes, res.scale, res.zero

        groups, tokens = solve_in_graph_order(model, self, solve)
        n = max(1, stats["layers"])
        return {
            "layers": stats["layers"],
            "groups": groups,
            "mean_rtn_proxy_error": stats["rtn_error"] / n,
            "mean_learned_proxy_error": stats["learned_error"] / n,
            "layers_kept_rtn": stats["fell_back"],
            "calibration_tokens": tokens,
            "seconds": round(time.perf_counter() - start, 3),
        }
