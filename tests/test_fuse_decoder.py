"""Fused decoder ops: the fused graph equals the traced one, each op equals independent math,
and the exported file (opset-23 RMSNormalization / RotaryEmbedding / Attention and ONNX
Runtime's SkipSimplifiedLayerNormalization) decodes like the torch graph in ONNX Runtime."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import calibrated, fresh_copy, tiny_llama

import qgraph
from qgraph.backends.onnx_decoder import export_decoder
from qgraph.backends.ort_runtime import OrtModel
from qgraph.fuse_decoder import fuse_decoder
from qgraph.fused_ops import (
    add_rms_norm,
    cached_attention,
    group_query_attention,
    rms_norm,
    rotary,
)
from qgraph.kv_cache import cached_decoder

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = {
    "float": "fuse-norms",
    "w4a16": "quantize{w=int4:channel}",  # norms keep their weights: the fused op takes them
    "w4a4-r1r4-kv8": (
        "fuse-norms,rotate{seed=0,online=all},quantize{w=int4:channel,a=int4:token,kv=int8}"
    ),
}


@pytest.fixture(scope="module")
def float_model() -> qgraph.Model:
    return calibrated(tiny_llama(random_norms=True), windows=2, length=16)


def _inputs(layout, seed: int = 0, batch: int = 2, padded: bool = True):
    """3 new tokens after 4 cached ones; row 1 left-padded by one token if ``padded``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, 3), generator=gen)
    mask = torch.ones(batch, 7, dtype=torch.long)
    if padded:
        mask[1, 0] = 0
    past = [
        torch.randn(batch, layout.kv_heads, 4, layout.head_dim, generator=gen)
        for _ in layout.names()
    ]
    return ids, mask, past


@pytest.mark.parametrize("attention", ["standard", "gqa"])
@pytest.mark.parametrize("recipe", RECIPES)
@torch.no_grad()
def test_fused_graph_equals_the_traced_one_bit_for_bit(float_model, recipe, attention):
    model = qgraph.run_pipeline(fresh_copy(float_model), RECIPES[recipe])
    decoder = cached_decoder(model, quantized_cache=False)
    fused = copy.deepcopy(decoder.gm)
    # GroupQueryAttention also takes over RoPE where nothing (R3) sits between them
    counts = fuse_decoder(fused, attention=attention, rope_positions=32, pack_qkv=True)
    layers = decoder.layout.layers
    r3 = "online=all" in RECIPES[recipe]
    assert counts.rotary_in_attention == (layers if attention == "gqa" and not r3 else 0)
    # and one packed q/k/v projection, where all three are quantized layers straight into it
    packs = attention == "gqa" and recipe == "w4a16"
    assert counts.packed_qkv == (layers if packs else 0)
    # 2 norms per layer + the final one; all but the first follow a residual add
    assert counts.norms + counts.residual_norms == 2 * layers + 1
    assert counts.residual_norms == 2 * layers
    assert counts.rotaries == 2 * layers  # queries and keys
    assert counts.attentions == counts.flat == layers
    assert counts.group_query == (layers if attention == "gqa" else 0)
    assert counts.skipped == []
    targets = {n.target for n in fused.graph.nodes if n.op == "call_function"}
    aten = torch.ops.aten
    assert aten.scaled_dot_product_attention.default not in targets
    assert aten.rsqrt.default not in targets and aten.transpose.int not in targets
    # GroupQueryAttention: right padding only, and a chunk after a cache in batch 1 only
    gqa = attention == "gqa"
    ids, mask, past = _inputs(decoder.layout, batch=1 if gqa else 2, padded=not gqa)
    want, got = decoder.gm(ids, mask, *past), fused(ids, mask, *past)
    assert len(want) == len(got) == 1 + len(past)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("attention", ["standard", "gqa"])
@torch.no_grad()
def test_r3_without_a_key_quantizer_is_cancelled_exactly(float_model, attention):
    """R3 turns queries and keys by the same orthogonal matrix; with nothing quantizing them it
    cancels in ``qkᵀ``: the fused graph drops it, its logits equal the traced graph's to float
    rounding, and its cache holds the unrotated keys (the traced one's rotated back)."""
    model = qgraph.run_pipeline(
        fresh_copy(float_model), "fuse-norms,rotate{seed=0,online=all},quantize{w=int4:channel}"
    )
    decoder = cached_decoder(model)
    fused = copy.deepcopy(decoder.gm)
    counts = fuse_decoder(fused, attention=attention)
    layers = decoder.layout.layers
    assert counts.r3_cancelled == layers
    hadamards = [n for n in fused.graph.nodes if n.target is torch.ops.qgraph.hadamard.default]
    assert len(hadamards) == 2 * layers  # R2's online half and R4 remain
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(4))
    empty = decoder.layout.empty(1)  # each graph caches keys in its own basis
    want = decoder.gm(ids[:, :5], torch.ones(1, 5, dtype=torch.long), *empty)
    got = fused(ids[:, :5], torch.ones(1, 5, dtype=torch.long), *empty)
    want = decoder.gm(ids[:, 5:], torch.ones(1, 7, dtype=torch.long), *want[1:])
    got = fused(ids[:, 5:], torch.ones(1, 7, dtype=torch.long), *got[1:])
    scale = float(want[0].abs().max())
    assert float((got[0] - want[0]).abs().max()) < 1e-5 * scale
    assert float((got[0] - want[0]).abs().max()) > 0  # a different, equivalent computation
    signs = next(n for n in decoder.gm.graph.nodes if n.target is torch.ops.qgraph.hadamard.default)
    r3 = signs.args[1]
    r3 = getattr(decoder.gm, r3.target) if r3 is not None else None
    # the traced cache's keys, rotated back by R3ᵀ, are the fused cache's keys
    back = torch.ops.qgraph.hadamard(want[1], r3, True, True)
    torch.testing.assert_close(got[1], back, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_unmatched_rotary_is_left_alone_and_reported(float_model):
    """A RoPE table whose halves differ is not the convention ONNX's RotaryEmbedding
    computes: the fuser must keep the traced ops (and still fuse the rest)."""
    decoder = cached_decoder(fresh_copy(float_model), quantized_cache=False)
    gm = decoder.gm
    cat = next(
        n
        for n in gm.graph.nodes
        if n.target is torch.ops.aten.cat.default and n.args[0][0] is n.args[0][1]
    )
    with gm.graph.inserting_before(cat):
        doubled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (cat.args[0][1], 2.0))
    cat.args = ([cat.args[0][0], doubled], *cat.args[1:])
    gm.recompile()
    fused = copy.deepcopy(gm)
    counts = fuse_decoder(fused)
    assert counts.rotaries == 0 and len(counts.skipped) >= 4
    assert all("two equal halves" in s or "heads kept first" in s for s in counts.skipped)
    assert counts.attentions == decoder.layout.layers
    ids, mask, past = _inputs(decoder.layout)
    for a, b in zip(gm(ids, mask, *past), fused(ids, mask, *past), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ the ops vs float64 math


def test_rms_norm_ops_match_float64_math():
    gen = torch.Generator().manual_seed(0)
    x, r = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    w = torch.rand(8, generator=gen) + 0.5
    xd, rd, wd = x.double().numpy(), r.double().numpy(), w.double().numpy()

    def ref(v):
        return wd * v / np.sqrt((v**2).mean(-1, keepdims=True) + 1e-5)

    np.testing.assert_allclose(rms_norm(x, w, 1e-5).numpy(), ref(xd), rtol=1e-6, atol=1e-6)
    normed, total = add_rms_norm(x, r, w, 1e-5)
    np.testing.assert_allclose(total.numpy(), xd + rd, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(normed.numpy(), ref(xd + rd), rtol=1e-6, atol=1e-6)


def test_rotary_rotates_pairs_by_position_angles_in_both_layouts():
    """Pair (i, i + D/2) of head h at position p turns by p·θᵢ: a complex multiplication."""
    b, h, s, d = 2, 3, 5, 8
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, h, s, d, generator=gen)
    theta = torch.rand(d // 2, generator=gen, dtype=torch.float64)
    angles = torch.arange(s, dtype=torch.float64)[:, None] * theta  # [S, D/2]
    cos = angles.cos().float().expand(b, s, d // 2)
    sin = angles.sin().float().expand(b, s, d // 2)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double()) * torch.polar(
        torch.ones_like(angles), angles
    )
    want = torch.cat([z.real, z.imag], dim=-1)
    got = rotary(x, cos, sin)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    flat = x.transpose(1, 2).reshape(b, s, h * d)  # the projection's own layout
    got_flat = rotary(flat, cos, sin, h)
    assert torch.equal(got_flat, got.transpose(1, 2).reshape(b, s, h * d))


def test_cached_attention_matches_float64_softmax_attention():
    b, heads, kv, s, past, d = 2, 4, 2, 3, 5, 8
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(b, heads, s, d, generator=gen)
    k, v = torch.randn(b, kv, s, d, generator=gen), torch.randn(b, kv, s, d, generator=gen)
    pk, pv = torch.randn(b, kv, past, d, generator=gen), torch.randn(b, kv, past, d, generator=gen)
    mask = torch.rand(b, 1, s, past + s, generator=gen) > 0.3
    mask[..., -1] = True  # every query sees at least one key
    out, present_k, present_v = cached_attention(q, k, v, pk, pv, mask, 0.3)
    keys = torch.cat([pk, k], 2).double().repeat_interleave(heads // kv, 1)
    values = torch.cat([pv, v], 2).double().repeat_interleave(heads // kv, 1)
    scores = (q.double() @ keys.transpose(-1, -2)) * 0.3
    weights = scores.masked_fill(~mask, -math.inf).softmax(-1)
    torch.testing.assert_close(out.double(), weights @ values, rtol=1e-5, atol=1e-6)
    assert torch.equal(present_k, torch.cat([pk, k], 2))
    assert torch.equal(present_v, torch.cat([pv, v], 2))
    flat = [t.transpose(1, 2).reshape(b, s, -1) for t in (q, k, v)]
    out_flat, pk2, _ = cached_attention(*flat, pk, pv, mask, 0.3, heads, kv)
    assert torch.equal(out_flat, out.transpose(1, 2).reshape(b, s, -1))
    assert torch.equal(pk2, present_k)


def _gqa_node_session(heads: int, kv: int, d: int, scale: float):
    """One ``com.microsoft::GroupQueryAttention`` node in ONNX Runtime."""
    from onnx import TensorProto
    from onnx import helper as oh

    f = TensorProto.FLOAT
    inputs = [oh.make_tensor_value_info(n, f, ["b", "s", w]) for n, w in (("q", heads * d),)]
    inputs += [oh.make_tensor_value_info(n, f, ["b", "s", kv * d]) for n in ("k", "v")]
    inputs += [oh.make_tensor_value_info(n, f, ["b", kv, "p", d]) for n in ("pk", "pv")]
    inputs += [oh.make_tensor_value_info("seqlens", TensorProto.INT32, ["b"])]
    inputs += [oh.make_tensor_value_info("total", TensorProto.INT32, [])]
    outputs = [oh.make_tensor_value_info(n, f, None) for n in ("out", "present_k", "present_v")]
    node = oh.make_node(
        "GroupQueryAttention", [i.name for i in inputs], [o.name for o in outputs],
        domain="com.microsoft", num_heads=heads, kv_num_heads=kv, scale=scale,
    )  # fmt: skip
    graph = oh.make_graph([node], "gqa", inputs, outputs)
    opsets = [oh.make_opsetid("", 21), oh.make_opsetid("com.microsoft", 1)]
    model = oh.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_group_query_attention_matches_float64_math_and_onnx_runtime_in_a_shared_buffer():
    """Two rows of 6 and 3 real tokens (right padding) decode one token each into 10-entry cache
    buffers: float64 attention over each row's own keys, and ONNX Runtime writing the same
    buffer in place (bound as past and present) gives the same output and cache."""
    b, heads, kv, d, buffer, scale = 2, 4, 2, 8, 10, 0.3
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(b, 1, heads * d, generator=gen)
    k, v = torch.randn(b, 1, kv * d, generator=gen), torch.randn(b, 1, kv * d, generator=gen)
    pk = torch.randn(b, kv, buffer, d, generator=gen)
    pv = torch.randn(b, kv, buffer, d, generator=gen)
    real = [6, 3]
    seqlens, total = torch.tensor([r - 1 for r in real], dtype=torch.int32), torch.tensor(6)
    out, present_k, present_v = group_query_attention(
        q, k, v, pk, pv, seqlens, total.int(), scale, heads, kv
    )
    assert present_k.shape == pk.shape  # the buffer is longer than total: written in place
    packed = group_query_attention(
        torch.cat([q, k, v], -1), None, None, pk, pv, seqlens, total.int(), scale, heads, kv
    )
    for a, b_ in zip(packed, (out, present_k, present_v), strict=True):
        assert torch.equal(a, b_)  # the packed q/k/v input is the same computation
    for row, n in enumerate(real):
        keys = torch.cat([pk[row, :, : n - 1], k[row].view(1, kv, d).transpose(0, 1)], 1)
        values = torch.cat([pv[row, :, : n - 1], v[row].view(1, kv, d).transpose(0, 1)], 1)
        assert torch.equal(present_k[row, :, :n], keys)
        assert torch.equal(present_v[row, :, :n], values)
        weights = (
            q[row].view(1, heads, d).transpose(0, 1).double()
            @ keys.double().repeat_interleave(heads // kv, 0).transpose(-1, -2)
            * scale
        ).softmax(-1)
        want = weights @ values.double().repeat_interleave(heads // kv, 0)  # [heads, 1, d]
        torch.testing.assert_close(out[row].double(), want.reshape(1, -1), rtol=1e-5, atol=1e-6)
    session = _gqa_node_session(heads, kv, d, scale)
    buffers = [ort.OrtValue.ortvalue_from_numpy(t.numpy().copy()) for t in (pk, pv)]
    binding = session.io_binding()
    for name, t in (("q", q), ("k", k), ("v", v), ("seqlens", seqlens)):
        binding.bind_cpu_input(name, t.numpy())
    binding.bind_cpu_input("total", np.array(6, np.int32))
    binding.bind_ortvalue_input("pk", buffers[0])
    binding.bind_ortvalue_input("pv", buffers[1])
    binding.bind_output("out")
    binding.bind_ortvalue_output("present_k", buffers[0])
    binding.bind_ortvalue_output("present_v", buffers[1])
    session.run_with_iobinding(binding)
    np.testing.assert_allclose(binding.copy_outputs_to_cpu()[0], out.numpy(), atol=1e-6)
    for row, n in enumerate(real):  # written in place, up to each row's length
        np.testing.assert_array_equal(buffers[0].numpy()[row, :, :n], present_k[row, :, :n])
        np.testing.assert_array_equal(buffers[1].numpy()[row, :, :n], present_v[row, :, :n])


# ------------------------------------------------------------------------- ONNX Runtime


def _ort_outputs(folder, layout, ids, mask, past) -> list[np.ndarray]:
    """All outputs of the folder's ``model.onnx`` in ONNX Runtime (exact MatMulNBits)."""
    runner = OrtModel(folder / "model.onnx", threads=1, matmulnbits_accuracy_level=0)
    feeds = {"input_ids": ids, "attention_mask": mask}
    feeds.update(zip(layout.names(), past, strict=True))
    return runner.run(*feeds.values())


@pytest.mark.parametrize(
    ("recipe", "attention"),
    [("float", "standard"), ("float", "gqa"), ("w4a4-r1r4-kv8", "gqa")],
)
@torch.no_grad()
def test_fused_export_runs_in_onnx_runtime_like_torch(float_model, recipe, attention, tmp_path):
    model = qgraph.run_pipeline(fresh_copy(float_model), RECIPES[recipe])
    folder = export_decoder(model, tmp_path / "fused", attention=attention)
    proto = onnx.load(str(folder / "model.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    gqa = attention == "gqa"
    assert "RMSNormalization" in ops
    assert ("GroupQueryAttention" if gqa else "Attention") in ops
    # RoPE runs inside GroupQueryAttention unless R3 (before a key quantizer) comes between
    assert ("RotaryEmbedding" in ops) == (not gqa or recipe != "float")
    # GroupQueryAttention masks by sequence lengths: the boolean mask's ops are gone
    assert not ops & ({"Attention", "And"} if gqa else {"GroupQueryAttention"})
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is gqa
    assert "SkipSimplifiedLayerNormalization" in ops
    for node in proto.graph.node:  # the unread statistics are not requested (ORT skips them)
        if node.op_type == "SkipSimplifiedLayerNormalization":
            assert list(node.output[1:3]) == ["", ""] and node.output[3]
    assert not ops & {"Softmax", "Transpose", "ReduceMean", "Sqrt"}
    assert {o.domain: o.version for o in proto.opset_import}[""] == 23
    decoder = cached_decoder(model, quantized_cache=False)
    fused_ops = json.loads({p.key: p.value for p in proto.metadata_props}["qgraph.fused_ops"])
    assert fused_ops["attention"] == decoder.layout.layers and fused_ops["skipped"] == []
    rotations = [n.op_type for n in proto.graph.node if n.domain == "qgraph"]
    if recipe != "float":  # R2-online, R3 (q and k) and R4 per layer
        assert len(rotations) == 4 * decoder.layout.layers
        folded = [t for t in rotations if t == f"Hadamard{decoder.layout.head_dim}_folded"]
        assert len(folded) == 2 * decoder.layout.layers, rotations  # R3: signs in the matrix
    ids, mask, past = _inputs(decoder.layout, batch=1 if gqa else 2, padded=not gqa)
    want = decoder.gm(ids, mask, *past)
    got = _ort_outputs(folder, decoder.layout, ids, mask, past)
    scale = float(want[0].abs().max())
    if recipe == "float":
        for a, b in zip(want, got, strict=True):
            np.testing.assert_allclose(b, a.numpy(), rtol=0, atol=2e-5 * max(scale, 1.0))
    else:  # per-token 4-bit codes: a rounding tie may flip one code; most logits agree
        close = np.isclose(got[0], want[0].numpy(), rtol=0, atol=1e-4 * scale)
        assert close.mean() > 0.9
    unfused = export_decoder(model, tmp_path / "plain", fused=False)
    plain_out = _ort_outputs(unfused, decoder.layout, ids, mask, past)
    plain_nodes = len(onnx.load(str(unfused / "model.onnx")).graph.node)
    assert plain_nodes > len(proto.graph.node) + 30 * decoder.layout.layers
    np.testing.assert_allclose(got[1], plain_out[1], rtol=0, atol=1e-5)  # the cache itself


@torch.no_grad()
def test_packed_qkv_export_runs_in_onnx_runtime_like_torch(float_model, tmp_path):
    """``pack_qkv``: one quantized q/k/v layer per attention, fed to GroupQueryAttention as its
    packed query; ONNX Runtime decodes like the torch decoder."""
    from qgraph.backends.ort_runtime import optimized_op_histogram

    model = qgraph.run_pipeline(fresh_copy(float_model), RECIPES["w4a16"])
    folder = export_decoder(model, tmp_path / "packed", pack_qkv=True)
    proto = onnx.load(str(folder / "model.onnx"))
    fused_ops = json.loads({p.key: p.value for p in proto.metadata_props}["qgraph.fused_ops"])
    decoder = cached_decoder(model, quantized_cache=False)
    layers = decoder.layout.layers
    assert fused_ops["packed_qkv"] == layers
    hist = optimized_op_histogram(folder / "model.onnx")
    assert hist.get("com.microsoft::MatMulNBits") == 5 * layers  # qkv, o, gate, up, down
    ids, mask, past = _inputs(decoder.layout, batch=1, padded=False)
    want = decoder.gm(ids, mask, *past)
    got = _ort_outputs(folder, decoder.layout, ids, mask, past)
    scale = float(want[0].abs().max())
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b, a.numpy(), rtol=0, atol=1e-4 * max(scale, 1.0))
