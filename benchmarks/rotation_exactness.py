"""Exactness, time and peak memory of `fuse-norms,rotate` on SmolLM2-135M (float32).

The reference logits come from the Hugging Face module itself, not from qgraph's graph.
The memory-bandwidth floor is the time to copy every weight once.

    .venv/bin/python benchmarks/rotation_exactness.py [--windows 4]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import header, job

from qgraph.pass_manager import PassManager


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    j = job(args.windows)
    hf = j.lm.model
    params = list(hf.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in params)
    copies = []
    for _ in range(3):
        t = time.perf_counter()
        clones = [p.detach().clone() for p in params]
        copies.append(time.perf_counter() - t)
        del clones
    copy_s = min(copies)

    model = j.fresh_model()
    PassManager("fuse-norms,rotate{seed=0}").run(model)
    errs = []
    with torch.inference_mode():
        for w in j.eval:
            ref = hf(input_ids=w[None], use_cache=False).logits
            out = model(w[None])
            errs.append(float((out - ref).abs().max() / ref.abs().max()))
    cmd = f".venv/bin/python benchmarks/rotation_exactness.py --windows {args.windows}"
    print(header("Exactness and cost of fuse-norms,rotate on SmolLM2-135M", cmd))
    print(
        "max |Δlogit| / max |logit| per 512-token window (reference: the HF module): "
        + ", ".join(f"{e:.2e}" for e in errs)
        + f" — worst {max(errs):.2e} (bound 1e-4)\n"
    )
    print("| step | seconds | peak RSS (MB) | × weight copy |")
    print("|---|---|---|---|")
    for r in model.log:
        print(f"| {r.name} | {r.seconds:.2f} | {r.peak_rss_mb:.0f} | {r.seconds / copy_s:.1f} |")
    total = sum(r.seconds for r in model.log)
    print(
        f"| fuse-norms + rotate | {total:.2f} | {max(r.peak_rss_mb for r in model.log):.0f} | "
        f"{total / copy_s:.1f} |"
    )
    print(f"| copy all weights once ({nbytes / 2**20:.0f} MB) | {copy_s:.3f} | – | 1.0 |")
    print(f"\nRotation: {model.log[-1].summary.get('r1')}; R2: {model.log[-1].summary.get('r2')}")


if __name__ == "__main__":
    main()
