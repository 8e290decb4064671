"""Export a qgraph Model to ONNX (with its recipe and pass log as metadata) and run it in ONNX Runtime."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from qgraph import __version__
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
    model: Model, path: str | os.PathLike, pipeline: str = "", external_data: bool | None = None
) -> Path:
    """Write ``model`` as an ONNX file that stock ONNX Runtime runs (opset 21)."""
    return export_onnx(
        model.gm,
        model.example_inputs,
        path,
        dynamic_shapes=model.dynamic_shapes,
        input_names=list(model.input_names),
        output_names=["logits"],
        metadata=export_metadata(model, pipeline),
        external_data=external_data,
    )


def ort_forward(path: str | os.PathLike, threads: int = 2, exact_matmul: bool = True):
    """A forward function over an ONNX file. ``exact_matmul`` keeps float activations in the
    fused ``MatMulNBits`` kernels (accuracy level 0) so the file computes what the recipe says;
    without it ONNX Runtime quantizes activations to int8 inside them (faster, less exact)."""
    runner = OrtModel(path, threads=threads, matmulnbits_accuracy_level=0 if exact_matmul else None)
    cache = [i for i in runner.session.get_inputs() if i.name.startswith("past_key_values.")]

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.numpy()
        if not cache:
            return torch.as_tensor(runner(ids))
        # a cached decoder: the whole window as its prompt, with an empty cache
        batch = ids.shape[0]
        empty = [np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for i in cache]
        return torch.as_tensor(runner(ids, np.ones_like(ids), *empty))

    return forward


__all__ = [
    "export_metadata",
    "export_model",
    "ort_forward",
    "op_histogram",
    "optimized_op_histogram",
]
