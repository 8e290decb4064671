"""expand: post-training model expansion (Franco et al., arXiv 2503.17513). Exact in float.

Widens the input of layers that carry an online rotation (o_proj and down_proj after
``rotate{online=r2+r4}``) from ``N`` to a Hadamard size ``M > N``: the activation and the
weight's input axis are zero-padded to ``M`` and rotated by the ``M``-point randomized
Hadamard instead of the ``N``-point one. The expanded weight ``W_pad Q`` has ``M`` columns but
rank ``N``, so the layer's input Hessian gets an ``(M - N)``-dimensional nullspace into which
GPTQ can push rounding error. Sizes are the Hadamard-friendly multiples of ``multiple`` above
``N``; step ``s`` is the ``s``-th of them.

Modes:

* ``selective`` — every selected layer grows by ``step`` sizes; with ``budget`` (percent of
  the model's parameters) the largest uniform step within the budget is used.
* ``progressive`` — measure each selected layer's GPTQ output error at its current width on
  calibration inputs (the Hessian of the expanded input is ``Qᵀ pad(XᵀX) Q``, so one
  calibration run serves every candidate width), then repeatedly grow the layer with the worst
  relative error by ``step`` sizes until the next growth would exceed ``budget``.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qgraph.calibration import ResumableRun, input_hessian
from qgraph.errors import DataError, PipelineError, StructureError
from qgraph.formats import parse_weight_spec
from qgraph.graph_edits import finish
from qgraph.kernels.gptq import gptq_quantize, rtn_error
from qgraph.kernels.hadamard import fast_hadamard_transform
from qgraph.model import Model
from qgraph.pass_manager import Option, Pass, register, working_on
from qgraph.selection import LayerSelector, selector_options
from qgraph.structure import Linear

from . import online_rotation


@dataclass
class _Layer:
    lin: Linear
    rot: online_rotation.OnlineRotation
    weight: torch.Tensor  # un-rotated float64 [out, N]
    sizes: list[int]  # candidate widths: sizes[0] = current, then steps 1, 2, ...
    index: int = 0  # position in sizes

    @property
    def size(self) -> int:
        return self.sizes[self.index]


@register
class Expand(Pass):
    name = "expand"
    help = (
        "Widen the input of layers with an online Hadamard rotation (post-training model "
        "expansion): zero-pad from N to a larger Hadamard size M and rotate with the M-point "
        "Hadamard. Exact in float; gives GPTQ a nullspace to put rounding error in."
    )
    options = (
        *selector_options("lm_head"),
        Option("step", int, 1, "sizes to grow by (selective: per layer; progressive: per growth)"),
        Option("budget", float, 0.0, "added parameters in percent of the model's (0: use step)"),
        Option("mode", str, "selective", "how to spend the budget", ("selective", "progressive")),
        Option("multiple", int, 32, "expanded widths are multiples of this"),
        Option("seed", int, 5, "seed of the expanded rotations' random signs"),
        Option("w", str, "int4:channel", "weight format whose GPTQ error guides progressive mode"),
        Option("calib-windows", int, 8, "calibration windows for progressive mode"),
    )
    provides = frozenset({"expanded"})
    forbids = frozenset({"quantized"})
    exact = True

    def validate(self) -> None:
        if self.opt("step") < 1:
            raise PipelineError(f"expand: step must be >= 1, got {self.opt('step')}")
        if self.opt("budget") < 0:
            raise PipelineError(f"expand: budget must be >= 0, got {self.opt('budget')}")
        if self.opt("multiple") < 1:
            raise PipelineError(f"expand: multiple must be >= 1, got {self.opt('multiple')}")
        if self.opt("mode") == "progressive" and self.opt("budget") <= 0:
            raise PipelineError("expand: mode=progressive needs a budget (percent of parameters)")
        try:
            self.spec = parse_weight_spec(self.opt("w"))
        except PipelineError as exc:
            raise PipelineError(f"expand: {exc}") from None
        self.selector = LayerSelector.from_pass(self)

    def check(self, model: Model) -> None:
        if self.opt("mode") == "progressive" and model.calibration is None:
            raise DataError(
                "expand: mode=progressive needs calibration data (Model.set_calibration)"
            )

    def run(self, model: Model) -> dict[str, Any]:
        gm = model.gm
        before = model.accounting()
        params_before = before["params"]
        layers = self._select(model)
        budget = params_before * self.opt("budget") / 100
        if self.opt("mode") == "progressive":
            self._progressive(model, layers, budget)
        elif self.opt("budget") > 0:
            self._uniform_within(layers, budget)
        else:
            for layer in layers:
                layer.index = self.opt("step")
        for layer in layers:
            if layer.size != layer.rot.size:
                with working_on(layer.lin.name):
                    self._apply(gm, layer)
        finish(gm)
        acc = model.accounting()
        after = acc["params"]
        widths = {x.lin.name: f"{x.rot.in_features}→{x.size}" for x in layers}
        changes = Counter(widths.values())
        return {
            "layers_expanded": sum(1 for x in layers if x.size != x.rot.in_features),
            "layers_seen": len(layers),
            "params_added_percent": round(100 * (after - params_before) / params_before, 3),
            "width_changes": ", ".join(f"{k} ×{n}" for k, n in sorted(changes.items())),
            "params_before": params_before,
            "params_added": after - params_before,
            "volume_mb_before": round(before["volume_mb"], 3),
            "volume_mb_after": round(acc["volume_mb"], 3),
            "widths": widths,
        }

    # -- selection -----------------------------------------------------------------------
    def _select(self, model: Model) -> list[_Layer]:
        gm = model.gm
        chosen = [
            lin for lin in self.selector.select(model.structure.linears) if lin.role != "lm_head"
        ]
        out: list[_Layer] = []
        missing: list[str] = []
        for lin in chosen:
            rot = online_rotation.find(lin.node, gm)
            if rot is None:
                if self.opt("layers") != "all":
                    missing.append(lin.name)
                continue
            weight = online_rotation.unrotated_weight(gm, lin.weight, rot)
            steps = online_rotation.next_sizes(
                rot.size, 64 * self.opt("step"), self.opt("multiple")
            )
            out.append(_Layer(lin, rot, weight, [rot.size, *steps]))
        if missing:
            raise StructureError(
                "expand: " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                + " have no online rotation to expand; run rotate{online=r2+r4} first "
                "(expansion pads the input and needs the Hadamard rotation that follows)"
            )  # fmt: skip
        if not out:
            raise StructureError(
                "expand: no layer with an online rotation was selected; run "
                "rotate{online=r2+r4} first (expansion widens those layers' inputs)"
            )
        return out

    def _uniform_within(self, layers: list[_Layer], budget: float) -> None:
        step = 0
        while step + 1 < len(layers[0].sizes):
            cost = sum(_added(x, step + 1) for x in layers)
            if cost > budget:
                break
            step += 1
        for layer in layers:
            layer.index = step

    def _progressive(self, model: Model, layers: list[_Layer], budget: float) -> None:
        spec = self.spec
        hessians = _source_hessians(model, layers, self.opt("calib-windows"))
        step = self.opt("step")

        def error(layer: _Layer, size: int) -> float:
            h = hessians[layer.lin.node]
            w_m, h_m = _expanded(layer, size, h)
            res = gptq_quantize(
                w_m, h_m, spec.bits, spec.symmetric, spec.granularity, spec.group_size,
                full_range=spec.full_range,
            )  # fmt: skip
            return res.error / max(rtn_error(w_m, h_m, torch.zeros_like(w_m)), 1e-30)

        heap = [(-error(x, x.size), i) for i, x in enumerate(layers)]
        heapq.heapify(heap)
        spent = 0.0
        while heap:
            _, i = heapq.heappop(heap)
            layer = layers[i]
            nxt = layer.index + step
            if nxt >= len(layer.sizes):
                continue
            cost = _added(layer, nxt) - _added(layer, layer.index)
            if spent + cost > budget:
                continue  # this layer cannot grow any more; others may still fit
            spent += cost
            layer.index = nxt
            heapq.heappush(heap, (-error(layer, layer.size), i))

    def _apply(self, gm: fx.GraphModule, layer: _Layer) -> None:
        # the new rotation reads the layer's original input; the old one becomes dead code
        lin, rot = layer.lin, layer.rot
        online_rotation.insert(
            gm, lin.node, lin.weight, layer.size, self.opt("seed") + layer.size, lin.name,
            source=rot.source, weight=layer.weight,
        )  # fmt: skip


def _added(layer: _Layer, index: int) -> int:
    return layer.lin.out_features * (layer.sizes[index] - layer.rot.in_features)


def _expanded(layer: _Layer, size: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and input Hessian the layer would have at width ``size`` (any signs do)."""
    n = layer.rot.in_features
    signs = torch.ones(size, dtype=torch.float64)
    w = fast_hadamard_transform(torch.nn.functional.pad(layer.weight, (0, size - n)), True, signs)
    hp = torch.nn.functional.pad(h, (0, size - n, 0, size - n))
    hq = fast_hadamard_transform(fast_hadamard_transform(hp, True, signs).T, True, signs).T
    return w, hq


def _source_hessians(
    model: Model, layers: list[_Layer], windows: int
) -> dict[fx.Node, torch.Tensor]:
    """``XᵀX`` (float64) of each layer's un-padded, un-rotated input, from one calibration run."""
    if model.calibration is None:
        raise DataError("expand: mode=progressive needs calibration data (Model.set_calibration)")
    # read the source when its consumer (the pad or the rotation) runs: it may be freed after
    wanted = {(x.rot.pad or x.rot.node): (x.lin.node, x.rot.source) for x in layers}
    out: dict[fx.Node, torch.Tensor] = {}

    def before(node: fx.Node, run: ResumableRun) -> None:
        hit = wanted.get(node)
        if hit is not None:
            out[hit[0]] = input_hessian(run.env[hit[1]])
            if len(out) == len(wanted):
                run.stop()

    with torch.inference_mode():
        ResumableRun(model.gm, before).run(model.calibration[:windows])
    return out
