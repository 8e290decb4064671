"""``qgraph inspect``: what a model or ONNX file contains — ops, parameters, bits per weight, volume."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import ModelFileError

#: The report data model's version (docs/REPORT.md); qgraph.workflow re-exports it.
REPORT_SCHEMA = "qgraph.report/1"

_BITS = {
    "FLOAT": 32,
    "FLOAT16": 16,
    "BFLOAT16": 16,
    "DOUBLE": 64,
    "INT8": 8,
    "UINT8": 8,
    "INT4": 4,
    "UINT4": 4,
    "INT16": 16,
    "UINT16": 16,
    "INT32": 32,
    "INT64": 64,
    "INT2": 2,
    "UINT2": 2,
    "BOOL": 8,
    "FLOAT8E4M3FN": 8,
}


def inspect_onnx(path: str | os.PathLike) -> dict[str, Any]:
    import onnx_ir as ir

    from qgraph.backends.onnx_export import op_histogram

    path = Path(path)
    try:
        model = ir.load(path)
    except Exception as exc:
        raise ModelFileError(f"cannot read ONNX file {path}: {type(exc).__name__}: {exc}") from exc
    by_dtype: Counter = Counter()
    volume = 0
    weights = 0
    for value in model.graph.initializers.values():
        n = 1
        for d in value.shape:
            n *= int(d)
        dtype = value.dtype.name if value.dtype is not None else "?"
        by_dtype[dtype] += n
        volume += n * _BITS.get(dtype, 32)
        if value.shape is not None and len(value.shape) >= 2:
            weights += n
    return {
        "schema": REPORT_SCHEMA,
        "report": "inspect",
        "kind": "onnx",
        "path": str(path),
        "file_mb": _file_mb(path),
        "opset": {d or "ai.onnx": v for d, v in model.opset_imports.items()},
        "ops": dict(sorted(op_histogram(path).items(), key=lambda kv: -kv[1])),
        "params": sum(by_dtype.values()),
        "params_by_dtype": dict(by_dtype),
        "matrix_params": weights,
        "volume_mb": volume / 8 / 2**20,
        "bits_per_param": volume / max(1, sum(by_dtype.values())),
        "metadata": {
            k: (v if len(v) < 200 else v[:200] + "…") for k, v in model.metadata_props.items()
        },
        "by_pass": _nodes_by_pass(model),
        "layers": _onnx_layers(model),
    }


def _onnx_layers(model) -> list[dict[str, Any]]:
    """Quantized layers of a qgraph file from its node metadata: the weight's stored type and
    grouping, read off the ``DequantizeLinear`` (or ``MatMulNBits``) that carries the layer."""
    import onnx_ir as ir

    rows: dict[str, dict[str, Any]] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        layer = node.metadata_props.get("qgraph.layer")
        if not layer or layer in rows:
            continue
        attrs = node.attributes
        if node.op_type == "DequantizeLinear" and node.inputs[0] is not None:
            weight = node.inputs[0]
            if weight.const_value is None and not weight.is_initializer():
                continue  # an activation's dequantizer
            dtype = weight.dtype.name.lower() if weight.dtype is not None else "?"
            block = attrs["block_size"].as_int() if "block_size" in attrs else 0
            if block:
                grain = f"group{block}"
            elif "axis" in attrs or len(node.inputs[1].shape or ()):
                grain = "channel"
            else:
                grain = "tensor"
            text, bits = f"{dtype}:{grain}", _BITS.get(dtype.upper())
        elif node.op_type == "MatMulNBits":
            bits = attrs["bits"].as_int() if "bits" in attrs else 4
            block = attrs["block_size"].as_int() if "block_size" in attrs else 0
            text = f"int{bits}:group{block}"
        else:
            continue
        rows[layer] = {"index": len(rows), "name": layer, "weight": text, "bits": bits}
    return list(rows.values())


def _nodes_by_pass(model) -> dict[str, dict[str, Any]]:
    """Nodes qgraph's passes made or changed, from their ``qgraph.passes``/``qgraph.layer``
    metadata: ``{passes: {"nodes": n, "ops": {op: n}, "layers": n}}``."""
    import onnx_ir as ir

    out: dict[str, dict[str, Any]] = {}
    layers: dict[str, set] = {}
    graphs = [model.graph, *(f.graph for f in model.functions.values())]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            passes = node.metadata_props.get("qgraph.passes")
            if not passes:
                continue
            entry = out.setdefault(passes, {"nodes": 0, "ops": Counter()})
            entry["nodes"] += 1
            entry["ops"][node.op_type] += 1
            layer = node.metadata_props.get("qgraph.layer")
            if layer:
                layers.setdefault(passes, set()).add(layer)
    for passes, entry in out.items():
        entry["ops"] = dict(entry["ops"].most_common())
        entry["layers"] = len(layers.get(passes, ()))
    return out


def _file_mb(path: Path) -> float:
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.exists():
        size += data.stat().st_size
    return size / 2**20


def inspect_model(spec: str) -> dict[str, Any]:
    """Inspect an ONNX file, or a loadable model (built-in name, GGUF, HF directory) traced to FX."""
    if str(spec).endswith(".onnx"):
        if not Path(spec).is_file():
            raise ModelFileError(f"ONNX file {spec} does not exist")
        info = inspect_onnx(spec)
        if not any(k.startswith("qgraph::") for k in info["ops"]):  # a file qgraph can read
            from .api import from_onnx
            from .errors import QGraphError

            try:
                model = from_onnx(spec)
                info["structure"] = model.structure.summary()
                info["passes"] = capabilities(model)
            except QGraphError as exc:
                info["import"] = f"not importable: {str(exc).splitlines()[0]}"
        return info
    from .api import load

    model = load(spec)
    ops = Counter(
        str(getattr(n.target, "__name__", n.target))
        for n in model.gm.graph.nodes
        if n.op == "call_function"
    )
    acc = model.accounting()
    from .layer_report import record_rows

    return {
        "schema": REPORT_SCHEMA,
        "report": "inspect",
        "kind": "fx",
        "model": model.name,
        "source": model.source,
        "ops": dict(ops.most_common()),
        "params": acc["params"],
        "volume_mb": acc["volume_mb"],
        "bits_per_param": acc["volume_bits"] / max(1, acc["params"]),
        "structure": model.structure.summary(),
        "passes": capabilities(model),
        "properties": sorted(model.properties),
        "pass_log": [r.to_dict() for r in model.log],
        "layers": record_rows(model),
    }


def capabilities(model) -> dict[str, dict[str, Any]]:
    """What each main pass can and cannot do to ``model``, from its structure (nothing runs):
    ``{pass: {"can": [...], "cannot": [...]}}``, each item one sentence naming the layers."""
    from .kernels.hadamard import hadamard_factorization

    sv = model.structure
    res = sv.residual
    out: dict[str, dict[str, Any]] = {}
    foldable = [n for n in sv.norms if (n.gamma or n.beta) and not n.other_readers]
    blocked = [n for n in sv.norms if (n.gamma or n.beta) and n.other_readers]
    stream_ln = [n for n in res.norms if n.kind == "layer"]
    fuse: dict[str, list[str]] = {"can": [], "cannot": []}
    if foldable:
        fuse["can"].append(f"fold the scale of {len(foldable)} norm(s) into the layers they feed")
    if sv.convs:
        fuse["can"].append("fold BatchNorm that follows a convolution into it")
    fuse["cannot"] += [
        f"fold {n.name}: its output feeds {n.other_readers[0].name}, not only linear layers"
        for n in blocked[:5]
    ]
    if stream_ln:
        if res.issues or any(n.other_readers for n in stream_ln):
            fuse["cannot"].append(
                f"turn the stream's {len(stream_ln)} LayerNorm(s) into RMSNorm (needed by rotate)"
            )
        else:
            fuse["can"].append(f"turn the stream's {len(stream_ln)} LayerNorm(s) into RMSNorm")
    out["fuse-norms"] = fuse
    rot: dict[str, list[str]] = {"can": [], "cannot": []}
    r1_problems = list(res.issues)
    if not res.embeddings:
        r1_problems.append("no embedding feeds a residual stream")
    r1_problems += [
        f"norm {n.name} output feeds {n.other_readers[0].name}, not a linear layer"
        for n in res.norms
        if n.other_readers
    ]
    if r1_problems:
        rot["cannot"] += [f"R1: {p}" for p in r1_problems[:5]]
    else:
        rot["can"].append(f"R1 on the residual stream (hidden {res.hidden})")
    ok = [a for a in sv.attention if a.v_path_ok and a.v is not None and a.o is not None]
    if ok:
        fused = " (V rows of a fused q/k/v projection)" if ok[0].v_rows else ""
        rot["can"].append(f"R2 on {len(ok)} attention layer(s){fused}")
    rot["cannot"] += [f"R2 at {a.node.name}: {a.reason}" for a in sv.attention if a not in ok][:5]
    if not sv.attention and sv.linears:
        rot["cannot"].append(
            "R2/R3: no scaled_dot_product_attention in the graph (attention written as "
            "MatMul/Softmax, e.g. from an ONNX file, is not matched)"
        )
    if sv.attention and any(a.decomposed for a in sv.attention):
        rot["cannot"].append("online R3: attention is written out as MatMul/Softmax")
    elif sv.attention:
        hd = sv.attention[0].head_dim
        known = hadamard_factorization(hd) is not None
        (rot["can"] if known else rot["cannot"]).append(f"online R3 (head size {hd})")
    out["rotate"] = rot
    linears = [lin for lin in sv.linears if lin.role != "lm_head"]
    quant = {"can": [f"quantize {len(linears)} linear layer(s) (+ lm_head on request)"]}
    if sv.convs:
        quant["can"].append(
            f"quantize {len(sv.convs)} convolution(s): :channel/:tensor weights, static or no "
            "activation quantization"
        )
    out["quantize"] = {**quant, "cannot": []}
    out["gptq"] = {
        "can": [f"re-solve {len(linears)} linear layer(s)"],
        "cannot": ["re-solve convolutions (they keep round-to-nearest codes)"] if sv.convs else [],
    }
    return out
