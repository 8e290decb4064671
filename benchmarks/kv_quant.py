"""KV-cache quantization on SmolLM2-135M: W4A4 with a 4-bit (and 8-bit) cache, with and without
R3, the online rotation of queries and keys (QuaRot's / SpinQuant's W4A4KV4 setting).

Keys are quantized after R3 where it is on, per token and head (``quantize{kv=...}``). Rows are
appended to ``results/kv_quant_w{windows}.json`` as they finish.

    .venv/bin/python benchmarks/kv_quant.py [--windows 8] [--rows KEY,...]
"""

from __future__ import annotations

from common import study_main

R2R4 = "fuse-norms,rotate{seed=0,online=r2+r4},"
ALL = "fuse-norms,rotate{seed=0,online=all},"  # r2+r3+r4
W4A4 = "quantize{w=int4:channel,a=int4:token"
#: key -> (recipe label, pipeline)
ROWS = {
    "w4a4": ("W4A4, float cache, R2+R4", R2R4 + W4A4 + "},gptq"),
    "w4a4kv8": ("W4A4KV8, R2+R4", R2R4 + W4A4 + ",kv=int8},gptq"),
    "w4a4kv4": ("W4A4KV4, R2+R4 (no R3)", R2R4 + W4A4 + ",kv=int4},gptq"),
    "w4a4kv4-r3": ("W4A4KV4, R2+R3+R4", ALL + W4A4 + ",kv=int4},gptq"),
    "w4a4-r3": ("W4A4, float cache, R2+R3+R4", ALL + W4A4 + "},gptq"),
}


if __name__ == "__main__":
    study_main(
        ROWS, "kv_quant", "KV-cache quantization with and without R3 (SmolLM2-135M)", __file__
    )
