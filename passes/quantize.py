"""quantize: round-to-nearest weight quantization and activation fake-quantization of linear layers.

Weight spec ``int<b>[:channel|:tensor|:group<g>][:sym|:asym]`` (default channel, sym);
activation spec ``none``, ``int<b>:token[:sym|:asym]`` (dynamic per token, default asym) or
``int<b>:tensor[:sym|:asym]`` (static per tensor, calibrated on the model's calibration
data as the graph is now). Each selected ``linear`` becomes ``qgraph::qlinear`` with int codes
in ``[in, out]`` layout, preceded by an activation quantizer when asked.

Range choice (qgraph/kernels/ranges.py; KL-J after Settle et al., arXiv 1805.07941), static
activations only:

* ``range=minmax`` (default): the observed (min, max) over all calibration windows;
* ``range=percentile``: ``percentile_range(sample, percentile, symmetric)``, i.e.
  (P_{100-p}, P_p) for an asymmetric spec, (-P_p(|x|), P_p(|x|)) for a symmetric one;
* ``range=mse``: ``mse_range`` (clip-ratio search) on at most ``MSE_SAMPLE_CAP`` values;
* ``range=klj``: the KL-J threshold t of |x| (``klj_threshold``, signed); KL-J always gives the
  symmetric range (-t, t), also for an ``:asym`` spec (which then only sets the grid:
  s = 2t / (2^b - 1), zero 0). With ``pow2`` the threshold is rounded up to a power of two
  and the scale is the paper's ``klj_scale(t, bits, signed=True, power_of_two=True)``
  = t / 2^(b-1), a power of two, with zero 0 (rescaling is a shift), whatever :sym/:asym says.

Every other range becomes (scale, zero) through ``quant.minmax_qparams(lo, hi, bits, symmetric)``.
The searches work on a seeded uniform random subsample of each layer input (at most
``SAMPLE_CAP`` values over all windows; every value when there are fewer, so small models are
calibrated exactly), see :func:`calibrate_ranges`.

``clip=output`` (the default, ``auto``, below 8 bits whenever the model has calibration data)
chooses the weight scales per row/group by ``kernels.gptq.mse_clip_search``
(the clip ratio of least error, 1.0 = RTN included) with each input column's error weighted by
Σx_j² of the layer's input on ``calib-batches`` calibration windows: the layer's output error in
a diagonal approximation. ``clip=mse`` weighs every column alike (plain weight MSE), which
clips the weights that meet LLMs' large activation channels and is kept for comparison.
When the next pass re-solves every grid from its own Hessians (``gptq``, ``learn-rounding``:
``Pass.resolves_grids``), the search is left to it: ``quantize`` writes plain round-to-nearest
placeholder codes, records ``clip=output`` for the next pass, and saves a calibration pass.

Formats, the stored layout and the accounting are :mod:`qgraph.formats`; each rewritten layer
gets a :class:`qgraph.quantized.QuantizedLayer` record in ``model.quant``. ``quantize`` may run
more than once on disjoint layers (e.g. ``quantize{w=int8:channel,layers=mlp},quantize{w=int4:
channel,exclude='mlp|lm_head'}``); selecting a layer an earlier one quantized is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx

from qgraph import ops  # noqa: F401  (registers torch.ops.qgraph)
from qgraph.calibration import ResumableRun, calibration_rows, input_second_moments
from qgraph.errors import DataError, PipelineError
from qgraph.formats import (
    CLIPS,
    ActSpec,
    choose_grid,
    parse_act_spec,
    parse_weight_spec,
    rtn_quantize,
)
from qgraph.graph_edits import finish, get_attr_node, get_tensor, insert_call, new_attr
from qgraph.kernels import quant as qk
from qgraph.kernels import ranges as rk
from qgraph.model import Model
from qgraph.pass_manager import Option, Pass, measures_each_pass, next_pass, register, working_on
from qgraph.quantized import QuantizedLayer
from qgraph.selection import LayerSelector, selector_options
from qgraph.structure import SDPA, Linear, gqa_source

#: Most values of one layer input kept for the range searches (over all calibration windows).
SAMPLE_CAP = 1 << 20
#: Most values handed to ``mse_range`` (100 fake-quantizations each; slow on large inputs).
MSE_SAMPLE_CAP = 100_000
RANGES = ("minmax", "percentile", "mse", "klj")
#: range=klj on an asymmetric spec treats an input whose min is at least -ONE_SIDED·max as
#: one-sided (post-ReLU/HardSwish): unsigned KL-J on its positive side.
ONE_SIDED = 0.25
PER_TOKEN = torch.ops.qgraph.quantize_per_token.default


class _Reservoir:
    """Seeded uniform random sample without replacement of a stream of tensors (bottom-k).

    Every value gets an independent random int32 key; the ``cap`` values of smallest key are
    kept, which is a uniform sample of everything seen, mergeable batch by batch. While at
    most ``cap`` values have been seen, all of them are kept (exact).
    """

    def __init__(self, cap: int, seed: int):
        self.cap = cap
        self.gen = torch.Generator().manual_seed(seed)
        self.values: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []
        self.size = 0

    def add(self, x: torch.Tensor) -> None:
        v = x.detach().reshape(-1).to(torch.float32, copy=True)
        k = torch.randint(0, 2**31 - 1, v.shape, generator=self.gen, dtype=torch.int32)
        if self.size + v.numel() <= self.cap:
            self.values.append(v)
            self.keys.append(k)
            self.size += v.numel()
            return
        if self.size == self.cap:  # full: only keys below the current largest can enter
            keep = k < max(int(c.max()) for c in self.keys)
            v, k = v[keep], k[keep]
        vals = torch.cat([*self.values, v])
        keys = torch.cat([*self.keys, k])
        if keys.numel() > self.cap:
            idx = torch.topk(keys, self.cap, largest=False, sorted=False).indices
            vals, keys = vals[idx], keys[idx]
        self.values, self.keys, self.size = [vals], [keys], vals.numel()

    def sample(self, limit: int | None = None) -> torch.Tensor:
        """The kept values (float32, 1-D); with ``limit``, a uniform sub-subsample of that size."""
        vals = torch.cat(self.values) if self.values else torch.empty(0)
        if limit is not None and vals.numel() > limit:
            keys = torch.cat(self.keys)
            vals = vals[torch.topk(keys, limit, largest=False, sorted=False).indices]
        return vals


@dataclass
class ActStats:
    """What calibration observed at the input of one linear layer."""

    lo: float
    hi: float
    count: int  # values seen over all windows
    reservoir: _Reservoir | None = None

    def sample(self, limit: int | None = None) -> torch.Tensor:
        """Uniform random subsample of the input values (all of them when count <= the cap)."""
        if self.reservoir is None:
            raise ValueError("calibration kept no sample (calibrate_ranges(sample_cap=0))")
        return self.reservoir.sample(limit)


def calibrate_ranges(
    model: Model,
    nodes: list[fx.Node],
    batches: int,
    sample_cap: int = SAMPLE_CAP,
    seed: int = 0,
) -> dict[fx.Node, ActStats]:
    """Observe each node's first input while running the graph as it is now.

    Runs the first ``batches`` calibration windows one at a time and keeps, per node, the exact
    min/max and (``sample_cap > 0``) a uniform random subsample of at most ``sample_cap`` input
    values over all windows, seeded by ``seed`` and the input's position among the observed
    inputs (reproducible). When fewer than ``sample_cap`` values are seen, the sample is all of
    them. Nodes reading the same tensor (q/k/v) share one ActStats object.
    """
    values = observe_values(model, [n.args[0] for n in nodes], batches, sample_cap, seed)
    return {n: values[n.args[0]] for n in nodes if n.args[0] in values}


def observe_values(
    model: Model,
    values: list[fx.Node],
    batches: int,
    sample_cap: int = SAMPLE_CAP,
    seed: int = 0,
) -> dict[fx.Node, ActStats]:
    """:class:`ActStats` of each value (node output) on the first ``batches`` calibration
    windows; see :func:`calibrate_ranges`."""
    if model.calibration is None:
        raise DataError(
            "quantize: static activation quantization needs calibration data (--calib-text)"
        )
    order = {x: i for i, x in enumerate(dict.fromkeys(values))}
    inputs: dict[fx.Node, ActStats] = {}  # by the observed tensor's node
    position = {n: i for i, n in enumerate(model.gm.graph.nodes)}
    last = max(order, key=position.__getitem__) if order else None

    def observe(n: fx.Node, out: torch.Tensor, run: ResumableRun) -> None:
        if n not in order:  # each observed tensor once per window, however many layers read it
            return
        lo, hi = float(out.min()), float(out.max())
        st = inputs.get(n)
        if st is None:
            res = _Reservoir(sample_cap, seed * 1_000_003 + order[n])
            st = inputs[n] = ActStats(lo, hi, 0, res if sample_cap > 0 else None)
        if math.isnan(lo) or math.isnan(hi):  # min/max below would skip a NaN
            lo = hi = math.nan
        st.lo = lo if math.isnan(lo) else min(st.lo, lo)
        st.hi = hi if math.isnan(hi) else max(st.hi, hi)
        st.count += out.numel()
        if st.reservoir is not None:
            st.reservoir.add(out)
        if n is last:
            run.stop()  # nothing after the last observed value is needed

    with torch.inference_mode():
        for i in range(min(batches, model.calibration.shape[0])):
            ResumableRun(model.gm, after=observe).run(model.calibration[i : i + 1])
    for n, st in inputs.items():
        if not (math.isfinite(st.lo) and math.isfinite(st.hi)):
            raise DataError(f"quantize: calibration produced non-finite activations at {n.name}")
    return inputs


def static_qparams(
    st: ActStats,
    bits: int,
    symmetric: bool,
    method: str = "minmax",
    percentile: float = 99.99,
    pow2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
    """(scale, zero int8, (lo, hi)) of a static per-tensor quantizer by range ``method``.

    See the module docstring: percentile/mse/klj work on the calibration sample (mse on at
    most MSE_SAMPLE_CAP of it); klj gives (-t, t), and with ``pow2`` the power-of-two scale
    ``klj_scale(t, bits, signed=True, power_of_two=True)`` with zero 0.
    """
    if method == "minmax":
        lo, hi = st.lo, st.hi
    elif method == "percentile":
        lo, hi = rk.percentile_range(st.sample(), percentile, symmetric)
    elif method == "mse":
        lo, hi = rk.mse_range(st.sample(MSE_SAMPLE_CAP), bits, symmetric)
    elif method == "klj" and not symmetric and not pow2 and st.lo >= -ONE_SIDED * st.hi:
        # (nearly) one-sided, e.g. after ReLU/HardSwish: the unsigned search (2^b levels) on
        # the positive side, the small negative side kept whole
        sample = st.sample()
        t = rk.klj_threshold(sample[sample > 0], bits, signed=False)
        lo, hi = min(st.lo, 0.0), t
    elif method == "klj":
        t = rk.klj_threshold(st.sample(), bits, signed=True, power_of_two=pow2)
        lo, hi = -t, t
        if pow2:
            scale = torch.tensor(rk.klj_scale(t, bits, signed=True, power_of_two=True))
            return scale.float(), torch.zeros((), dtype=torch.int8), (lo, hi)
    else:
        raise ValueError(f"unknown range method {method!r}; use one of {', '.join(RANGES)}")
    scale, zero = qk.minmax_qparams(lo, hi, bits, symmetric)
    return scale, zero, (lo, hi)


@register
class Quantize(Pass):
    name = "quantize"
    help = (
        "Round-to-nearest quantization of linear layers: weights int2–int8 per tensor, channel or "
        "group, symmetric or asymmetric; activations dynamic per token or static per tensor "
        "(range by min/max, percentile, MSE or KL-J); optional MSE clip search for weights."
    )
    options = (
        Option(
            "w",
            str,
            "int8:channel",
            "weight spec int<b>[:channel|:tensor|:group<g>][:sym|:asym][:full|:narrow]; "
            "symmetric grids are full range (scale amax/2^(b-1)) unless :narrow",
        ),
        Option(
            "a",
            str,
            "none",
            "activation spec none | int<b>:token[:sym|:asym] | int<b>:tensor[:sym|:asym]",
        ),
        Option(
            "kv",
            str,
            "none",
            "key/value cache: none | int<b>[:head][:sym|:asym] (default asym): keys (after an "
            "online R3) and values quantized per token and head, so the cache holds them "
            "quantized",
        ),
        *selector_options("lm_head"),
        Option(
            "calib-batches",
            int,
            8,
            "calibration windows used for static activation ranges and clip=output",
        ),
        Option(
            "range",
            str,
            "minmax",
            "static (a=int<b>:tensor) activation range: minmax | percentile (see percentile) | "
            "mse (clip-ratio search) | klj (KL-J threshold t; always the symmetric range "
            "(-t, t), also for :asym specs)",
            choices=RANGES,
        ),
        Option(
            "percentile",
            float,
            99.99,
            "range=percentile: keep values up to this percentile (50-100); :sym specs use "
            "the percentile of |x|",
        ),
        Option(
            "pow2",
            bool,
            False,
            "range=klj: round t up to a power of two; scale t / 2^(b-1) (a power of two, the "
            "paper's convention) and zero 0, whatever :sym/:asym says",
        ),
        Option(
            "clip",
            str,
            "auto",
            "weight range: auto (output below 8 bits when the model has calibration data, else "
            "none) | none "
            "(min/max) | output (clip ratio per row/group of least output error: weight error "
            "weighted by the mean square of each input on calibration data; measured best) | mse "
            "(least plain weight MSE; clips the weights that meet large activations, usually "
            "worse)",
            choices=("auto", *CLIPS),
        ),
        Option(
            "conv-out",
            bool,
            True,
            "with static activations, also quantize each convolution's output on the same "
            "spec, so the file runs DQ→Conv→Q as ONNX Runtime's integer QLinearConv",
        ),
    )
    provides = frozenset({"quantized", "float-weights"})
    forbids = frozenset({"gptq", "learned-rounding", "sparse-split", "qat"})

    def validate(self) -> None:
        try:
            self.wspec = parse_weight_spec(self.opt("w"))
            self.aspec = parse_act_spec(self.opt("a"))
        except PipelineError as exc:
            raise PipelineError(f"quantize: {exc}") from None
        self.selector = LayerSelector.from_pass(self)
        self.kvspec = parse_kv_spec(self.opt("kv"))
        static = self.aspec is not None and self.aspec.mode == "tensor"
        method = self.opt("range")
        if method != "minmax" and not static:
            raise PipelineError(
                f"quantize: option range={method} needs static activation quantization "
                f"(a=int<b>:tensor[...]), got a={self.opt('a')}"
            )
        if not 50.0 <= self.opt("percentile") <= 100.0:
            raise PipelineError(
                f"quantize: option percentile={self.opt('percentile')} must be in [50, 100]"
            )
        if "percentile" in self.explicit and method != "percentile":
            raise PipelineError(
                f"quantize: option percentile only applies to range=percentile (range={method})"
            )
        if self.opt("pow2") and method != "klj":
            raise PipelineError(f"quantize: option pow2 only applies to range=klj (range={method})")

    def check(self, model: Model) -> None:
        done = [r for r in model.quant.values() if self.selector.matches(r.name, r.role)]
        if done:
            names = ", ".join(r.name for r in done[:3]) + (" ..." if len(done) > 3 else "")
            raise PipelineError(
                f"quantize: {len(done)} selected layer(s) are already quantized ({names}, "
                f"w={done[0].weight.text()}); a further quantize must select other layers: "
                "narrow layers= or add them to exclude="
            )
        if self.opt("clip") == "output" and model.calibration is None:
            raise DataError(
                "quantize: clip=output weighs weight errors by calibration activations "
                "(Model.set_calibration or --calib-text)"
            )
        if self.aspec is not None and self.aspec.mode == "tensor" and model.calibration is None:
            raise DataError(
                "quantize: static activation quantization needs calibration data "
                "(Model.set_calibration or --calib-text)"
            )

    def run(self, model: Model) -> dict[str, Any]:
        every = self.selector.select(model.structure.linears + model.structure.convs)
        if not every:
            raise PipelineError(
                f"quantize: no unquantized linear or conv layer matches {self.selector.describe()}"
            )
        chosen = [lin for lin in every if lin.kind == "linear"]
        convs = [lin for lin in every if lin.kind == "conv"]
        self._check_convs(convs)
        self._clip = self.opt("clip")
        if self._clip == "auto":  # the measured best (benchmarks/README.md, weight grids)
            below_8 = self.wspec.bits < 8  # at 8 bits clipping only cost (W8A8 +0.15 %)
            self._clip = "output" if model.calibration is not None and below_8 else "none"
        method = self.opt("range")
        self._range = None  # the range method recorded, None without static activations
        qparams: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}
        out_qparams: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.aspec is not None and self.aspec.mode == "tensor":
            self._range = method
            outputs = [c.node for c in convs] if self.opt("conv-out") else []
            stats = observe_values(
                model,
                [lin.node.args[0] for lin in every] + outputs,
                calibration_rows(model, self, "calib-batches"),
                sample_cap=0 if method == "minmax" else SAMPLE_CAP,
            )
            done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # q/k/v share their stats
            wanted = [(lin.node, False) for lin in every] + [(n, True) for n in outputs]
            for n, is_output in wanted:
                where = f"the {'output' if is_output else 'input'} of {n.name}"
                st = stats[n] if is_output else stats[n.args[0]]
                if id(st) not in done:
                    try:
                        s, z, _ = static_qparams(
                            st,
                            self.aspec.bits,
                            self.aspec.symmetric,
                            method,
                            self.opt("percentile"),
                            self.opt("pow2"),
                        )
                    except DataError as exc:
                        raise DataError(f"quantize: range={method} at {where}: {exc}") from None
                    done[id(st)] = (s, z)
                if is_output:
                    out_qparams[n] = done[id(st)]
                else:
                    qparams[n] = done[id(st)]
        importance = {}
        # when the next pass searches every grid again from its own Hessians, a clip search here
        # would cost a calibration pass (a third of quantize+gptq) for codes it discards
        resolved = _resolved_next(chosen) if not convs else None
        later = resolved if self._clip == "output" else None
        self._search = "none" if later else self._clip
        # The next pass writes every chosen layer's codes before any calibration window runs
        # through the layer, so round-to-nearest codes would only occupy memory until then
        # (1.1B model: 1 GB of int8 codes beside the float weights): a zero-stride placeholder
        # stands in for them, unless the manager measures the model between the two passes.
        self._placeholder = (
            bool(resolved) and model.calibration is not None and not measures_each_pass()
        )
        if self._search == "output":
            importance = input_second_moments(
                model.gm,
                [lin.node for lin in chosen],
                model.calibration[: calibration_rows(model, self, "calib-batches")],
            )
        self._token_quant: dict[fx.Node, fx.Node] = {}
        for lin in chosen:
            with working_on(lin.name):
                model.quant[lin.name] = self._rewrite(
                    model.gm, lin, qparams.get(lin.node), importance.get(lin.node)
                )
        for conv in convs:
            with working_on(conv.name):
                model.quant[conv.name] = self._rewrite_conv(
                    model.gm, conv, qparams.get(conv.node), out_qparams.get(conv.node)
                )
        kv_layers = insert_kv_quantizers(model, self.kvspec) if self.kvspec else 0
        finish(model.gm)
        summary = {
            "layers_quantized": len(every),
            "convs_quantized": len(convs),
            "kv_cache": self.kvspec.text().replace(":token", ":head") if self.kvspec else "none",
            "kv_attention_layers": kv_layers,
            "weights": self.wspec.text(),
            "activations": self.aspec.text() if self.aspec else "none",
            "range": self._range,
            "clip": self._clip,
        }
        if later:
            summary["clip_search"] = f"searched by {later}"
        if self._range == "percentile":
            summary["percentile"] = self.opt("percentile")
        if self._range == "klj":
            summary["pow2"] = self.opt("pow2")
        return summary

    def _rewrite(
        self, gm: fx.GraphModule, lin: Linear, act_qparams, importance: torch.Tensor | None
    ) -> QuantizedLayer:
        node = lin.node
        w = get_tensor(gm, lin.weight)
        stored = rtn_quantize(w, self.wspec, self._search, importance)
        if self._placeholder:
            codes = stored.codes
            stored = replace(stored, codes=torch.zeros((), dtype=codes.dtype).expand(codes.shape))
        g = gm.graph
        x = node.args[0]
        if self.aspec is not None and self.aspec.mode == "token":
            # one dynamic quantizer per input tensor, shared by the layers reading it (q/k/v)
            if x not in self._token_quant:
                with g.inserting_after(x):
                    self._token_quant[x] = g.call_function(
                        torch.ops.qgraph.quantize_per_token.default,
                        (x, self.aspec.bits, self.aspec.symmetric),
                    )
                # same shape as its input: passes that insert after it (split-sparse) need it
                self._token_quant[x].meta["val"] = x.meta.get("val")
            x = self._token_quant[x]
        with g.inserting_before(node):
            if self.aspec is not None and self.aspec.mode == "tensor":
                x = self._static_quantizer(gm, node, x, lin.name + ".act", *act_qparams)
            attrs = [
                get_attr_node(gm, node, new_attr(gm, lin.name + suffix, t))
                for suffix, t in zip((".codes", ".scale", ".zero"), stored.tensors(), strict=True)
            ]
            bias = node.args[2] if len(node.args) > 2 else None
            q = g.call_function(
                torch.ops.qgraph.qlinear.default, (x, *attrs, bias, stored.group, self.wspec.bits)
            )
        q.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(q)
        g.erase_node(node)
        return QuantizedLayer(
            name=lin.name,
            role=lin.role,
            in_features=lin.in_features,
            out_features=lin.out_features,
            weight=self.wspec,
            act=self.aspec,
            codes_attr=attrs[0].target,
            group=stored.group,
            n_scales=stored.n_scales,
            act_range=self._range,
            clip=self._clip,
            float_weight=w,  # a reference (no copy) for passes that re-solve the weights
        )

    def _check_convs(self, convs: list[Linear]) -> None:
        if not convs:
            return
        if self.wspec.granularity == "group":
            raise PipelineError(
                f"quantize: conv layers ({convs[0].name}, ...) take w=int<b>:channel or :tensor, "
                f"not groups ({self.wspec.text()}); exclude them or change w"
            )
        if self.aspec is not None and self.aspec.mode == "token":
            raise PipelineError(
                f"quantize: conv layers ({convs[0].name}, ...) take static activations "
                f"(a=int<b>:tensor) or none, not per-token ({self.aspec.text()})"
            )

    def _rewrite_conv(
        self, gm: fx.GraphModule, conv: Linear, act_qparams, out_qparams
    ) -> QuantizedLayer:
        """``aten.conv*`` → [quantize_static →] ``qgraph::qconv`` [→ quantize_static]: codes in
        the conv weight's layout with one scale per output channel. With a static input the
        bias is rounded to the integer grid ``s_x · s_w[o]`` that an int32 accumulator uses,
        so the exported file (bias as int32 codes) computes the same values."""
        node = conv.node
        w = get_tensor(gm, conv.weight)
        flat = w.reshape(w.shape[0], -1).float()
        clip = "mse" if self._search == "output" else self._search  # no per-column importance
        scale, zero = choose_grid(flat, self.wspec, clip)
        codes = qk.quantize_weight(flat, scale, zero, self.wspec.bits).reshape(w.shape)
        out_ch = w.shape[0]
        scale_o = scale.expand(out_ch, 1).reshape(out_ch).float().contiguous()
        zero_o = zero.expand(out_ch, 1).reshape(out_ch).to(torch.int8).contiguous()
        g = gm.graph
        x = node.args[0]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with g.inserting_before(node):
            if act_qparams is not None:
                s, z = act_qparams
                if _is_static_quantizer(x, self.aspec.bits):
                    # the output of an earlier conv, already quantized: quantizing it again
                    # (Q→DQ→Q→DQ) would only add error; its scale is the input scale
                    s = get_tensor(gm, x.args[1].target)
                else:
                    x = self._static_quantizer(gm, node, x, conv.name + ".act", s, z)
                if bias is not None:  # the int32 bias grid of an integer convolution
                    b = get_tensor(gm, bias.target).float()
                    step = s.float().reshape(()) * scale_o
                    rounded = torch.round(b / step) * step
                    bias = get_attr_node(gm, node, new_attr(gm, conv.name + ".bias_q", rounded))
            attrs = [
                get_attr_node(gm, node, new_attr(gm, conv.name + suffix, t.contiguous()))
                for suffix, t in zip(
                    (".codes", ".scale", ".zero"),
                    (codes.to(torch.int8), scale_o, zero_o),
                    strict=True,
                )
            ]
            stride, padding, dilation, groups = conv.conv
            q = g.call_function(
                torch.ops.qgraph.qconv.default,
                (x, *attrs, bias, stride, padding, dilation, groups, self.wspec.bits),
            )
        q.meta["val"] = node.meta.get("val")
        out = q
        if out_qparams is not None:  # inserted after q, since q sits right before node
            out = self._static_quantizer(gm, node, q, conv.name + ".out", *out_qparams)
            out.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(out)
        g.erase_node(node)
        return QuantizedLayer(
            name=conv.name,
            role=conv.role,
            in_features=conv.in_features,
            out_features=conv.out_features,
            weight=self.wspec,
            act=self.aspec,
            codes_attr=attrs[0].target,
            group=conv.in_features,
            n_scales=out_ch if self.wspec.granularity == "channel" else 1,
            act_range=self._range,
            clip=clip,
            kind="conv",
            out_range=self._range if out_qparams is not None else None,
            float_weight=w,
        )

    def _static_quantizer(self, gm: fx.GraphModule, before: fx.Node, x, prefix: str, s, z):
        """A ``quantize_static`` node on ``x``, with new scale/zero attributes, before ``before``."""
        s_node = get_attr_node(gm, before, new_attr(gm, prefix + "_scale", s.float().reshape(())))
        z_node = get_attr_node(gm, before, new_attr(gm, prefix + "_zero", z.float().reshape(())))
        with gm.graph.inserting_before(before):
            node = gm.graph.call_function(
                torch.ops.qgraph.quantize_static.default, (x, s_node, z_node, self.aspec.bits)
            )
        node.meta["val"] = x.meta.get("val")
        return node


def _is_static_quantizer(node, bits: int) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.target is torch.ops.qgraph.quantize_static.default
        and node.args[3] == bits
    )


def _resolved_next(chosen: list[Linear]) -> str | None:
    """The name of the next pipeline pass if it re-solves the grid of every layer in ``chosen``."""
    nxt = next_pass()
    if nxt is None or not nxt.resolves_grids:
        return None
    selector = LayerSelector.from_pass(nxt)
    return nxt.name if all(selector.matches(lin.name, lin.role) for lin in chosen) else None


def parse_kv_spec(text: str) -> ActSpec | None:
    """``none`` or ``int<b>[:head][:sym|:asym]``: a per-token-and-head quantizer (one scale per
    head vector of one token; the default is asymmetric, like per-token activations)."""
    if text == "none":
        return None
    parts = text.split(":")
    if "token" in parts or "tensor" in parts:
        raise PipelineError(
            f"quantize: kv={text}: the cache is quantized per token and head (kv=int<b>[:head]); "
            "one scale across heads or a static range is not offered"
        )
    rest = [p for p in parts[1:] if p != "head"]
    try:
        return parse_act_spec(":".join([parts[0], "token", *rest]))
    except PipelineError as exc:
        raise PipelineError(f"quantize: kv={text}: {exc}") from None


def insert_kv_quantizers(model: Model, spec: ActSpec) -> int:
    """A per-token quantizer on every attention's keys and values, where the cache will take
    them: after the keys' online R3, before the GQA repeat. Returns the attentions done."""
    gm = model.gm
    sdpas = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]
    for sdpa in sdpas:
        for index in (1, 2):
            src, chain = gqa_source(sdpa.args[index])
            if src.op == "call_function" and src.target is PER_TOKEN:
                raise PipelineError(
                    f"quantize: the keys/values of {sdpa.name} are already quantized (kv= was "
                    "given to an earlier quantize)"
                )
            reader = chain[-1] if chain else sdpa
            quant = insert_call(gm, reader, PER_TOKEN, (src, spec.bits, spec.symmetric))
            reader.replace_input_with(src, quant)
    return len(sdpas)
