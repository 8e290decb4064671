"""Per-layer measurements of a model as it is now: each layer's output error against its own
float weights, its weight error, and the range and outlier ratio of the activation it reads.

The output error of a layer is *local*: the layer's actual output (quantized input, quantized
weights, sparse branch) against the float layer (its float weight, in the model's current basis)
applied to the same float input. It is what this layer's quantization adds given what reaches
it, so it can be compared pass by pass and against the same layer in ONNX Runtime
(:mod:`qgraph.layer_trace`), and it needs no float twin of the whole model — rotations change the
basis of half the layers' outputs, which makes a whole-model comparison meaningless per layer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import fx

from .calibration import ResumableRun
from .kernels.error_stats import channel_absmax, energies, outlier_ratio, relative_l2, sqnr_db
from .quantized import BoundLayer
from .structure import Linear

if TYPE_CHECKING:
    from .model import Model

#: Activation quantizers in front of a layer: the layer's float input is their first argument.
ACT_QUANTIZERS = ("quantize_per_token", "quantize_static", "quantize_per_token_u8")


@dataclass
class Probe:
    """Where one layer is measured in the graph: its float input, its output node(s)."""

    name: str
    role: str
    kind: str  # linear | conv
    input_node: fx.Node
    output_node: fx.Node
    sparse_node: fx.Node | None = None
    bound: BoundLayer | None = None  # the quantized layer, None for a float one


@dataclass
class LayerMeasure:
    """Sums over the batch for one layer (kept as sums so windows add up)."""

    signal: float = 0.0
    noise: float = 0.0
    absmax: torch.Tensor | None = None  # per input channel
    square_sum: float = 0.0
    count: int = 0
    outputs: list[torch.Tensor] = field(default_factory=list)  # when asked to keep them

    def add_input(self, x: torch.Tensor, channel_dim: int) -> None:
        amax = channel_absmax(x, channel_dim)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        self.square_sum += float(x.detach().double().square().sum())
        self.count += x.numel()

    def sqnr_db(self) -> float | None:
        return (
            None if self.signal == 0.0 and self.noise == 0.0 else sqnr_db(self.signal, self.noise)
        )

    def activation(self) -> dict[str, float]:
        if self.absmax is None:
            return {}
        rms = math.sqrt(self.square_sum / max(1, self.count))
        return {
            "act_absmax": json_number(float(self.absmax.max())),
            "act_rms": json_number(rms),
            "act_outlier_ratio": json_number(outlier_ratio(self.absmax)),
        }


def _float_input(node: fx.Node) -> fx.Node:
    x = node.args[0]
    while (
        isinstance(x, fx.Node)
        and x.op == "call_function"
        and any(q in str(x.target) for q in ACT_QUANTIZERS)
    ):
        x = x.args[0]
    return x


def quantized_probes(model: Model, pattern: str | None = None) -> list[Probe]:
    """The quantized layers (``pattern``: a regex their names must match), in graph order."""
    rx = re.compile(pattern) if pattern else None
    out = []
    for bound in model.quantized:
        if rx is not None and not rx.search(bound.name):
            continue
        out.append(
            Probe(
                bound.name,
                bound.role,
                bound.record.kind,
                _float_input(bound.node),
                bound.node,
                bound.sparse_node,
                bound,
            )
        )
    return out


def float_probes(model: Model, pattern: str | None = None) -> list[Probe]:
    """The float linear layers and convolutions of the model's structure, in graph order."""
    rx = re.compile(pattern) if pattern else None
    sv = model.structure
    layers: list[Linear] = [*sv.linears, *sv.convs]
    position = {n: i for i, n in enumerate(model.gm.graph.nodes)}
    layers.sort(key=lambda lin: position[lin.node])
    return [
        Probe(lin.name, lin.role, lin.kind, lin.node.args[0], lin.node)
        for lin in layers
        if rx is None or rx.search(lin.name)
    ]


def _reference(model: Model, probe: Probe, x: torch.Tensor) -> torch.Tensor | None:
    """The float layer on ``x``: the record's float weight with the graph's bias."""
    rec = probe.bound.record if probe.bound else None
    if rec is None or rec.float_weight is None:
        return None
    from .graph_edits import get_tensor

    node = probe.output_node
    bias_arg = node.args[4]
    bias = get_tensor(model.gm, bias_arg.target) if isinstance(bias_arg, fx.Node) else None
    w = rec.float_weight.to(x.dtype)
    if probe.sparse_node is not None:  # a split keeps only the dense part as its float weight
        rows, cols, values = probe.bound.sparse_tensors(model.gm)
        w = w.index_put((rows.long(), cols.long()), values.to(x.dtype), accumulate=True)
    bias = None if bias is None else bias.to(x.dtype)
    if probe.kind == "conv":
        stride, padding, dilation, groups = node.args[5:9]
        conv = {3: F.conv1d, 4: F.conv2d}.get(w.dim(), F.conv3d)
        return conv(x, w, bias, stride, padding, dilation, groups)
    return F.linear(x, w, bias)


def apply_layer(model: Model, probe: Probe, x: torch.Tensor) -> torch.Tensor:
    """The layer as the graph computes it (activation quantizer, quantized weights, sparse
    branch) on an input of one's choosing: runs the nodes between the probe's float input and
    its output(s), fetching constants, so another runtime's layer can be checked on the very
    input it saw."""
    from .graph_edits import get_tensor

    ends = [probe.output_node] + ([probe.sparse_node] if probe.sparse_node is not None else [])
    needed: set[fx.Node] = set()
    stack = list(ends)
    while stack:
        node = stack.pop()
        if node in needed or node is probe.input_node or node.op != "call_function":
            continue
        needed.add(node)
        stack += [a for a in node.all_input_nodes if a.op == "call_function"]
    env: dict[fx.Node, Any] = {probe.input_node: x}

    def value(a):
        if isinstance(a, fx.Node):
            return get_tensor(model.gm, a.target) if a.op == "get_attr" else env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(value(v) for v in a)
        if isinstance(a, dict):
            return {k: value(v) for k, v in a.items()}
        return a

    with torch.inference_mode():
        for node in model.gm.graph.nodes:
            if node in needed:
                env[node] = node.target(*value(node.args), **value(node.kwargs))
    out = env[probe.output_node]
    return out + env[probe.sparse_node] if probe.sparse_node is not None else out


def measure(
    model: Model,
    batch: torch.Tensor,
    probes: list[Probe],
    *,
    keep_outputs: bool = False,
) -> tuple[dict[str, LayerMeasure], list[Any]]:
    """Run ``batch`` (one row at a time) through the model as it is now and measure every probe:
    input range per channel, and for quantized layers with a float weight the output error
    against the float layer on the same input. ``keep_outputs`` keeps each layer's outputs
    (float32, one per row) for a comparison with another runtime. Returns the measures and the
    model's output for each row."""
    results = {p.name: LayerMeasure() for p in probes}
    by_input: dict[fx.Node, list[Probe]] = {}
    for p in probes:
        by_input.setdefault(p.input_node, []).append(p)
    by_output = {p.output_node: p for p in probes}
    by_sparse = {p.sparse_node: p for p in probes if p.sparse_node is not None}
    inputs: dict[str, torch.Tensor] = {}
    partial: dict[str, torch.Tensor] = {}

    def finish(p: Probe, y: torch.Tensor) -> None:
        m = results[p.name]
        x = inputs.pop(p.name)
        ref = _reference(model, p, x)
        if ref is not None:
            signal, noise = energies(ref, y)
            m.signal += signal
            m.noise += noise
        if keep_outputs:
            m.outputs.append(y.detach().float().clone())

    def observe(n: fx.Node, out: Any, run: ResumableRun) -> None:
        for p in by_input.get(n, ()):
            results[p.name].add_input(out, 1 if p.kind == "conv" else -1)
            inputs[p.name] = out
        p = by_output.get(n) or by_sparse.get(n)
        if p is None:
            return
        if p.sparse_node is not None:  # the layer's output is the dense part plus the branch
            if p.name not in partial:
                partial[p.name] = out
                return
            out = partial.pop(p.name) + out
        finish(p, out)

    outputs = []
    with torch.inference_mode():
        for i in range(batch.shape[0]):
            outputs.append(ResumableRun(model.gm, after=observe).run(batch[i : i + 1]))
    return results, outputs


def weight_error(model: Model, bound: BoundLayer) -> float | None:
    """‖W_q − W‖ / ‖W‖ of a quantized layer's dense weight against its float weight."""
    from .ops import dequantize_conv_weight, dequantize_kn

    rec = bound.record
    if rec.float_weight is None:
        return None
    codes, scale, zero = bound.stored(model.gm)
    if rec.kind == "conv":
        w_q = dequantize_conv_weight(codes, scale, zero)
    else:
        w_q = dequantize_kn(codes, scale, zero, int(bound.node.args[5])).T
    return relative_l2(rec.float_weight, w_q)


def _expansion_widths(model: Model) -> dict[str, str]:
    widths: dict[str, str] = {}
    for r in model.log:
        if r.name == "expand":
            widths.update(r.summary.get("widths") or {})
    return widths


def _widened(width: str | None) -> bool:
    return bool(width) and len(set(width.split("→"))) > 1


def record_rows(model: Model) -> list[dict[str, Any]]:
    """The per-layer table's format columns from the quantized-layer records alone (nothing
    runs): what ``qgraph inspect`` shows for a saved model."""
    widths = _expansion_widths(model)
    return [
        _record_columns(model, index, p, widths) for index, p in enumerate(quantized_probes(model))
    ]


def _record_columns(model: Model, index: int, p: Probe, widths: dict[str, str]) -> dict[str, Any]:
    rec = p.bound.record
    return {
        "index": index,
        "name": p.name,
        "role": p.role,
        "kind": p.kind,
        "weight": rec.weight.text(),
        "bits": rec.weight.bits,
        "act": rec.act.text() if rec.act else None,
        "solver": rec.solver,
        "in_features": rec.in_features,
        "out_features": rec.out_features,
        "weight_rel_err": json_number(weight_error(model, p.bound)),
        "expansion": widths.get(p.name) if _widened(widths.get(p.name)) else None,
        "sparse_share": (
            rec.sparse.nnz / (rec.in_features * rec.out_features) if rec.sparse else 0.0
        ),
    }


def layer_rows(
    model: Model,
    batch: torch.Tensor,
    pattern: str | None = None,
    measured: dict[str, LayerMeasure] | None = None,
) -> list[dict[str, Any]]:
    """The report's per-layer table: one row per quantized layer (or, for a model with none,
    per linear layer and convolution with its activation statistics only). ``measured``: the
    measures of the model as it is now on ``batch`` when already taken (the pass trace's last)."""
    probes = quantized_probes(model, pattern) or float_probes(model, pattern)
    if measured is None or any(p.name not in measured for p in probes):
        measured, _ = measure(model, batch, probes)
    widths = _expansion_widths(model)
    rows = []
    for index, p in enumerate(probes):
        m = measured[p.name]
        row: dict[str, Any] = {"index": index, "name": p.name, "role": p.role, "kind": p.kind}
        if p.bound is not None:
            row = _record_columns(model, index, p, widths)
            row["sqnr_db"] = json_number(m.sqnr_db())
        row.update(m.activation())
        rows.append(row)
    return rows


def activation_rows(model: Model, batch: torch.Tensor) -> dict[str, dict[str, float]]:
    """``{layer: {act_absmax, act_rms, act_outlier_ratio}}`` of the inputs every linear layer and
    convolution reads (quantized or not) — taken before and after a pipeline to show what the
    rotations did to the activations."""
    probes = quantized_probes(model) or float_probes(model)
    measured, _ = measure(model, batch, probes)
    return {p.name: measured[p.name].activation() for p in probes}


def json_number(value: float | None) -> float | None:
    """A float for JSON, which has no infinities: an exact match (+inf dB) is written as null
    (the report's documentation says so); 6 significant digits."""
    return None if value is None or not math.isfinite(value) else float(f"{value:.6g}")
