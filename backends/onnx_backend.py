"""Export a qgraph Model to ONNX (with its recipe and pass log as metadata) and run it in ONNX Runtime."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from qgraph import __version__
from qgraph.errors import ExportError
from qgraph.model import Model

from .onnx_export import export_onnx, op_histogram
from .ort_runtime import OrtModel, optimized_op_histogram


def export_metadata(model: Model, pipeline: str) -> dict[str, str]:
    """The recipe and pass log every exported file carries (``metadata_props``)."""
    return {
        "qgraph.version": __version__,
        "qgraph.model": model.name,
        "qgraph.pipeline": pipeline,
        "qgraph.properties": ",".join(sorted(model.properties)),
        "qgraph.pass_log": json.dumps([r.to_dict() for r in model.log], default=str),
    }


def export_model(
    model: Model,
    path: str | os.PathLike,
    pipeline: str = "",
    external_data: bool | None = None,
    integer_activations: bool = False,
) -> Path:
    """Write ``model`` as an ONNX file that stock ONNX Runtime runs (opset 21).

    ``integer_activations`` runs per-token quantized layers as ``MatMulInteger``
    (:mod:`qgraph.backends.onnx_integer`): measured 1.2–1.6× faster prefill but 0.8–0.9× the
    decode speed of the default float path (fake quantization into ``MatMulNBits``)."""
    attempts = [model.dynamic_shapes, *_narrower_dims(model.dynamic_shapes)]
    for i, dynamic in enumerate(attempts):
        try:
            return export_onnx(
                model.gm,
                model.example_inputs,
                path,
                dynamic_shapes=dynamic,
                input_names=list(model.input_names),
                output_names=list(model.output_names),
                metadata=export_metadata(model, pipeline),
                external_data=external_data,
                integer_activations=integer_activations,
                node_metadata=provenance(model),
            )
        except ExportError as exc:
            if i + 1 == len(attempts) or "torch.onnx.export failed" not in str(exc):
                raise
            warnings.warn(
                f"{model.name}: export with dynamic dims {_dims_text(dynamic)} failed "
                f"({str(exc).splitlines()[0][:120]}); retrying with {_dims_text(attempts[i + 1])}",
                stacklevel=2,
            )
    raise AssertionError("unreachable")


def provenance(model: Model) -> dict[str, dict[str, str]]:
    """``{constant: {"qgraph.passes": "rotate,quantize", "qgraph.layer": name}}`` for the
    constants read by every node a pass made or changed (``node.meta["qgraph"]``, see
    ``pass_manager.tag_provenance``), keyed as the exporter names them (``.`` → ``_``): the ONNX
    nodes made from those nodes carry it (:func:`~qgraph.backends.onnx_export.annotate_nodes`),
    so Netron and Model Explorer show where they came from. A constant read by nodes of several
    layers (shared rotation signs) names no layer."""
    out: dict[str, dict[str, str]] = {}
    for node in model.gm.graph.nodes:
        info = node.meta.get("qgraph")
        if not info:
            continue
        props = {"qgraph.passes": ",".join(info["passes"])}
        if info.get("layer"):
            props["qgraph.layer"] = info["layer"]
        for arg in node.args:
            if getattr(arg, "op", None) != "get_attr":
                continue
            key = arg.target.replace(".", "_")
            if key in out and out[key].get("qgraph.layer") != props.get("qgraph.layer"):
                out[key].pop("qgraph.layer", None)
            else:
                out.setdefault(key, props)
    return out


def _narrower_dims(dynamic) -> list:
    """For a model imported from ONNX (one ``{dim: Dim.AUTO}`` per input): the batch dims only,
    then none. torch.export can trace some dynamic sizes it cannot export (the width of an SVTR
    text recognizer, pooled by 3 after a stride of 16), and a file with fixed sizes beats none."""
    if not (isinstance(dynamic, tuple) and all(isinstance(d, dict) for d in dynamic)):
        return []
    out = []
    batch = tuple({0: d[0]} if 0 in d else {} for d in dynamic)
    if batch != dynamic:
        out.append(batch)
    if any(batch):
        out.append(tuple({} for _ in dynamic))
    return out


def _dims_text(dynamic) -> str:
    if not (isinstance(dynamic, tuple) and all(isinstance(d, dict) for d in dynamic)):
        return str(dynamic)
    return "; ".join(f"input {i}: dims {sorted(d) or 'none'}" for i, d in enumerate(dynamic))


def ort_forward(path: str | os.PathLike, threads: int = 2, exact_matmul: bool = True):
    """A forward function over an ONNX file. ``exact_matmul`` keeps float activations in the
    fused ``MatMulNBits`` kernels (accuracy level 0) so the file computes what the recipe says;
    without it ONNX Runtime quantizes activations to int8 inside them (faster, less exact)."""
    runner = OrtModel(path, threads=threads, matmulnbits_accuracy_level=0 if exact_matmul else None)
    inputs = runner.session.get_inputs()
    cache_dims = _cache_dims(Path(path), inputs)

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.numpy()
        if len(inputs) == 1:
            return torch.as_tensor(runner(ids))
        # a cached decoder (qgraph's or ONNX Runtime GenAI's builder's): the whole window as
        # the prompt, with an empty cache
        return torch.as_tensor(runner(*(_decoder_feed(i, ids, cache_dims) for i in inputs)))

    return forward


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _cache_dims(path: Path, inputs) -> tuple[int, int] | None:
    """(kv_heads, head_size) of a decoder's cache: from its input shapes, or from the
    ``genai_config.json`` beside it when the file leaves them symbolic (the GenAI builder)."""
    cache = [i for i in inputs if i.name.startswith("past_key_values.")]
    if not cache:
        return None
    heads, size = cache[0].shape[1], cache[0].shape[3]
    if isinstance(heads, int) and isinstance(size, int):
        return heads, size
    config = path.parent / "genai_config.json"
    if not config.exists():
        raise ExportError(
            f"{path}: the cache shape {cache[0].shape} is symbolic and no config says it"
        )
    decoder = json.loads(config.read_text())["model"]["decoder"]
    return int(decoder["num_key_value_heads"]), int(decoder["head_size"])


def _decoder_feed(spec, ids: np.ndarray, cache_dims: tuple[int, int] | None) -> np.ndarray:
    """The value of one decoder input for a prompt ``ids`` and an empty cache."""
    batch, seq = ids.shape
    if spec.name == "input_ids":
        return ids.astype(np.int32 if spec.type == "tensor(int32)" else np.int64)
    if spec.name == "attention_mask":
        return np.ones_like(ids, dtype=np.int32 if spec.type == "tensor(int32)" else np.int64)
    if spec.name == "position_ids":
        return np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
    if spec.name.startswith("past_key_values."):
        dtype = _NUMPY_TYPES.get(spec.type, np.float32)
        return np.zeros((batch, cache_dims[0], 0, cache_dims[1]), dtype)
    raise ExportError(f"cannot feed decoder input {spec.name!r} ({spec.type}, {spec.shape})")


__all__ = [
    "export_metadata",
    "export_model",
    "ort_forward",
    "op_histogram",
    "optimized_op_histogram",
]
