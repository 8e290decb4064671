"""Range methods of the quantize pass (``range``, ``percentile``, ``pow2``, ``clip``).

Static activation scales are checked against numpy references computed from the layer input
captured independently (an FX interpreter over the float graph, on the same calibration
windows). The inputs of the tiny model are far below the calibration sample cap, so the pass
sees every value and percentile/MSE can be compared exactly. The reference quantization
parameters follow quant.py's documented conventions, in float32 as ``minmax_qparams`` computes
them for Python-float ranges: symmetric s = amax / qmax, z = 0; asymmetric range widened to
contain 0, s = (max - min) / (2^b - 1), z = clamp(round(qmin - min / s)); s >= 1e-10.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import qgraph
import qgraph.ops  # noqa: F401  (registers torch.ops.qgraph.*)
from qgraph.kernels.ranges import klj_threshold
from qgraph.passes.quantize import calibrate_ranges

# The range searches run many small ops: see conftest.one_thread (mse_range is ~40x slower with
# 2 threads on a busy 2-core machine).
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning"),
]

QLINEAR = torch.ops.qgraph.qlinear.default
STATIC = torch.ops.qgraph.quantize_static.default
LAYER = "model.layers.1.mlp.down_proj"  # 128 input features, after SiLU(gate) * up
SHARED = "model.layers.0.self_attn.k_proj"  # reads the same tensor as q_proj / v_proj


# ---------------------------------------------------------------------------- references


def np_qparams(lo: float, hi: float, bits: int, symmetric: bool, dtype=np.float32):
    """(scale, zero) of a static range, in ``dtype`` (float32 = what the pass stores)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo, hi, zero_, eps = dtype(lo), dtype(hi), dtype(0), dtype(1e-10)
    if symmetric:
        return max(max(abs(lo), abs(hi)) / dtype(qmax), eps), zero_
    lo, hi = min(lo, zero_), max(hi, zero_)
    s = max((hi - lo) / dtype(2**bits - 1), eps)
    return s, np.clip(np.round(dtype(qmin) - lo / s), qmin, qmax)


def np_mse_range(v: np.ndarray, bits: int, symmetric: bool, grid: int = 100):
    """Clip ratio k/grid of least fake-quantization MSE (float64; ties: larger ratio)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo, hi, amax = v.min(), v.max(), np.abs(v).max()
    best = (math.inf, 0.0, 0.0)
    for k in range(grid, 0, -1):
        r = k / grid
        a, b = (-amax * r, amax * r) if symmetric else (lo * r, hi * r)
        s, z = np_qparams(a, b, bits, symmetric, np.float64)
        q = np.clip(np.round(v / s) + z, qmin, qmax)
        err = np.mean(((q - z) * s - v) ** 2)
        if err < best[0]:
            best = (err, a, b)
    return best[1], best[2]


# ---------------------------------------------------------------------------- models
# ``traced`` and ``model`` are conftest's: the tiny Llama (vocab 256, hidden 64) with 4
# calibration windows of 32 tokens.


@pytest.fixture(scope="module")
def captured(traced) -> dict[str, np.ndarray]:
    """Every linear's input over all calibration windows (calib-batches 8 > 4), float64."""
    traced.invalidate()
    names = {lin.node: lin.name for lin in traced.structure.linears}
    seen: dict[str, list[np.ndarray]] = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, n):
            if n in names:
                x = self.env[n.args[0]].detach().double().reshape(-1).numpy().copy()
                seen.setdefault(names[n], []).append(x)
            return super().run_node(n)

    with torch.inference_mode():
        for i in range(traced.calibration.shape[0]):
            Capture(traced.gm).run(traced.calibration[i : i + 1])
    traced.invalidate()
    return {name: np.concatenate(parts) for name, parts in seen.items()}


def qlinears(model: qgraph.Model) -> dict[str, torch.fx.Node]:
    return {b.name: b.node for b in model.quantized}


def act_qparams(model: qgraph.Model, name: str) -> tuple[np.float32, np.float32]:
    quant = qlinears(model)[name].args[0]
    assert quant.target is STATIC
    s, z = (model.gm.get_buffer(a.target) for a in quant.args[1:3])
    assert s.dtype == torch.float32 and s.dim() == 0
    return np.float32(s.item()), np.float32(z.item())


def outlier_model() -> qgraph.Model:
    """One linear whose calibration input is N(0, 1) with four values at ±30."""
    torch.manual_seed(0)
    model = qgraph.from_module(nn.Linear(32, 16), (torch.randn(1, 64, 32),))
    x = torch.randn(8, 64, 32, generator=torch.Generator().manual_seed(2))
    x[0, 3, 5], x[2, 60, 1], x[5, 7, 30], x[7, 0, 0] = 30.0, -30.0, 28.0, -25.0
    model.set_calibration(x)
    model.invalidate()
    return model


# ---------------------------------------------------------------------------- static ranges


@pytest.mark.parametrize(
    "spec, options, expected",
    [
        ("int8:tensor", "", lambda v: (v.min(), v.max())),
        ("int8:tensor:sym", "range=minmax", lambda v: (v.min(), v.max())),
        (
            "int8:tensor",
            "range=percentile",
            lambda v: tuple(np.percentile(v, [100 - 99.99, 99.99])),
        ),
        (
            "int8:tensor",
            "range=percentile,percentile=99",
            lambda v: tuple(np.percentile(v, [1, 99])),
        ),
        (
            "int8:tensor:sym",
            "range=percentile,percentile=99.5",
            lambda v: (-np.percentile(np.abs(v), 99.5), np.percentile(np.abs(v), 99.5)),
        ),
        ("int4:tensor", "range=mse", lambda v: np_mse_range(v, 4, False)),
        ("int6:tensor:sym", "range=mse", lambda v: np_mse_range(v, 6, True)),
        ("int8:tensor:sym", "range=klj", lambda v: (-klj_threshold(v, 8), klj_threshold(v, 8))),
        ("int4:tensor", "range=klj", lambda v: (-klj_threshold(v, 4), klj_threshold(v, 4))),
    ],
)
def test_static_scale_matches_reference(model, captured, spec, options, expected) -> None:
    opts = f",{options}" if options else ""
    qgraph.run_pipeline(model, f"quantize{{w=int8:channel,a={spec}{opts}}}")
    bits, symmetric = int(spec[3]), spec.endswith(":sym")
    method = options.split(",")[0].removeprefix("range=") or "minmax"
    for layer in (LAYER, SHARED):
        v = captured[layer]
        lo, hi = expected(v)
        if method != "minmax":  # the method really clips something here
            assert lo > v.min() or hi < v.max()
        assert act_qparams(model, layer) == np_qparams(lo, hi, bits, symmetric), layer
    assert model.log[-1].summary["range"] == method
    assert all(r.act_range == method for r in model.quant.values())


@pytest.mark.parametrize("spec", ["int8:tensor:sym", "int8:tensor"])
def test_klj_pow2_scale(model, captured, spec) -> None:
    qgraph.run_pipeline(model, f"quantize{{w=int8:channel,a={spec},range=klj,pow2=true}}")
    v = captured[LAYER]
    t = klj_threshold(v, 8)
    t2 = 2.0 ** math.ceil(math.log2(t))
    assert klj_threshold(v, 8, power_of_two=True) == t2
    s, z = act_qparams(model, LAYER)
    assert s == t2 / 128 and z == 0  # the paper's t / 2^(b-1), whatever :asym says
    assert math.log2(s) == round(math.log2(s))
    assert model.log[-1].summary["pow2"] is True
    for name in qlinears(model):
        s, _ = act_qparams(model, name)
        assert np.frexp(s)[0] == 0.5  # every layer's scale is a power of two


@pytest.mark.parametrize(
    "options", ["range=percentile,percentile=99.9", "range=mse", "range=klj", "range=klj,pow2=1"]
)
def test_outliers_shrink_the_range(options) -> None:
    base = outlier_model()
    scales = {}
    for opts in ("range=minmax", options):
        m = copy.deepcopy(base)
        # 4 bits: at 8 bits the MSE-optimal range keeps ±30 (the rounding error is small there)
        qgraph.run_pipeline(m, f"quantize{{w=int8:channel,a=int4:tensor,exclude=,{opts}}}")
        (node,) = qlinears(m).values()
        scales[opts] = m.gm.get_buffer(node.args[0].args[1].target).item()
    assert scales["range=minmax"] == pytest.approx(60 / 15)
    assert scales[options] < 0.25 * scales["range=minmax"]


def test_calibration_sample_is_seeded_and_bounded() -> None:
    model = outlier_model()
    (lin,) = model.structure.linears
    x = model.calibration
    full = calibrate_ranges(model, [lin.node], batches=8)[lin.node]
    assert (full.lo, full.hi, full.count) == (float(x.min()), float(x.max()), x.numel())
    assert torch.equal(full.sample().sort().values, x.reshape(-1).sort().values)  # under cap: all
    small = calibrate_ranges(model, [lin.node], batches=8, sample_cap=1000)[lin.node]
    again = calibrate_ranges(model, [lin.node], batches=8, sample_cap=1000)[lin.node]
    other = calibrate_ranges(model, [lin.node], batches=8, sample_cap=1000, seed=1)[lin.node]
    assert small.sample().numel() == 1000 and (small.lo, small.hi) == (full.lo, full.hi)
    assert torch.equal(small.sample(), again.sample())
    assert not torch.equal(small.sample().sort().values, other.sample().sort().values)
    assert torch.isin(small.sample(), x.reshape(-1)).all()
    assert small.sample(100).numel() == 100
    for cap in (4096, 5000):  # filled exactly by whole windows / merged after appends
        st = calibrate_ranges(model, [lin.node], batches=8, sample_cap=cap)[lin.node]
        assert st.sample().numel() == cap and torch.isin(st.sample(), x.reshape(-1)).all()
    assert torch.isin(small.sample(100), small.sample()).all()
    # roughly uniform: the subsample's mean/std are those of N(0, 1)
    assert abs(float(small.sample().mean())) < 0.15
    assert 0.85 < float(small.sample().std()) < 1.3


# ---------------------------------------------------------------------------- weight clipping


def weight_errors(
    model: qgraph.Model, importance: dict[str, torch.Tensor] | None = None
) -> dict[str, float]:
    """Per layer Σ d_j (ŵ - w)² / n (d = 1 without ``importance``)."""
    errs = {}
    for name, n in qlinears(model).items():
        codes, scale, zero = (model.gm.get_buffer(a.target) for a in n.args[1:4])
        w_hat = qgraph.ops.dequantize_kn(codes, scale, zero, n.args[5]).double()
        w = model.quant[name].float_weight.detach().double()
        d = importance[name][:, None] if importance else 1.0
        errs[name] = float(((w_hat - w.T).square() * d).mean())
    return errs


def hf_input_square_sums(hf: nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ x_j² of every nn.Linear input over ``windows``, captured by hooks on the HF model."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(mod, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.square().sum(0)

        return record

    handles = [
        m.register_forward_pre_hook(hook(name))
        for name, m in hf.named_modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        with torch.inference_mode():
            for ids in windows:
                hf(ids[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return sums


@pytest.mark.parametrize("spec", ["int3:channel", "int4:group32:asym"])
def test_clip_output_minimises_the_activation_weighted_error(llama, model, spec) -> None:
    """clip=output: per row/group the clip ratio of least Σ_j E[x_j²] (w_j - ŵ_j)², x the
    layer's input on the calibration windows (captured from the HF model here)."""
    rtn, mse = copy.deepcopy(model), copy.deepcopy(model)
    qgraph.run_pipeline(rtn, f"quantize{{w={spec},clip=none}}")
    qgraph.run_pipeline(mse, f"quantize{{w={spec},clip=mse}}")
    qgraph.run_pipeline(model, f"quantize{{w={spec},clip=output,calib-batches=2}}")
    d = hf_input_square_sums(llama, model.calibration[:2])
    e_rtn, e_mse, e_out = (weight_errors(m, d) for m in (rtn, mse, model))
    assert len(e_out) == 14
    for name in e_rtn:
        assert e_out[name] <= min(e_rtn[name], e_mse[name]) * (1 + 1e-6), name
    assert sum(e_out.values()) < 0.95 * sum(e_rtn.values())
    assert model.log[-1].summary["clip"] == "output"
    assert all(r.clip == "output" for r in model.quant.values())


def test_clip_default_is_output_with_calibration_and_none_without(model) -> None:
    """clip=auto (the default) is the measured best: output below 8 bits whenever calibration
    data exists; without it RTN keeps the min/max grid instead of failing."""
    eight = copy.deepcopy(model)
    uncalibrated = copy.deepcopy(model)
    uncalibrated.calibration = None
    qgraph.run_pipeline(model, "quantize{w=int4}")
    explicit = copy.deepcopy(uncalibrated)
    explicit.calibration = model.calibration
    qgraph.run_pipeline(explicit, "quantize{w=int4,clip=output}")
    assert model.log[-1].summary["clip"] == "output"
    assert weight_errors(model) == weight_errors(explicit)
    qgraph.run_pipeline(uncalibrated, "quantize{w=int4}")
    assert uncalibrated.log[-1].summary["clip"] == "none"
    qgraph.run_pipeline(eight, "quantize{w=int8}")
    assert eight.log[-1].summary["clip"] == "none"  # 8 bits: measured no gain
    assert all(r.clip == "none" for r in uncalibrated.quant.values())


def test_clip_output_needs_calibration(model) -> None:
    model.calibration = None
    with pytest.raises(qgraph.DataError, match="clip=output"):
        qgraph.run_pipeline(model, "quantize{w=int4,clip=output}")


@pytest.mark.parametrize("spec", ["int4:group32:asym", "int3:channel", "int4:tensor"])
def test_clip_mse_never_worse_than_rtn(model, spec) -> None:
    rtn = copy.deepcopy(model)
    qgraph.run_pipeline(rtn, f"quantize{{w={spec},clip=none}}")
    qgraph.run_pipeline(model, f"quantize{{w={spec},clip=mse}}")
    e_rtn, e_mse = weight_errors(rtn), weight_errors(model)
    assert e_rtn.keys() == e_mse.keys() and len(e_rtn) == 14
    for name in e_rtn:
        assert e_mse[name] <= e_rtn[name] * (1 + 1e-6), name
    assert sum(e_mse.values()) < 0.95 * sum(e_rtn.values())
    assert model.log[-1].summary["clip"] == "mse" and rtn.log[-1].summary["clip"] == "none"
    assert model.log[-1].summary["range"] is None  # no static activations
    rec = next(iter(model.quant.values()))
    assert rec.clip == "mse" and rec.act_range is None


# ---------------------------------------------------------------------------- option errors


@pytest.mark.parametrize(
    "text, match",
    [
        ("quantize{a=int8:token,range=percentile}", "range=percentile"),
        ("quantize{range=mse}", "range=mse"),
        ("quantize{a=int8:tensor,range=foo}", "range"),
        ("quantize{a=int8:tensor,range=percentile,percentile=abc}", "percentile"),
        ("quantize{a=int8:tensor,range=percentile,percentile=101}", "percentile"),
        ("quantize{a=int8:tensor,percentile=99.9}", "percentile"),
        ("quantize{a=int8:tensor,range=mse,pow2=true}", "pow2"),
        ("quantize{a=int8:tensor,range=klj,pow2=maybe}", "pow2"),
        ("quantize{clip=foo}", "clip"),
    ],
)
def test_invalid_range_options(text, match) -> None:
    with pytest.raises(qgraph.PipelineError, match=match):
        qgraph.parse_pipeline(text)


def test_valid_range_options_parse() -> None:
    for text in (
        "quantize{a=int8:token,range=minmax}",
        "quantize{a=int4:tensor:sym,range=klj,pow2=true,clip=mse}",
        "quantize{a=int8:tensor,range=percentile,percentile=99.9}",
    ):
        assert qgraph.parse_pipeline(text)[0].name == "quantize"


def test_klj_on_a_one_sided_input_searches_unsigned() -> None:
    """A post-ReLU input (min ≥ -ONE_SIDED·max) on an :asym spec: KL-J over the positive values
    with 2^b levels (the paper's unsigned case), the small negative side kept whole, instead of
    a symmetric (-t, t) that would waste half the codes."""

    class ReluLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 16)

        def forward(self, x):
            return self.fc(torch.relu(x) - 0.05)

    torch.manual_seed(0)
    model = qgraph.from_module(ReluLinear(), (torch.randn(1, 64, 32),))
    x = torch.randn(8, 64, 32, generator=torch.Generator().manual_seed(2)).abs() ** 2
    model.set_calibration(x)
    qgraph.run_pipeline(model, "quantize{w=int8:channel,a=int8:tensor,range=klj,exclude=}")
    v = (torch.relu(x) - 0.05).reshape(-1)
    t = klj_threshold(v[v > 0], 8, signed=False)
    assert t < float(v.max())  # the search clips the long tail
    (name,) = qlinears(model)
    assert act_qparams(model, name) == np_qparams(float(v.min()), t, 8, symmetric=False)
