"""mixed-precision: give more bits to the layers whose quantization hurts the loss most.

Sensitivity of a layer = the increase of the calibration loss (mean next-token NLL) when only
that layer's weight is round-to-nearest quantized at the lowest candidate width, measured on
the graph as it is now (so after rotations). The loss increase of a layer at a wider width is
modelled as ``s_l · 4^(b_min - b)`` (uniform quantization noise power falls by 4× per bit), and
the widths minimising the summed modelled loss under the average-bits budget (code bits per
weight over the selected layers) are found exactly, as a multiple-choice knapsack solved by
dynamic programming (:func:`allocate_bits`). The chosen widths are then applied by running the
``quantize`` pass once per width through the pass manager (each gets its own log record, op
diff and verification), so ``gptq`` can follow as usual.
"""

from __future__ import annotations

import re
from typing import Any

from qgraph.errors import DataError, PipelineError
from qgraph.evaluate import window_nll
from qgraph.formats import fake_quantize, parse_act_spec, parse_weight_spec
from qgraph.graph_edits import get_tensor, set_tensor
from qgraph.model import Model
from qgraph.pass_manager import Option, Pass, register, registry, run_nested, working_on
from qgraph.progress import bar
from qgraph.selection import LayerSelector, selector_options


def allocate_bits(
    sizes: list[int], sensitivity: list[float], choices: list[int], budget: float
) -> list[int]:
    """Widths (from ``choices``) minimising ``Σ s_l 4^(b_min - b_l)`` under ``Σ n_l b_l ≤ budget · Σ n_l``.

    A multiple-choice knapsack solved exactly by dynamic programming over the spare bits, in
    units of the greatest common divisor of the layer sizes (coarsened, never loosened, when
    that would exceed ``MAX_UNITS`` cells). A pure function, tested on its own.
    """
    import math

    import numpy as np

    choices = sorted(set(choices))
    b_min = choices[0]
    if budget < b_min:
        raise PipelineError(f"mixed-precision: budget {budget} is below the smallest width {b_min}")
    spare = budget * sum(sizes) - b_min * sum(sizes)
    unit = math.gcd(*sizes)
    cap = int(spare // unit)
    coarse = max(1, math.ceil(cap / MAX_UNITS))
    cap //= coarse
    inf = float("inf")
    best = np.zeros(cap + 1)  # best[c]: least loss of the layers so far within c units
    picks = np.zeros((len(sizes), cap + 1), dtype=np.int8)
    for i, (n, s) in enumerate(zip(sizes, sensitivity, strict=True)):
        new = np.full(cap + 1, inf)
        for k, b in enumerate(choices):
            cost = math.ceil(n * (b - b_min) / (unit * coarse))
            if cost > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[cost:] = best[: cap + 1 - cost] + max(s, 0.0) * 4.0 ** (b_min - b)
            better = cand < new
            new[better] = cand[better]
            picks[i, better] = k
        best = new
    out, c = [], cap
    for i in range(len(sizes) - 1, -1, -1):
        k = int(picks[i, c])
        out.append(choices[k])
        c -= math.ceil(sizes[i] * (choices[k] - b_min) / (unit * coarse))
    return out[::-1]


MAX_UNITS = 20000


@register
class MixedPrecision(Pass):
    name = "mixed-precision"
    help = (
        "Measure each linear layer's loss sensitivity on calibration data and allocate weight "
        "bit widths under an average-bits budget, then quantize with them (RTN; gptq may follow)."
    )
    options = (
        Option("budget", float, 4.5, "average code bits per weight over the selected layers"),
        Option(
            "choices",
            str,
            "4+8",
            "candidate widths separated by '+' (4+8: the widths ONNX Runtime runs natively; "
            "3-bit layers lost to 4/8 on SmolLM2 with rotation + GPTQ, benchmarks/README.md)",
        ),
        Option("w", str, "int4:channel", "weight spec template (its width is replaced per layer)"),
        Option("a", str, "none", "activation spec, as in quantize"),
        *selector_options("lm_head"),
        Option("windows", int, 2, "calibration windows used to measure sensitivity"),
        Option("tokens", int, 256, "tokens per window used to measure sensitivity"),
    )
    provides = frozenset({"quantized", "float-weights", "mixed-precision"})
    forbids = frozenset({"gptq", "learned-rounding", "sparse-split", "mixed-precision", "qat"})

    def validate(self) -> None:
        try:
            self.choices = sorted({int(c) for c in self.opt("choices").split("+")})
        except ValueError:
            raise PipelineError(
                f"mixed-precision: choices {self.opt('choices')!r} is not like 3+4+8"
            ) from None
        if not self.choices or not all(2 <= c <= 8 for c in self.choices):
            raise PipelineError("mixed-precision: widths must be between 2 and 8")
        if self.opt("budget") < self.choices[0]:  # before minutes of sensitivity measurement
            raise PipelineError(
                f"mixed-precision: budget {self.opt('budget')} is below the smallest width "
                f"{self.choices[0]} (choices {self.opt('choices')})"
            )
        try:
            self.template = parse_weight_spec(self.opt("w"))
            parse_act_spec(self.opt("a"))
        except PipelineError as exc:
            raise PipelineError(f"mixed-precision: {exc}") from None
        self.selector = LayerSelector.from_pass(self)

    def check(self, model: Model) -> None:
        if model.calibration is None:
            raise DataError("mixed-precision: needs calibration data to measure sensitivity")
        registry()["quantize"](layers=self.opt("layers"), exclude=self.opt("exclude")).check(model)

    def run(self, model: Model) -> dict[str, Any]:
        data = model.calibration[: self.opt("windows"), : self.opt("tokens")]
        gm = model.gm
        chosen = self.selector.select(model.structure.linears)
        if not chosen:
            raise PipelineError(
                f"mixed-precision: no unquantized linear layer matches {self.selector.describe()}"
            )
        base_nll, count = window_nll(model, data)
        b_min = self.choices[0]
        sens = []
        t = self.template
        for lin in bar(chosen, desc="sensitivity", unit="layer", leave=False):
            w = get_tensor(gm, lin.weight)
            with working_on(lin.name):
                set_tensor(
                    gm,
                    lin.weight,
                    fake_quantize(w, t.with_bits(b_min)),
                )
                try:
                    nll, _ = window_nll(model, data)
                finally:
                    set_tensor(gm, lin.weight, w)
            sens.append((nll - base_nll) / count)
        sizes = [lin.in_features * lin.out_features for lin in chosen]
        bits = allocate_bits(sizes, sens, self.choices, self.opt("budget"))
        names = {lin.name: b for lin, b in zip(chosen, bits, strict=True)}
        quantize = registry()["quantize"]
        for width in self.choices:
            group = [re.escape(n) for n, b in names.items() if b == width]
            if group:
                run_nested(
                    quantize(
                        w=self.template.with_bits(width).text(), a=self.opt("a"),
                        layers="^(" + "|".join(group) + ") ", exclude="",
                    ),
                    model, self,
                )  # fmt: skip
        average = sum(n * b for n, b in zip(sizes, bits, strict=True)) / sum(sizes)
        order = sorted(range(len(chosen)), key=lambda i: -sens[i])
        return {
            "budget": self.opt("budget"),
            "average_bits": average,
            "layers_per_width": {b: bits.count(b) for b in self.choices},
            "allocation": names,
            "most_sensitive": [(chosen[i].name, sens[i], bits[i]) for i in order[:5]],
        }
