"""The error each pass adds, layer by layer, and the same layers in the exported file.

:class:`PassTrace` is handed to the pass manager: before the first pass it keeps the model's
output on a probe batch; after every pass it records the output's SQNR against that (exact
passes show ~100+ dB, quantizing passes what they cost) and each quantized layer's local output
error (:mod:`qgraph.layer_report`). :func:`compare_with_onnx` measures the same layers in ONNX
Runtime on the same inputs and flags a layer whose error in the file departs from torch's.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .kernels.error_stats import energies, sqnr_db
from .layer_report import (
    LayerMeasure,
    _reference,
    apply_layer,
    json_number,
    measure,
    quantized_probes,
)

if TYPE_CHECKING:
    from .model import Model

#: A layer is flagged when its error in ONNX Runtime is this many dB worse than in torch ...
FLAG_DB = 1.0
#: ... or when ONNX Runtime's output departs from torch's layer, run on the same input, by noise
#: within this many dB of the layer's quantization noise (a rounding tie that integer kernels
#: break the other way is ~30 dB below it; a wrong scale or layout is at or above it).
AGREEMENT_MARGIN_DB = 6.0


def probe_batch(model: Model, rows: int = 2, tokens: int | None = None) -> torch.Tensor:
    """The inputs the report measures on: the first ``rows`` calibration windows (first
    ``tokens`` of each when given), or, for tensor models, the first 8 calibration samples."""
    data = model.calibration
    if data is None:
        return model.probe_inputs()[0]
    if data.is_floating_point():
        return data[:8]
    return data[:rows, :tokens] if tokens else data[:rows]


class PassTrace:
    """Records, after each pass, ``output_sqnr_db`` (the model's output against its output before
    the pipeline) and ``layer_sqnr_db`` (each quantized layer's local output error, for layers
    whose names match ``pattern``) into the pass's summary."""

    def __init__(self, batch: torch.Tensor | None = None, pattern: str | None = None):
        self.batch = batch
        self.pattern = pattern
        self.reference: list[Any] | None = None
        self.last: dict[str, LayerMeasure] = {}  # the measures after the latest pass
        self.seconds = 0.0  # spent measuring, reported so its cost is known

    def start(self, model: Model) -> None:
        t = time.perf_counter()
        if self.batch is None:
            self.batch = probe_batch(model)
        _, self.reference = measure(model, self.batch, [])
        self.seconds += time.perf_counter() - t

    def after_pass(self, model: Model) -> dict[str, Any]:
        t = time.perf_counter()
        try:
            return self._measure(model)
        finally:
            self.seconds += time.perf_counter() - t

    def _measure(self, model: Model) -> dict[str, Any]:
        probes = quantized_probes(model, self.pattern)
        measured, outputs = measure(model, self.batch, probes)
        self.last = measured
        out: dict[str, Any] = {
            "output_sqnr_db": json_number(_outputs_sqnr(self.reference, outputs))
        }
        if probes:
            out["layer_sqnr_db"] = {p.name: json_number(measured[p.name].sqnr_db()) for p in probes}
        return out


def _outputs_sqnr(reference: list[Any], outputs: list[Any]) -> float:
    signal = noise = 0.0
    for ref, out in zip(reference, outputs, strict=True):
        ref = ref[0] if isinstance(ref, (tuple, list)) else ref
        out = out[0] if isinstance(out, (tuple, list)) else out
        s, n = energies(ref, out)
        signal, noise = signal + s, noise + n
    return sqnr_db(signal, noise)


def compare_with_onnx(
    model: Model,
    path: str | os.PathLike,
    batch: torch.Tensor | None = None,
    pattern: str | None = None,
    measured: dict[str, LayerMeasure] | None = None,
) -> dict[str, Any]:
    """Each quantized layer's local output error in torch and in the exported file in ONNX
    Runtime, on the same inputs (``batch``, by default :func:`probe_batch`'s, the per-layer
    table's), with their agreement — the SQNR of ONNX Runtime's layer output against torch's
    layer run on the input ONNX Runtime gave it, so a divergence is pinned on the layer where
    it starts, not on every layer after it — and a flag where they diverge. ``measured``: torch's
    measures of the model as it is now on ``batch`` when already taken."""
    from qgraph.backends.onnx_layer_capture import iter_captures

    if batch is None:
        batch = probe_batch(model)
    probes = quantized_probes(model, pattern)
    if measured is None or any(p.name not in measured for p in probes):
        measured, _ = measure(model, batch, probes)
    sums = {p.name: [0.0, 0.0, 0.0, 0.0] for p in probes}  # ORT signal, noise; agreement s, n
    seen: set[str] = set()
    rows = (batch[i : i + 1].numpy() for i in range(batch.shape[0]))
    for captured in iter_captures(path, rows, [p.name for p in probes]):
        for p in probes:
            if p.name not in captured:
                continue
            seen.add(p.name)
            x, y = captured[p.name]
            y_ort = torch.from_numpy(np.ascontiguousarray(y)).float()
            x_ort = torch.from_numpy(np.ascontiguousarray(x)).float()
            acc = sums[p.name]
            with torch.inference_mode():
                ref = _reference(model, p, x_ort)
                if ref is not None:
                    s, n = energies(ref, y_ort)
                    acc[0], acc[1] = acc[0] + s, acc[1] + n
                s, n = energies(apply_layer(model, p, x_ort), y_ort)
                acc[2], acc[3] = acc[2] + s, acc[3] + n
    layers = []
    for p in probes:
        torch_db = measured[p.name].sqnr_db()
        entry: dict[str, Any] = {"name": p.name, "torch_sqnr_db": json_number(torch_db)}
        if p.name not in seen:
            entry["in_file"] = False
            layers.append(entry)
            continue
        signal, noise, agree_signal, agree_noise = sums[p.name]
        ort_db = sqnr_db(signal, noise) if signal or noise else None
        agreement = sqnr_db(agree_signal, agree_noise)
        flagged = (
            torch_db is not None
            and ort_db is not None
            and (ort_db < torch_db - FLAG_DB or agreement < torch_db + AGREEMENT_MARGIN_DB)
        )
        entry.update(
            in_file=True,
            ort_sqnr_db=json_number(ort_db),
            agreement_db=json_number(agreement),
            flagged=bool(flagged),
        )
        layers.append(entry)
    return {
        "path": str(path),
        "tokens": int(batch[0].numel()) * int(batch.shape[0]),
        "flag_db": FLAG_DB,
        "agreement_margin_db": AGREEMENT_MARGIN_DB,
        "layers": layers,
        "flagged": [e["name"] for e in layers if e.get("flagged")],
        "missing": [e["name"] for e in layers if not e.get("in_file", True)],
    }


class RunAnalysis:
    """What ``qgraph run --html`` / ``--trace-layers`` adds to a run: the activation ranges of the
    model before the pipeline, the per-pass trace, the final per-layer table, and the same
    layers in the exported file."""

    def __init__(self, pattern: str | None = None):
        self.pattern = pattern or None
        self.batch: torch.Tensor | None = None
        self.activations_before: dict[str, dict] = {}
        self.trace: PassTrace | None = None
        self.measured: dict[str, LayerMeasure] = {}
        self.seconds = 0.0

    def start(self, model: Model) -> PassTrace:
        """Measure the model as loaded; returns the trace to hand to the pass manager."""
        from .layer_report import activation_rows

        t = time.perf_counter()
        self.batch = probe_batch(model)
        self.activations_before = activation_rows(model, self.batch)
        self.trace = PassTrace(self.batch, self.pattern)
        self.seconds += time.perf_counter() - t
        return self.trace

    def finish(self, model: Model) -> dict[str, Any]:
        """The report's ``probe``, ``layers``, ``activations_before`` and ``analysis_seconds``
        (the time spent measuring so far, the trace's included)."""
        from .layer_report import layer_rows

        t = time.perf_counter()
        self.measured = self.trace.last if self.trace else {}  # the model after the last pass
        layers = layer_rows(model, self.batch, self.pattern, self.measured or None)
        self.seconds += time.perf_counter() - t
        return {
            "probe": {"rows": int(self.batch.shape[0]), "shape": list(self.batch.shape[1:])},
            "layers": layers,
            "activations_before": self.activations_before,
            "analysis_seconds": self.seconds + (self.trace.seconds if self.trace else 0.0),
        }

    def onnx(self, model: Model, path: str | os.PathLike) -> dict[str, Any]:
        t = time.perf_counter()
        result = compare_with_onnx(model, path, self.batch, self.pattern, self.measured or None)
        result["seconds"] = time.perf_counter() - t
        return result
