"""The gptq pass: calibrates on the graph as it is now and beats round-to-nearest."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qgraph
from qgraph.graph_edits import get_tensor
from qgraph.kernels.gptq import gptq_quantize

QLINEAR = torch.ops.qgraph.qlinear.default


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def rel_err(model: qgraph.Model, hf, ids) -> float:
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
    return float((model(ids) - ref).norm() / ref.norm())


@pytest.mark.parametrize("quant", ["w=int3:channel,a=int8:token", "w=int4:group32:asym"])
def test_gptq_beats_rtn_on_held_out_tokens(quant):
    hf = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 256, (16, 64), generator=gen)
    held_out = torch.randint(0, 256, (4, 64), generator=gen)
    rtn = qgraph.from_hf(hf)
    rtn.set_calibration(calib)
    qgraph.run_pipeline(rtn, f"fuse-norms,rotate,quantize{{{quant}}}")
    gptq = qgraph.from_hf(hf)
    gptq.set_calibration(calib)
    qgraph.run_pipeline(gptq, f"fuse-norms,rotate,quantize{{{quant}}},gptq")
    assert rel_err(gptq, hf, held_out) < 0.95 * rel_err(rtn, hf, held_out)
    summary = gptq.log[-1].summary
    assert summary["layers"] == 14
    assert summary["mean_gptq_proxy_error"] < summary["mean_rtn_proxy_error"]


def test_gptq_hessian_comes_from_the_rewritten_graph():
    """The first group's codes equal GPTQ solved on XᵀX of the *rotated, activation-quantized*
    input, captured independently from the graph before the gptq pass."""
    hf = tiny_llama()
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2))
    model = qgraph.from_hf(hf)
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
    x = captured["x"].reshape(-1, captured["x"].shape[-1]).double()
    info = first.meta["qgraph_quant"]
    expected = gptq_quantize(info["float_weight"], x.T @ x, 4, True, "channel")
    qgraph.run_pipeline(model, "gptq{calib-windows=8}")
    first = next(n for n in model.gm.graph.nodes if n.target is QLINEAR)
    codes = get_tensor(model.gm, first.args[1].target)  # stored [in, out]
    assert torch.equal(codes.T, expected.codes)


def test_gptq_requires_quantize_first():
    with pytest.raises(qgraph.PipelineError, match="quantize"):
        qgraph.PassManager("gptq").run(qgraph.from_hf(tiny_llama()))


def test_resumable_run_stops_before_the_rest_of_the_graph():
    """A pass that has what it needs ends the run: no later node (here lm_head) executes."""
    from qgraph.calibration import ResumableRun

    model = qgraph.from_hf(tiny_llama())
    nodes = [n for n in model.gm.graph.nodes if n.op == "call_function"]
    stop_at, seen = nodes[len(nodes) // 2], []

    def before(node, run):
        seen.append(node)
        if node is stop_at:
            run.stop()

    run = ResumableRun(model.gm, before)
    ids = torch.randint(0, 256, (1, 8))
    assert run.run(ids) is None and run.stopped
    assert seen[-1] is stop_at and not set(nodes[len(nodes) // 2 + 1 :]) & set(seen)
    out = ResumableRun(model.gm, lambda n, r: None).run(ids)
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert torch.equal(out, model(ids))
