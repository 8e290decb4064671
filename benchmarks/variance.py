"""Seed variance of the headline recipes on SmolLM2-135M: mean and spread over 3 seeds.

A seed sets both sources of chance in a recipe: the calibration sample (16 windows of 512
tokens drawn from the whole calibration text, ``qgraph run --calib-seed``) and the rotation's
random signs (``rotate``'s seed, ``qgraph run --seed``). The evaluation windows are the same
held-out windows for every run. Each (recipe, seed) is appended to
``results/variance_w{windows}.json`` as it finishes, so an interrupted study resumes.

    .venv/bin/python benchmarks/variance.py [--windows 8] [--seeds 0,1,2] [--rows KEY,...]

Equivalent command line of one run: ``qgraph run --pipeline P --seed S --calib-seed S``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import header

from qgraph.workflow import Job, write_json

W4 = "quantize{w=int4:channel}"
W4A4 = "quantize{w=int4:channel,a=int4:token}"
#: key -> (recipe label, pipeline); rotate takes its seed from the run
ROWS = {
    "w4a16-gptq": ("W4A16 GPTQ, no rotation", W4 + ",gptq"),
    "w4a16-rot-gptq": ("W4A16 rotation + GPTQ", "fuse-norms,rotate," + W4 + ",gptq"),
    "w4a16-rot-r4-gptq": (
        "W4A16 rotation + online R4 + GPTQ",
        "fuse-norms,rotate{online=r4}," + W4 + ",gptq",
    ),
    "w4a4-rot-gptq": (
        "W4A4 rotation (online R2+R4) + GPTQ",
        "fuse-norms,rotate{online=r2+r4}," + W4A4 + ",gptq",
    ),
}


def run(keys: list[str], seeds: list[int], path: Path, windows: int) -> dict:
    done = json.loads(path.read_text()) if path.exists() else {}
    for seed in seeds:
        todo = [k for k in keys if f"{k}@{seed}" not in done]
        if not todo:
            continue
        job = Job(None, eval_windows=windows, calib_windows=16, progress=False, calib_seed=seed)
        for key in todo:
            t = time.perf_counter()
            rep = job.run(ROWS[key][1], seed=seed)
            done[f"{key}@{seed}"] = {
                "pipeline": ROWS[key][1],
                "seed": seed,
                "ppl": rep["ppl"],
                "ppl_float": rep["ppl_float"],
                "seconds": round(time.perf_counter() - t, 1),
                "date": time.strftime("%Y-%m-%d"),
            }
            write_json(path, done)
            print(f"{key} seed {seed}: {rep['ppl']:.3f}", file=sys.stderr)
    return done


def table(done: dict, windows: int) -> str:
    fp = next(iter(done.values()))["ppl_float"] if done else float("nan")
    lines = [
        f"{windows} windows × 512 held-out tokens; float perplexity {fp:.3f}.\n",
        "| recipe | pipeline | seeds | perplexities | mean | spread (max − min) | mean × float |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, (label, pipeline) in ROWS.items():
        runs = sorted(
            (r for k, r in done.items() if k.split("@")[0] == key), key=lambda r: r["seed"]
        )
        if not runs:
            continue
        ppl = [r["ppl"] for r in runs]
        mean = statistics.fmean(ppl)
        lines.append(
            f"| {label} | `{pipeline}` | {','.join(str(r['seed']) for r in runs)} | "
            f"{', '.join(f'{p:.3f}' for p in ppl)} | {mean:.3f} | {max(ppl) - min(ppl):.3f} | "
            f"{mean / fp:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seeds", type=str, default="0,1,2")
    ap.add_argument("--rows", type=str, default=",".join(ROWS))
    ap.add_argument("--tag", default="", help="results file suffix: a fresh study beside old ones")
    args = ap.parse_args()
    path = Path(__file__).parent / "results" / f"variance_w{args.windows}{args.tag}.json"
    seeds = [int(s) for s in args.seeds.split(",")]
    done = run(args.rows.split(","), seeds, path, args.windows)
    cmd = " ".join([".venv/bin/python", *sys.argv])
    print(header("Seed variance of the headline recipes (SmolLM2-135M)", cmd))
    print(table(done, args.windows))


if __name__ == "__main__":
    main()
