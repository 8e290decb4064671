"""Integer activation paths: per-token quantized layers exported as ``MatMulInteger``.

The rewrite (:func:`integer_activation_graph`) is checked in torch against the fake-quantized
graph it replaces, and the exported file in ONNX Runtime against torch; the integer kernels'
sums are exact, so the two differ only by float rounding of the scales.
"""

from __future__ import annotations

import pytest
import torch
from helpers import genai_greedy, tiny_llama, tokens, traced_copy

import qgraph
import qgraph.integer_ops  # noqa: F401  (registers torch.ops.qgraph.*_u8)
from qgraph.backends.onnx_backend import export_model, optimized_op_histogram, ort_forward
from qgraph.backends.onnx_integer import integer_activation_graph
from qgraph.kernels import quant as qk

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

VOCAB = 128
W8A8 = "fuse-norms,rotate{seed=0},quantize{w=int8:channel,a=int8:token}"
W4A4 = "fuse-norms,rotate{seed=0,online=all},quantize{w=int4:channel,a=int4:token}"
U8 = torch.ops.qgraph.qlinear_u8.default
QLINEAR = torch.ops.qgraph.qlinear.default


@pytest.fixture(scope="module")
def hf():
    """Hidden 96 and MLP 192: per-channel scales are stored as 3 identical row blocks
    (formats.storage_group), as on real models, not as one row."""
    return tiny_llama(vocab=VOCAB, hidden=96, intermediate=192, layers=2, heads=6, kv_heads=2,
                      head_dim=16, tied=False, init=0.05, random_norms=True)  # fmt: skip


def _quantized(hf, pipeline: str) -> qgraph.Model:
    model = traced_copy(hf)
    model.set_calibration(tokens(VOCAB, 4, 32, seed=1))
    return qgraph.run_pipeline(model, pipeline)


def assert_close_but_for_ties(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Float32 products summed in another order can move a value onto the other side of a
    per-token rounding midpoint; that token (and the later ones attending to it) then differ by
    one code step (test_onnx_tiny_llama finds such ties exactly). Most tokens must agree to float
    rounding and none may differ by more than a code step's effect."""
    err = (got - ref).abs().amax(-1) / ref.abs().max()
    assert float(err.max()) < 1e-2
    assert float((err < 1e-5).float().mean()) >= 0.75, err


def _count(gm: torch.fx.GraphModule, target) -> int:
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


@pytest.mark.parametrize("bits,symmetric", [(8, False), (8, True), (4, False), (3, True)])
def test_u8_codes_are_the_per_token_codes(bits, symmetric):
    x = torch.randn(3, 5, 40) * torch.linspace(0.1, 4, 40)
    x[0, 0] = 0.0  # an all-zero row
    u, scale, offset = torch.ops.qgraph.quantize_per_token_u8(x, bits, symmetric)
    codes, s_ref, z_ref = qk.encode_per_token(x, bits, symmetric)
    qmin, qmax = qk.qrange(bits)
    assert u.dtype == torch.uint8 and int(u.max()) <= qmax - qmin
    assert torch.equal(u.to(torch.int16) + qmin, codes.to(torch.int16))
    assert torch.equal(scale, s_ref) and torch.equal(offset, z_ref.float() - qmin)
    # (u - offset) * scale is the fake-quantized activation, to the bit
    assert torch.equal((u.float() - offset) * scale, qk.fake_quantize_per_token(x, bits, symmetric))


def test_u8_linear_matches_float64_math():
    gen = torch.Generator().manual_seed(0)
    u = torch.randint(0, 256, (2, 7, 48), generator=gen).to(torch.uint8)
    scale, offset = (
        torch.rand(2, 7, 1, generator=gen) + 0.1,
        torch.randint(0, 256, (2, 7, 1)).float(),
    )
    codes = torch.randint(-128, 128, (48, 20), generator=gen).to(torch.int8)
    w_scale, bias = torch.rand(1, 20, generator=gen), torch.randn(20, generator=gen)
    colsum = codes.to(torch.int32).sum(0, dtype=torch.int32)
    got = torch.ops.qgraph.qlinear_u8(u, scale, offset, codes, w_scale, colsum, bias)
    ref = ((u.double() - offset.double()) * scale.double()) @ (codes.double() * w_scale.double())
    torch.testing.assert_close(got.double(), ref + bias.double(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("pipeline", [W8A8, W4A4])
def test_rewrite_keeps_the_function_and_the_model(hf, pipeline):
    model = _quantized(hf, pipeline)
    before = model.gm.code
    rewritten, n = integer_activation_graph(model.gm)
    assert n == 14 and _count(rewritten, U8) == 14 and _count(rewritten, QLINEAR) == 0
    first = next(n for n in model.gm.graph.nodes if n.target is QLINEAR)
    assert model.gm.get_buffer(first.args[2].target).shape[0] == 3  # stored in row blocks
    assert model.gm.code == before and _count(model.gm, U8) == 0  # the model is not touched
    ids = tokens(VOCAB, 2, 24, seed=5)
    ref = model(ids)
    with torch.inference_mode():
        got = rewritten(ids)
    got = got[0] if isinstance(got, tuple) else got
    assert_close_but_for_ties(got, ref)


@pytest.mark.parametrize(
    "pipeline",
    [
        "quantize{w=int4:group32,a=int8:token}",  # a group grid needs one product per group
        "quantize{w=int8:channel:asym,a=int8:token}",  # weight zero points
        "quantize{w=int8:channel}",  # no activation quantizer
    ],
)
def test_ineligible_layers_keep_the_float_path(hf, pipeline):
    model = _quantized(hf, pipeline)
    rewritten, n = integer_activation_graph(model.gm)
    assert n == 0 and _count(rewritten, QLINEAR) == 14


@pytest.mark.parametrize("pipeline", [W8A8, W4A4])
def test_exported_integer_path_runs_in_onnx_runtime(hf, pipeline, tmp_path):
    model = _quantized(hf, pipeline)
    integer = export_model(model, tmp_path / "int.onnx", pipeline, integer_activations=True)
    floating = export_model(model, tmp_path / "float.onnx", pipeline)  # the default
    ops = optimized_op_histogram(integer)
    assert ops.get("MatMulInteger") == 14 and "com.microsoft::MatMulNBits" not in ops
    assert optimized_op_histogram(floating).get("com.microsoft::MatMulNBits") == 14
    ids = tokens(VOCAB, 2, 24, seed=6)
    ref = model(ids)
    for path in (integer, floating):
        assert_close_but_for_ties(ort_forward(path)(ids), ref)


def test_integer_decoder_generates_in_onnx_runtime_genai(hf, tmp_path):
    """The real client: a W8A8 decoder folder with integer products generates torch's tokens."""
    from qgraph.backends.onnx_decoder import export_decoder
    from qgraph.generation import decode
    from qgraph.kv_cache import cached_decoder

    model = _quantized(hf, W8A8)
    folder = export_decoder(model, tmp_path / "w8a8", W8A8, integer_activations=True)
    ops = optimized_op_histogram(folder / "model.onnx")
    assert ops.get("MatMulInteger") == 10  # q/k/v packed into one product: 5 per layer
    prompt = tokens(VOCAB, 1, 6, seed=3)
    expected = prompt[0].tolist() + decode(cached_decoder(model), prompt[0].tolist(), 8)[0]
    assert genai_greedy(folder, prompt, 8) == expected


def test_integer_path_needs_a_qgraph_graph(tmp_path):
    from qgraph.backends.onnx_export import export_onnx

    target = tmp_path / "m.onnx"
    with pytest.raises(qgraph.ExportError, match="integer_activations"):
        export_onnx(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), target, integer_activations=True)
    assert not target.exists()
