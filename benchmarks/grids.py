"""Weight grids and clipping on SmolLM2-135M: which grid, clip search and column order is best.

Every row is one pipeline on the real model, calibrated on 16 × 512 tokens and evaluated on
held-out windows (the stdlib-docstring eval split). ``narrow`` is the symmetric grid
amax / (2^(b-1) - 1) (code -2^(b-1) unused), ``full`` is amax / 2^(b-1) over every code;
``clip=output`` picks each row's clip ratio by the layer's output error on calibration inputs
(weight error weighted by E[x_j²], for GPTQ by the Hessian diagonal), ``clip=mse`` by plain
weight MSE. Rows are appended to ``results/grids_w{windows}.json`` as they finish, so an
interrupted study resumes where it stopped.

    .venv/bin/python benchmarks/grids.py [--windows 8] [--rows KEY,KEY,...]
"""

from __future__ import annotations

from common import study_main

ROT = "fuse-norms,rotate{seed=0},"
ROT_A4 = "fuse-norms,rotate{seed=0,online=r2+r4},"
#: key -> (recipe label, pipeline)
ROWS = {
    "rtn-narrow": ("W4A16 RTN", "quantize{w=int4:channel:narrow,clip=none}"),
    "rtn-full": ("W4A16 RTN", "quantize{w=int4:channel,clip=none}"),
    "rtn-full-output": ("W4A16 RTN", "quantize{w=int4:channel,clip=output}"),
    "rtn-full-mse": ("W4A16 RTN", "quantize{w=int4:channel,clip=mse}"),
    "gptq-narrow-noact": (
        "W4A16 GPTQ",
        "quantize{w=int4:channel:narrow,clip=none},gptq{act-order=false,refit-scale=false}",
    ),
    "gptq-narrow": (
        "W4A16 GPTQ",
        "quantize{w=int4:channel:narrow,clip=none},gptq{refit-scale=false}",
    ),
    "gptq-full": ("W4A16 GPTQ", "quantize{w=int4:channel,clip=none},gptq{refit-scale=false}"),
    "gptq-full-output": (
        "W4A16 GPTQ",
        "quantize{w=int4:channel,clip=output},gptq{refit-scale=false}",
    ),
    "gptq-full-refit": ("W4A16 GPTQ", "quantize{w=int4:channel,clip=none},gptq{refit-scale=true}"),
    "gptq-full-output-refit": (
        "W4A16 GPTQ",
        "quantize{w=int4:channel,clip=output},gptq{refit-scale=true}",
    ),
    "rot-gptq-narrow": (
        "W4A16 rotation + GPTQ",
        ROT + "quantize{w=int4:channel:narrow,clip=none},gptq{refit-scale=false}",
    ),
    "rot-gptq-full": (
        "W4A16 rotation + GPTQ",
        ROT + "quantize{w=int4:channel,clip=none},gptq{refit-scale=false}",
    ),
    "rot-gptq-full-output": (
        "W4A16 rotation + GPTQ",
        ROT + "quantize{w=int4:channel,clip=output},gptq{refit-scale=false}",
    ),
    "w3-gptq-narrow": (
        "W3A16 GPTQ",
        "quantize{w=int3:channel:narrow,clip=none},gptq{refit-scale=false}",
    ),
    "w3-gptq-full": ("W3A16 GPTQ", "quantize{w=int3:channel,clip=none},gptq{refit-scale=false}"),
    "w4a4-narrow": (
        "W4A4 rotation + GPTQ",
        ROT_A4 + "quantize{w=int4:channel:narrow,a=int4:token,clip=none},gptq{refit-scale=false}",
    ),
    "w4a4-full": (
        "W4A4 rotation + GPTQ",
        ROT_A4 + "quantize{w=int4:channel,a=int4:token,clip=none},gptq{refit-scale=false}",
    ),
    "w4a4-full-output": (
        "W4A4 rotation + GPTQ",
        ROT_A4 + "quantize{w=int4:channel,a=int4:token,clip=output},gptq{refit-scale=false}",
    ),
    "w8a8": ("W8A8 RTN", "quantize{w=int8:channel,a=int8:token,clip=none}"),
    "w8a8-output": ("W8A8 RTN", "quantize{w=int8:channel,a=int8:token,clip=output}"),
    "w8a8-narrow": ("W8A8 RTN", "quantize{w=int8:channel:narrow,a=int8:token,clip=none}"),
}


if __name__ == "__main__":
    study_main(ROWS, "grids", "Weight grids, clipping and column order (SmolLM2-135M)", __file__)
