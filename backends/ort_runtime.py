"""Run exported qgraph models with ONNX Runtime on CPU, and inspect what ORT makes of them.

``matmulnbits_accuracy_level`` matters for numbers: ORT fuses ``DequantizeLinear(int4) → MatMul``
into ``MatMulNBits`` at level "extended"/"all" with accuracy level 4 by default (activations
quantized to int8 inside the kernel, ~1e-2 relative error); level 0 keeps float activations.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from qgraph.errors import ExportError

from .onnx_export import op_histogram

__all__ = ["OPTIMIZATION_LEVELS", "OrtModel", "optimized_op_histogram", "session_options"]

OPTIMIZATION_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(
    *,
    threads: int = 2,
    optimization: str = "all",
    matmulnbits_accuracy_level: int | None = None,
) -> ort.SessionOptions:
    """CPU session options shared by :class:`OrtModel` and :func:`optimized_op_histogram`."""
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(
            f"optimization must be one of {sorted(OPTIMIZATION_LEVELS)}, got {optimization!r}"
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    opts.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    if matmulnbits_accuracy_level is not None:
        opts.add_session_config_entry(
            "session.qdq_matmulnbits_accuracy_level", str(int(matmulnbits_accuracy_level))
        )
    return opts


def _session(path: Path, opts: ort.SessionOptions) -> ort.InferenceSession:
    if not path.is_file():
        raise ExportError(f"ONNX model {path} does not exist")
    try:
        return ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load {path}: {exc}") from exc


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


class OrtModel:
    """A CPU ``InferenceSession`` callable like the torch module it was exported from.

    ``model(*inputs)`` takes numpy arrays or torch tensors in graph-input order and returns the
    first output as a numpy array (:meth:`run` returns all of them).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        threads: int = 2,
        optimization: str = "all",
        matmulnbits_accuracy_level: int | None = None,
    ) -> None:
        self.path = Path(path)
        opts = session_options(
            threads=threads,
            optimization=optimization,
            matmulnbits_accuracy_level=matmulnbits_accuracy_level,
        )
        self.session = _session(self.path, opts)
        self.input_names: list[str] = [i.name for i in self.session.get_inputs()]
        self.output_names: list[str] = [o.name for o in self.session.get_outputs()]

    def run(self, *inputs: Any) -> list[np.ndarray]:
        """All outputs for positional ``inputs``."""
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"{self.path} takes {len(self.input_names)} inputs {self.input_names}, "
                f"got {len(inputs)}"
            )
        feeds = {name: _to_numpy(v) for name, v in zip(self.input_names, inputs, strict=True)}
        return self.session.run(None, feeds)

    def __call__(self, *inputs: Any) -> np.ndarray:
        return self.run(*inputs)[0]

    def __repr__(self) -> str:
        return f"OrtModel({str(self.path)!r}, inputs={self.input_names})"


def optimized_op_histogram(
    path: str | os.PathLike, optimization: str = "all", **kw: Any
) -> dict[str, int]:
    """Op histogram of the graph ORT actually runs, after its graph optimizations.

    ``kw`` goes to :func:`session_options` (``threads``, ``matmulnbits_accuracy_level``). ORT
    writes the optimized graph into a temporary directory (weights to a side file so that big
    models stay under protobuf's 2 GB limit); the directory is removed afterwards.
    """
    opts = session_options(optimization=optimization, **kw)
    tmp_dir = Path(tempfile.mkdtemp(prefix="qgraph-ort-"))
    try:
        optimized = tmp_dir / "optimized.onnx"
        opts.optimized_model_filepath = os.fspath(optimized)
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.data"
        )
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
        session = _session(Path(path), opts)
        del session
        return op_histogram(optimized)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
