"""qgraph: a compiler-style graph rewriting toolkit for quantizing neural networks."""

from . import ops, sparse_ops  # noqa: F401  (registers torch.ops.qgraph.*)
from .api import (
    calibration_windows,
    eval_windows,
    from_hf,
    from_module,
    from_onnx,
    load,
    run_pipeline,
)
from .errors import (
    DataError,
    ExportError,
    ModelFileError,
    PipelineError,
    QGraphError,
    StructureError,
    TraceError,
    VerificationError,
)
from .generation import Sampling, generate
from .model import Model
from .pass_manager import Option, Pass, PassManager, parse_pipeline, register
from .saving import save

__all__ = [
    "DataError",
    "ExportError",
    "Model",
    "ModelFileError",
    "Option",
    "Pass",
    "PassManager",
    "PipelineError",
    "QGraphError",
    "StructureError",
    "TraceError",
    "VerificationError",
    "calibration_windows",
    "eval_windows",
    "from_hf",
    "from_module",
    "from_onnx",
    "generate",
    "load",
    "parse_pipeline",
    "register",
    "run_pipeline",
    "Sampling",
    "save",
]
__version__ = "0.1.0"
