"""The quantize pass against an independent reference.

The reference is a copy of the user's HF model whose linear weights are replaced by weights
fake-quantized here with plain float64 torch math (the conventions of qgraph/kernels/quant.py:
symmetric s = amax / 2^(b-1) on the default full grid or amax / qmax on the narrow one,
q = clamp(round(w / s)); asymmetric range widened to contain 0,
s = (max - min) / (2^b - 1), z = clamp(round(qmin - min / s)), q = clamp(round(w / s) + z),
ŵ = (q - z) s), and whose linear inputs are fake-quantized by forward pre-hooks when the recipe
quantizes activations.

Activation quantizers follow the documented convention for float32 inputs: their parameters are
computed in float32 (weights are quantized in float64 here). They round values that the graph and
the reference compute with different, equally valid kernels (``x @ W`` of the dequantized
``[in, out]`` codes vs ``F.linear``), so a value within float32 noise of a rounding midpoint can
land on the neighbouring code in one of them, and the causal attention carries that one-step
difference to the later tokens of the sequence. The activation tests therefore record every
quantizer input on both sides, mark a token (and the rest of its sequence) as tied only where the
two inputs agree to float32 noise and still quantize differently, require every other token to
match to 1e-4, and check that the activation quantizer changes the logits far more than that.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import hf_logits, tiny_llama, tiny_opt, token_batches, tokens, traced_copy
from torch import nn

import qgraph
import qgraph.ops  # noqa: F401  (registers torch.ops.qgraph.*)

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")

QLINEAR = torch.ops.qgraph.qlinear.default
LINEAR = torch.ops.aten.linear.default
VOCAB = 128
LAYERS = 2
TOL = 1e-4


# ---------------------------------------------------------------------------- reference math


def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def fq_weight_channel_sym(w: torch.Tensor, bits: int, narrow: bool = False) -> torch.Tensor:
    qmin, qmax = qrange(bits)
    w64 = w.detach().double()
    s = (w64.abs().amax(dim=1, keepdim=True) / (qmax if narrow else -qmin)).clamp_min(1e-10)
    q = torch.clamp(torch.round(w64 / s), qmin, qmax)
    return (q * s).to(w.dtype)


def fq_weight_tensor_sym(w: torch.Tensor, bits: int, narrow: bool = False) -> torch.Tensor:
    qmin, qmax = qrange(bits)
    w64 = w.detach().double()
    s = (w64.abs().max() / (qmax if narrow else -qmin)).clamp_min(1e-10)
    return (torch.clamp(torch.round(w64 / s), qmin, qmax) * s).to(w.dtype)


def _asym_codes(x: torch.Tensor, bits: int, lo: torch.Tensor, hi: torch.Tensor):
    """(codes, scale, zero) of asymmetric quantization, in the dtype of the inputs."""
    qmin, qmax = qrange(bits)
    lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)
    s = ((hi - lo) / (2**bits - 1)).clamp_min(1e-10)
    z = torch.clamp(torch.round(qmin - lo / s), qmin, qmax)
    q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
    return q, s, z


def _asym(x: torch.Tensor, bits: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    q, s, z = _asym_codes(x, bits, lo, hi)
    return (q - z) * s


def fq_weight_group_asym(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    out, inp = w.shape
    g = w.detach().double().reshape(out, inp // group, group)
    deq = _asym(g, bits, g.amin(-1, keepdim=True), g.amax(-1, keepdim=True))
    return deq.reshape(out, inp).to(w.dtype)


class PerTokenAsym:
    """Dynamic per-token asymmetric activation quantizer; parameters in x's dtype (float32 for
    float32 activations, as documented)."""

    def __init__(self, bits: int = 8):
        self.bits = bits

    def codes(self, name: str, x: torch.Tensor):
        return _asym_codes(x, self.bits, x.amin(-1, keepdim=True), x.amax(-1, keepdim=True))

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        q, s, z = self.codes(name, x)
        return (q - z) * s


class StaticAsym(PerTokenAsym):
    """Static per-tensor asymmetric quantizer of calibrated ranges {layer name: (min, max)};
    scale and zero in float32 as documented for minmax_qparams."""

    def __init__(self, ranges: dict[str, tuple[float, float]], bits: int = 8):
        super().__init__(bits)
        self.ranges = {
            name: (torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32))
            for name, (lo, hi) in ranges.items()
        }

    def codes(self, name: str, x: torch.Tensor):
        return _asym_codes(x, self.bits, *self.ranges[name])


# ---------------------------------------------------------------------------- models


def linears(hf: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in hf.named_modules() if isinstance(m, nn.Linear)}


def reference(hf: nn.Module, fq_weight, select=lambda name: name != "lm_head", act=None):
    """Copy of ``hf`` with fake-quantized weights on selected linears and optional input hooks."""
    ref = copy.deepcopy(hf)
    for name, lin in linears(ref).items():
        if not select(name):
            continue
        lin.weight = nn.Parameter(fq_weight(lin.weight))  # also unties a tied lm_head
        if act is not None:
            lin.register_forward_pre_hook(lambda mod, args, name=name: (act(name, args[0]),))
    return ref


def token_errors(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """max |Δlogit| of every token, relative to max |logit| of the whole batch."""
    ref, out = ref.double(), out.double()
    return ((out - ref).abs().amax(-1) / ref.abs().max()).flatten()


def assert_close(ref: torch.Tensor, out: torch.Tensor, tol: float = TOL) -> None:
    err = float(token_errors(ref, out).max())
    assert err <= tol, f"max|Δlogit|/max|logit| = {err:.3g}"


QUANTIZERS = (torch.ops.qgraph.quantize_per_token.default, torch.ops.qgraph.quantize_static.default)


def run_graph_recording(model: qgraph.Model, ids: torch.Tensor):
    """Logits of the graph and, per quantized layer name, the input of its activation quantizer."""
    seen: dict[str, torch.Tensor] = {}
    names = {b.node: b.name for b in model.quantized}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            if n.op == "call_function" and n.target in QUANTIZERS:
                for user in n.users:  # a quantizer may feed several layers (q/k/v)
                    seen[names[user]] = self.env[n.args[0]].clone()
            return super().run_node(n)

    with torch.inference_mode():
        out = Recorder(model.gm).run(ids)
    return out, seen


def run_reference_recording(ref_model: nn.Module, ids: torch.Tensor):
    seen: dict[str, torch.Tensor] = {}
    handles = [  # prepended: sees the input before the reference's own quantizing hook
        lin.register_forward_pre_hook(
            lambda mod, args, name=name: seen.__setitem__(name, args[0].clone()), prepend=True
        )
        for name, lin in linears(ref_model).items()
    ]
    try:
        out = hf_logits(ref_model, ids)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def tied_tokens(graph_in: dict, ref_in: dict, act: PerTokenAsym) -> torch.Tensor:
    """[batch, seq] mask of tokens at or after a rounding tie in their sequence.

    A tie: the two quantizer inputs of a token agree to float32 noise (1e-5 relative) but the
    reference quantizer gives them different integer codes. Larger input differences are not
    ties (they are real divergences and must show up in the logits)."""
    assert len(graph_in) == 7 * LAYERS and graph_in.keys() <= ref_in.keys()
    tie = None
    for name, gx in graph_in.items():
        rx = ref_in[name]
        near = (gx - rx).abs().amax(-1) <= 1e-5 * rx.abs().amax(-1).clamp_min(1e-12)
        differ = (act.codes(name, gx)[0] != act.codes(name, rx)[0]).any(-1)
        t = near & differ
        tie = t if tie is None else tie | t
    return tie.cummax(dim=-1).values  # a tie also reaches the later tokens (causal attention)


def assert_matches_up_to_ties(model, ref_model, act, ids_list, min_untied: float = 0.25) -> None:
    untied = total = 0
    for ids in ids_list:
        out, graph_in = run_graph_recording(model, ids)
        ref, ref_in = run_reference_recording(ref_model, ids)
        mask = tied_tokens(graph_in, ref_in, act).flatten()
        e = token_errors(ref, out)
        assert float(torch.cat([e[~mask], e.new_zeros(1)]).max()) <= TOL, (
            f"input {tuple(ids.shape)}: untied tokens differ by {e[~mask].tolist()}"
        )
        assert float(e.max()) <= 5e-2  # a tie moves a token by about one quantization step
        untied += int((~mask).sum())
        total += mask.numel()
    assert untied >= min_untied * total, f"only {untied}/{total} tokens free of rounding ties"


def inputs(seed: int = 2) -> list[torch.Tensor]:
    return token_batches(VOCAB, [(2, 16), (1, 29), (3, 8)], seed)


def qlinear_nodes(model: qgraph.Model) -> list[torch.fx.Node]:
    return [n for n in model.gm.graph.nodes if n.target is QLINEAR]


def quantized_names(model: qgraph.Model) -> set[str]:
    return {b.name for b in model.quantized}


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hf():
    """Tied, init 0.05, norm γ ∈ [0.5, 1.5) from generator seed 1."""
    return tiny_llama(
        vocab=VOCAB, hidden=96, intermediate=192, layers=LAYERS, head_dim=24, init=0.05,
        max_positions=128, random_norms=True, norm_seed=1,
    )  # fmt: skip


@pytest.fixture(scope="module")
def traced(hf) -> qgraph.Model:
    """Without calibration data; conftest's ``model`` gives each test a fresh copy of it."""
    return traced_copy(hf)


# ---------------------------------------------------------------------------- rewriting


def test_every_selected_linear_becomes_qlinear(model) -> None:
    qgraph.run_pipeline(model, "quantize{w=int4:channel}")
    nodes = qlinear_nodes(model)
    assert len(nodes) == 7 * LAYERS
    remaining = [n for n in model.gm.graph.nodes if n.target is LINEAR]
    assert len(remaining) == 1  # the lm_head stays a float aten.linear by default
    assert remaining[0].args[1].target.endswith("lm_head.weight")
    assert "lm_head" not in quantized_names(model)
    assert [b.node for b in model.quantized] == nodes
    for layer in model.quantized:
        rec = layer.record
        assert rec.weight.bits == 4 and rec.weight.granularity == "channel" and rec.weight.symmetric
        codes, _, _ = layer.stored(model.gm)
        assert codes.dtype == torch.int8 and codes.shape == (rec.in_features, rec.out_features)
        assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    # summary and structure agree
    assert model.log[-1].summary["layers_quantized"] == 7 * LAYERS
    assert "quantized" in model.properties


@pytest.mark.parametrize(
    "spec, fq",
    [
        ("int4:channel", lambda w: fq_weight_channel_sym(w, 4)),
        ("int8:channel:sym", lambda w: fq_weight_channel_sym(w, 8)),
        ("int4:channel:sym:narrow", lambda w: fq_weight_channel_sym(w, 4, narrow=True)),
        ("int4:group32:asym", lambda w: fq_weight_group_asym(w, 4, 32)),
        ("int3:tensor", lambda w: fq_weight_tensor_sym(w, 3)),
    ],
)
def test_weight_only_matches_reference(hf, model, spec: str, fq) -> None:
    qgraph.run_pipeline(model, f"quantize{{w={spec}}}")
    ref_model = reference(hf, fq)
    for ids in inputs():
        assert_close(hf_logits(ref_model, ids), model(ids))
    # and it is not the float model
    ids = inputs()[0]
    assert float(token_errors(hf_logits(hf, ids), model(ids)).max()) > 10 * TOL


@pytest.mark.parametrize(
    "spec, fq",
    [
        ("int4:channel", lambda w: fq_weight_channel_sym(w, 4)),
        ("int4:group32:asym", lambda w: fq_weight_group_asym(w, 4, 32)),
    ],
)
def test_per_token_activations_match_reference(hf, model, spec: str, fq) -> None:
    qgraph.run_pipeline(model, f"quantize{{w={spec},a=int8:token}}")
    per_token = torch.ops.qgraph.quantize_per_token.default
    # every quantized layer reads a per-token quantizer (layers reading one tensor may share it)
    assert all(n.args[0].target is per_token for n in qlinear_nodes(model))
    assert 4 * LAYERS <= sum(n.target is per_token for n in model.gm.graph.nodes) <= 7 * LAYERS
    act = PerTokenAsym(8)
    ref_model = reference(hf, fq, act=act)
    assert_matches_up_to_ties(model, ref_model, act, inputs())
    # the activation quantizer is really applied: without it most tokens differ
    weights_only = reference(hf, fq)
    for ids in inputs():
        e = token_errors(hf_logits(weights_only, ids), model(ids))
        assert float((e > 10 * TOL).double().mean()) > 0.5


def test_linear_biases_are_kept() -> None:
    """OPT: every linear has a bias; the quantized layers must add it after the int matmul."""
    opt = tiny_opt(
        vocab=VOCAB, hidden=64, layers=LAYERS, max_positions=64, bias_std=0.1, bias_seed=3,
        norm_biases=True,
    )  # fmt: skip
    qmodel = qgraph.from_hf(opt)
    qgraph.run_pipeline(qmodel, "quantize{w=int4:group32:asym}")
    nodes = qlinear_nodes(qmodel)
    assert len(nodes) == 6 * LAYERS and all(n.args[4] is not None for n in nodes)
    ref_model = reference(opt, lambda w: fq_weight_group_asym(w, 4, 32))
    for ids in inputs():
        assert_close(hf_logits(ref_model, ids), qmodel(ids))


def test_quantized_tied_lm_head_keeps_embedding_float(hf, model) -> None:
    qgraph.run_pipeline(model, "quantize{w=int8:channel,exclude=}")
    assert "lm_head" in quantized_names(model)
    assert len(qlinear_nodes(model)) == 7 * LAYERS + 1
    ref_model = reference(hf, lambda w: fq_weight_channel_sym(w, 8), select=lambda n: True)
    assert ref_model.lm_head.weight is not ref_model.model.embed_tokens.weight
    for ids in inputs():
        assert_close(hf_logits(ref_model, ids), model(ids))


# ---------------------------------------------------------------------------- static activations


def test_static_activations_need_calibration(model) -> None:
    with pytest.raises(qgraph.DataError, match="calibration"):
        qgraph.run_pipeline(model, "quantize{w=int8:channel,a=int8:tensor}")
    assert all(n.target is not QLINEAR for n in model.gm.graph.nodes)


def test_static_activations_with_calibration_match_reference(hf, model) -> None:
    calib = tokens(VOCAB, 4, 24, seed=5)
    model.set_calibration(calib)
    qgraph.run_pipeline(model, "quantize{w=int8:channel,a=int8:tensor}")
    static = torch.ops.qgraph.quantize_static.default
    assert len(qlinear_nodes(model)) == 7 * LAYERS
    assert all(n.args[0].target is static for n in qlinear_nodes(model))

    # observe each linear's input range on the float model, one calibration window at a time
    ranges: dict[str, list[float]] = {}
    observer = copy.deepcopy(hf)
    for name, lin in linears(observer).items():

        def hook(mod, args, name=name):
            lo, hi = float(args[0].min()), float(args[0].max())
            old = ranges.get(name, [lo, hi])
            ranges[name] = [min(old[0], lo), max(old[1], hi)]

        lin.register_forward_pre_hook(hook)
    for i in range(calib.shape[0]):
        hf_logits(observer, calib[i : i + 1])

    act = StaticAsym(ranges)
    ref_model = reference(hf, lambda w: fq_weight_channel_sym(w, 8), act=act)
    assert_matches_up_to_ties(model, ref_model, act, inputs())
    weights_only = reference(hf, lambda w: fq_weight_channel_sym(w, 8))
    for ids in inputs():
        e = token_errors(hf_logits(weights_only, ids), model(ids))
        assert float((e > 10 * TOL).double().mean()) > 0.5


# ---------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    "options, expected",
    [
        (
            "layers=mlp",
            {
                f"model.layers.{i}.mlp.{p}"
                for i in range(2)
                for p in ("gate_proj", "up_proj", "down_proj")
            },
        ),
        (
            "layers=layers\\.1\\.",
            {
                f"model.layers.1.{p}"
                for p in (
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.o_proj",
                    "mlp.gate_proj",
                    "mlp.up_proj",
                    "mlp.down_proj",
                )
            },
        ),
        (
            "layers=attn_v|attn_o",
            {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("v_proj", "o_proj")},
        ),
        (
            "exclude=lm_head|down_proj|self_attn",
            {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")},
        ),
        ("layers=mlp_out", {f"model.layers.{i}.mlp.down_proj" for i in range(2)}),
    ],
)
def test_layer_selection(model, options: str, expected: set[str]) -> None:
    qgraph.run_pipeline(model, f"quantize{{w=int8:channel,{options}}}")
    assert quantized_names(model) == expected
    n_linear = sum(n.target is LINEAR for n in model.gm.graph.nodes)
    assert n_linear == 7 * LAYERS + 1 - len(expected)


def test_selection_matching_nothing(model) -> None:
    with pytest.raises(qgraph.PipelineError, match="no unquantized linear or conv layer"):
        qgraph.run_pipeline(model, "quantize{layers=nothing_is_called_this}")


@pytest.mark.parametrize(
    "text",
    [
        "quantize{w=int9}",
        "quantize{w=int1:channel}",
        "quantize{w=float8}",
        "quantize{w=int4:row}",
        "quantize{w=int4:group0}",
        "quantize{w=int4:groupx}",
        "quantize{w=int4:channel:maybe}",
        "quantize{a=int8:channel}",
        "quantize{a=fp8:token}",
        "quantize{layers=[}",
        "quantize{exclude=(}",
    ],
)
def test_invalid_specs(text: str) -> None:
    with pytest.raises(qgraph.PipelineError, match="quantize"):
        qgraph.parse_pipeline(text)


def test_ragged_group_size(model) -> None:
    """Group 7 does not divide the input sizes: the last group of each row is shorter, and the
    stored scales have ceil(in / 7) rows (ONNX blocked layout)."""
    qgraph.run_pipeline(model, "quantize{w=int4:group7}")
    for layer in model.quantized:
        scale = layer.node.args[2].meta["val"]
        assert layer.node.args[5] == 7
        assert scale.shape[0] == -(-layer.record.in_features // 7)


# ---------------------------------------------------------------------------- accounting


def _hand_count(
    hf: nn.Module, bits: int, scales_per_linear, symmetric: bool
) -> tuple[int, float, int]:
    """(params, volume bits, quantized params) of hf with every linear but lm_head quantized."""
    quant = {n: m for n, m in linears(hf).items() if n != "lm_head"}
    qparams = sum(m.weight.numel() for m in quant.values())
    qweights = {id(m.weight) for m in quant.values()}
    float_params = [p for p in hf.parameters() if id(p) not in qweights]  # tied: counted once
    n_float = sum(p.numel() for p in float_params) + hf.model.rotary_emb.inv_freq.numel()
    volume = 32.0 * n_float
    for m in quant.values():
        n_scales = scales_per_linear(m)
        volume += m.weight.numel() * bits + n_scales * 32 + (0 if symmetric else n_scales * bits)
    return n_float + qparams, volume, qparams


@pytest.mark.parametrize(
    "spec, bits, scales, symmetric",
    [
        ("int8:channel", 8, lambda m: m.out_features, True),
        ("int4:group32:asym", 4, lambda m: m.out_features * m.in_features // 32, False),
        ("int4:tensor", 4, lambda m: 1, True),
    ],
)
def test_accounting_matches_hand_count(hf, model, spec, bits, scales, symmetric) -> None:
    qgraph.run_pipeline(model, f"quantize{{w={spec}}}")
    acc = model.accounting()
    params, volume, qparams = _hand_count(hf, bits, scales, symmetric)
    expected_q = LAYERS * (2 * 96 * 96 + 2 * 48 * 96 + 3 * 192 * 96)
    assert qparams == expected_q
    assert acc["quantized_params"] == expected_q
    assert acc["params"] == params
    assert acc["volume_bits"] == volume
    assert acc["volume_mb"] == pytest.approx(volume / 8 / 2**20)


def test_accounting_of_unrewritten_tied_model(hf, traced) -> None:
    acc = traced.accounting()
    n_params = sum(p.numel() for p in hf.parameters())  # tied weights once
    assert acc["params"] == n_params + hf.model.rotary_emb.inv_freq.numel()
    assert acc["quantized_params"] == 0
