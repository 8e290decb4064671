"""Wall time and peak memory of the default GPTQ recipe, one fresh process per run, for one or
more source trees of qgraph (e.g. this checkout against a ``git worktree`` of an older commit),
the trees interleaved so that they share the machine's state.

Each run is ``python -m qgraph.cli run --pipeline "quantize{w=int4:channel},gptq"
--eval-windows 1 --report R.json`` started in the tree's root (so ``import qgraph`` is that
tree's; an older worktree needs ``qgraph/passes`` and ``qgraph/backends`` symlinked to its
top-level folders, as the editable install maps them for this checkout only).

    .venv/bin/python benchmarks/gptq_speed.py [--trees new=.,old=/tmp/old] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import header, interleaved_tree_runs

PIPELINE = "quantize{w=int4:channel},gptq"


def one_run(tree: Path, report: Path) -> dict:
    cmd = [sys.executable, "-m", "qgraph.cli", "run", "--pipeline", PIPELINE]
    cmd += ["--eval-windows", "1", "--no-progress", "--report", str(report)]
    subprocess.run(cmd, cwd=tree, check=True, capture_output=True)
    rep = json.loads(report.read_text())
    passes = {p["name"]: p for p in rep["passes"]}
    return {
        "quantize_s": passes["quantize"]["seconds"],
        "gptq_s": passes["gptq"]["seconds"],
        "peak_rss_mb": max(p["peak_rss_mb"] for p in rep["passes"]),
        "ppl_1_window": rep["ppl"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", default="new=.")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = interleaved_tree_runs(
            args.trees, args.repeats, lambda tree, i: one_run(tree, Path(tmp) / f"{i}.json")
        )
    print(
        header("GPTQ wall time, default recipe (SmolLM2-135M, 16 × 512 tokens)", " ".join(sys.argv))
    )
    print("| tree | quantize s | gptq s | quantize + gptq s | peak RSS MB | ppl (1 window) |")
    print("|---|---|---|---|---|---|")
    for name, rs in runs.items():
        for r in rs:
            total = r["quantize_s"] + r["gptq_s"]
            print(
                f"| {name} | {r['quantize_s']:.1f} | {r['gptq_s']:.1f} | {total:.1f} | "
                f"{r['peak_rss_mb']:.0f} | {r['ppl_1_window']:.4f} |"
            )


if __name__ == "__main__":
    main()
