"""Online rotations (rotate{online=...}) and the expand pass are exact, and later passes see them.

References: the original Hugging Face module (exactness), hand-computed widths and parameter
counts, and the Hessian the gptq pass actually receives (captured by wrapping the kernel).
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_exact,
    exact_llama,
    hf_logits,
    max_rel_err,
    probe_inputs,
    raises_naming,
    tokens,
    traced_copy,
)

import qgraph
from qgraph.errors import PipelineError, StructureError
from qgraph.graph_edits import get_tensor
from qgraph.pass_manager import check_order
from qgraph.passes import gptq as gptq_pass
from qgraph.structure import gqa_source

HADAMARD = torch.ops.qgraph.hadamard.default
PAD = torch.ops.aten.constant_pad_nd.default


def count(model: qgraph.Model, target) -> int:
    return sum(1 for n in model.gm.graph.nodes if n.op == "call_function" and n.target is target)


def prepared(hf, pipeline: str, calib: torch.Tensor | None = None) -> qgraph.Model:
    model = traced_copy(hf)
    if calib is not None:
        model.set_calibration(calib)
    qgraph.run_pipeline(model, pipeline, verify_each=True)
    return model


def layer(model: qgraph.Model, name: str):
    (lin,) = [lin for lin in model.structure.linears if lin.name.endswith(name)]
    return lin


def test_online_rotations_are_exact_and_in_the_graph(llama_exact):
    hf = llama_exact
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    plain = prepared(hf, "fuse-norms,rotate")
    model = prepared(hf, "fuse-norms,rotate{online=all}")
    assert_exact(hf, model, 128)
    # 2 layers × (o_proj + down_proj + q + k)
    assert count(model, HADAMARD) == 8
    summary = model.log[-1].summary
    assert summary["r2_online_layers"] == 2 and summary["r4_layers"] == 2
    assert summary["r3_attention_layers"] == 2
    # R4's random signs live in up_proj's rows (sign-free online Hadamards fold in the export);
    # o_proj's stay online
    assert summary["r4_signs_moved_upstream"] == 2
    signs = {
        n.args[0].name: get_tensor(model.gm, n.args[1].target)
        for n in model.gm.graph.nodes
        if n.target is HADAMARD and n.args[1] is not None and n.args[1].op == "get_attr"
    }
    down_signs = [v for v in signs.values() if v.numel() == 192]  # intermediate 192 (2 layers)
    assert len(down_signs) == 2 and all(bool((v == 1).all()) for v in down_signs)
    up = get_tensor(model.gm, layer(model, "layers.0.mlp.up_proj").weight)
    up_plain = get_tensor(plain.gm, layer(plain, "layers.0.mlp.up_proj").weight)
    flipped = (up == -up_plain).all(1)
    assert (
        torch.equal(up[~flipped], up_plain[~flipped]) and 0.3 < float(flipped.float().mean()) < 0.7
    )
    # the online rotation really moved into the weights: W_down differs from the offline-only one
    down_plain = get_tensor(plain.gm, layer(plain, "layers.0.mlp.down_proj").weight)
    lin = layer(model, "layers.0.mlp.down_proj")
    assert lin.role == "mlp_out" and layer(model, "layers.0.self_attn.o_proj").role == "attn_o"
    down = get_tensor(model.gm, lin.weight)
    assert (down - down_plain).norm() > 0.5 * down_plain.norm()
    for key, value in before.items():
        assert torch.equal(hf.state_dict()[key], value), key


def test_online_r3_alone_changes_only_queries_and_keys(llama_exact):
    hf = llama_exact
    model = prepared(hf, "fuse-norms,rotate{online=r3}")
    assert_exact(hf, model, 128)
    sdpa = [
        n
        for n in model.gm.graph.nodes
        if n.target is torch.ops.aten.scaled_dot_product_attention.default
    ]
    assert len(sdpa) == 2
    for node in sdpa:
        assert node.args[0].target is HADAMARD  # queries: right before attention
        key, chain = gqa_source(node.args[1])  # keys: before their GQA repeat (cacheable)
        assert chain and key.target is HADAMARD
        assert gqa_source(node.args[2])[0].target is not HADAMARD


def test_online_width_without_hadamard_order_is_padded_and_says_so():
    hf = exact_llama(intermediate=90)  # 90: no order
    model = prepared(hf, "fuse-norms,rotate{online=r4}")
    assert_exact(hf, model, 128)
    assert "90 → 96" in model.log[-1].summary["online_padded"]
    assert count(model, PAD) == 2
    assert get_tensor(model.gm, layer(model, "layers.0.mlp.down_proj").weight).shape == (96, 96)


def test_bad_online_option_is_refused():
    with raises_naming(PipelineError, "r5", "r2"):
        qgraph.parse_pipeline("rotate{online=r5}")


def test_expand_steps_are_exact_with_expected_widths(llama_exact):
    hf = llama_exact
    # Hadamard-friendly multiples of 32 above 96: 128, 160, 192, ...; above 192: 224, 256, 288, ...
    for step, o_width, down_width in ((1, 128, 224), (3, 192, 288), (5, 256, 352)):
        model = prepared(hf, f"fuse-norms,rotate{{online=all}},expand{{step={step}}}")
        assert_exact(hf, model, 128)
        summary = model.log[-1].summary
        assert summary["widths"]["model.layers.1.self_attn.o_proj"] == f"96→{o_width}"
        assert summary["widths"]["model.layers.1.mlp.down_proj"] == f"192→{down_width}"
        # new weight columns, plus the longer ±1 sign vectors of the wider rotations
        added = 2 * 96 * (o_width - 96) + 2 * 96 * (down_width - 192)
        added += 2 * (o_width - 96) + 2 * (down_width - 192)
        assert summary["params_added"] == added
        w = get_tensor(model.gm, layer(model, "layers.1.mlp.down_proj").weight)
        assert w.shape == (96, down_width)
        assert model.log[-1].verify_max_rel_err <= 1e-4


def test_expand_budget_and_progressive_stay_within_budget_and_exact(llama_exact):
    hf = llama_exact
    calib = tokens(128, 4, 32, seed=3)
    for opts in ("budget=10", "budget=10,mode=progressive"):
        model = prepared(hf, f"fuse-norms,rotate{{online=r2+r4}},expand{{{opts}}}", calib)
        assert_exact(hf, model, 128)
        summary = model.log[-1].summary
        assert 0 < summary["params_added"] <= 0.10 * summary["params_before"]
        assert summary["layers_expanded"] >= 1


def test_expand_refuses_layers_without_online_rotation(llama_exact):
    hf = llama_exact
    model = prepared(hf, "fuse-norms,rotate")
    with raises_naming(StructureError, "no layer with an online rotation", "online="):
        qgraph.run_pipeline(model, "expand")
    model = prepared(hf, "fuse-norms,rotate{online=r4}")
    with raises_naming(StructureError, "o_proj", "no online rotation"):
        qgraph.run_pipeline(model, "expand{layers=o_proj}")


def test_expand_after_quantize_is_refused():
    passes = qgraph.parse_pipeline("fuse-norms,rotate{online=r4},quantize{w=int4:channel},expand")
    with pytest.raises(PipelineError, match="expand"):
        check_order(passes, set())


def test_gptq_sees_the_expanded_rotated_input(llama_exact, monkeypatch):
    """The Hessian gptq receives for an expanded layer is M×M with rank N: the layer's input as
    it sees it (padded, then rotated), not the original one."""
    hf = llama_exact
    calib = tokens(128, 8, 32, seed=4)
    seen = []
    real = gptq_pass.gptq_quantize

    def spy(w, h, *args, **kw):
        seen.append((w.shape[1], int(torch.linalg.matrix_rank(h, rtol=1e-6))))
        return real(w, h, *args, **kw)

    monkeypatch.setattr(gptq_pass, "gptq_quantize", spy)
    model = prepared(
        hf, "fuse-norms,rotate{online=all},expand{step=3},quantize{w=int4:channel},gptq", calib
    )
    widths = sorted({width for width, _ in seen})
    assert 288 in widths and 192 in widths  # expanded down_proj (192→288), o_proj (96→192)
    assert all(rank <= 192 for width, rank in seen if width == 288)
    assert all(rank <= 96 for width, rank in seen if width == 192)
    ids = probe_inputs(128)[2]
    assert max_rel_err(model(ids), hf_logits(hf, ids)) < 0.5


def test_sign_free_r4_exports_as_static_matrices(llama_exact, tmp_path):
    """With R4's signs in up_proj, the 192-point online Hadamard (Kronecker 12 × 16) folds into
    static matrices in the ONNX file: no Mul by signs, no Shape; ONNX Runtime computes the
    same logits as torch."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from qgraph.backends.onnx_backend import export_model

    model = prepared(llama_exact, "fuse-norms,rotate{online=r4}")
    path = export_model(model, tmp_path / "r4.onnx")
    proto = onnx.load(str(path))
    rotations = [n.op_type for n in proto.graph.node if n.domain == "qgraph"]
    assert len(rotations) == 2 and all(t.startswith("Hadamard192_folded_rank") for t in rotations)
    body = {n.op_type for f in proto.functions for n in f.node}
    assert "Mul" not in body and "Shape" not in body, body
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * float(np.abs(want).max()))
