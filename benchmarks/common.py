"""Shared set-up of the benchmarks: the real SmolLM2, fixed windows, a machine description."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from qgraph.workflow import Job, write_json


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
            cpu,
        )
    except OSError:
        name = cpu
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def interleaved_tree_runs(trees_arg: str, repeats: int, one_run) -> dict[str, list[dict]]:
    """``{tree: [one_run(tree root, repeat index), ...]}`` for ``trees_arg`` ``"new=.,old=/tmp/old"``,
    the trees interleaved within each repeat so that they share the machine's state."""
    trees = dict(item.split("=", 1) for item in trees_arg.split(","))
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for i in range(repeats):
        for name, tree in trees.items():
            runs[name].append(one_run(Path(tree).resolve(), i))
    return runs


def header(title: str, command: str) -> str:
    today = datetime.date.today().isoformat()
    return f"## {title}\n\n`{command}` — {machine()} — {today}\n"


def job(eval_windows: int = 16, calib_windows: int = 16, model: str | None = None) -> Job:
    """SmolLM2 (or ``model``: a name, folder or a ``.pt2`` saved by ``qgraph run --save``)."""
    return Job(model, eval_windows=eval_windows, calib_windows=calib_windows, progress=False)


def run_rows(
    rows: dict[str, tuple[str, str]],
    keys: list[str],
    path: Path,
    windows: int,
    model: str | None = None,
    **run_kw,
) -> dict:
    """Run each row ``key -> (label, pipeline)`` not yet in the JSON file ``path`` and append its
    result as soon as it finishes, so an interrupted study resumes where it stopped."""
    done = json.loads(path.read_text()) if path.exists() else {}
    j = None
    for key in keys:
        if key in done:
            continue
        j = j or job(windows, model=model)
        pipeline = rows[key][1]
        t = time.perf_counter()
        rep = j.run(pipeline, **run_kw)
        done[key] = {
            "pipeline": pipeline,
            "ppl": rep["ppl"],
            "ppl_float": rep["ppl_float"],
            "baseline": rep["baseline"],
            "seconds": round(time.perf_counter() - t, 1),
            "date": time.strftime("%Y-%m-%d"),
            "passes": {p["name"]: p["summary"] for p in rep["passes"]},
        }
        write_json(path, done)
        print(f"{key}: {rep['ppl']:.3f}", file=sys.stderr)
    return done


def rows_table(rows: dict[str, tuple[str, str]], done: dict, windows: int) -> str:
    """The markdown table of the finished rows, as ratios to float measured in the same run."""
    first = next(iter(done.values()), {})
    fp = first.get("ppl_float", float("nan"))
    base = "float" if first.get("baseline", "float32") == "float32" else "start"
    lines = [
        f"{windows} windows × 512 held-out tokens; {base} perplexity {fp:.3f}.\n",
        f"| recipe | pipeline | perplexity | × {base} | run s |",
        "|---|---|---|---|---|",
    ]
    for key, (label, pipeline) in rows.items():
        r = done.get(key)
        if r:
            lines.append(
                f"| {label} | `{pipeline}` | {r['ppl']:.3f} | {r['ppl'] / r['ppl_float']:.3f} | "
                f"{r['seconds']:.0f} |"
            )
    return "\n".join(lines)


def study_main(rows: dict[str, tuple[str, str]], stem: str, title: str, script: str) -> None:
    """The command line of a row study: ``[--windows N] [--rows KEY,...]``; runs the missing
    rows into ``results/{stem}_w{N}.json`` and prints the table with its command line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--rows", type=str, default=",".join(rows), help="row keys to run now")
    ap.add_argument("--model", default=None, help="start from this model (default SmolLM2)")
    args = ap.parse_args()
    path = Path(script).parent / "results" / f"{stem}_w{args.windows}.json"
    done = run_rows(rows, args.rows.split(","), path, args.windows, model=args.model)
    cmd = f".venv/bin/python benchmarks/{Path(script).name} --windows {args.windows}"
    if args.model:
        cmd += f" --model {args.model}"
    print(header(title, cmd))
    print(rows_table(rows, done, args.windows))
