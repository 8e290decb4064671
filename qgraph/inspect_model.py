"""``qgraph inspect``: what a model or ONNX file contains — ops, parameters, bits per weight, volume."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import ModelFileError

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
    }


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
        return inspect_onnx(spec)
    from .api import load

    model = load(spec)
    ops = Counter(
        str(getattr(n.target, "__name__", n.target))
        for n in model.gm.graph.nodes
        if n.op == "call_function"
    )
    acc = model.accounting()
    return {
        "kind": "fx",
        "model": model.name,
        "source": model.source,
        "ops": dict(ops.most_common()),
        "params": acc["params"],
        "volume_mb": acc["volume_mb"],
        "bits_per_param": acc["volume_bits"] / max(1, acc["params"]),
        "structure": model.structure.summary(),
    }
