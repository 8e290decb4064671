"""fuse-norms and rotate are exact: the rewritten graph computes what the user's HF model computes.

The reference is always the ORIGINAL Hugging Face module run directly (not the traced graph), on
several inputs with different batch sizes and sequence lengths (the graph has dynamic shapes).
Norm scales are random and positive so that fusing them into the weights matters, and every
test also checks that the rewrite really changed the weights, so a no-op pass cannot pass.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    assert_exact,
    exact_llama,
    exact_opt,
    fresh_copy,
    hf_logits,
    max_rel_err,
    probe_inputs,
)

import qgraph
from qgraph.graph_edits import get_tensor

TOL = 1e-4


# ---------------------------------------------------------------------------- helpers


def rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def weight_of(model: qgraph.Model, name: str) -> torch.Tensor:
    """Current weight of the linear layer whose parameter path contains ``name``."""
    lins = [lin for lin in model.structure.linears if name in lin.weight or name in lin.name]
    assert len(lins) == 1, [lin.name for lin in model.structure.linears]
    return get_tensor(model.gm, lins[0].weight)


def weight_of_name(model: qgraph.Model, name: str):
    (lin,) = [lin for lin in model.structure.linears if name in lin.weight]
    return lin


def embedding_of(model: qgraph.Model, index: int = 0) -> torch.Tensor:
    return get_tensor(model.gm, model.structure.embeddings[index].weight)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_identical(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), f"the user's tensor {key} was modified"


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def llama_tied(llama_exact, llama_exact_traced):
    return llama_exact, llama_exact_traced


# ---------------------------------------------------------------------------- (a) GQA, tied


def test_traced_graph_matches_hf_before_rewriting(llama_tied) -> None:
    hf, model = llama_tied
    for ids in probe_inputs(128):
        assert max_rel_err(model(ids), hf_logits(hf, ids)) <= 1e-6


def test_llama_gqa_tied_fuse_norms_and_rotate_exact(llama_tied) -> None:
    hf, traced = llama_tied
    model = fresh_copy(traced)
    qgraph.run_pipeline(model, "fuse-norms", verify_each=True)
    assert_exact(hf, model, 128)
    # every norm scale was folded away (γ = 1 everywhere): no norm has a γ any more
    assert all(n.gamma is None for n in model.structure.norms)
    assert model.structure.summary()["norms"] == {"rms": 5, "layer": 0}
    # the γ really went into the readers: q_proj now holds W·diag(γ)
    gamma = hf.model.layers[0].input_layernorm.weight.detach()
    w_q = hf.model.layers[0].self_attn.q_proj.weight.detach()
    torch.testing.assert_close(weight_of(model, "layers.0.self_attn.q_proj"), w_q * gamma)

    qgraph.run_pipeline(model, "rotate{seed=0}", verify_each=True)
    assert_exact(hf, model, 128)
    assert [r.name for r in model.log] == ["fuse-norms", "rotate"]
    assert all(r.verify_max_rel_err is not None and r.verify_max_rel_err <= TOL for r in model.log)
    summary = model.log[-1].summary
    assert "Hadamard" in summary["r1"] and "96" in summary["r1"]
    assert summary["r2_heads_rotated_in_layers"] == 2


# ---------------------------------------------------------------------------- (f) not a no-op


def test_rotation_really_changes_weights(llama_tied) -> None:
    hf, traced = llama_tied
    model = fresh_copy(traced)
    qgraph.run_pipeline(model, "fuse-norms,rotate{seed=0}", verify_each=True)
    emb = embedding_of(model)
    emb_ref = hf.model.embed_tokens.weight.detach()
    assert emb.shape == emb_ref.shape
    assert rel_change(emb, emb_ref) > 0.1
    # R1 is orthogonal: every embedding row keeps its length
    torch.testing.assert_close(emb.norm(dim=1), emb_ref.norm(dim=1), rtol=1e-5, atol=1e-6)
    # the lm_head (tied in the user's model) read the rotated stream: it changed as well
    lm_head = weight_of(model, "lm_head")
    gamma_final = hf.model.norm.weight.detach()
    assert rel_change(lm_head, emb_ref * gamma_final) > 0.1
    # v_proj: R1 on its input and R2 on its output
    v = weight_of(model, "layers.1.self_attn.v_proj")
    v_fused = hf.model.layers[1].self_attn.v_proj.weight * hf.model.layers[1].input_layernorm.weight
    assert rel_change(v, v_fused.detach()) > 0.1
    assert_exact(hf, model, 128)


# ---------------------------------------------------------------------------- (b) untied


def test_llama_untied_exact() -> None:
    hf = exact_llama(tied=False, seed=3)
    assert hf.lm_head.weight is not hf.model.embed_tokens.weight
    model = qgraph.from_hf(hf)
    qgraph.run_pipeline(model, "fuse-norms,rotate{seed=5}", verify_each=True)
    assert_exact(hf, model, 128)
    assert rel_change(embedding_of(model), hf.model.embed_tokens.weight.detach()) > 0.1
    lm_head_fused = (hf.lm_head.weight * hf.model.norm.weight).detach()
    assert rel_change(weight_of(model, "lm_head"), lm_head_fused) > 0.1


# ---------------------------------------------------------------------------- (c) hidden 576


def test_llama_hidden_576_exact() -> None:
    hf = exact_llama(
        hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=256, layers=1, seed=4
    )
    model = qgraph.from_hf(hf)
    summary = model.structure.summary()
    assert summary["attention"] == {"layers": 1, "heads": 9, "kv_heads": 3, "head_dim": 64}
    qgraph.run_pipeline(model, "fuse-norms,rotate{seed=2}", verify_each=True)
    assert_exact(hf, model, 128)
    rot = model.log[-1].summary
    assert "576" in rot["r1"] and "64" in rot["r2"]
    assert rel_change(embedding_of(model), hf.model.embed_tokens.weight.detach()) > 0.1


# ---------------------------------------------------------------------------- (d) OPT


def test_opt_layernorm_to_rms_and_rotate_exact() -> None:
    hf = exact_opt(seed=0)
    model = qgraph.from_hf(hf)
    before = model.structure.summary()
    assert before["norms"] == {"rms": 0, "layer": 5}
    assert before["issues"] == []
    qgraph.run_pipeline(model, "fuse-norms", verify_each=True)
    after = model.structure.summary()
    assert after["norms"] == {"rms": 5, "layer": 0}
    assert model.log[0].summary["layernorm_to_rms"] == 5
    assert_exact(hf, model, 128)
    qgraph.run_pipeline(model, "rotate{seed=0}", verify_each=True)
    assert_exact(hf, model, 128)
    tok = hf.model.decoder.embed_tokens.weight.detach()
    assert rel_change(embedding_of(model), tok) > 0.1


def test_opt_fold_affine_only_is_exact_and_rotate_refuses_layernorm() -> None:
    hf = exact_opt(seed=1)
    model = qgraph.from_hf(hf)
    qgraph.run_pipeline(model, "fuse-norms{ln-to-rms=false}", verify_each=True)
    assert_exact(hf, model, 128)
    assert model.structure.summary()["norms"] == {"rms": 0, "layer": 5}
    assert all(n.gamma is None and n.beta is None for n in model.structure.norms)
    # γ and β went into fc1: W·diag(γ) and b + W·β
    layer = hf.model.decoder.layers[0]
    ln, fc1 = layer.final_layer_norm, layer.fc1
    torch.testing.assert_close(weight_of(model, "layers.0.fc1"), (fc1.weight * ln.weight).detach())
    fc1_bias = weight_of_name(model, "layers.0.fc1").bias
    expected_bias = (fc1.bias + fc1.weight @ ln.bias).detach()
    torch.testing.assert_close(get_tensor(model.gm, fc1_bias), expected_bias)
    # LayerNorms remain on the stream: a rotation would not be exact, so it is refused
    with pytest.raises(qgraph.StructureError, match="LayerNorm"):
        qgraph.run_pipeline(model, "rotate")
    assert_exact(hf, model, 128)
    # the per-head value/output rotation needs no RMSNorm stream; it handles v_proj's bias
    v_before = get_tensor(model.gm, weight_of_name(model, "layers.0.self_attn.v_proj").bias)
    qgraph.run_pipeline(model, "rotate{r1=false,seed=4}", verify_each=True)
    assert model.log[-1].summary["r2_heads_rotated_in_layers"] == 2
    v_after = get_tensor(model.gm, weight_of_name(model, "layers.0.self_attn.v_proj").bias)
    assert rel_change(v_after, v_before) > 0.1
    assert_exact(hf, model, 128)


# ---------------------------------------------------------------------------- (e) options


def test_rotate_kind_random_exact(llama_tied) -> None:
    hf, traced = llama_tied
    model = fresh_copy(traced)
    qgraph.run_pipeline(model, "fuse-norms,rotate{kind=random,seed=7}", verify_each=True)
    assert_exact(hf, model, 128)
    summary = model.log[-1].summary
    assert "Hadamard" not in summary["r1"] and "Hadamard" not in summary["r2"]
    emb = embedding_of(model)
    emb_ref = hf.model.embed_tokens.weight.detach()
    assert rel_change(emb, emb_ref) > 0.1
    torch.testing.assert_close(emb.norm(dim=1), emb_ref.norm(dim=1), rtol=1e-5, atol=1e-6)


def test_rotate_seeds_give_different_weights_same_function(llama_tied) -> None:
    hf, traced = llama_tied
    a, b = fresh_copy(traced), fresh_copy(traced)
    qgraph.run_pipeline(a, "fuse-norms,rotate{seed=1}")
    qgraph.run_pipeline(b, "fuse-norms,rotate{seed=2}")
    assert rel_change(embedding_of(a), embedding_of(b)) > 0.1
    ids = probe_inputs(128)[2]
    assert max_rel_err(b(ids), a(ids)) <= TOL


def test_rotate_r1_false_only_rotates_heads(llama_tied) -> None:
    hf, traced = llama_tied
    model = fresh_copy(traced)
    qgraph.run_pipeline(model, "fuse-norms,rotate{r1=false}", verify_each=True)
    assert_exact(hf, model, 128)
    summary = model.log[-1].summary
    assert "r1" not in summary and summary["r2_heads_rotated_in_layers"] == 2
    # the residual stream is not rotated: embedding and q_proj are only fused, not rotated
    assert torch.equal(embedding_of(model), hf.model.embed_tokens.weight.detach())
    attn = hf.model.layers[0].self_attn
    gamma = hf.model.layers[0].input_layernorm.weight.detach()
    torch.testing.assert_close(
        weight_of(model, "layers.0.self_attn.q_proj"), attn.q_proj.weight * gamma
    )
    # but the value/output path is: v_proj rows and o_proj columns are rotated per head
    assert (
        rel_change(weight_of(model, "layers.0.self_attn.v_proj"), attn.v_proj.weight * gamma) > 0.1
    )
    assert (
        rel_change(weight_of(model, "layers.0.self_attn.o_proj"), attn.o_proj.weight.detach()) > 0.1
    )


def test_rotate_r2_false_only_rotates_stream(llama_tied) -> None:
    hf, traced = llama_tied
    model = fresh_copy(traced)
    qgraph.run_pipeline(model, "fuse-norms,rotate{r2=false,seed=3}", verify_each=True)
    assert_exact(hf, model, 128)
    summary = model.log[-1].summary
    assert "r1" in summary and "r2" not in summary and "r2_heads_rotated_in_layers" not in summary
    assert rel_change(embedding_of(model), hf.model.embed_tokens.weight.detach()) > 0.1
    # without R2, o_proj is only rotated on its output side (Qᵀ W_o): its column norms stay
    w_o = weight_of(model, "layers.0.self_attn.o_proj")
    w_o_ref = hf.model.layers[0].self_attn.o_proj.weight.detach()
    assert rel_change(w_o, w_o_ref) > 0.1
    torch.testing.assert_close(w_o.norm(dim=0), w_o_ref.norm(dim=0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- (g) user model


def test_user_model_is_never_modified() -> None:
    hf = exact_llama(tied=True, seed=8)
    before = snapshot(hf)
    ids = probe_inputs(128)[2]
    ref = hf_logits(hf, ids)
    model = qgraph.from_hf(hf)
    qgraph.run_pipeline(
        model, "fuse-norms,rotate{seed=0},quantize{w=int4:channel,a=int8:token}", verify_each=True
    )
    model(ids)
    assert_state_identical(hf, before)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight  # still tied
    assert torch.equal(hf_logits(hf, ids), ref)


def test_user_untied_model_is_never_modified_by_exact_passes() -> None:
    hf = exact_llama(tied=False, seed=9)
    before = snapshot(hf)
    model = qgraph.from_hf(hf)
    qgraph.run_pipeline(model, "fuse-norms,rotate{kind=random}")
    assert_state_identical(hf, before)


def test_user_model_train_mode_is_restored() -> None:
    hf = exact_llama(tied=True, seed=10, layers=1)
    hf.train()
    qgraph.from_hf(hf)
    assert hf.training
    assert all(m.training for m in hf.modules())


# ---------------------------------------------------------------------------- (h) γ matters


def test_random_norm_scales_matter(llama_tied) -> None:
    """The reference depends on γ: dropping the norm scales changes the logits materially."""
    hf, traced = llama_tied
    gammas = [p.detach() for n, p in hf.named_parameters() if "norm" in n]
    assert all(float((g - 1).abs().max()) > 0.3 for g in gammas)
    assert all(float(g.min()) > 0 for g in gammas)
    plain = copy.deepcopy(hf)
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
    ids = probe_inputs(128)[2]
    assert max_rel_err(hf_logits(plain, ids), hf_logits(hf, ids)) > 0.05
