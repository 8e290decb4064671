"""Capture quantized layers' inputs and outputs inside an exported file, in ONNX Runtime.

The exporter names each ONNX value after the FX node that made it and records that node in
``pkg.torch.onnx.fx_node``; qgraph's provenance (``qgraph.layer``) says which layer a node
belongs to. So for each ``qgraph::qlinear``/``qconv`` layer the file holds its output (the
value named after the op's node, plus the sparse branch's when split) and, one activation
quantizer up, its float input. This module makes those values graph outputs of an in-memory
copy of the file and runs it: the layer as ONNX Runtime computes it, to put beside torch.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from qgraph.errors import ExportError
from qgraph.layer_report import ACT_QUANTIZERS

from .ort_runtime import session_options

_FX = re.compile(r"^%(\w+) : .*?target=torch\.ops\.qgraph\.(\w+)\.default\]\(args = \(\[?%(\w+)")
_LAYER_OPS = ("qlinear", "qconv")
_PROTO_LIMIT = 2**31 - 2**24  # an in-memory model must serialize under protobuf's 2 GB


@dataclass
class LayerValues:
    """The value names of one layer in the file."""

    name: str
    inputs: str  # the float input (before the activation quantizer)
    outputs: list[str]  # summed: the dense part, then the sparse branch when split
    columns: tuple[int, int] | None = None  # a part of a packed layer: its output columns


def _fx_of(node: onnx.NodeProto) -> tuple[str, str, str] | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.fx_node":
            m = _FX.match(prop.value)
            return (m.group(1), m.group(2), m.group(3)) if m else None
    return None


def _layer_of(node: onnx.NodeProto) -> str | None:
    return next((p.value for p in node.metadata_props if p.key == "qgraph.layer"), None)


def _packed_of(node: onnx.NodeProto) -> list[tuple[str, int, int]]:
    """``[(layer, first column, end column)]`` of a packed q/k/v node, else []."""
    text = next((p.value for p in node.metadata_props if p.key == "qgraph.packed_layers"), None)
    return [(str(n), int(a), int(b)) for n, a, b in json.loads(text)] if text else []


def find_layer_values(
    proto: onnx.ModelProto, layers: list[str] | None = None
) -> dict[str, LayerValues]:
    """The capture points of each quantized layer in ``proto`` (those in ``layers`` when
    given) found from the node metadata; layers whose values the file does not keep are left
    out. A value the exporter renamed to a graph input or output (``image``, ``logits``) is
    found through the ONNX nodes made from the FX node that reads or writes it."""
    graph_inputs = {i.name for i in proto.graph.input}
    graph_outputs = {o.name for o in proto.graph.output}
    produced = {out for node in proto.graph.node for out in node.output} | graph_inputs
    made_by: dict[str, tuple[str, str]] = {}  # fx value -> (qgraph op, its first argument)
    onnx_in: dict[str, set[str]] = {}  # fx value -> inputs of the ONNX nodes made from it
    onnx_out: dict[str, set[str]] = {}  # ... and their outputs
    owners: dict[str, list[tuple[str, tuple[int, int] | None]]] = {}  # fx value -> its layers
    sparse: dict[str, str] = {}  # layer -> its sparse branch's value
    for node in proto.graph.node:
        fx = _fx_of(node)
        if fx is None:
            continue
        value, op, first = fx
        made_by[value] = (op, first)
        onnx_in.setdefault(value, set()).update(node.input)
        onnx_out.setdefault(value, set()).update(node.output)
        layer = _layer_of(node)
        packed = _packed_of(node)
        if packed and op in _LAYER_OPS:  # one node, several layers' columns
            owners[value] = [(name, (a, b)) for name, a, b in packed]
        elif layer and op in _LAYER_OPS:
            owners[value] = [(layer, None)]
        elif layer and op == "sparse_matmul":
            sparse[layer] = value

    def only(names: set[str]) -> str | None:
        return next(iter(names)) if len(names) == 1 else None

    wanted = set(layers) if layers is not None else None
    out: dict[str, LayerValues] = {}
    for value, parts in owners.items():
        reader, x = value, made_by[value][1]  # the float input, one activation quantizer up
        while x in made_by and made_by[x][0] in ACT_QUANTIZERS:
            reader, x = x, made_by[x][1]
        if x not in produced:  # the model's input, under its ONNX name
            x = only(onnx_in.get(reader, set()) & graph_inputs)
        for layer, columns in parts:
            if (wanted is not None and layer not in wanted) or layer in out:
                continue
            outputs = [value] + ([sparse[layer]] if layer in sparse else [])
            outputs = [v if v in produced else only(onnx_out.get(v, set()) & graph_outputs)
                       for v in outputs]  # fmt: skip
            if x is not None and all(v is not None for v in outputs):
                out[layer] = LayerValues(layer, x, outputs, columns)
    return out


def iter_captures(
    path: str | os.PathLike,
    rows: Iterable[np.ndarray],
    layers: list[str] | None = None,
    threads: int = 2,
) -> Iterator[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Run ``path`` in ONNX Runtime (float activations inside ``MatMulNBits``, as
    :func:`~qgraph.backends.onnx_backend.ort_forward` does) once per row of model input (a
    decoder gets the row as its prompt with an empty cache) and yield, per run,
    ``{layer: (float input, summed output)}`` — one run at a time, so that memory holds one
    run's activations of every layer, not the whole batch's."""
    import onnxruntime as ort

    from .onnx_backend import _cache_dims, _decoder_feed

    path = Path(path)
    try:
        proto = onnx.load(os.fspath(path))  # with external data from the file's folder
    except Exception as exc:
        raise ExportError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    found = find_layer_values(proto, layers)
    if not found:
        return
    graph_outputs = {o.name for o in proto.graph.output}
    extra = sorted({v for lv in found.values() for v in [lv.inputs, *lv.outputs]} - graph_outputs)
    types = {v.name: v.type.tensor_type.elem_type for v in proto.graph.value_info}
    for name in extra:
        elem = types.get(name) or onnx.TensorProto.FLOAT
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    if proto.ByteSize() >= _PROTO_LIMIT:
        raise ExportError(
            f"{path}: over 2 GB with its weights; capturing layers needs it in memory"
        )
    opts = session_options(threads=threads, matmulnbits_accuracy_level=0)
    session = ort.InferenceSession(
        proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    del proto
    wanted = [lv.inputs for lv in found.values()] + [v for lv in found.values() for v in lv.outputs]
    wanted = list(dict.fromkeys(wanted))
    specs = session.get_inputs()
    cache_dims = _cache_dims(path, specs) if len(specs) > 1 else None
    for row in rows:
        if len(specs) == 1:
            feed = {specs[0].name: row}
        else:
            feed = {s.name: _decoder_feed(s, row, cache_dims) for s in specs}
        values = dict(zip(wanted, session.run(wanted, feed), strict=True))
        yield {layer: (values[lv.inputs], _summed(values, lv)) for layer, lv in found.items()}


def _summed(values: dict[str, np.ndarray], lv: LayerValues) -> np.ndarray:
    """The layer's output: its parts summed, the packed layer's columns cut out."""
    total = sum(values[v] for v in lv.outputs[1:]) + values[lv.outputs[0]]
    return total if lv.columns is None else total[..., lv.columns[0] : lv.columns[1]]
