"""Learned rotations (SpinQuant) against rotate's randomized Hadamards on SmolLM2-135M.

Each row is one pipeline on the real model, calibrated on 16 × 512 tokens and evaluated on the
held-out windows. ``learn-rotations`` runs with its defaults (the reduced CPU schedule) unless
the row says otherwise; the ``spinquant`` rows use SpinQuant's own layout (R2 learned offline,
only R4 online). Rows are appended to ``results/rotations_w{windows}.json`` as they finish.

    .venv/bin/python benchmarks/learned_rotations.py [--windows 8] [--rows KEY,KEY,...]
"""

from __future__ import annotations

from common import study_main

HAD = "fuse-norms,rotate{seed=0,online=r2+r4},"
SPIN = "fuse-norms,rotate{seed=0,online=r4},"
LEARN = "learn-rotations,"
W4A4 = "quantize{w=int4:channel,a=int4:token}"
W4 = "quantize{w=int4:channel}"
#: key -> (recipe label, pipeline)
ROWS = {
    "w4a4-rtn-hadamard": ("W4A4 RTN, Hadamard", HAD + W4A4),
    "w4a4-rtn-learned": ("W4A4 RTN, learned", HAD + LEARN + W4A4),
    "w4a4-rtn-spinquant": ("W4A4 RTN, learned (SpinQuant layout)", SPIN + LEARN + W4A4),
    "w4a4-gptq-hadamard": ("W4A4 GPTQ, Hadamard", HAD + W4A4 + ",gptq"),
    "w4a4-gptq-learned": ("W4A4 GPTQ, learned", HAD + LEARN + W4A4 + ",gptq"),
    # SpinQuant's GPTQ recipe: rotations trained with float weights (W16A4), GPTQ after
    "w4a4-gptq-learned-w16": (
        "W4A4 GPTQ, learned with float weights",
        HAD + "learn-rotations{w=none}," + W4A4 + ",gptq",
    ),
    # the rows of 2026-12-02 (session 7), before clip=output and refit-scale were the defaults
    "w4a4-gptq-hadamard-minmax": (
        "W4A4 GPTQ, Hadamard, min/max grid",
        HAD + W4A4[:-1] + ",clip=none},gptq{refit-scale=false}",
    ),
    "w4a4-gptq-learned-minmax": (
        "W4A4 GPTQ, learned, min/max grid",
        HAD + LEARN + W4A4[:-1] + ",clip=none},gptq{refit-scale=false}",
    ),
    "w4a16-gptq-learned": (
        "W4A16 GPTQ, learned",
        "fuse-norms,rotate{seed=0},learn-rotations{a=none}," + W4 + ",gptq",
    ),
}


if __name__ == "__main__":
    study_main(ROWS, "rotations", "Learned rotations against Hadamards (SmolLM2-135M)", __file__)
