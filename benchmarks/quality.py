"""Quality of SmolLM2-135M under round-to-nearest formats, with and without rotation.

Held-out text: the evaluation split of the stdlib-docstring corpus, fixed 512-token windows.
SmolLM2's packaged weights come from Q4_1 (asymmetric int4, group 32), so the formats here are
per-channel symmetric, which that grid does not favour.

    .venv/bin/python benchmarks/quality.py [--windows 16]
"""

from __future__ import annotations

import argparse
import sys
import time

from common import header, job

FORMATS = {
    "W8A8": "quantize{w=int8:channel,a=int8:token}",
    "W4A16": "quantize{w=int4:channel}",
    "W4A16-g64": "quantize{w=int4:group64}",
    "W4A8": "quantize{w=int4:channel,a=int8:token}",
    "W4A4": "quantize{w=int4:channel,a=int4:token}",
}
ROTATE = "fuse-norms,rotate{seed=0},"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    j = job(args.windows)
    rows = []
    for label, quant in FORMATS.items():
        for rotated in (False, True):
            pipeline = (ROTATE if rotated else "") + quant
            t = time.perf_counter()
            rep = j.run(pipeline)
            rows.append((label, "yes" if rotated else "no", rep, time.perf_counter() - t))
            print(f"{label} rot={rotated}: {rep['ppl']:.4f}", file=sys.stderr)
    fp = rows[0][2]
    cmd = f".venv/bin/python benchmarks/quality.py --windows {args.windows}"
    print(header("Quality: SmolLM2-135M, RTN, with and without rotation", cmd))
    print(
        f"{args.windows} windows × 512 tokens of held-out text (stdlib docstrings, eval split).\n"
    )
    print("| format | rotation | perplexity | Δ vs float | params (M) | volume (MB) |")
    print("|---|---|---|---|---|---|")
    print(
        f"| float32 | – | {fp['ppl_float']:.3f} | – | {fp['params_float'] / 1e6:.1f} | "
        f"{fp['volume_bits_float'] / 8 / 2**20:.1f} |"
    )
    for label, rot, rep, _ in rows:
        print(
            f"| {label} | {rot} | {rep['ppl']:.3f} | {100 * (rep['ppl'] / rep['ppl_float'] - 1):+.2f} % | "
            f"{rep['params'] / 1e6:.1f} | {rep['volume_bits'] / 8 / 2**20:.1f} |"
        )


if __name__ == "__main__":
    main()
