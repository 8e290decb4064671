"""Real CNNs given as ONNX: RapidOCR's PP-OCRv4 text recognizer (opset 12) and 0°/180°
classifier (opset 11), imported, quantized to int8 and exported, on text lines rendered with
the machine's DejaVu fonts."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import qgraph
from qgraph.backends.onnx_backend import export_model, optimized_op_histogram

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import ocr_data  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        ocr_data.models_dir() is None or not ocr_data.fonts_available(),
        reason="needs rapidocr-onnxruntime's model files and the DejaVu fonts (make setup)",
    ),
]


@pytest.fixture(scope="module")
def rec_lines():
    return ocr_data.text_batch(24, 11, "eval")


def _reads(probs: np.ndarray, alphabet: list[str]) -> list[str]:
    return [s.strip() for s in ocr_data.ctc_decode(probs, alphabet)]


def test_imported_recognizer_reads_like_onnx_runtime(rec_lines):
    x, lines = rec_lines
    path = ocr_data.model_path("rec")
    model = qgraph.from_onnx(path, (torch.from_numpy(x[:1].copy()),))
    ours = model(torch.from_numpy(x)).numpy()
    ref = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0)  # softmax over 6625 classes
    alphabet = ocr_data.characters(path)
    assert _reads(ours, alphabet) == _reads(ref, alphabet)
    exact = np.mean([a == b for a, b in zip(_reads(ref, alphabet), lines, strict=True)])
    assert exact >= 0.8  # the rendered text is legible to the float model


def test_int8_recognizer_keeps_the_readings_in_onnx_runtime(rec_lines, tmp_path):
    """Seed 002's setting: int8 per-channel weights, static per-tensor activations by the 99.99th percentile (the best range measured on it, benchmarks/README.md),
    calibrated on one batch of 16 lines; ≥ 95 % of readings stay identical to float, in torch
    and in the exported file, which ONNX Runtime runs with integer convolutions."""
    x, _ = rec_lines
    calib, _ = ocr_data.text_batch(16, 3, "calib")
    path = ocr_data.model_path("rec")
    model = qgraph.from_onnx(path, (torch.from_numpy(calib[:1].copy()),))
    model.set_calibration(torch.from_numpy(calib))
    float_out = model(torch.from_numpy(x)).numpy()
    qgraph.run_pipeline(
        model, "fuse-norms,quantize{w=int8:channel,a=int8:tensor,range=percentile,exclude=none}"
    )
    alphabet = ocr_data.characters(path)
    want = _reads(float_out, alphabet)
    ours = _reads(model(torch.from_numpy(x)).numpy(), alphabet)
    assert np.mean([a == b for a, b in zip(ours, want, strict=True)]) >= 0.95
    out = export_model(model, tmp_path / "rec_int8.onnx")
    got = _reads(ort.InferenceSession(str(out)).run(None, {"x": x})[0], alphabet)
    assert np.mean([a == b for a, b in zip(got, want, strict=True)]) >= 0.95
    ops = optimized_op_histogram(out)
    assert sum(v for k, v in ops.items() if k.endswith("QLinearConv")) == 38, ops


def test_opset11_classifier_imports_exactly():
    x, _ = ocr_data.text_batch(6, 5, "eval", ocr_data.CLS_SHAPE)
    x[1::2] = x[1::2, :, ::-1, ::-1]  # every other line upside down
    path = ocr_data.model_path("cls")
    model = qgraph.from_onnx(path, (torch.from_numpy(x[:1].copy()),))
    ours = model(torch.from_numpy(x)).numpy()
    ref = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert list(ref.argmax(-1)) == [0, 1, 0, 1, 0, 1]  # the classifier sees the flips
