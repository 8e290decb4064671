"""Pipeline text, typed pass options, pass ordering and the instrumented pass manager."""

from __future__ import annotations

import copy
import io
import json
from typing import Any

import pytest
import torch
from helpers import tiny_llama, tokens

import qgraph
from qgraph.graph_edits import finish, get_tensor, set_arg_tensor
from qgraph.pass_manager import check_order, parse_pipeline, registry

QLINEAR = "qlinear.default"


# ---------------------------------------------------------------------------- a broken "exact" pass


class BreakWeights(qgraph.Pass):
    """Claims to be exact but scales the first linear layer's weight by 1.5."""

    name = "test-break-weights"
    help = "test only: scale one weight by 1.5 while claiming exactness"
    exact = True

    def run(self, model: qgraph.Model) -> dict[str, Any]:
        lin = model.structure.linears[0]
        w = get_tensor(model.gm, lin.weight)
        set_arg_tensor(model.gm, lin.node, 1, w * 1.5, lin.name + ".weight")
        finish(model.gm)
        return {"broke": lin.name}


class BreakWeightsInexact(BreakWeights):
    """The same change, honestly declared as not exact (not registered: used as an object)."""

    name = "test-break-weights-inexact"
    exact = False


if BreakWeights.name not in registry():
    qgraph.register(BreakWeights)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def traced() -> qgraph.Model:
    """Untied, vocab 128, init 0.05, no calibration data; conftest's ``model`` copies it."""
    return qgraph.from_hf(tiny_llama(vocab=128, tied=False, init=0.05, max_positions=128))


def ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return tokens(128, batch, length, seed)


# ---------------------------------------------------------------------------- parse_pipeline


def test_parse_typed_options() -> None:
    passes = parse_pipeline(
        "fuse-norms{ln-to-rms=false}, rotate{seed=3, kind=random, r1=0, r2=yes},"
        "quantize{w=int4:group32,a=int8:token,calib-batches=4,layers=mlp}"
    )
    assert [p.name for p in passes] == ["fuse-norms", "rotate", "quantize"]
    fuse, rot, quant = passes
    assert fuse.opts == {"ln-to-rms": False}
    assert rot.opts == {
        "seed": 3, "kind": "random", "precision": "float32", "r1": False, "r2": True, "online": "none"
    }  # fmt: skip
    assert type(rot.opt("seed")) is int and type(rot.opt("r1")) is bool
    assert quant.opt("w") == "int4:group32" and quant.opt("a") == "int8:token"
    assert quant.opt("calib-batches") == 4 and quant.opt("layers") == "mlp"
    assert quant.opt("exclude") == "lm_head"  # default kept
    assert quant.explicit == {"w", "a", "calib-batches", "layers"}
    assert repr(rot) == "rotate{kind=random,r1=false,r2=true,seed=3}"


ROTATE_DEFAULTS = {
    "seed": 0, "kind": "hadamard", "precision": "float32", "r1": True, "r2": True, "online": "none"
}  # fmt: skip


def test_parse_defaults_and_whitespace() -> None:
    (rot,) = parse_pipeline("  rotate { seed = 11 }  ")
    assert rot.opts == {**ROTATE_DEFAULTS, "seed": 11}
    (plain,) = parse_pipeline("rotate")
    assert plain.opts == ROTATE_DEFAULTS
    assert plain.explicit == set()


@pytest.mark.parametrize("text, unknown", [("fuse-norms,quantise", "quantise"), ("rotat", "rotat")])
def test_unknown_pass_lists_known_passes(text: str, unknown: str) -> None:
    with pytest.raises(qgraph.PipelineError) as info:
        parse_pipeline(text)
    msg = str(info.value)
    assert f"unknown pass '{unknown}'" in msg
    for known in ("fuse-norms", "rotate", "quantize"):
        assert known in msg


def test_unknown_pass_suggests_close_name() -> None:
    with pytest.raises(qgraph.PipelineError, match="did you mean 'fuse-norms'"):
        parse_pipeline("fuse")


def test_unknown_option() -> None:
    with pytest.raises(qgraph.PipelineError) as info:
        parse_pipeline("rotate{sed=1}")
    msg = str(info.value)
    assert "'rotate'" in msg and "'sed'" in msg
    assert "seed" in msg and "kind" in msg  # lists the options it does have


@pytest.mark.parametrize(
    "text, words",
    [
        ("rotate{seed=abc}", ["'rotate'", "'seed'", "int", "'abc'"]),
        ("rotate{r1=maybe}", ["'rotate'", "'r1'", "bool", "'maybe'"]),
        ("quantize{calib-batches=1.5}", ["'quantize'", "'calib-batches'", "int", "'1.5'"]),
        ("fuse-norms{ln-to-rms=2}", ["'fuse-norms'", "'ln-to-rms'", "bool"]),
    ],
)
def test_ill_typed_option(text: str, words: list[str]) -> None:
    with pytest.raises(qgraph.PipelineError) as info:
        parse_pipeline(text)
    for w in words:
        assert w in str(info.value)


def test_bad_choice() -> None:
    with pytest.raises(qgraph.PipelineError) as info:
        parse_pipeline("rotate{kind=foo}")
    msg = str(info.value)
    assert "'kind'" in msg and "hadamard" in msg and "random" in msg and "'foo'" in msg


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("fuse-norms{seed=1", "cannot parse"),
        ("quantize{w}", "key=value"),
        ("", "empty"),
        ("   ", "empty"),
        ("fuse-norms rotate", "cannot parse"),
        ("rotate{seed=1}}", "cannot parse"),
        (",rotate", "cannot parse"),
        ("rotate{seed={1}}", "cannot parse"),
    ],
)
def test_malformed_text(text: str, fragment: str) -> None:
    with pytest.raises(qgraph.PipelineError, match=fragment):
        parse_pipeline(text)


def test_pass_objects_validate_python_values() -> None:
    rotate = registry()["rotate"]
    assert rotate(seed=4, kind="random").opts["seed"] == 4
    assert registry()["fuse-norms"](ln_to_rms=False).opt("ln-to-rms") is False
    with pytest.raises(qgraph.PipelineError, match="expects int"):
        rotate(seed=True)
    with pytest.raises(qgraph.PipelineError, match="expects bool"):
        rotate(r1="perhaps")
    with pytest.raises(qgraph.PipelineError, match="no option"):
        rotate(colour="red")


# ---------------------------------------------------------------------------- check_order


def test_rotate_without_fuse_norms_says_what_to_add() -> None:
    with pytest.raises(qgraph.PipelineError) as info:
        check_order(parse_pipeline("rotate"), set())
    msg = str(info.value)
    assert "'rotate'" in msg and "norms-fused" in msg and "add 'fuse-norms'" in msg


def test_order_checked_before_anything_runs(model) -> None:
    before = {k: v.clone() for k, v in model.tensors().items()}
    with pytest.raises(qgraph.PipelineError, match="fuse-norms"):
        qgraph.run_pipeline(model, "quantize{w=int8:channel},rotate")
    assert model.log == [] and model.properties == set()
    after = model.tensors()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "text", ["fuse-norms,quantize,rotate", "quantize,fuse-norms", "quantize,expand"]
)
def test_quantized_models_refuse_further_rewrites(text: str) -> None:
    with pytest.raises(qgraph.PipelineError, match="quantized"):
        check_order(parse_pipeline(text), set())


def test_properties_carry_over_between_pipelines(model) -> None:
    qgraph.run_pipeline(model, "fuse-norms")
    assert "norms-fused" in model.properties
    qgraph.run_pipeline(model, "rotate")  # fuse-norms already ran: accepted
    assert {"norms-fused", "rotated"} <= model.properties
    qgraph.run_pipeline(model, "quantize")
    with pytest.raises(qgraph.PipelineError, match="quantized"):
        qgraph.run_pipeline(model, "rotate")


# ---------------------------------------------------------------------------- PassManager


def test_log_records_with_verify_each(model) -> None:
    pipeline = "fuse-norms,rotate{seed=0},quantize{w=int4:channel,a=int8:token}"
    qgraph.run_pipeline(model, pipeline, verify_each=True)
    assert [r.name for r in model.log] == ["fuse-norms", "rotate", "quantize"]
    fuse, rot, quant = model.log
    assert rot.options == ROTATE_DEFAULTS
    assert quant.options["w"] == "int4:channel" and quant.options["a"] == "int8:token"
    for r in model.log:
        assert r.seconds > 0
        assert r.peak_rss_mb > 0
        assert isinstance(r.verify_max_rel_err, float)
    assert fuse.verify_max_rel_err <= 1e-4 and rot.verify_max_rel_err <= 1e-4
    assert quant.verify_max_rel_err > 1e-4  # int4 is not exact, and is not required to be
    assert quant.summary["op_diff"][QLINEAR] == 14
    assert quant.summary["op_diff"]["linear.default"] == -14
    assert quant.summary["layers_quantized"] == 14
    json.dumps([r.to_dict() for r in model.log])  # reports/ONNX metadata need plain data


def test_log_without_verify(model) -> None:
    qgraph.run_pipeline(model, "fuse-norms")
    (record,) = model.log
    assert record.verify_max_rel_err is None and record.seconds > 0


def test_verify_each_catches_wrong_exact_pass(model) -> None:
    x = ids()
    with pytest.raises(qgraph.VerificationError) as info:
        qgraph.run_pipeline(model, "fuse-norms,test-break-weights", verify_each=True)
    msg = str(info.value)
    assert "'test-break-weights'" in msg and "exact" in msg
    assert [r.name for r in model.log] == ["fuse-norms"]
    # the change itself is real: without verification it goes through silently
    fresh = copy.deepcopy(model)
    ref = fresh(x)
    qgraph.run_pipeline(fresh, [BreakWeights()])
    assert float((fresh(x) - ref).abs().max() / ref.abs().max()) > 1e-3


def test_verify_each_records_error_of_inexact_pass(model) -> None:
    qgraph.PassManager([BreakWeightsInexact()], verify_each=True).run(model)
    (record,) = model.log
    assert record.name == "test-break-weights-inexact"
    assert record.verify_max_rel_err > 1e-3
    assert record.summary["broke"]


def test_print_after_writes_summaries(model) -> None:
    stream = io.StringIO()
    qgraph.PassManager("fuse-norms,rotate", print_after=True, verify_each=True, stream=stream).run(
        model
    )
    text = stream.getvalue()
    assert "[qgraph] fuse-norms:" in text and "[qgraph] rotate:" in text
    assert "peak RSS" in text and "verify" in text
    assert "Hadamard" in text  # the rotate summary


def test_pass_objects_and_text_are_equivalent(traced) -> None:
    a, b = copy.deepcopy(traced), copy.deepcopy(traced)
    passes = registry()
    qgraph.PassManager([passes["fuse-norms"](), passes["rotate"](seed=5, kind="random")]).run(a)
    qgraph.run_pipeline(b, "fuse-norms,rotate{seed=5,kind=random}")
    assert [r.name for r in a.log] == [r.name for r in b.log]
    assert [r.options for r in a.log] == [r.options for r in b.log]
    x = ids(3, 9)
    assert torch.equal(a(x), b(x))
    ta, tb = a.tensors(), b.tensors()
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    # ordering is checked for object lists too
    with pytest.raises(qgraph.PipelineError, match="add 'fuse-norms'"):
        qgraph.PassManager([passes["rotate"]()]).run(copy.deepcopy(traced))


def test_erased_nodes_free_the_tensors_in_their_meta() -> None:
    """torch.fx keeps erased nodes in the graph's name table; forget_erased_nodes lets them
    and the tensors in their ``meta`` go, and later nodes are named as before."""
    import gc
    import weakref

    from qgraph.graph_edits import forget_erased_nodes

    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 3))
    weight = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "weight")
    value = torch.randn(3, 4)
    weight.meta["val"] = value
    alive = weakref.ref(value)
    replacement = gm.graph.get_attr("bias")  # any node: the test only needs weight unused
    weight.replace_all_uses_with(replacement)
    gm.graph.erase_node(weight)
    del weight, value
    gc.collect()
    assert alive() is not None  # held by the erased node, which the name table holds
    assert forget_erased_nodes(gm.graph) == 1
    gc.collect()
    assert alive() is None
    assert gm.graph.get_attr("weight").name == "weight_1"  # the erased node's name stays taken
