"""QAT (seed 003) on SmolLM2-135M: sigmoid rounding + SoftClamp against straight-through.

Training a whole 4-bit model is the expensive part; quantizing and GPTQ are not what is
compared, so the rows start from one saved model (weights quantized, float weights kept for the
distillation teacher) and differ only in the ``qat`` pass:

    qgraph run --pipeline "quantize{w=int4:channel},gptq" --save START.pt2 --save-float-weights
    .venv/bin/python benchmarks/qat.py --model START.pt2 [--windows 8] [--rows KEY,...]

Ratios are to the starting model's perplexity, measured in the same run. Rows are appended to
``results/qat_w{windows}.json`` as they finish.
"""

from __future__ import annotations

from common import study_main

#: key -> (recipe label, pipeline run on the saved model)
ROWS = {
    "ste": ("QAT, straight-through estimator", "qat{estimator=ste}"),
    "sigmoid": ("QAT, sigmoid rounding + SoftClamp", "qat{estimator=sigmoid}"),
    "ste-16": ("QAT, straight-through, 16 steps", "qat{estimator=ste,iters=16}"),
    "sigmoid-16": ("QAT, sigmoid + SoftClamp, 16 steps", "qat{estimator=sigmoid,iters=16}"),
    "sigmoid-16-lr03": (
        "QAT, sigmoid + SoftClamp, 16 steps, lr 0.03",
        "qat{estimator=sigmoid,iters=16,lr=0.03}",
    ),
    "ste-16-lr10": (
        "QAT, straight-through, 16 steps, lr 0.1",
        "qat{estimator=ste,iters=16,lr=0.1}",
    ),
}


if __name__ == "__main__":
    study_main(ROWS, "qat", "QAT estimators from a saved 4-bit model (SmolLM2-135M)", __file__)
