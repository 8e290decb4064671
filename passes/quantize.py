"""quantize: round-to-nearest weight quantization and activation fake-quantization of linear layers.

Weight spec ``int<b>[:channel|:tensor|:group<g>][:sym|:asym]`` (default channel, sym);
activation spec ``none``, ``int<b>:token[:sym|:asym]`` (dynamic per token, default asym) or
``int<b>:tensor[:sym|:asym]`` (static per tensor, min/max calibrated on the model's
calibration data as the graph is now). Each selected ``linear`` becomes ``qgraph::qlinear``
with int codes in ``[in, out]`` layout, preceded by an activation quantizer when asked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qgraph import ops  # noqa: F401  (registers torch.ops.qgraph)
from qgraph.errors import DataError, PipelineError
from qgraph.graph_edits import finish, get_attr_node, get_tensor, new_attr
from qgraph.kernels import quant as qk
from qgraph.model import Model
from qgraph.pass_manager import Option, Pass, register
from qgraph.structure import Linear

_SPEC = re.compile(r"^int([2-8])((?::[a-z0-9]+)*)$")


@dataclass(frozen=True)
class WeightSpec:
    bits: int
    granularity: str  # tensor | channel | group
    group_size: int | None
    symmetric: bool


@dataclass(frozen=True)
class ActSpec:
    bits: int
    mode: str  # token | tensor
    symmetric: bool


def parse_weight_spec(text: str) -> WeightSpec:
    m = _SPEC.match(text.strip().lower())
    if not m:
        raise PipelineError(
            f"quantize: weight spec {text!r} is not int<2-8>[:channel|:tensor|:group<g>][:sym|:asym]"
        )
    bits, gran, group, sym = int(m.group(1)), "channel", None, True
    for part in filter(None, m.group(2).split(":")):
        if part in ("channel", "tensor"):
            gran = part
        elif part.startswith("group") and part[5:].isdigit() and int(part[5:]) > 0:
            gran, group = "group", int(part[5:])
        elif part in ("sym", "asym"):
            sym = part == "sym"
        else:
            raise PipelineError(f"quantize: unknown part {part!r} in weight spec {text!r}")
    return WeightSpec(bits, gran, group, sym)


def parse_act_spec(text: str) -> ActSpec | None:
    if text.strip().lower() in ("none", "", "float"):
        return None
    m = _SPEC.match(text.strip().lower())
    if not m:
        raise PipelineError(
            f"quantize: activation spec {text!r} is not none or int<2-8>:token|tensor[:sym|:asym]"
        )
    bits, mode, sym = int(m.group(1)), "token", False
    for part in filter(None, m.group(2).split(":")):
        if part in ("token", "tensor"):
            mode = part
        elif part in ("sym", "asym"):
            sym = part == "sym"
        else:
            raise PipelineError(f"quantize: unknown part {part!r} in activation spec {text!r}")
    return ActSpec(bits, mode, sym)


def storage_group(in_features: int, spec: WeightSpec) -> int:
    """Rows of ``[in, out]`` codes that share one scale row in the stored form.

    Per-channel/per-tensor scales are stored as identical blocks of a power-of-two size (16–256)
    when the input size allows, so that ONNX Runtime can fuse ``DequantizeLinear → MatMul``
    into ``MatMulNBits``; this is the same function, only a different layout.
    """
    if spec.granularity == "group":
        return spec.group_size
    for block in (256, 128, 64, 32, 16):
        if in_features % block == 0:
            return block
    return in_features


def quantize_linear_weight(
    w: torch.Tensor, spec: WeightSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """RTN-quantize ``w [out, in]``; returns (codes [in,out], scale [G,out], zero [G,out], group, n_scales)."""
    if spec.granularity == "group" and w.shape[1] % spec.group_size:
        raise PipelineError(
            f"quantize: group size {spec.group_size} does not divide input size {w.shape[1]}"
        )
    scale, zero = qk.weight_qparams(
        w.float(), spec.bits, spec.symmetric, spec.granularity, spec.group_size
    )
    codes = qk.quantize_weight(w.float(), scale, zero, spec.bits)  # [out, in]
    return to_storage(codes, scale, zero, spec)


def to_storage(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: WeightSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """From quant.py's layout (codes [out,in], scale/zero [out or 1, G]) to qlinear's stored
    layout (codes [in,out], scale/zero [in/group, out]); also the storage group and the number
    of distinct scales."""
    out_f, in_f = codes.shape
    group = storage_group(in_f, spec)
    n_scales = scale.numel() if spec.granularity != "tensor" else 1
    reps = in_f // group
    scale_kn = scale.expand(out_f, -1).T
    zero_kn = zero.expand(out_f, -1).T
    if scale_kn.shape[0] != reps:
        scale_kn = scale_kn.repeat_interleave(reps // scale_kn.shape[0], 0)
        zero_kn = zero_kn.repeat_interleave(reps // zero_kn.shape[0], 0)
    return (
        codes.T.contiguous(),
        scale_kn.contiguous().float(),
        zero_kn.contiguous().to(torch.int8),
        group,
        n_scales,
    )


def _select(model: Model, pattern: str, exclude: str) -> list[Linear]:
    inc = re.compile(pattern) if pattern != "all" else None
    exc = re.compile(exclude) if exclude else None
    chosen = []
    for lin in model.structure.linears:
        label = f"{lin.name} {lin.role}"
        if inc is not None and not inc.search(label):
            continue
        if exc is not None and exc.search(label):
            continue
        chosen.append(lin)
    return chosen


def calibrate_minmax(
    model: Model, nodes: list[fx.Node], batches: int
) -> dict[fx.Node, tuple[float, float]]:
    """Observe min/max of each node's first input while running the graph as it is now."""
    if model.calibration is None:
        raise DataError(
            "quantize: static activation quantization needs calibration data (--calib-text)"
        )
    wanted = set(nodes)
    stats: dict[fx.Node, list[float]] = {}

    class Observer(fx.Interpreter):
        def run_node(self, n):
            if n in wanted:
                x = self.env[n.args[0]]
                lo, hi = float(x.min()), float(x.max())
                if n in stats:
                    stats[n] = [min(stats[n][0], lo), max(stats[n][1], hi)]
                else:
                    stats[n] = [lo, hi]
            return super().run_node(n)

    with torch.inference_mode():
        for i in range(min(batches, model.calibration.shape[0])):
            Observer(model.gm).run(model.calibration[i : i + 1])
    for n, (lo, hi) in stats.items():
        if not (torch.isfinite(torch.tensor(lo)) and torch.isfinite(torch.tensor(hi))):
            raise DataError(
                f"quantize: calibration produced non-finite activations at the input of {n.name}"
            )
    return {n: (lo, hi) for n, (lo, hi) in stats.items()}


@register
class Quantize(Pass):
    name = "quantize"
    help = (
        "Round-to-nearest quantization of linear layers: weights int2–int8 per tensor, channel or "
        "group, symmetric or asymmetric; activations dynamic per token or static per tensor."
    )
    options = (
        Option(
            "w", str, "int8:channel", "weight spec int<b>[:channel|:tensor|:group<g>][:sym|:asym]"
        ),
        Option(
            "a",
            str,
            "none",
            "activation spec none | int<b>:token[:sym|:asym] | int<b>:tensor[:sym|:asym]",
        ),
        Option("layers", str, "all", "regex on 'layer-name role' selecting layers (default all)"),
        Option("exclude", str, "lm_head", "regex on 'layer-name role' of layers to keep in float"),
        Option("calib-batches", int, 8, "calibration windows used for static activation ranges"),
    )
    provides = frozenset({"quantized"})
    forbids = frozenset({"quantized"})

    def validate(self) -> None:
        self.wspec = parse_weight_spec(self.opt("w"))
        self.aspec = parse_act_spec(self.opt("a"))
        for key in ("layers", "exclude"):
            try:
                re.compile(self.opt(key))
            except re.error as exc:
                raise PipelineError(
                    f"quantize: option {key}={self.opt(key)!r} is not a valid regex: {exc}"
                ) from None

    def run(self, model: Model) -> dict[str, Any]:
        gm = model.gm
        chosen = _select(model, self.opt("layers"), self.opt("exclude"))
        if not chosen:
            raise PipelineError("quantize: no linear layer matches layers/exclude")
        ranges = {}
        if self.aspec is not None and self.aspec.mode == "tensor":
            ranges = calibrate_minmax(
                model, [lin.node for lin in chosen], self.opt("calib-batches")
            )
        self._token_quant: dict[fx.Node, fx.Node] = {}
        for lin in chosen:
            self._rewrite(gm, lin, ranges.get(lin.node))
        finish(gm)
        return {
            "layers_quantized": len(chosen),
            "weights": self.opt("w"),
            "activations": self.opt("a"),
        }

    def _rewrite(self, gm: fx.GraphModule, lin: Linear, act_range) -> None:
        node = lin.node
        w = get_tensor(gm, lin.weight)
        codes, scale, zero, group, n_scales = quantize_linear_weight(w, self.wspec)
        g = gm.graph
        x = node.args[0]
        if self.aspec is not None and self.aspec.mode == "token":
            # one dynamic quantizer per input tensor, shared by the layers reading it (q/k/v)
            if x not in self._token_quant:
                with g.inserting_after(x):
                    self._token_quant[x] = g.call_function(
                        torch.ops.qgraph.quantize_per_token.default,
                        (x, self.aspec.bits, self.aspec.symmetric),
                    )
            x = self._token_quant[x]
        with g.inserting_before(node):
            if self.aspec is not None and self.aspec.mode == "tensor":
                s, z = qk.minmax_qparams(
                    act_range[0], act_range[1], self.aspec.bits, self.aspec.symmetric
                )
                s_node = get_attr_node(
                    gm, node, new_attr(gm, lin.name + ".act_scale", s.float().reshape(()))
                )
                z_node = get_attr_node(
                    gm, node, new_attr(gm, lin.name + ".act_zero", z.float().reshape(()))
                )
                x = g.call_function(
                    torch.ops.qgraph.quantize_static.default, (x, s_node, z_node, self.aspec.bits)
                )
            attrs = [
                get_attr_node(gm, node, new_attr(gm, lin.name + suffix, t))
                for suffix, t in ((".codes", codes), (".scale", scale), (".zero", zero))
            ]
            bias = node.args[2] if len(node.args) > 2 else None
            q = g.call_function(
                torch.ops.qgraph.qlinear.default, (x, *attrs, bias, group, self.wspec.bits)
            )
        q.meta["val"] = node.meta.get("val")
        q.meta["qgraph_quant"] = {
            "name": lin.name,
            "bits": self.wspec.bits,
            "granularity": self.wspec.granularity,
            "group_size": self.wspec.group_size,
            "symmetric": self.wspec.symmetric,
            "in_features": lin.in_features,
            "out_features": lin.out_features,
            "scales": n_scales,
            "act": self.opt("a"),
            "float_weight": w,  # a reference (no copy) for passes that re-solve the weights
            "group_storage": group,
        }
        node.replace_all_uses_with(q)
        g.erase_node(node)
