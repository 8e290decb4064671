"""Wall time of the exact rewrites (``fuse-norms,rotate{seed=0}``) on SmolLM2-135M against one
copy of its weights, one fresh process per run, for one or more source trees of qgraph (e.g.
this checkout against a ``git worktree`` of an older commit, set up as in gptq_speed.py), the
trees interleaved so that they share the machine's state.

    .venv/bin/python benchmarks/rewrite_speed.py [--trees new=.,old=/tmp/old] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import header, interleaved_tree_runs

PIPELINE = "fuse-norms,rotate{seed=0}"

#: Runs inside the tree: trace SmolLM2, time one clone of every weight, run the pipeline.
_CHILD = f"""
import json, time
import qgraph
from qgraph.loaders import load_causal_lm
from qgraph.pass_manager import PassManager
lm = load_causal_lm("smollm2-135m")
model = qgraph.from_hf(lm.model, lm.tokenizer, lm.name)
t = time.perf_counter()
copies = {{k: v.detach().clone() for k, v in lm.model.state_dict().items()}}
copy_s = time.perf_counter() - t
del copies
PassManager("{PIPELINE}").run(model)
print(json.dumps({{"copy_s": copy_s, **{{r.name: r.seconds for r in model.log}},
                  "peak_rss_mb": max(r.peak_rss_mb for r in model.log)}}))
"""


def one_run(tree: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], cwd=tree, check=True, capture_output=True, text=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", default="new=.")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    runs = interleaved_tree_runs(args.trees, args.repeats, lambda tree, _: one_run(tree))
    print(header(f"Exact rewrites `{PIPELINE}` (SmolLM2-135M)", " ".join(sys.argv)))
    print("| tree | weight copy s | fuse-norms s | rotate s | both s | both / copy | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        for r in rs:
            both = r["fuse-norms"] + r["rotate"]
            print(
                f"| {name} | {r['copy_s']:.2f} | {r['fuse-norms']:.2f} | {r['rotate']:.2f} | "
                f"{both:.2f} | {both / r['copy_s']:.1f}× | {r['peak_rss_mb']:.0f} |"
            )


if __name__ == "__main__":
    main()
