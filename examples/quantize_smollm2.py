"""Quantize the packaged SmolLM2-135M to W8A8 with rotations, check it, and export it.

.venv/bin/python examples/quantize_smollm2.py [out.onnx]
"""

import sys

import qgraph
from qgraph.backends.onnx_backend import export_model, ort_forward
from qgraph.backends.torch_backend import generate
from qgraph.evaluate import perplexity

PIPELINE = "fuse-norms,rotate{seed=0},quantize{w=int8:channel,a=int8:token}"

model = qgraph.load()  # built-in smollm2-135m, converted once and cached
model.set_calibration(qgraph.calibration_windows(model, windows=8))
windows = qgraph.eval_windows(model, windows=4)
print(f"float perplexity: {perplexity(model, windows):.3f}")

qgraph.run_pipeline(model, PIPELINE, verify_each=True, print_after=True)
print(f"W8A8 perplexity:  {perplexity(model, windows):.3f}")
print("continuation:", generate(model, "def fibonacci(n):", max_new_tokens=16))

out = sys.argv[1] if len(sys.argv) > 1 else "smollm2-w8a8.onnx"
path = export_model(model, out, PIPELINE)
print(f"ONNX Runtime perplexity: {perplexity(ort_forward(path), windows):.3f} ({path})")
