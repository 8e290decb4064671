"""Cached decoding: the rewritten graph with a key/value cache equals the full forward."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import calibrated, fresh_copy, genai_greedy, tiny_llama, tokens

import qgraph
from qgraph.errors import StructureError
from qgraph.generation import decode
from qgraph.kv_cache import cached_decoder
from qgraph.structure import SDPA, gqa_source

pytestmark = pytest.mark.usefixtures("one_thread")

W4A4_ALL = (
    "fuse-norms,rotate{seed=0,online=all},expand{step=1},quantize{w=int4:channel,a=int4:token},gptq"
)


@pytest.fixture(scope="module")
def hf() -> torch.nn.Module:
    return tiny_llama(random_norms=True)


@pytest.fixture(scope="module")
def float_model(hf) -> qgraph.Model:
    return calibrated(hf, windows=4, length=32)


@pytest.fixture(scope="module")
def w4a4(float_model) -> qgraph.Model:
    return qgraph.run_pipeline(fresh_copy(float_model), W4A4_ALL)


@torch.no_grad()
def _incremental_errors(
    model: qgraph.Model, ids: torch.Tensor, prefill: int, quantized_cache: bool | None = None
) -> float:
    """Max |Δlogit| between a prefill then one-token steps through the cache, and one full pass."""
    decoder = cached_decoder(model, quantized_cache)
    full = model(ids)
    batch = ids.shape[0]
    past = decoder.layout.empty(batch)
    logits, past = decoder(ids[:, :prefill], torch.ones(batch, prefill, dtype=torch.long), past)
    worst = float((logits - full[:, :prefill]).abs().max())
    for t in range(prefill, ids.shape[1]):
        mask = torch.ones(batch, t + 1, dtype=torch.long)
        logits, past = decoder(ids[:, t : t + 1], mask, past)
        worst = max(worst, float((logits[:, 0] - full[:, t]).abs().max()))
    assert past[0].shape == (batch, decoder.layout.kv_heads, ids.shape[1], decoder.layout.head_dim)
    assert past[0].dtype == (torch.int8 if decoder.layout.quantized else torch.float32)
    return worst / float(full.abs().max())


def test_float_cache_matches_full_forward_and_hf_greedy(hf, float_model):
    ids = tokens(256, 2, 14, seed=3)
    assert _incremental_errors(float_model, ids, prefill=5) < 1e-5
    decoder = cached_decoder(float_model)
    prompt = ids[:1, :6]
    ours = decode(decoder, prompt[0].tolist(), 10)[0]
    ref = hf.generate(
        prompt, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(prompt)
    )
    assert ref[0].tolist() == prompt[0].tolist() + ours
    assert decoder.layout.layers == 2 and decoder.layout.kv_heads == 2
    assert decoder.layout.names()[:2] == ["past_key_values.0.key", "past_key_values.0.value"]


def test_rewritten_model_cache_matches_its_full_forward(w4a4):
    """Online R2/R3/R4, expansion, W4A4 and GPTQ all survive: keys are cached after R3."""
    ids = tokens(256, 2, 12, seed=4)
    assert _incremental_errors(w4a4, ids, prefill=4) < 1e-5


def test_r3_rotates_keys_before_the_gqa_repeat(w4a4):
    hadamard = torch.ops.qgraph.hadamard.default
    for sdpa in (n for n in w4a4.gm.graph.nodes if n.target is SDPA):
        q, k = sdpa.args[0], sdpa.args[1]
        assert q.target is hadamard  # queries: right before attention
        while k.target is not hadamard:  # keys: behind the repeat, on kv_heads heads only
            k = k.args[0]
        assert k.meta["val"].shape[1] == 2


def test_masked_cache_entries_are_ignored(float_model):
    """A cached token marked 0 in attention_mask has no effect on later tokens."""
    decoder = cached_decoder(float_model)
    ids = tokens(256, 1, 6, seed=5)
    past = decoder.layout.empty(1)
    _, past = decoder(ids, torch.ones(1, 6, dtype=torch.long), past)
    nxt = tokens(256, 1, 1, seed=6)
    mask = torch.ones(1, 7, dtype=torch.long)
    base, _ = decoder(nxt, mask, past)
    mask[0, 2] = 0
    masked, _ = decoder(nxt, mask, past)
    assert float((masked - base).abs().max()) > 1e-4
    poisoned = [p.clone() for p in past]
    for p in poisoned:
        p[:, :, 2] = 1e3  # the masked entry's contents no longer matter
    again, _ = decoder(nxt, mask, poisoned)
    assert torch.allclose(again, masked, atol=1e-6)


@torch.no_grad()
def test_left_padded_batch_rows_decode_as_they_do_alone(float_model):
    """A short prompt left-padded next to a long one gives, at its real tokens, the logits it gives
    alone: positions are ``P + arange(S)`` for every row, so a padded row's tokens sit 3 places
    later than alone, and RoPE sees only position differences. Padding queries, which see no
    key at all, must not produce NaN that reaches real rows."""
    decoder = cached_decoder(float_model)
    long, short = tokens(256, 1, 7, seed=8), tokens(256, 1, 4, seed=9)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    batch_logits, past = decoder(ids, mask, decoder.layout.empty(2))
    alone_logits, alone_past = decoder(
        short, torch.ones(1, 4, dtype=torch.long), decoder.layout.empty(1)
    )
    assert torch.isfinite(batch_logits).all()
    scale = float(alone_logits.abs().max())
    worst = float((batch_logits[1, 3:] - alone_logits[0]).abs().max())
    for step in range(4):
        nxt = alone_logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        batch_logits, past = decoder(torch.cat([nxt, nxt]), mask, past)
        alone_logits, alone_past = decoder(
            nxt, torch.ones(1, 5 + step, dtype=torch.long), alone_past
        )
        worst = max(worst, float((batch_logits[1] - alone_logits[0]).abs().max()))
    assert worst / scale < 1e-5


def test_bad_cache_and_mask_are_refused(float_model):
    decoder = cached_decoder(float_model)
    ids = tokens(256, 1, 3, seed=1)
    with pytest.raises(StructureError, match="quantized keys and values"):
        cached_decoder(float_model, quantized_cache=True)
    with pytest.raises(ValueError, match="cache has 4 tensors"):
        decoder(ids, torch.ones(1, 3, dtype=torch.long), decoder.layout.empty(1)[:2])
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, past \+ new\]"):
        decoder(ids, torch.ones(1, 4, dtype=torch.long), decoder.layout.empty(1))


def test_graph_without_attention_is_refused():
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x)

    model = qgraph.from_module(MLP(), (torch.randn(2, 8),))
    with pytest.raises(StructureError, match="scaled_dot_product_attention"):
        cached_decoder(model)


# ------------------------------------------------------------------ ONNX Runtime GenAI


@pytest.mark.parametrize("which", ["float", "w4a4"])
def test_exported_decoder_generates_in_onnx_runtime_genai(float_model, w4a4, which, tmp_path):
    """The real client: onnxruntime_genai.Model(folder) generates the torch decoder's tokens."""
    import onnx

    from qgraph.backends.onnx_decoder import export_decoder
    from qgraph.backends.ort_runtime import optimized_op_histogram

    model = float_model if which == "float" else w4a4
    folder = export_decoder(model, tmp_path / "decoder", W4A4_ALL if which == "w4a4" else "")
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == 2
    assert config["model"]["decoder"]["head_size"] == 16
    assert config["model"]["vocab_size"] == 256
    proto = onnx.load(folder / "model.onnx", load_external_data=False)
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*proto.graph.input, *proto.graph.output]
    }
    assert dims["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
    assert dims["present.0.key"] == ["batch_size", 2, "total_sequence_length", 16]
    assert dims["logits"] == ["batch_size", "sequence_length", 256]
    prompt = tokens(256, 1, 6, seed=3)
    expected = prompt[0].tolist() + decode(cached_decoder(model), prompt[0].tolist(), 10)[0]
    assert genai_greedy(folder, prompt, 10) == expected
    if which == "w4a4":
        hist = optimized_op_histogram(folder / "model.onnx")
        assert hist.get("com.microsoft::MatMulNBits") == 10  # q/k/v packed: 5 per layer


def test_export_decoder_refuses_a_file_target(float_model, tmp_path):
    from qgraph.backends.onnx_decoder import export_decoder
    from qgraph.errors import ExportError

    target = tmp_path / "taken"
    target.write_text("keep me")
    with pytest.raises(ExportError, match="not a folder"):
        export_decoder(float_model, target)
    assert target.read_text() == "keep me"


# ------------------------------------------------------------------ qgraph.generate


def test_generate_greedy_and_sampling_in_torch(hf, float_model):
    prompt = tokens(256, 1, 5, seed=8)[0].tolist()
    greedy = qgraph.generate(float_model, prompt, 8, stop_at_eos=False)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert greedy.tokens == ref[0, 5:].tolist()
    assert greedy.text is None and greedy.prompt_tokens == 5 and greedy.backend == "torch"
    assert greedy.tokens_per_s > 0 and 0 < greedy.prompt_seconds <= greedy.seconds
    sampled = [
        qgraph.generate(float_model, prompt, 8, sampling=qgraph.Sampling(True, seed=s)).tokens
        for s in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]  # seeded
    top1 = qgraph.generate(float_model, prompt, 8, sampling=qgraph.Sampling(True, top_k=1))
    assert top1.tokens == greedy.tokens  # top-k 1 is greedy
    nucleus = qgraph.generate(float_model, prompt, 8, sampling=qgraph.Sampling(True, top_p=1e-6))
    assert nucleus.tokens == greedy.tokens  # so is the smallest nucleus


def test_choose_next_follows_the_distribution():
    from qgraph.generation import choose_next

    logits = torch.log(torch.tensor([0.5, 0.3, 0.2, 0.0]))
    gen = torch.Generator().manual_seed(0)
    draws = [choose_next(logits, qgraph.Sampling(True), gen) for _ in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=4).double() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]).double(), atol=0.03)
    cut = [choose_next(logits, qgraph.Sampling(True, top_p=0.6), gen) for _ in range(500)]
    assert set(cut) == {0, 1}  # 0.5 < 0.6: the nucleus holds the two most likely tokens


def test_generate_in_onnx_runtime_genai_matches_torch(w4a4, tmp_path):
    from qgraph.backends.onnx_decoder import export_decoder

    pytest.importorskip("onnxruntime_genai")
    folder = export_decoder(w4a4, tmp_path / "w4a4")
    prompt = tokens(256, 1, 5, seed=9)[0].tolist()
    torch_out = qgraph.generate(w4a4, prompt, 6, stop_at_eos=False)
    ort_out = qgraph.generate(folder, prompt, 6, backend="ort", stop_at_eos=False)
    assert ort_out.tokens == torch_out.tokens and ort_out.backend == "ort"


def test_genai_batch_decodes_each_row_as_it_decodes_alone(float_model, tmp_path):
    """A batch of two prompts in ONNX Runtime GenAI (the default GroupQueryAttention file, one
    shared cache buffer per tensor): each row's logits, at the prompt and at every generated
    token, are the ones the torch decoder gives that row alone."""
    from qgraph.backends.onnx_decoder import export_decoder

    og = pytest.importorskip("onnxruntime_genai")
    folder = export_decoder(float_model, tmp_path / "float")
    assert json.loads((folder / "genai_config.json").read_text())["search"][
        "past_present_share_buffer"
    ]
    prompts = [tokens(256, 1, 7, seed=8), tokens(256, 1, 7, seed=9)]
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=7 + 5, batch_size=2)
    generator = og.Generator(model, params)
    generator.append_tokens(torch.cat(prompts).numpy().astype("int32"))
    decoder = cached_decoder(float_model)
    pasts = [decoder.layout.empty(1) for _ in prompts]
    steps = [p for p in prompts]
    masks = [torch.ones_like(p) for p in prompts]
    worst = 0.0
    for _ in range(5):
        got = torch.from_numpy(generator.get_logits()).reshape(2, -1)
        for row in range(2):
            want, pasts[row] = decoder(steps[row], masks[row], pasts[row])
            worst = max(worst, float((got[row] - want[0, -1]).abs().max()))
        generator.generate_next_token()
        nxt = generator.get_next_tokens()
        steps = [torch.tensor([[int(t)]]) for t in nxt]
        masks = [torch.cat([m, torch.ones(1, 1, dtype=torch.long)], 1) for m in masks]
    assert worst < 1e-4


@torch.no_grad()
def test_standard_attention_file_decodes_left_padded_rows_as_alone(float_model, tmp_path):
    """The opset-23 ``Attention`` file takes any mask: a prompt left-padded next to a longer one
    gives, in ONNX Runtime, the logits it gives alone (prompt and a decode step)."""
    from qgraph.backends.onnx_decoder import export_decoder
    from qgraph.backends.ort_runtime import OrtModel

    folder = export_decoder(float_model, tmp_path / "std", attention="standard")
    runner = OrtModel(folder / "model.onnx", threads=1)
    layout = cached_decoder(float_model).layout
    long, short = tokens(256, 1, 7, seed=8), tokens(256, 1, 4, seed=9)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    out = runner.run(ids, mask, *layout.empty(2))
    alone = runner.run(short, torch.ones(1, 4, dtype=torch.long), *layout.empty(1))
    scale = float(abs(alone[0]).max())
    assert abs(out[0][1, 3:] - alone[0][0]).max() / scale < 1e-5
    nxt = torch.tensor([[5], [5]])
    mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    out = runner.run(nxt, mask, *out[1:])
    alone = runner.run(nxt[:1], torch.ones(1, 5, dtype=torch.long), *alone[1:])
    assert abs(out[0][1] - alone[0][0]).max() / scale < 1e-5


def test_generate_refuses_bad_requests(float_model, tmp_path):
    with pytest.raises(qgraph.DataError, match="exceed the model's context"):
        qgraph.generate(float_model, [1] * 8190, 8)
    with pytest.raises(qgraph.DataError, match="tokenizer"):
        qgraph.generate(float_model, "no tokenizer here", 4)
    with pytest.raises(qgraph.QGraphError, match="genai_config.json"):
        qgraph.generate(tmp_path, [1, 2], 4, backend="ort")
    with pytest.raises(qgraph.QGraphError, match="top_p"):
        qgraph.Sampling(True, top_p=1.5)
    with pytest.raises(qgraph.QGraphError, match="backend"):
        qgraph.generate(float_model, [1, 2], 4, backend="tpu")


# ------------------------------------------------------------------ KV-cache quantization


def _logits_err(model: qgraph.Model, ref: qgraph.Model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        out, base = model(ids), ref(ids)
    return float((out - base).abs().mean() / base.abs().mean())


def test_kv_quantization_is_cached_quantized_and_exports(float_model, tmp_path):
    from qgraph.backends.onnx_backend import export_model, ort_forward

    per_token = torch.ops.qgraph.quantize_per_token.default
    ids = tokens(256, 2, 24, seed=11)
    rot = "fuse-norms,rotate{seed=0,online=r3},"
    errs = {}
    for kv in ("int8", "int4", "int4:head:sym"):
        model = qgraph.run_pipeline(fresh_copy(float_model), rot + f"quantize{{w=int8,kv={kv}}}")
        s = model.log[-1].summary
        assert s["kv_attention_layers"] == 2 and s["kv_cache"].startswith(kv.split(":")[0])
        for sdpa in (n for n in model.gm.graph.nodes if n.target is SDPA):
            for index in (1, 2):  # the cache takes what the quantizer produced
                src, _ = gqa_source(sdpa.args[index])
                assert src.target is per_token and src.args[1] == int(kv[3])
        errs[kv] = _logits_err(model, float_model, ids)
        assert _incremental_errors(model, ids, prefill=7) < 1e-5  # int8 codes in the cache
        decoder = cached_decoder(model)
        assert decoder.layout.quantized and decoder.layout.names()[:3] == [
            "past_key_values.0.key.codes",
            "past_key_values.0.key.scale",
            "past_key_values.0.key.zero",
        ]
        # 16 int8 codes + a float scale + an int8 zero per head, against 16 floats
        assert decoder.layout.bytes_per_token() == 2 * 2 * 2 * 21
        assert cached_decoder(model, quantized_cache=False).layout.bytes_per_token() == 512
        assert _incremental_errors(model, ids, prefill=7, quantized_cache=False) < 1e-5
        prompt = ids[0, :6].tolist()
        out = qgraph.generate(model, prompt, 4, stop_at_eos=False)
        # 6 + 4 − 1 tokens: the last generated token is never fed back
        assert out.cache_bytes == 9 * decoder.layout.bytes_per_token()
        plain = decode(cached_decoder(model, quantized_cache=False), prompt, 4)
        assert plain[0] == out.tokens and plain[3] == 9 * 512
    assert errs["int8"] < errs["int4"] / 4, errs
    path = export_model(model, tmp_path / "kv.onnx")
    with torch.no_grad():
        ref = model(ids)
    assert float((ort_forward(path)(ids) - ref).abs().max() / ref.abs().max()) < 1e-3


def test_kv_option_errors(float_model):
    with pytest.raises(qgraph.PipelineError, match="per token and head"):
        qgraph.parse_pipeline("quantize{kv=int4:token}")
    with pytest.raises(qgraph.PipelineError, match="kv=int9"):
        qgraph.parse_pipeline("quantize{kv=int9}")
    model = fresh_copy(float_model)
    with pytest.raises(qgraph.PipelineError, match="already quantized"):
        qgraph.run_pipeline(
            model,
            "quantize{w=int8,kv=int8,layers=mlp},quantize{w=int8,kv=int8,exclude='mlp|lm_head'}",
        )


def test_run_export_writes_a_decoder_folder_and_checks_it(float_model, tmp_path):
    """What `qgraph run --export DIR/name.onnx` does for a language model."""

    from qgraph.evaluate import perplexity
    from qgraph.workflow import export_and_check

    windows = tokens(256, 2, 32, seed=12)
    out = tmp_path / "run"
    out.mkdir()
    info = export_and_check(fresh_copy(float_model), out / "tiny.onnx", "", windows, False)
    assert info["kv_cache"] and info["path"] == str(out / "tiny.onnx")
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "tiny.onnx"
    assert info["ort_ppl"] == pytest.approx(perplexity(float_model, windows), rel=1e-4)
    assert info["fused_ops"]
    # --standard-ops: the same decoder without fused ops, many more nodes, same perplexity
    std = tmp_path / "std"
    std.mkdir()
    plain = export_and_check(
        fresh_copy(float_model), std / "tiny.onnx", "", windows, False, fused_ops=False
    )
    assert not plain["fused_ops"]
    assert plain["ort_optimized_nodes"] > info["ort_optimized_nodes"] + 30
    assert plain["ort_ppl"] == pytest.approx(info["ort_ppl"], rel=1e-4)


def test_run_export_packs_qkv_unless_told_not_to(float_model, tmp_path):
    """`qgraph run --export ...` packs q/k/v into one quantized layer per attention (two nodes
    fewer per layer in ONNX Runtime than with `--no-pack-qkv`), at the same perplexity."""
    from qgraph.workflow import export_and_check

    windows = tokens(256, 2, 32, seed=13)
    model = qgraph.run_pipeline(fresh_copy(float_model), "quantize{w=int4:channel}")
    infos = {}
    for pack in (False, True):
        out = tmp_path / str(pack)
        out.mkdir()
        infos[pack] = export_and_check(model, out / "m.onnx", "", windows, False, pack_qkv=pack)
    assert infos[True]["pack_qkv"] and not infos[False]["pack_qkv"]
    layers = cached_decoder(model, quantized_cache=False).layout.layers
    saved = infos[False]["ort_optimized_nodes"] - infos[True]["ort_optimized_nodes"]
    assert saved == 2 * layers
    assert infos[True]["ort_ppl"] == pytest.approx(infos[False]["ort_ppl"], rel=1e-4)


def test_ort_forward_reads_symbolic_cache_dims_from_the_config(float_model, tmp_path):
    """ONNX Runtime GenAI's builder leaves the head size symbolic; genai_config.json says it."""
    import onnx

    from qgraph.backends.onnx_backend import ort_forward
    from qgraph.backends.onnx_decoder import export_decoder
    from qgraph.errors import ExportError

    folder = export_decoder(float_model, tmp_path / "d")
    proto = onnx.load(folder / "model.onnx")
    for value in proto.graph.input:
        if value.name.startswith("past_key_values."):
            value.type.tensor_type.shape.dim[3].dim_param = "kv_cache_dim"
    onnx.save(proto, folder / "model.onnx")
    ids = tokens(256, 2, 9, seed=13)
    with torch.no_grad():
        ref = float_model(ids)
    assert float((ort_forward(folder / "model.onnx")(ids) - ref).abs().max()) < 1e-4
    (folder / "genai_config.json").unlink()
    with pytest.raises(ExportError, match="symbolic"):
        ort_forward(folder / "model.onnx")
