"""Dense-and-sparse split (PQI / ReQuant) on SmolLM2-135M.

* ``--pqi``: predicted vs actual loss change from quantizing every linear layer (RTN W3 and
  W4 per-channel): first-order Taylor, second-order (diagonal Fisher), PQI with N = 4, 8, 16, 32.
* ``--quality``: perplexity vs bits per weight for W3A16 / W4A16 (per-channel and group 128):
  base quantizer, + outliers only, + significant weights only, + both, at about +0.25 bits per
  weight (0.5 % of weights at 48 bits each). Resumable
  (``benchmarks/results/sparse_split_w{windows}.json``); also time and peak RSS of the pass.
* ``--export``: ONNX Runtime perplexity, file size and decode latency of a W4A16 export with
  and without the sparse branch.

    .venv/bin/python benchmarks/sparse_split.py --pqi [--windows 4]
    .venv/bin/python benchmarks/sparse_split.py --quality [--windows 16]
    .venv/bin/python benchmarks/sparse_split.py --export [--windows 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import header, job
from latency import timed

from qgraph.backends.ort_runtime import OrtModel
from qgraph.kernels import pqi as pqi_kernels
from qgraph.kernels.sparse_split import split_weight
from qgraph.pass_manager import PassManager
from qgraph.passes.split_sparse import SplitSparse, loss_setup
from qgraph.workflow import write_json

RESULTS = Path(__file__).parent / "results"
FORMATS = {
    "W3A16": "int3:channel",
    "W4A16": "int4:channel",
    "W3A16-g128": "int3:group128",
    "W4A16-g128": "int4:group128",
}
VARIANTS = {
    "base": "",
    "+ outliers": ",split-sparse{outliers=0.5}",
    "+ significant": ",split-sparse{outliers=0,significant=0.5}",
    "+ both": ",split-sparse{outliers=0.25,significant=0.25}",
    # the split on top of GPTQ: gptq re-solves the dense part around the sparse weights
    "GPTQ": ",gptq",
    "+ both, then GPTQ": ",split-sparse{outliers=0.25,significant=0.25},gptq",
}


def pqi_table(windows: int) -> None:
    j = job(1)
    rows = []
    for label, spec in (
        ("W3 per-channel RTN", "int3:channel"),
        ("W4 per-channel RTN", "int4:channel"),
    ):
        model = j.fresh_model()
        PassManager(f"quantize{{w={spec}}}").run(model)
        layers = SplitSparse()._layers(model)
        loss_fn, params, batches = loss_setup(model, layers, windows, 512)

        deltas = {}
        for x in layers:
            x.split = split_weight(x.w, torch.zeros_like(x.w, dtype=torch.bool), x.qspec)
            deltas[x.name] = (x.split.weight - x.w).detach()
        estimates = [("first-order Taylor", 0), ("second-order Taylor (diag. Fisher)", 0)]
        estimates += [(f"PQI N={n}", n) for n in (4, 8, 16, 32)]
        for name, n in estimates:
            t = time.perf_counter()
            if n:
                res = pqi_kernels.pqi(loss_fn, params, deltas, batches, n)
            elif name.startswith("first"):
                res = pqi_kernels.taylor_first(loss_fn, params, deltas, batches)
            else:
                res = pqi_kernels.taylor_second(loss_fn, params, deltas, batches)
            rows.append((label, name, res.total, res.actual, time.perf_counter() - t))
            print(rows[-1], file=sys.stderr)
    cmd = f".venv/bin/python benchmarks/sparse_split.py --pqi --windows {windows}"
    print(header("Predicted vs actual loss change of quantizing SmolLM2-135M", cmd))
    print(f"Loss: mean next-token cross-entropy on {windows} calibration windows × 512 tokens; "
          "every linear layer except lm_head quantized at once.\n")  # fmt: skip
    print("| quantization | estimate | predicted ΔF | actual ΔF | relative error | seconds |")
    print("|---|---|---|---|---|---|")
    for label, name, pred, actual, secs in rows:
        print(f"| {label} | {name} | {pred:.4f} | {actual:.4f} | "
              f"{abs(pred - actual) / abs(actual) * 100:.1f} % | {secs:.0f} |")  # fmt: skip


def quality(windows: int, formats: list[str]) -> None:
    path = RESULTS / f"sparse_split_w{windows}.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    j = None
    for fmt, spec in FORMATS.items():
        for variant, suffix in VARIANTS.items():
            key = f"{fmt}|{variant}"
            if key in done or fmt not in formats:
                continue
            j = j or job(windows)
            pipeline = f"quantize{{w={spec}}}{suffix}"
            rep = j.run(pipeline)
            sp = next((p for p in rep["passes"] if p["name"] == "split-sparse"), None)
            quant_bits = rep["volume_bits"]
            done[key] = {
                "pipeline": pipeline, "ppl": rep["ppl"], "ppl_float": rep["ppl_float"],
                "volume_bits": quant_bits, "params": rep["params"],
                "seconds": sp["seconds"] if sp else None,
                "peak_rss_mb": sp["peak_rss_mb"] if sp else None,
                "sparse_percent": sp["summary"]["sparse_fraction_percent"] if sp else 0.0,
                "date": time.strftime("%Y-%m-%d"),
            }  # fmt: skip
            write_json(path, done)
            print(key, rep["ppl"], file=sys.stderr)
    cmd = f".venv/bin/python benchmarks/sparse_split.py --quality --windows {windows}"
    fp = next(iter(done.values()))["ppl_float"]
    print(header("Perplexity vs bits per weight: dense-and-sparse split on SmolLM2-135M", cmd))
    print(f"{windows} windows × 512 held-out tokens; float perplexity {fp:.3f}. Bits per weight "
          "= model volume / parameters (embedding and lm_head in float32 included), so the "
          "split's extra cost shows as the difference to `base`.\n")  # fmt: skip
    print(
        "| format | variant | sparse % | perplexity | bits/weight (model) | Δ bits vs base | split s | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for fmt in FORMATS:
        base = done.get(f"{fmt}|base")
        for variant in VARIANTS:
            r = done.get(f"{fmt}|{variant}")
            if not r:
                continue
            bpw = r["volume_bits"] / r["params"]
            dbits = (r["volume_bits"] - base["volume_bits"]) / base["params"] if base else 0.0
            secs = f"{r['seconds']:.0f}" if r["seconds"] else "–"
            rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] else "–"
            print(f"| {fmt} | {variant} | {r['sparse_percent']:.2f} | {r['ppl']:.3f} | "
                  f"{bpw:.3f} | {dbits:+.3f} | {secs} | {rss} |")  # fmt: skip


def export(windows: int, repeats: int) -> None:
    j = job(windows)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, pipeline in (
            ("W4A16 (dense only)", "quantize{w=int4:channel},gptq"),
            ("W4A16 + split-sparse 0.5 %", "quantize{w=int4:channel},split-sparse{outliers=0.25,significant=0.25},gptq"),
        ):  # fmt: skip
            rep = j.run(pipeline, export=Path(tmp) / "m.onnx")
            ex = rep["export"]
            runner = OrtModel(ex["path"], threads=2)
            decode = timed(runner, np.array([[42]], dtype=np.int64), repeats)
            rows.append((label, rep["ppl"], ex["ort_ppl"], ex["file_mb"], decode))
            print(rows[-1], file=sys.stderr)
    cmd = f".venv/bin/python benchmarks/sparse_split.py --export --windows {windows}"
    print(header("Sparse branch in ONNX Runtime (SmolLM2-135M, W4A16 + GPTQ)", cmd))
    print(
        "| export | torch ppl | ORT ppl | ORT vs torch | file MB | decode ms (batch 1, no KV cache) |"
    )
    print("|---|---|---|---|---|---|")
    for label, tp, op, mb, d in rows:
        print(
            f"| {label} | {tp:.3f} | {op:.3f} | {100 * (op / tp - 1):+.2f} % | {mb:.1f} | {d:.2f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pqi", action="store_true")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--export", action="store_true")
    ap.add_argument("--windows", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--formats", type=str, default=",".join(FORMATS), help="subset to run now")
    args = ap.parse_args()
    if args.pqi:
        pqi_table(args.windows or 4)
    if args.quality:
        quality(args.windows or 16, args.formats.split(","))
    if args.export:
        export(args.windows or 4, args.repeats)


if __name__ == "__main__":
    main()
