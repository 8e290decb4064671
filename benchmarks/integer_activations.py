"""Integer activation paths in ONNX Runtime: per-token quantized layers as float arithmetic
(fake quantization, then ``MatMulNBits``) against ``MatMulInteger`` (uint8 × int8 → int32).

Each recipe (round-to-nearest weights; the speed does not depend on how codes were chosen) is
exported twice from the same rewritten model. Timed: one token at batch 1 without a cache (every
weight read once, the GEMV-bound part of a decode step) and a 128-token prefill, median of
``--repeats``, 2 threads, ONNX Runtime's default session options. Perplexity of both files in
ONNX Runtime against torch's on the same windows.

    .venv/bin/python benchmarks/integer_activations.py [--windows 2] [--repeats 30]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import header, job
from latency import timed

from qgraph.backends.onnx_backend import export_model, optimized_op_histogram, ort_forward
from qgraph.backends.ort_runtime import OrtModel
from qgraph.evaluate import perplexity
from qgraph.pass_manager import PassManager

RECIPES = {
    "W8A8": "fuse-norms,rotate{seed=0},quantize{w=int8:channel,a=int8:token}",
    "W4A8": "fuse-norms,rotate{seed=0},quantize{w=int4:channel,a=int8:token}",
    "W4A4": "fuse-norms,rotate{seed=0,online=r2+r4},quantize{w=int4:channel,a=int4:token}",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    j = job(args.windows, 16)
    windows = j.eval
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, pipeline in RECIPES.items():
            model = j.fresh_model()
            PassManager(pipeline).run(model)
            torch_ppl = perplexity(model.gm, windows)
            for integer in (False, True):
                path = export_model(
                    model,
                    Path(tmp) / f"{label}-{integer}.onnx",
                    pipeline,
                    integer_activations=integer,
                )
                ops = optimized_op_histogram(path)
                runner = OrtModel(path, threads=2)
                decode = timed(runner, np.array([[42]], dtype=np.int64), args.repeats)
                prefill = timed(
                    runner, np.arange(128, dtype=np.int64)[None] + 100, max(5, args.repeats // 5)
                )
                ort_ppl = perplexity(ort_forward(path, threads=2), windows)
                rows.append(
                    (label, integer, path.stat().st_size / 2**20, ops, decode, prefill,
                     torch_ppl, ort_ppl)
                )  # fmt: skip
    cmd = (
        f".venv/bin/python benchmarks/integer_activations.py --windows {args.windows} "
        f"--repeats {args.repeats}"
    )
    print(header("Integer activation paths in ONNX Runtime (batch 1, 2 threads)", cmd))
    print(
        "| recipe | activation path | file MB | integer / 4-bit kernels | decode-step ms | "
        "× float path | prefill-128 ms | × float path | torch ppl | ONNX Runtime ppl |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {}
    for label, integer, size, ops, decode, prefill, tppl, oppl in rows:
        if not integer:
            base[label] = (decode, prefill)
        d0, p0 = base[label]
        kernels = (
            f"{ops.get('MatMulInteger', 0)} MatMulInteger"
            if integer
            else f"{ops.get('com.microsoft::MatMulNBits', 0)} MatMulNBits"
        )
        path_name = "MatMulInteger (u8×s8)" if integer else "float fake-quant + MatMulNBits"
        print(
            f"| {label} | {path_name} | {size:.0f} | {kernels} | {decode:.2f} | "
            f"{d0 / decode:.2f}× | {prefill:.1f} | {p0 / prefill:.2f}× | {tppl:.3f} | {oppl:.3f} |"
        )


if __name__ == "__main__":
    main()
