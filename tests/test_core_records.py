"""The core consolidation: typed quantized-layer records served as an analysis, preserved
analyses, one layer selector, quoted pipeline values, chained quantize, pass failures named,
and re-solving saved models."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from helpers import fresh_copy, raises_naming, tokens

import qgraph
from qgraph.errors import PassError, PipelineError, VerificationError
from qgraph.formats import WeightSpec
from qgraph.kernels.gptq import gptq_quantize, rtn_error
from qgraph.pass_manager import REGISTRY, Pass, check_order, parse_pipeline, working_on
from qgraph.quantized import QuantizedLayers

VOCAB = 256


# ``model`` is conftest's: a fresh copy of the tiny Llama (vocab VOCAB) with 4 calibration
# windows.


# ---------------------------------------------------------------------------- pipeline text


def test_quoted_values_hold_commas_and_braces() -> None:
    (p,) = parse_pipeline(
        r"""quantize{w=int4:channel, layers='layers\.(0|1)\.', exclude="x{2,3}"}"""
    )
    assert p.opt("layers") == r"layers\.(0|1)\." and p.opt("exclude") == "x{2,3}"
    again = parse_pipeline(repr(p))[0]  # the pass's text form quotes what needs quoting
    assert again.opts == p.opts


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("quantize{layers=a{2,3}}", "quote"),
        ("quantize{layers='abc}", "unterminated"),
        ("quantize{w=int4,w=int8}", "twice"),
    ],
)
def test_bad_quoting_is_explained(text: str, fragment: str) -> None:
    with pytest.raises(PipelineError, match=fragment):
        parse_pipeline(text)


def test_quoted_regex_selects_layers(model) -> None:
    qgraph.run_pipeline(
        model, r"quantize{w=int4:channel,layers='layers\.(0)\.(self_attn|mlp)\.(q|up)_proj'}"
    )
    assert sorted(model.quant) == ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"]


# ---------------------------------------------------------------------------- records


def test_records_bind_to_the_graph_in_order(model) -> None:
    qgraph.run_pipeline(model, "quantize{w=int4:group32:asym,a=int8:token}")
    layers = model.quantized
    assert len(layers) == 14 and [b.name for b in layers] == list(model.quant)
    for b in layers:
        rec = b.record
        assert b.node.target is torch.ops.qgraph.qlinear.default
        assert rec.weight == WeightSpec(4, "group", 32, False) and rec.act.bits == 8
        codes, scale, zero = b.stored(model.gm)
        assert codes.shape == (rec.in_features, rec.out_features)
        assert scale.shape[0] * rec.group >= rec.in_features
        assert rec.float_weight.shape == (rec.out_features, rec.in_features)
    roles = {b.role for b in layers}
    assert roles == {"attn_q", "attn_k", "attn_v", "attn_o", "mlp_in", "mlp_out"}
    groups = layers.groups()
    assert [len(g) for g in groups[:4]] == [3, 1, 2, 1]  # qkv, o, gate/up, down


def test_accounting_is_the_records(model) -> None:
    before = model.accounting()
    qgraph.run_pipeline(model, "quantize{w=int3:channel}")
    after = model.accounting()
    n = sum(r.in_features * r.out_features for r in model.quant.values())
    assert after["quantized_params"] == n
    saved = sum(
        (32 - 3) * r.in_features * r.out_features - 32 * r.out_features
        for r in model.quant.values()
    )
    assert before["volume_bits"] - after["volume_bits"] == saved


def test_quantize_invalidates_and_gptq_preserves(model) -> None:
    structure = model.structure
    qgraph.run_pipeline(model, "quantize{w=int4:channel}")
    assert model.structure is not structure  # rebuilt: quantize changed the graph
    structure, layers = model.structure, model.quantized
    qgraph.run_pipeline(model, "gptq{calib-windows=2}", verify_each=True)
    assert model.structure is structure and model.quantized is layers  # declared preserved


class _Liar(Pass):
    name = "test-liar"
    preserves: ClassVar[frozenset[str]] = frozenset({"quantized-layers"})

    def run(self, model) -> dict[str, Any]:
        model.quant.popitem()  # changes the quantized layers while claiming to preserve them
        return {}


def test_a_false_preserves_claim_is_caught(model) -> None:
    qgraph.run_pipeline(model, "quantize{w=int4:channel}")
    assert len(model.quantized) == 14  # cached
    with raises_naming(VerificationError, "test-liar", "quantized-layers"):
        qgraph.run_pipeline(model, [_Liar()], verify_each=True)
    assert len(QuantizedLayers(model)) == 13


# ---------------------------------------------------------------------------- chained quantize


def test_quantize_chains_on_disjoint_layers(model) -> None:
    qgraph.run_pipeline(
        model,
        "quantize{w=int8:channel,layers=mlp},quantize{w=int4:group32,exclude='mlp|lm_head'},gptq{calib-windows=2}",
    )
    bits = {r.role: r.weight.bits for r in model.quant.values()}
    assert bits == {"attn_q": 4, "attn_k": 4, "attn_v": 4, "attn_o": 4, "mlp_in": 8, "mlp_out": 8}
    assert all(r.solver == "gptq" for r in model.quant.values())
    assert [r.name for r in model.log] == ["quantize", "quantize", "gptq"]


def test_overlapping_quantize_is_refused_before_it_runs(model) -> None:
    qgraph.run_pipeline(model, "quantize{w=int8:channel,layers=mlp}")
    tensors = dict(model.tensors())
    with raises_naming(PipelineError, "already quantized", "mlp", "int8:channel:sym", "exclude"):
        qgraph.run_pipeline(model, "quantize{w=int4:channel}")
    assert model.tensors().keys() == tensors.keys() and len(model.log) == 1


# ---------------------------------------------------------------------------- failures named


class _Fails(Pass):
    name = "test-fails"

    def run(self, model) -> dict[str, Any]:
        with working_on("model.layers.1.mlp.down_proj"):
            raise ValueError("boom")


def test_an_exception_in_a_pass_names_the_pass_and_layer(model) -> None:
    with raises_naming(
        PassError, "test-fails", "model.layers.1.mlp.down_proj", "ValueError", "boom"
    ):
        qgraph.run_pipeline(model, [_Fails()])
    assert isinstance(PassError("x"), qgraph.QGraphError)


def test_per_tensor_gptq_runs_and_beats_rtn(model) -> None:
    """Was an uncaught ValueError from the kernel: ``quantize{w=int4:tensor},gptq``."""
    qgraph.run_pipeline(model, "quantize{w=int4:tensor},gptq{calib-windows=4}")
    summary = model.log[-1].summary
    assert summary["mean_gptq_proxy_error"] < summary["mean_rtn_proxy_error"]
    for b in model.quantized:
        _, scale, _ = b.stored(model.gm)
        assert torch.unique(scale).numel() == 1  # one scale per tensor, as quantize chose


def test_per_tensor_gptq_kernel_against_rtn() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=gen, dtype=torch.float64)
    x = torch.randn(256, 64, generator=gen, dtype=torch.float64) @ torch.randn(
        64, 64, generator=gen, dtype=torch.float64
    )
    res = gptq_quantize(w, x.T @ x, 4, True, "tensor")
    assert res.scale.shape == (1, 1) and float(res.scale) == pytest.approx(float(w.abs().max()) / 7)
    rtn = torch.round(w / res.scale).clamp(-8, 7) * res.scale
    assert res.error < rtn_error(w, x.T @ x, rtn)


# ---------------------------------------------------------------------------- mixed precision


def test_mixed_precision_quantizes_through_the_manager(model) -> None:
    qgraph.run_pipeline(
        model, "mixed-precision{budget=6,choices=4+8,windows=1,tokens=16}", verify_each=True
    )
    nested = [r for r in model.log if r.parent == "mixed-precision"]
    assert [r.name for r in nested] == ["quantize", "quantize"]
    assert all("op_diff" in r.summary and r.verify_max_rel_err is not None for r in nested)
    assert model.log[-1].name == "mixed-precision"
    widths = {r.weight.bits for r in model.quant.values()}
    assert widths == {4, 8}


# ---------------------------------------------------------------------------- saved models


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(scope="module")
def saved(traced, tmp_path_factory):
    """``quantize{w=int4:channel}`` with a word tokenizer, saved once without (``lean``) and once
    with (``full``) its float weights; saving re-exports the graph, which is slow. The model
    itself is returned too: tests copy it before rewriting."""
    model = fresh_copy(traced)
    model.tokenizer = _word_tokenizer()
    qgraph.run_pipeline(model, "quantize{w=int4:channel}")
    root = tmp_path_factory.mktemp("saved")
    lean = qgraph.save(model, root / "lean.pt2")
    full = qgraph.save(model, root / "full.pt2", float_weights=True)
    return model, lean, full


def test_saved_model_keeps_its_tokenizer(saved, tmp_path) -> None:
    _, lean, _ = saved
    back = qgraph.load(lean)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 200}" for i in range(2000)))
    windows = qgraph.calibration_windows(back, str(text), windows=2, length=64)
    assert windows.shape == (2, 64) and int(windows.max()) < 200
    assert "quantized" in back.properties and "float-weights" not in back.properties
    with raises_naming(PipelineError, "gptq", "float_weights=True", "--save-float-weights"):
        check_order(parse_pipeline("gptq"), back.properties)
    with raises_naming(PipelineError, "float_weights=True"):
        qgraph.run_pipeline(back, "gptq")
    # not "add 'quantize' before it": the model is quantized
    with pytest.raises(PipelineError) as info:
        qgraph.run_pipeline(back, "learn-rounding")
    assert "add 'quantize'" not in str(info.value)


def test_gptq_on_a_model_saved_with_float_weights_equals_gptq_before_saving(saved) -> None:
    quantized, _, full = saved
    model = fresh_copy(quantized)
    back = qgraph.load(full)
    assert "float-weights" in back.properties
    back.set_calibration(model.calibration)
    qgraph.run_pipeline(back, "gptq{calib-windows=2}")
    qgraph.run_pipeline(model, "gptq{calib-windows=2}")
    ids = tokens(VOCAB, 2, 24, seed=5)
    torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)


def test_passes_listed_in_registry_declare_known_analyses() -> None:
    from qgraph.model import ANALYSES

    qgraph.pass_manager.registry()
    for name, cls in REGISTRY.items():
        assert cls.preserves <= set(ANALYSES), name


def test_cli_continues_a_saved_model(saved, tmp_path, capsys) -> None:
    """`qgraph run --model m.pt2 --pipeline gptq` was refused ("requires quantized") although
    the saved model is quantized; now it runs when the float weights were saved, and is refused
    with the reason, before loading, when they were not."""
    from qgraph.cli import main

    _, lean, full = saved
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{(i * 7) % 250}" for i in range(4000)))
    common = ["--calib-text", str(text), "--eval-text", str(text), "--window", "32"]
    common += ["--eval-windows", "2", "--calib-windows", "2", "--no-progress"]
    assert main(["run", "--model", str(lean), "--pipeline", "gptq", *common]) == 2
    err = capsys.readouterr().err
    assert "float-weights" in err and "--save-float-weights" in err and "Traceback" not in err
    report = tmp_path / "r.json"
    args = ["run", "--model", str(full), "--pipeline", "gptq", "--report", str(report)]
    assert main([*args, *common]) == 0
    import json

    data = json.loads(report.read_text())
    assert data["baseline"] == "as saved"
    assert [p["name"] for p in data["passes"]] == ["quantize", "gptq"]  # the whole history
    assert data["ppl"] <= data["ppl_float"] * 1.01  # GPTQ on top of RTN: no worse
