"""RTN vs GPTQ vs learned rounding on SmolLM2-135M, with and without rotation.

Each row is an independent run from the float model on the foundation table's held-out
windows. Rows are appended to a JSON file as they finish, so an interrupted study resumes
where it stopped (``--fresh`` starts over). ``--scaling`` instead times ``gptq`` against the
number of calibration windows, one subprocess per point so that peak RSS is not inherited.

    .venv/bin/python benchmarks/weight_solvers.py [--windows 16]
    .venv/bin/python benchmarks/weight_solvers.py --scaling 4,8,16,32,64
    .venv/bin/python benchmarks/weight_solvers.py --mixed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import header, job

from qgraph.workflow import write_json

FORMATS = {
    "W4A16": "quantize{w=int4:channel}",
    "W4A4": "quantize{w=int4:channel,a=int4:token}",
    "W4A16-g128": "quantize{w=int4:group128}",
    "W3A16": "quantize{w=int3:channel}",
}
SOLVERS = {"RTN": "", "GPTQ": ",gptq", "learned rounding": ",learn-rounding"}
ROTATE = "fuse-norms,rotate{seed=0},"
RESULTS = Path(__file__).parent / "results"


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _solver_pass(rep: dict) -> dict | None:
    return next((p for p in rep["passes"] if p["name"] in ("gptq", "learn-rounding")), None)


def study(windows: int, fresh: bool, solvers: list[str]) -> None:
    path = RESULTS / f"weight_solvers_w{windows}.json"
    done = {} if fresh else _load(path)
    j = None
    # learned rounding is the slowest solver (~15 min per run on 2 cores): its rows run last
    order = [
        (label, quant, rotated, solver, suffix)
        for solver, suffix in SOLVERS.items()
        if solver in solvers
        for label, quant in FORMATS.items()
        for rotated in (False, True)
    ]
    for label, quant, rotated, solver, suffix in order:
        key = f"{label}|{'rot' if rotated else 'norot'}|{solver}"
        if key in done:
            continue
        j = j or job(windows)
        pipeline = (ROTATE if rotated else "") + quant + suffix
        rep = j.run(pipeline)
        done[key] = {
            "pipeline": pipeline,
            "ppl": rep["ppl"],
            "ppl_float": rep["ppl_float"],
            "solver_pass": _solver_pass(rep),
            "date": time.strftime("%Y-%m-%d"),
        }
        write_json(path, done)
        print(f"{key}: {rep['ppl']:.3f}", file=sys.stderr)
    cmd = f".venv/bin/python benchmarks/weight_solvers.py --windows {windows}"
    print(header("Weight solvers: RTN vs GPTQ vs learned rounding on SmolLM2-135M", cmd))
    fp = next(iter(done.values()))["ppl_float"]
    print(f"{windows} windows × 512 held-out tokens; float perplexity {fp:.3f}.\n")
    print("| format | rotation | RTN | GPTQ | learned rounding | GPTQ s | learn-rounding s |")
    print("|---|---|---|---|---|---|---|")
    for label in FORMATS:
        for rot in ("norot", "rot"):
            r = {s: done.get(f"{label}|{rot}|{s}") for s in SOLVERS}
            cells = [f"{r[s]['ppl']:.2f}" if r[s] else "–" for s in SOLVERS]
            secs = [
                f"{r[s]['solver_pass']['seconds']:.0f}" if r[s] and r[s]["solver_pass"] else "–"
                for s in ("GPTQ", "learned rounding")
            ]
            yes = "yes" if rot == "rot" else "no"
            print(f"| {label} | {yes} | " + " | ".join(cells + secs) + " |")


def scaling_point(windows: int, calib: int) -> dict:
    j = job(windows, calib_windows=calib)
    rep = j.run(f"{ROTATE}quantize{{w=int4:channel}},gptq{{calib-windows={calib}}}")
    sp = _solver_pass(rep)
    return {"calib_windows": calib, "ppl": rep["ppl"], "seconds": sp["seconds"],
            "peak_rss_mb": sp["peak_rss_mb"], "tokens": sp["summary"].get("calibration_tokens")}  # fmt: skip


def scaling(windows: int, points: list[int]) -> None:
    rows = []
    for calib in points:
        out = subprocess.run(
            [sys.executable, __file__, "--windows", str(windows), "--point", str(calib)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr)
    write_json(RESULTS / "gptq_scaling.json", {"rows": rows})
    cmd = f".venv/bin/python benchmarks/weight_solvers.py --scaling {','.join(map(str, points))}"
    print(header("GPTQ time and memory vs calibration size (SmolLM2-135M, rotated W4A16)", cmd))
    base = rows[0]
    print("| calibration windows × 512 | tokens | gptq s | × smallest | peak RSS MB | perplexity |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['calib_windows']} | {r['tokens']} | {r['seconds']:.1f} | "
            f"{r['seconds'] / base['seconds']:.2f}× | {r['peak_rss_mb']:.0f} | {r['ppl']:.3f} |"
        )


MIXED = (
    "quantize{w=int4:channel}",
    "mixed-precision{budget=4.5,choices=3+4+8}",
    ROTATE + "quantize{w=int4:channel},gptq",
    ROTATE + "mixed-precision{budget=4.5,choices=3+4+8},gptq",
    # widths >= 4 only: GPTQ recovers less at 3 bits than the RTN noise model predicts
    ROTATE + "mixed-precision{budget=4.5,choices=4+5+6+8},gptq",
    # the widths ONNX Runtime runs natively (MatMulNBits int4, int8)
    ROTATE + "mixed-precision{budget=4.5,choices=4+8},gptq",
)


def mixed(windows: int) -> None:
    """Mixed precision vs uniform int4; resumable (results/mixed_w{windows}.json)."""
    path = RESULTS / f"mixed_w{windows}.json"
    done = _load(path)
    j = None
    for pipeline in MIXED:
        if pipeline in done:
            continue
        j = j or job(windows)
        rep = j.run(pipeline)
        mp = next((p for p in rep["passes"] if p["name"] == "mixed-precision"), None)
        done[pipeline] = {
            "ppl": rep["ppl"],
            "mixed": {k: mp[k] for k in ("seconds", "peak_rss_mb", "summary")} if mp else None,
            "date": time.strftime("%Y-%m-%d"),
        }
        write_json(path, done)
        print(pipeline, rep["ppl"], file=sys.stderr)
    cmd = f".venv/bin/python benchmarks/weight_solvers.py --mixed --windows {windows}"
    print(header("Mixed precision at 4.5 bits vs uniform int4 (SmolLM2-135M)", cmd))
    print("| pipeline | average code bits | perplexity | mixed-precision s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for pipeline in MIXED:
        r = done.get(pipeline)
        if not r:
            continue
        mp = r["mixed"]
        bits = f"{mp['summary']['average_bits']:.3f}" if mp else "4.0"
        secs = f"{mp['seconds']:.0f}" if mp else "–"
        rss = f"{mp['peak_rss_mb']:.0f}" if mp else "–"
        print(f"| `{pipeline}` | {bits} | {r['ppl']:.3f} | {secs} | {rss} |")
    for pipeline in MIXED:
        mp = (done.get(pipeline) or {}).get("mixed")
        if mp:
            top = [(n, round(s, 4), b) for n, s, b in mp["summary"]["most_sensitive"]]
            print(
                f"\n`{pipeline}` allocation (layers per width): "
                f"{mp['summary']['layers_per_width']}; most sensitive: {top}"
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--scaling", type=str, default="")
    ap.add_argument("--point", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--mixed", action="store_true")
    ap.add_argument("--solvers", type=str, default=",".join(SOLVERS), help="subset to run now")
    args = ap.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.point:
        print(json.dumps(scaling_point(args.windows, args.point)))
    elif args.scaling:
        scaling(args.windows, [int(p) for p in args.scaling.split(",")])
    elif args.mixed:
        mixed(args.windows)
    else:
        study(args.windows, args.fresh, args.solvers.split(","))


if __name__ == "__main__":
    main()
