"""ONNX Runtime latency of one decode step of SmolLM2-135M: float32 export vs W4A16 export.

A "decode step" here is one new token at batch 1 without a KV cache (the exported graph has
no cache inputs yet), which runs every weight matrix once — the GEMV-bound part of real
decoding — and omits attention over past tokens. Also a 128-token prefill. 2 threads.

    .venv/bin/python benchmarks/latency.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import header, job

from qgraph.backends.onnx_backend import export_model, optimized_op_histogram
from qgraph.backends.ort_runtime import OrtModel
from qgraph.pass_manager import PassManager


def timed(runner: OrtModel, ids: np.ndarray, repeats: int) -> float:
    for _ in range(3):
        runner(ids)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        runner(ids)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    j = job(1, 2)
    recipes = {
        "float32": None,
        "W4A16": "quantize{w=int4:channel}",
        "W4A16-g64": "quantize{w=int4:group64}",
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, pipeline in recipes.items():
            model = j.fresh_model()
            if pipeline:
                PassManager(pipeline).run(model)
            path = export_model(model, Path(tmp) / f"{label}.onnx", pipeline or "")
            nbits = optimized_op_histogram(path).get("com.microsoft::MatMulNBits", 0)
            size = path.stat().st_size / 2**20
            res = {"file_mb": size, "matmulnbits": nbits}
            for level_name, level in (("default (acc. 4)", None), ("acc. 0", 0)):
                runner = OrtModel(path, threads=2, matmulnbits_accuracy_level=level)
                decode = timed(runner, np.array([[42]], dtype=np.int64), args.repeats)
                prefill = timed(
                    runner, np.arange(128, dtype=np.int64)[None] + 100, max(5, args.repeats // 5)
                )
                res[level_name] = (decode, prefill)
                if pipeline is None:
                    break
            rows[label] = res
    base = rows["float32"]["default (acc. 4)"]
    cmd = f".venv/bin/python benchmarks/latency.py --repeats {args.repeats}"
    print(
        header(
            "ONNX Runtime latency: one decode step and a 128-token prefill (batch 1, 2 threads)",
            cmd,
        )
    )
    print(
        "| export | MatMulNBits level | file MB | MatMulNBits nodes | decode ms | ratio vs float | prefill-128 ms | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, res in rows.items():
        for level_name in ("default (acc. 4)", "acc. 0"):
            if level_name not in res:
                continue
            d, p = res[level_name]
            print(
                f"| {label} | {level_name if label != 'float32' else '–'} | {res['file_mb']:.0f} | "
                f"{res['matmulnbits']} | {d:.2f} | {base[0] / d:.2f}× | {p:.1f} | {base[1] / p:.2f}× |"
            )


if __name__ == "__main__":
    main()
