"""Decode speed of exported decoder folders in ONNX Runtime GenAI (SmolLM2-135M, batch 1).

Every row is one recipe exported with ``qgraph run --export DIR/model.onnx`` (a decoder with a
KV cache, ``genai_config.json`` and the tokenizer), then run by ``onnxruntime_genai``: a
128-token prompt from the held-out text and 128 new tokens, greedy. The anchor row is ONNX
Runtime GenAI's own model builder on the same model (``-p int4``, RTN, block 32, ``lm_head``
int4 too). Perplexity is each file's own, in ONNX Runtime, on the held-out windows. Rows are
appended to ``results/decode_w{windows}.json`` as they finish.

    .venv/bin/python benchmarks/decode.py [--windows 8] [--rows KEY,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import header

import qgraph
from qgraph.backends.onnx_backend import ort_forward
from qgraph.evaluate import perplexity
from qgraph.loaders import load_causal_lm
from qgraph.workflow import Job, write_json

PROMPT, NEW = 128, 128
W4 = "quantize{w=int4:channel}"
ROWS = {
    "float": ("float32", "fuse-norms"),
    "w4a16-gptq": ("W4A16 GPTQ", W4 + ",gptq"),
    "w4a16-rot-gptq": ("W4A16 R1+R2 + GPTQ", "fuse-norms,rotate{seed=0}," + W4 + ",gptq"),
    "w4a16-r1r4-gptq": (
        "W4A16 R1–R4 + GPTQ",
        "fuse-norms,rotate{seed=0,online=all}," + W4 + ",gptq",
    ),
    "w4a4-gptq": (
        "W4A4 R1–R4 + GPTQ",
        "fuse-norms,rotate{seed=0,online=r2+r4},quantize{w=int4:channel,a=int4:token},gptq",
    ),
    "w8a8": (
        "W8A8 R1+R2",
        "fuse-norms,rotate{seed=0},quantize{w=int8:channel,a=int8:token}",
    ),
    "builder-fp32": ("ONNX Runtime GenAI builder fp32 (GroupQueryAttention)", "fp32"),
    "builder-int4": ("ONNX Runtime GenAI builder int4 (anchor)", "int4"),
}


def speed(folder: Path, prompt: list[int]) -> dict:
    out = qgraph.generate(folder, prompt, NEW, backend="ort", stop_at_eos=False)
    return {
        "tokens": len(out.tokens),
        "prompt_seconds": out.prompt_seconds,
        "tokens_per_s": out.tokens_per_s,
    }


def builder_row(folder: Path, windows, precision: str) -> dict:
    """The model builder on SmolLM2's Hugging Face folder, then the same measurements."""
    source = load_causal_lm(None).source
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
    cmd += ["-i", str(source), "-o", str(folder), "-p", precision, "-e", "cpu"]
    t = time.perf_counter()
    if not (folder / "genai_config.json").exists():  # a folder built before is reused
        subprocess.run(cmd, check=True, capture_output=True)
    return {
        "pipeline": " ".join(cmd[1:]),
        "export_seconds": time.perf_counter() - t,
        "ort_ppl": perplexity(ort_forward(folder / "model.onnx", exact_matmul=False), windows),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--rows", type=str, default=",".join(ROWS))
    ap.add_argument("--out", type=Path, default=Path("out/decode"))
    args = ap.parse_args()
    path = Path(__file__).parent / "results" / f"decode_w{args.windows}.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    job = Job(None, eval_windows=args.windows, progress=False)
    prompt = job.eval[-1, :PROMPT].tolist()  # held-out text
    windows = job.eval  # the same perplexity windows as the qgraph rows
    for key in args.rows.split(","):
        if key in done:
            continue
        folder = args.out / key
        folder.mkdir(parents=True, exist_ok=True)
        if key.startswith("builder-"):
            row = builder_row(folder, windows, ROWS[key][1])
        else:
            rep = job.run(ROWS[key][1], export=folder / "model.onnx")
            row = {
                "pipeline": ROWS[key][1],
                "ppl_torch": rep["ppl"],
                "ort_ppl": rep["export"]["ort_ppl"],
                "ppl_float": rep["ppl_float"],
                "file_mb": rep["export"]["file_mb"],
            }
        row.update(speed(folder, prompt), date=time.strftime("%Y-%m-%d"))
        done[key] = row
        write_json(path, done)
        print(f"{key}: {row['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    base = done.get("float", {}).get("tokens_per_s")
    print(header("Decode speed in ONNX Runtime GenAI (SmolLM2-135M, batch 1)", " ".join(sys.argv)))
    print(f"{PROMPT}-token prompt + {NEW} new tokens, greedy.\n")
    print("| recipe | ONNX Runtime ppl | prompt s | decode tokens/s | × float |")
    print("|---|---|---|---|---|")
    for key, (label, _) in ROWS.items():
        r = done.get(key)
        if r:
            ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "–"
            print(
                f"| {label} | {r['ort_ppl']:.3f} | {r['prompt_seconds']:.2f} | "
                f"{r['tokens_per_s']:.1f} | {ratio} |"
            )


if __name__ == "__main__":
    main()
