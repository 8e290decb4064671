"""W4A4 SmolLM2-135M with online Hadamard rotations, model expansion and GPTQ; save, reload,
export to ONNX and run it in stock ONNX Runtime.

.venv/bin/python examples/w4a4_online_expansion.py [out-dir]
"""

import sys
from pathlib import Path

import qgraph
from qgraph.backends.onnx_backend import export_model, ort_forward
from qgraph.evaluate import perplexity

PIPELINE = (
    "fuse-norms,rotate{seed=0,online=all},"  # R1+R2 offline, R2 (o_proj), R3, R4 online
    "expand{budget=5},"  # widen o_proj/down_proj inputs: +5 % parameters
    "quantize{w=int4:channel,a=int4:token},gptq"
)

out = Path(sys.argv[1] if len(sys.argv) > 1 else "out")
out.mkdir(exist_ok=True)
model = qgraph.load()
model.set_calibration(qgraph.calibration_windows(model, windows=16))
windows = qgraph.eval_windows(model, windows=4)
print(f"float perplexity: {perplexity(model, windows):.3f}")

qgraph.run_pipeline(model, PIPELINE, print_after=True)
print(f"W4A4 perplexity:  {perplexity(model, windows):.3f}")
print("expansion:", {k: model.log[2].summary[k] for k in ("params_added", "params_added_percent")})

saved = qgraph.save(model, out / "smollm2-w4a4.pt2")
again = qgraph.load(saved, tokenizer=model.tokenizer)
print(f"reloaded perplexity: {perplexity(again, windows):.3f} ({saved})")

path = export_model(model, out / "smollm2-w4a4.onnx", PIPELINE)
print(f"ONNX Runtime perplexity: {perplexity(ort_forward(path), windows):.3f} ({path})")
