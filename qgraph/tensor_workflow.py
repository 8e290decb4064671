"""``qgraph run`` for models that are not language models (an ONNX file, a CNN): calibrate on
``--calib-inputs``, rewrite, measure each output's error against the original model on
``--eval-inputs``, and with ``--export`` the same for the written file in ONNX Runtime."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from . import __version__
from .api import from_onnx
from .errors import DataError
from .layer_trace import RunAnalysis
from .pass_manager import PassManager
from .tensor_data import output_error, read_inputs, run_samples, stack_samples
from .workflow import REPORT_SCHEMA, log, log_flagged, pass_log


def _ort_forward(path: str | os.PathLike):
    from qgraph.backends.ort_runtime import OrtModel

    return OrtModel(path).run


def run_tensor_model(
    model_path: str | os.PathLike,
    pipeline: str,
    *,
    calib_inputs: str | os.PathLike | None,
    eval_inputs: str | os.PathLike | None,
    calib_samples: int | None = None,
    export: str | os.PathLike | None = None,
    verify_each: bool = False,
    trace_layers: str | None = None,
) -> dict[str, Any]:
    """Rewrite an ONNX model with ``pipeline`` and report the error of each output
    (``trace_layers``: as for :meth:`qgraph.workflow.Job.run`)."""
    from .onnx_import import input_specs, read_onnx

    t0 = time.perf_counter()
    specs = input_specs(read_onnx(model_path))
    names = [s.name for s in specs]
    dtypes = [s.dtype for s in specs]
    calib = read_inputs(calib_inputs, names, dtypes) if calib_inputs else None
    if calib is not None and calib_samples is not None:
        calib = [c[:calib_samples] for c in calib]
    evals = read_inputs(eval_inputs, names, dtypes) if eval_inputs else calib
    if evals is None:
        raise DataError(
            f"{model_path}: give --eval-inputs (or --calib-inputs) FILE.npz to measure the "
            "rewritten model's outputs"
        )
    example = tuple(x[0] for x in (calib if calib is not None else evals))
    model = from_onnx(model_path, example)
    log(
        f"loaded {model.name} from {model_path} ({model.accounting()['params'] / 1e6:.2f} M params)"
    )
    if calib is not None:
        if len(calib) != 1:
            raise DataError(
                f"{model_path}: calibration of models with {len(calib)} inputs is not supported "
                "yet (one input only)"
            )
        model.set_calibration(stack_samples(calib[0]))
    reference = run_samples(model, evals)
    ort_original = run_samples(_ort_forward(model_path), evals)
    import_error = [output_error(o, r) for o, r in zip(ort_original, reference, strict=True)]
    float_acc = model.accounting()
    # passes calibrate on every sample given (qgraph.calibration.calibration_rows)
    analysis = RunAnalysis(trace_layers) if trace_layers is not None else None
    trace = analysis.start(model) if analysis else None
    PassManager(pipeline, verify_each=verify_each, print_after=True, trace=trace).run(model)
    outputs = run_samples(model, evals)
    acc = model.accounting()
    errors = [output_error(r, y) for r, y in zip(reference, outputs, strict=True)]
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "report": "run",
        "qgraph_version": __version__,
        "model": model.name,
        "source": str(model_path),
        "pipeline": pipeline,
        "inputs": {n: list(e.shape[1:]) for n, e in zip(names, evals, strict=True)},
        "calibration_samples": int(calib[0].shape[0]) if calib is not None else 0,
        "eval_samples": int(evals[0].shape[0]),
        "eval_on_calibration": eval_inputs is None,
        "import_error": dict(zip(model.output_names, import_error, strict=True)),
        "passes": pass_log(model),
        "output_error": dict(zip(model.output_names, errors, strict=True)),
        "params_float": float_acc["params"],
        "params": acc["params"],
        "volume_bits_float": float_acc["volume_bits"],
        "volume_bits": acc["volume_bits"],
    }
    if analysis:
        report.update(analysis.finish(model))
    for name, err in report["output_error"].items():
        log(f"output {name}: SQNR {err['sqnr_db']:.1f} dB, rel L2 {err['rel_l2']:.2e}")
    if export:
        from qgraph.backends.onnx_backend import export_model, optimized_op_histogram

        t = time.perf_counter()
        path = export_model(model, export, pipeline)
        seconds = time.perf_counter() - t
        ort_out = run_samples(_ort_forward(path), evals)
        ort_errors = [output_error(r, y) for r, y in zip(reference, ort_out, strict=True)]
        vs_torch = [output_error(y, o) for y, o in zip(outputs, ort_out, strict=True)]
        ops = optimized_op_histogram(path)
        report["export"] = {
            "path": str(path),
            "file_mb": Path(path).stat().st_size / 2**20,
            "export_seconds": seconds,
            "output_error": dict(zip(model.output_names, ort_errors, strict=True)),
            "vs_torch": dict(zip(model.output_names, vs_torch, strict=True)),
            "ort_optimized_ops": {
                k: v for k, v in ops.items() if "Conv" in k or "MatMul" in k or "QLinear" in k
            },
        }
        for name, err in report["export"]["output_error"].items():
            log(f"ONNX Runtime output {name}: SQNR {err['sqnr_db']:.1f} dB against the original")
        if analysis:
            report["onnx_trace"] = analysis.onnx(model, path)
            log_flagged(report["onnx_trace"])
    report["seconds"] = time.perf_counter() - t0
    return report


def format_outputs(report: dict[str, Any]) -> str:
    """One line per output: the rewritten model's error (and the exported file's)."""
    lines = [f"{'output':<28} {'SQNR dB':>8} {'rel L2':>9} {'max abs':>10} {'ORT SQNR dB':>11}"]
    lines.append("-" * len(lines[0]))
    ort = (report.get("export") or {}).get("output_error", {})
    for name, err in report["output_error"].items():
        ort_db = ort.get(name, {}).get("sqnr_db", float("nan"))
        lines.append(
            f"{name[:28]:<28} {err['sqnr_db']:>8.2f} {err['rel_l2']:>9.2e} "
            f"{err['max_abs']:>10.3g} {ort_db:>11.2f}"
        )
    return "\n".join(lines)
