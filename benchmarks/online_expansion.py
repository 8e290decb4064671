"""Online rotations and post-training model expansion on SmolLM2-135M.

Three studies, each printing a markdown table:

* ``--exact``: max |Δlogit| / max |logit| against the Hugging Face module, in the torch backend
  and in ONNX Runtime (float32 exports), for R1+R2, R1+R2+R3+R4 and expansion steps 1, 3, 5.
* ``--quality``: W4A4 (int4 per-channel symmetric weights with GPTQ, int4 per-token asymmetric
  activations, lm_head in float) without rotation, with R1+R2, with all rotations, and with
  expansion at +2/+5/+10 % parameters — perplexity, parameters and volume. Resumable
  (``benchmarks/results/online_expansion_w{windows}.json``).
* ``--latency``: ONNX Runtime decode-step latency of W4A16 exports with and without the
  online rotations (batch 1, one token, no KV cache).

    .venv/bin/python benchmarks/online_expansion.py --exact [--windows 2]
    .venv/bin/python benchmarks/online_expansion.py --quality [--windows 16]
    .venv/bin/python benchmarks/online_expansion.py --latency [--repeats 50]
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

from qgraph.backends.onnx_backend import export_model
from qgraph.backends.onnx_export import op_histogram
from qgraph.backends.ort_runtime import OrtModel
from qgraph.pass_manager import PassManager
from qgraph.workflow import write_json

RESULTS = Path(__file__).parent / "results"
OFFLINE = "fuse-norms,rotate{seed=0}"
ONLINE = "fuse-norms,rotate{seed=0,online=all}"
EXACT = {
    "R1+R2 (offline)": OFFLINE,
    "R1+R2+R3+R4": ONLINE,
    "R1–R4 + expand step 1": ONLINE + ",expand{step=1}",
    "R1–R4 + expand step 3": ONLINE + ",expand{step=3}",
    "R1–R4 + expand step 5": ONLINE + ",expand{step=5}",
}
W4A4 = "quantize{w=int4:channel,a=int4:token},gptq"
QUALITY = {
    "no rotation": W4A4,
    "R1+R2": f"{OFFLINE},{W4A4}",
    "R1+R2+R3+R4": f"{ONLINE},{W4A4}",
    "all + expand +2 %": f"{ONLINE},expand{{budget=2}},{W4A4}",
    "all + expand +5 %": f"{ONLINE},expand{{budget=5}},{W4A4}",
    "all + expand +10 %": f"{ONLINE},expand{{budget=10}},{W4A4}",
    "all + expand +5 % (progressive)": f"{ONLINE},expand{{budget=5,mode=progressive,step=2}},{W4A4}",
}


def exact(windows: int) -> None:
    j = job(windows)
    hf = j.lm.model
    with torch.inference_mode():
        refs = [hf(input_ids=w[None], use_cache=False).logits for w in j.eval]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, pipeline in EXACT.items():
            model = j.fresh_model()
            PassManager(pipeline).run(model)
            errs = []
            with torch.inference_mode():
                for w, ref in zip(j.eval, refs, strict=True):
                    errs.append(float((model(w[None]) - ref).abs().max() / ref.abs().max()))
            path = export_model(model, Path(tmp) / "m.onnx", pipeline)
            runner = OrtModel(path, threads=2)
            ort_errs = []
            for w, ref in zip(j.eval, refs, strict=True):
                out = torch.from_numpy(runner(w[None].numpy()))
                ort_errs.append(float((out - ref).abs().max() / ref.abs().max()))
            n_had = sum(v for k, v in op_histogram(path).items() if k.startswith("qgraph::"))
            acc = model.accounting()
            rows.append((label, max(errs), max(ort_errs), acc["params"], n_had))
            print(label, rows[-1], file=sys.stderr)
    cmd = f".venv/bin/python benchmarks/online_expansion.py --exact --windows {windows}"
    print(header("Exactness of online rotations and expansion on SmolLM2-135M (float32)", cmd))
    print(f"Worst max |Δlogit| / max |logit| over {windows} windows × 512 tokens; reference: "
          "the Hugging Face module. Bound 1e-4.\n")  # fmt: skip
    print("| pipeline | torch | ONNX Runtime | params (M) | qgraph::Hadamard nodes in the file |")
    print("|---|---|---|---|---|")
    for label, e, o, p, n in rows:
        print(f"| {label} | {e:.2e} | {o:.2e} | {p / 1e6:.2f} | {n} |")


def quality(windows: int) -> None:
    path = RESULTS / f"online_expansion_w{windows}.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    j = None
    for label, pipeline in QUALITY.items():
        if label in done:
            continue
        j = j or job(windows)
        rep = j.run(pipeline)
        exp = next((p for p in rep["passes"] if p["name"] == "expand"), None)
        done[label] = {
            "pipeline": pipeline, "ppl": rep["ppl"], "ppl_float": rep["ppl_float"],
            "params": rep["params"], "params_float": rep["params_float"],
            "volume_bits": rep["volume_bits"], "volume_bits_float": rep["volume_bits_float"],
            "expand": exp["summary"] if exp else None, "date": time.strftime("%Y-%m-%d"),
        }  # fmt: skip
        write_json(path, done)
        print(f"{label}: {rep['ppl']:.3f}", file=sys.stderr)
    first = next(iter(done.values()))
    cmd = f".venv/bin/python benchmarks/online_expansion.py --quality --windows {windows}"
    print(header("W4A4 on SmolLM2-135M: rotations and expansion (GPTQ)", cmd))
    print(f"{windows} windows × 512 held-out tokens; float perplexity {first['ppl_float']:.3f}, "
          f"{first['params_float'] / 1e6:.1f} M parameters, "
          f"{first['volume_bits_float'] / 8 / 2**20:.0f} MB.\n")  # fmt: skip
    print(
        "| W4A4 + GPTQ | perplexity | gap to float | params (M) | added by expand | volume (MB) |"
    )
    print("|---|---|---|---|---|---|")
    for label, r in done.items():
        added = f"+{r['expand']['params_added_percent']:.2f} %" if r["expand"] else "–"
        print(
            f"| {label} | {r['ppl']:.3f} | {r['ppl'] - r['ppl_float']:+.3f} | "
            f"{r['params'] / 1e6:.2f} | {added} | {r['volume_bits'] / 8 / 2**20:.1f} |"
        )


def latency(repeats: int) -> None:
    j = job(1, 2)
    recipes = {
        "W4A16, R1+R2 (offline only)": f"{OFFLINE},quantize{{w=int4:channel}}",
        "W4A16, R1+R2+R3+R4": f"{ONLINE},quantize{{w=int4:channel}}",
        "W4A16, R1–R4 + expand step 3": f"{ONLINE},expand{{step=3}},quantize{{w=int4:channel}}",
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, pipeline in recipes.items():
            model = j.fresh_model()
            PassManager(pipeline).run(model)
            path = export_model(model, Path(tmp) / "m.onnx", pipeline)
            runner = OrtModel(path, threads=2)
            decode = timed(runner, np.array([[42]], dtype=np.int64), repeats)
            prefill = timed(
                runner, np.arange(128, dtype=np.int64)[None] + 100, max(5, repeats // 5)
            )
            rows.append((label, decode, prefill))
            print(label, decode, prefill, file=sys.stderr)
    base = rows[0]
    cmd = f".venv/bin/python benchmarks/online_expansion.py --latency --repeats {repeats}"
    print(
        header("Decode-step overhead of online rotations (ONNX Runtime, batch 1, 2 threads)", cmd)
    )
    print("| export | decode ms | vs offline only | prefill-128 ms | vs offline only |")
    print("|---|---|---|---|---|")
    for label, d, p in rows:
        print(f"| {label} | {d:.2f} | {d / base[1]:.3f}× | {p:.1f} | {p / base[2]:.3f}× |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--exact", action="store_true")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--windows", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    if args.exact:
        exact(args.windows or 2)
    if args.quality:
        quality(args.windows or 16)
    if args.latency:
        latency(args.repeats)


if __name__ == "__main__":
    main()
