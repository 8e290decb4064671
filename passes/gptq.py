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

from qgraph.formats import CLIPS, fake_quantize
from qgraph.kernels.gptq import gptq_quantize, row_proxy_errors
from qgraph.model import Model
from qgraph.pass_manager import Option, Pass, register
from qgraph.quantized import QuantizedLayer
from qgraph.selection import selector_options

from .weight_solver import check_solvable, solve_in_graph_order


@register
class GPTQ(Pass):
    name = "gptq"
    help = (
        "Re-solve quantized linear weights with GPTQ, layer group by layer group in graph order, "
        "on calibration inputs as the rewritten graph produces them."
    )
    options = (
        Option("damp", float, 0.01, "Hessian damping as a fraction of its mean diagonal"),
        Option(
            "act-order",
            bool,
            True,
            "process columns by decreasing Hessian diagonal (measured far better; false for "
            "the paper's plain order)",
        ),
        Option("block-size", int, 128, "columns per lazy-update block"),
        Option(
            "clip",
            str,
            "auto",
            "grid per row/group: auto (what quantize chose) | none | output (clip ratio of "
            "least error weighted by the Hessian diagonal) | mse (plain weight MSE)",
            choices=("auto", *CLIPS),
        ),
        Option(
            "refit-scale",
            bool,
            True,
            "after GPTQ, re-solve each row's scales for its codes by least squares on the "
            "layer's output error (measured better; false for GPTQ's own scales)",
        ),
        Option(
            "target",
            str,
            "layer",
            "what each layer's output is fitted to: layer (its float weight on the quantized "
            "model's inputs, GPTQ) | float (the float model's output, GPTAQ-style asymmetric "
            "calibration: the float model runs beside the quantized one)",
            choices=("layer", "float"),
        ),
        Option(
            "calib-windows", int, 16, "calibration windows used (of the model's calibration data)"
        ),
        *selector_options("", "quantized layers"),
    )
    requires = frozenset({"quantized", "float-weights"})
    provides = frozenset({"gptq"})
    forbids = frozenset({"gptq", "learned-rounding", "qat"})
    resolves_grids = True
    preserves = frozenset({"structure", "quantized-layers"})  # only codes and scales change

    def check(self, model: Model) -> None:
        check_solvable(self, model)

    def run(self, model: Model) -> dict[str, Any]:
        stats = {"layers": 0, "rtn_error": 0.0, "gptq_error": 0.0}

        def solve_group(
            recs: list[QuantizedLayer], h: torch.Tensor, targets: list[torch.Tensor]
        ) -> list[tuple]:
            # Layers that share an input (q/k/v, gate/up) and a grid are solved as one weight:
            # GPTQ treats rows independently given H, so the codes are those of solving them
            # one by one (up to the summation order of the block products), and the
            # factorisation of H and the column loop run once instead of per layer.
            out: dict[int, tuple] = {}
            trace = float(h.diagonal().sum())  # for the proxy statistics
            batches: dict[tuple, list[int]] = {}
            for i, rec in enumerate(recs):
                clip = rec.clip if self.opt("clip") == "auto" else self.opt("clip")
                rec.clip = clip
                key = (rec.weight, clip) if rec.weight.granularity != "tensor" else (i,)
                batches.setdefault(key, []).append(i)
            # float32 statistics and the scale refit share one cast of h, taken before the last
            # batch's kernel reorders and factors h in place (one in × in float64 less at the peak)
            h32 = h.float()
            for b, members in enumerate(batches.values()):
                spec, clip = recs[members[0]].weight, recs[members[0]].clip
                weights = [targets[i] for i in members]
                stack = torch.cat(weights) if len(weights) > 1 else weights[0]
                res = gptq_quantize(
                    stack, h,
                    spec.bits, spec.symmetric, spec.granularity, spec.group_size,
                    damp=self.opt("damp"), act_order=self.opt("act-order"),
                    block_size=self.opt("block-size"), clip=clip,
                    full_range=spec.full_range, refit_scale=self.opt("refit-scale"),
                    with_error=False, consume_hessian=b == len(batches) - 1, refit_hessian=h32,
                )  # fmt: skip
                # split the stacked rows back per layer (a per-tensor grid is never stacked)
                sizes = [w.shape[0] for w in weights]
                parts = [(res.codes, res.scale, res.zero)]
                if len(members) > 1:
                    parts = list(zip(*(t.split(sizes) for t in parts[0]), strict=True))
                # proxy errors of the whole stack at once (float32 statistics), split per layer
                errors = {
                    "gptq_error": row_proxy_errors(stack, h32, res.weight).split(sizes),
                    "rtn_error": row_proxy_errors(
                        stack, h32, fake_quantize(stack.float(), spec)
                    ).split(sizes),
                }
                for k, (i, part) in enumerate(zip(members, parts, strict=True)):
                    stats["layers"] += 1
                    for key, rows in errors.items():
                        stats[key] += float(rows[k].sum()) / (sizes[k] * trace)
                    out[i] = part
            return [out[i] for i in range(len(recs))]

        damp = self.opt("damp") if self.opt("target") == "float" else None
        groups, tokens = solve_in_graph_order(
            model, self, solve_group=solve_group, float_target_damp=damp
        )
        n = max(1, stats["layers"])
        return {
            "layers": stats["layers"],
            "groups": groups,
            "act_order": self.opt("act-order"),
            "target": self.opt("target"),
            "mean_rtn_proxy_error": stats["rtn_error"] / n,
            "mean_gptq_proxy_error": stats["gptq_error"] / n,
            "calibration_tokens": tokens,
        }
