"""Decode speed of exported decoder folders in ONNX Runtime GenAI (SmolLM2-135M, batch 1).

Every row is one recipe exported with ``qgraph run --export DIR/model.onnx`` (a decoder with a
KV cache, ``genai_config.json`` and the tokenizer), then run by ``onnxruntime_genai``: a
128-token prompt from the held-out text and 128 new tokens, greedy. The anchor row is ONNX
Runtime GenAI's own model builder on the same model (``-p int4``, RTN, block 32, ``lm_head``
int4 too). Perplexity is each file's own, in ONNX Runtime, on the held-out windows.

Two phases, so that building can share the machine and timing need not:

1. **build**: each row's folder is written once (under ``--out``) and its quality appended to
   ``results/decode_w{windows}.json``; a folder that exists is reused.
2. **time**: every requested row is generated ``--repeats`` times, the rows interleaved, in one
   run, and the median speed is recorded. Ratios are only taken between rows of that run.

    .venv/bin/python benchmarks/decode.py [--windows 8] [--rows KEY,...] [--repeats 3]
        [--build-only] [--reexport] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import header

import qgraph
from qgraph.backends.onnx_backend import optimized_op_histogram, ort_forward
from qgraph.evaluate import perplexity
from qgraph.loaders import load_causal_lm
from qgraph.workflow import Job, export_and_check, write_json

PROMPT, NEW = 128, 128
W4 = "quantize{w=int4:channel}"
W4_HEAD = "quantize{w=int4:channel,exclude=}"  # lm_head quantized too, as the builder does
W4A4 = "quantize{w=int4:channel,a=int4:token},gptq"
ONLINE = "fuse-norms,rotate{seed=0,online=all},"
ROWS = {
    "float": ("float32", "fuse-norms"),
    "w4a16-gptq": ("W4A16 GPTQ, lm_head float", W4 + ",gptq"),
    "w4a16-gptq-head": ("W4A16 GPTQ, lm_head int4", W4_HEAD + ",gptq"),
    "w4a16-rot-gptq": (
        "W4A16 R1+R2 + GPTQ, lm_head float",
        "fuse-norms,rotate{seed=0}," + W4 + ",gptq",
    ),
    "w4a16-rot-gptq-head": (
        "W4A16 R1+R2 + GPTQ, lm_head int4",
        "fuse-norms,rotate{seed=0}," + W4_HEAD + ",gptq",
    ),
    "w4a16-r1r4-gptq-head": ("W4A16 R1–R4 + GPTQ, lm_head int4", ONLINE + W4_HEAD + ",gptq"),
    "w4a16-r4-gptq-head": (
        "W4A16 R1+R2 + online R4 + GPTQ, lm_head int4 (the best W4A16 recipe)",
        "fuse-norms,rotate{seed=0,online=r4}," + W4_HEAD + ",gptq",
    ),
    "w4a4-gptq": ("W4A4 R1–R4 + GPTQ", ONLINE + W4A4),
    "w4a4-expand-gptq": ("W4A4 R1–R4 + expand +5 % + GPTQ", ONLINE + "expand{budget=5}," + W4A4),
    "w8a8": ("W8A8 R1+R2", "fuse-norms,rotate{seed=0},quantize{w=int8:channel,a=int8:token}"),
    "float-std": ("float32, standard ops", "fuse-norms"),
    "w4a16-rot-gptq-head-std": (
        "W4A16 R1+R2 + GPTQ, lm_head int4, standard ops",
        "fuse-norms,rotate{seed=0}," + W4_HEAD + ",gptq",
    ),
    "w4a16-rot-gptq-head-attn": (
        "W4A16 R1+R2 + GPTQ, lm_head int4, opset-23 Attention",
        "fuse-norms,rotate{seed=0}," + W4_HEAD + ",gptq",
    ),
    "w4a16-r1r4-gptq-head-attn": (
        "W4A16 R1–R4 + GPTQ, lm_head int4, opset-23 Attention",
        ONLINE + W4_HEAD + ",gptq",
    ),
    "builder-fp32": ("ONNX Runtime GenAI builder fp32 (GroupQueryAttention)", "fp32"),
    "builder-int4": ("ONNX Runtime GenAI builder int4 (anchor)", "int4"),
}


def speed(folder: Path, prompt: list[int]) -> tuple[float, float]:
    out = qgraph.generate(folder, prompt, NEW, backend="ort", stop_at_eos=False)
    assert len(out.tokens) == NEW, (folder, len(out.tokens))
    return out.tokens_per_s, out.prompt_seconds


def builder_row(folder: Path, windows, precision: str) -> dict:
    """The model builder on SmolLM2's Hugging Face folder, then the same measurements."""
    source = load_causal_lm(None).source
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
    cmd += ["-i", str(source), "-o", str(folder), "-p", precision, "-e", "cpu"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return {
        "pipeline": " ".join(cmd[1:]),
        "export_seconds": time.perf_counter() - t,
        "ort_ppl": perplexity(ort_forward(folder / "model.onnx", exact_matmul=False), windows),
        "ort_nodes": sum(optimized_op_histogram(folder / "model.onnx").values()),
    }


def build(
    keys: list[str], out: Path, job: Job, done: dict, path: Path, reexport: bool = False
) -> None:
    """Write each row's folder and record its quality (rows already recorded are kept).

    Each qgraph row's rewritten model is saved beside its folder (``{key}.pt2``); with
    ``reexport`` every requested row that has one is exported again from it (for changes to the
    export alone: the rewrite, and its torch perplexity, stay as recorded)."""
    for key in keys:
        folder = out / key
        saved = out / f"{key}.pt2"
        again = reexport and key in done and saved.exists()
        if key in done and (folder / "genai_config.json").exists() and not again:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        fused = not key.endswith("-std")  # -std: standard ops instead of fused ones
        attention = "standard" if key.endswith("-attn") else "gqa"
        if key.startswith("builder-"):
            row = builder_row(folder, job.eval, ROWS[key][1])
        elif again:
            model = qgraph.load(saved)
            exported = export_and_check(
                model, folder / "model.onnx", ROWS[key][1], job.eval, False,
                fused_ops=fused, attention=attention,
            )  # fmt: skip
            row = dict(done[key])
            row.update(
                ort_ppl=exported["ort_ppl"],
                file_mb=exported["file_mb"],
                ort_nodes=exported["ort_optimized_nodes"],
            )
        else:
            rep = job.run(
                ROWS[key][1], export=folder / "model.onnx", fused_ops=fused, attention=attention,
                save=saved,
            )  # fmt: skip
            row = {
                "pipeline": ROWS[key][1],
                "ppl_torch": rep["ppl"],
                "ort_ppl": rep["export"]["ort_ppl"],
                "ppl_float": rep["ppl_float"],
                "file_mb": rep["export"]["file_mb"],
                "ort_nodes": rep["export"]["ort_optimized_nodes"],
            }
        row.update(build_seconds=round(time.perf_counter() - t, 1), date=time.strftime("%Y-%m-%d"))
        done[key] = row
        write_json(path, done)
        print(f"{key}: built, ort ppl {row['ort_ppl']:.3f}", file=sys.stderr)


def time_rows(keys: list[str], out: Path, prompt: list[int], repeats: int) -> dict:
    """Median decode tokens/s and prompt seconds of each row, the rows interleaved."""
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    for _ in range(repeats):
        for key in keys:
            runs[key].append(speed(out / key, prompt))
    return {
        k: {
            "tokens_per_s": statistics.median(r[0] for r in v),
            "tokens_per_s_runs": [round(r[0], 2) for r in v],
            "prompt_seconds": statistics.median(r[1] for r in v),
        }
        for k, v in runs.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--rows", type=str, default=",".join(ROWS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument(
        "--reexport", action="store_true", help="export rows again from their saved models"
    )
    ap.add_argument("--out", type=Path, default=Path("out/decode"))
    args = ap.parse_args()
    keys = args.rows.split(",")
    if unknown := [k for k in keys if k not in ROWS]:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    path = Path(__file__).parent / "results" / f"decode_w{args.windows}.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    job = Job(None, eval_windows=args.windows, progress=False)
    build(keys, args.out, job, done, path, args.reexport)
    if args.build_only:
        return
    prompt = job.eval[-1, :PROMPT].tolist()  # held-out text
    timed = time_rows(keys, args.out, prompt, args.repeats)
    stamp = {"timed_together": keys, "timed_on": time.strftime("%Y-%m-%d %H:%M")}
    for key, t in timed.items():
        done[key].update(t, **stamp)
    write_json(path, done)
    base = timed.get("float", {}).get("tokens_per_s")
    print(header("Decode speed in ONNX Runtime GenAI (SmolLM2-135M, batch 1)", " ".join(sys.argv)))
    print(f"{PROMPT}-token prompt + {NEW} new tokens, greedy, median of {args.repeats}.\n")
    print("| recipe | ONNX Runtime ppl | file MB | nodes | prompt s | decode tokens/s | × float |")
    print("|---|---|---|---|---|---|---|")
    for key in keys:
        r, label = done[key], ROWS[key][0]
        ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "–"
        mb = f"{r['file_mb']:.0f}" if "file_mb" in r else "–"
        print(
            f"| {label} | {r['ort_ppl']:.3f} | {mb} | {r.get('ort_nodes', '–')} | "
            f"{r['prompt_seconds']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {ratio} |"
        )


if __name__ == "__main__":
    main()
