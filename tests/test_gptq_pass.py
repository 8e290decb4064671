"""The gptq pass: calibrates on the graph as it is now and beats round-to-nearest."""

from __future__ import annotations

import pytest
import torch
from helpers import logits_rel_err, token_batches, tokens, traced_copy

import qgraph
from qgraph.graph_edits import get_tensor
from qgraph.kernels.gptq import gptq_quantize

QLINEAR = torch.ops.qgraph.qlinear.default


@pytest.mark.parametrize("quant", ["w=int3:channel,a=int8:token", "w=int4:group32:asym"])
def test_gptq_beats_rtn_on_held_out_tokens(llama96, quant):
    hf = llama96
    calib, held_out = token_batches(256, [(16, 64), (4, 64)], seed=1)
    rtn = traced_copy(hf)
    rtn.set_calibration(calib)
    qgraph.run_pipeline(rtn, f"fuse-norms,rotate,quantize{{{quant}}}")
    gptq = traced_copy(hf)
    gptq.set_calibration(calib)
    qgraph.run_pipeline(gptq, f"fuse-norms,rotate,quantize{{{quant}}},gptq")
    assert logits_rel_err(gptq, hf, held_out) < 0.95 * logits_rel_err(rtn, hf, held_out)
    summary = gptq.log[-1].summary
    assert summary["layers"] == 14
    assert summary["mean_gptq_proxy_error"] < summary["mean_rtn_proxy_error"]


def test_gptq_hessian_comes_from_the_rewritten_graph(llama96):
    """The first group's codes equal GPTQ solved on XᵀX of the *rotated, activation-quantized*
    input, captured independently from the graph before the gptq pass."""
    calib = tokens(256, 8, 32, seed=2)
    model = traced_copy(llama96)
    model.set_calibration(calib)
    qgraph.run_pipeline(model, "fuse-norms,rotate,quantize{w=int4:channel,a=int8:token}")
    first = next(n for n in model.gm.graph.nodes if n.target is QLINEAR)
    captured = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, n):
            if n is first:
                captured["x"] = self.env[n.args[0]].clone()
            return super().run_node(n)

    with torch.no_grad():
        Capture(model.gm).run(calib)
    x = captured["x"].reshape(-1, captured["x"].shape[-1])  # float32, as the pass multiplies
    rec = model.quantized.layers[0].record
    assert model.quantized.layers[0].node is first
    expected = gptq_quantize(
        rec.float_weight, (x.T @ x).double(), 4, True, "channel", act_order=True, full_range=True,
        clip="output",
    )  # the defaults: full grid, act-order, clip ratio by output error  # fmt: skip
    qgraph.run_pipeline(model, "gptq{calib-windows=8}")
    first = next(n for n in model.gm.graph.nodes if n.target is QLINEAR)
    codes = get_tensor(model.gm, first.args[1].target)  # stored [in, out]
    assert torch.equal(codes.T, expected.codes)


def test_gptq_requires_quantize_first(llama96):
    with pytest.raises(qgraph.PipelineError, match="quantize"):
        qgraph.PassManager("gptq").run(traced_copy(llama96))


def test_resumable_run_stops_before_the_rest_of_the_graph(llama96):
    """A pass that has what it needs ends the run: no later node (here lm_head) executes."""
    from qgraph.calibration import ResumableRun

    model = traced_copy(llama96)
    nodes = [n for n in model.gm.graph.nodes if n.op == "call_function"]
    stop_at, seen = nodes[len(nodes) // 2], []

    def before(node, run):
        seen.append(node)
        if node is stop_at:
            run.stop()

    run = ResumableRun(model.gm, before)
    ids = tokens(256, 1, 8)
    assert run.run(ids) is None and run.stopped
    assert seen[-1] is stop_at and not set(nodes[len(nodes) // 2 + 1 :]) & set(seen)
    out = ResumableRun(model.gm, lambda n, r: None).run(ids)
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert torch.equal(out, model(ids))


@pytest.mark.parametrize("then", ["gptq", "learn-rounding{iters=5}"])
def test_quantize_leaves_the_clip_search_to_a_pass_that_resolves_every_grid(llama96, then):
    """``quantize,gptq`` in one pipeline skips quantize's calibration pass for clip=output and
    gives the codes and scales of the two passes run one after the other."""
    calib = tokens(256, 8, 32, seed=5)
    together, apart = traced_copy(llama96), traced_copy(llama96)
    for m in (together, apart):
        m.set_calibration(calib)
    qgraph.run_pipeline(together, f"fuse-norms,quantize{{w=int4:channel}},{then}")
    qgraph.run_pipeline(apart, "fuse-norms,quantize{w=int4:channel}")
    assert "clip_search" not in apart.log[-1].summary  # alone, quantize searches its grids
    qgraph.run_pipeline(apart, then)
    assert together.log[1].summary["clip"] == "output"
    assert together.log[1].summary["clip_search"] == f"searched by {then.split('{')[0]}"
    layers = [[n for n in m.gm.graph.nodes if n.target is QLINEAR] for m in (together, apart)]
    assert len(layers[0]) == len(layers[1]) == 14
    for a, b in zip(*layers, strict=True):
        for k in (1, 2):  # codes and scales
            ta, tb = (
                get_tensor(together.gm, a.args[k].target),
                get_tensor(apart.gm, b.args[k].target),
            )
            assert torch.equal(ta, tb), a.name


def test_quantize_searches_when_the_next_pass_resolves_only_some_layers(llama96):
    model = traced_copy(llama96)
    model.set_calibration(tokens(256, 4, 32, seed=6))
    qgraph.run_pipeline(model, "quantize{w=int4:channel},gptq{layers=mlp}")
    assert "clip_search" not in model.log[0].summary


@pytest.mark.parametrize("target", ["layer", "float"])
def test_gptq_as_last_pass_frees_the_float_weights(llama96, target):
    """The float weights ``gptq`` drops are freed: no node ``quantize`` erased keeps them in its
    ``meta`` (torch.fx's name table kept erased nodes alive: 0.4 GB on SmolLM2 through
    evaluation and saving)."""
    import gc

    model = traced_copy(llama96)
    model.set_calibration(tokens(256, 2, 32, seed=3))
    model.keep_float_weights = False
    qgraph.run_pipeline(model, f"fuse-norms,quantize{{w=int4:channel}},gptq{{target={target}}}")
    gc.collect()
    graph = model.gm.graph
    nodes = (o for o in gc.get_objects() if isinstance(o, torch.fx.Node) and o.graph is graph)
    alive = [n for n in nodes if n.op != "root"]  # the list's sentinel is not a node of it
    assert len(alive) == len(graph.nodes)
    assert all(r.float_weight is None for r in model.quant.values())


def test_float_run_of_a_quantized_graph_is_the_float_model(llama96):
    """FloatStepRun (what ``gptq{target=float}`` walks beside the quantized runs) computes the
    float model from the quantized graph: activation quantizers off, float weights in."""
    from qgraph.calibration import FloatStepRun

    ids = tokens(256, 2, 24, seed=5)
    model = traced_copy(llama96)
    model.set_calibration(tokens(256, 2, 24, seed=6))
    qgraph.run_pipeline(
        model, "fuse-norms,rotate{online=r2+r4},quantize{w=int4:channel,a=int4:token}"
    )
    weights = {b.node: b.record.float_weight for b in model.quantized.linear()}
    assert len(weights) == 14
    with torch.no_grad():
        ref = llama96(input_ids=ids, use_cache=False).logits
        got = FloatStepRun(model.gm, weights).run(ids)
        quantized = model(ids)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    assert float((quantized - ref).norm() / ref.norm()) > 0.05  # the run did quantize


def test_gptq_float_target_fits_the_float_model_on_calibration_tokens(llama96):
    """``target=float`` solves each layer towards the float model's output: on the calibration
    tokens the whole model's logits land much closer to float than with GPTQ's own target."""
    calib = tokens(256, 16, 64, seed=1)
    errors = {}
    for target in ("layer", "float"):
        model = traced_copy(llama96)
        model.set_calibration(calib)
        qgraph.run_pipeline(model, f"quantize{{w=int3:channel}},gptq{{target={target}}}")
        assert model.log[-1].summary["target"] == target
        errors[target] = logits_rel_err(model, llama96, calib)
    assert errors["float"] < 0.7 * errors["layer"], errors
