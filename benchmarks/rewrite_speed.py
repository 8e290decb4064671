"""Wall time of the exact rewrites (``fuse-norms,rotate{seed=0}``) on SmolLM2-135M against one
copy of its weights, one fresh process per run, for one or more source trees of qgraph (e.g.
this checkout against a ``git worktree`` of an older commit, set up as in gptq_speed.py), the
trees interleaved so that they share the machine's state.

    .venv/bin/python benchmarks/rewrite_speed.py [--trees new=.,old=/tmp/old] [--repeats 2]
        [--precisions float32,float64]

``--precisions`` runs ``rotate{seed=0,precision=P}`` for each ``P`` in every tree, interleaved
(the float32 GEMM rotations against the float64 transform, in one checkout).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import header

PIPELINE = "fuse-norms,rotate{{seed=0{extra}}}"

#: Runs inside the tree: trace SmolLM2, time one clone of every weight, run the pipeline.
_CHILD = """
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
PassManager("{pipeline}").run(model)
print(json.dumps({{"copy_s": copy_s, **{{r.name: r.seconds for r in model.log}},
                  "peak_rss_mb": max(r.peak_rss_mb for r in model.log)}}))
"""


def one_run(tree: Path, pipeline: str) -> dict:
    child = _CHILD.format(pipeline=pipeline)
    proc = subprocess.run(
        [sys.executable, "-c", child], cwd=tree, check=True, capture_output=True, text=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", default="new=.")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precisions", default="", help="e.g. float32,float64 (default: rotate's)")
    args = ap.parse_args()
    precisions = args.precisions.split(",") if args.precisions else [""]
    pipelines = {p: PIPELINE.format(extra=f",precision={p}" if p else "") for p in precisions}
    trees = ",".join(f"{name}{'/' + p if p else ''}={tree}" for name, tree in
                     (t.split("=", 1) for t in args.trees.split(",")) for p in precisions)  # fmt: skip
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):  # trees and precisions interleaved: they share the machine
        for key in trees.split(","):
            name, tree = key.split("=", 1)
            precision = name.split("/", 1)[1] if "/" in name else ""
            runs.setdefault(name, []).append(one_run(Path(tree).resolve(), pipelines[precision]))
    title = PIPELINE.format(extra="")
    print(header(f"Exact rewrites `{title}` (SmolLM2-135M)", " ".join(sys.argv)))
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
