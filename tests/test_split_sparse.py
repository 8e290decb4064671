"""split-sparse: the dense-and-sparse split is what it claims (budgets, exact sparse values, a
re-quantized dense part), helps the quantized model, and runs the same in ONNX Runtime."""

from __future__ import annotations

import pytest
import torch
from helpers import logits_rel_err, token_batches, traced_copy

import qgraph
from qgraph.errors import PipelineError
from qgraph.graph_edits import get_tensor
from qgraph.pass_manager import check_order

SPARSE = torch.ops.qgraph.sparse_matmul.default
QLINEAR = torch.ops.qgraph.qlinear.default


@pytest.fixture(scope="module")
def setup(llama_exact):
    calib, held = token_batches(128, [(8, 64), (4, 64)], seed=0)
    return llama_exact, calib, held


def run(hf, calib, pipeline: str) -> qgraph.Model:
    model = traced_copy(hf)
    model.set_calibration(calib)
    qgraph.run_pipeline(model, pipeline)
    return model


def effective_weights(model: qgraph.Model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (dense dequantized [out, in], sparse part as dense [out, in]) read from the graph."""
    gm, out = model.gm, {}
    names = {b.node: b.name for b in model.quantized}
    for node in gm.graph.nodes:
        if node.target is SPARSE:
            (add,) = node.users  # add(qlinear, sparse_matmul)
            q = add.args[0]
            assert q.target is QLINEAR
            codes, scale, zero = (get_tensor(gm, a.target) for a in q.args[1:4])
            group = q.args[5]
            dense = ((codes.float() - zero.float().repeat_interleave(group, 0)[: codes.shape[0]])
                     * scale.repeat_interleave(group, 0)[: codes.shape[0]]).T  # fmt: skip
            rows, cols, values = (get_tensor(gm, a.target) for a in node.args[1:4])
            sparse = torch.zeros_like(dense)
            sparse.index_put_((rows.long(), cols.long()), values.float(), accumulate=True)
            out[names[q]] = (dense, sparse)
    return out


def test_outliers_are_exact_sparse_values_within_budget(setup):
    hf, calib, held = setup
    base = run(hf, calib, "quantize{w=int3:channel}")
    float_w = {name: rec.float_weight for name, rec in base.quant.items()}
    model = run(hf, calib, "quantize{w=int3:channel},split-sparse{outliers=1}")
    parts = effective_weights(model)
    assert len(parts) == 14
    total = sum(w.numel() for w in float_w.values())
    nnz = sum(int((s != 0).sum()) for _, s in parts.values())
    assert 0.9 * 0.01 * total <= nnz <= 0.01 * total  # the 1 % budget, spent
    for name, (dense, sparse) in parts.items():
        w = float_w[name]
        mask = sparse != 0
        # sparse values are the float weights (to float16), the dense part is 0 there
        torch.testing.assert_close(sparse[mask], w[mask].half().float())
        assert torch.all(dense[mask] == 0)
        # the outliers are the largest-magnitude weights of the layer
        if mask.any():
            assert w[mask].abs().min() >= w[~mask].abs().max() - 1e-6
            # the dense grid no longer covers them: its per-row scale shrank where rows lost one
            assert dense.abs().max() < w.abs().max()
    assert logits_rel_err(model, hf, held) < logits_rel_err(base, hf, held)
    bits = model.accounting()["volume_bits"] - base.accounting()["volume_bits"]
    assert bits == nnz * (16 + 16 + 16)  # int16 row, int16 column, float16 value


def test_significant_weights_follow_pqi_and_budget(setup):
    hf, calib, _ = setup
    model = run(
        hf, calib,
        "quantize{w=int3:channel},split-sparse{outliers=0,significant=1,beta=0.5,windows=2,tokens=64,intervals=4}",
    )  # fmt: skip
    summary = model.log[-1].summary
    total = sum(r.in_features * r.out_features for r in model.quant.values())
    assert abs(summary["significant"] - int(0.01 * total)) <= 14
    steps = summary["sensitivity"]["steps"]
    assert len(steps) == 2 and all(s["method"] == "pqi/midpoint/4" for s in steps)
    # the integral predicts the loss change of the current split closely (quadrature error only)
    for s in steps:
        assert abs(s["predicted"] - s["actual"]) <= 0.05 * abs(s["actual"]) + 1e-3


def test_gptq_after_split_improves_and_onnx_matches(setup, tmp_path):
    from qgraph.backends.onnx_backend import export_model
    from qgraph.backends.ort_runtime import OrtModel, optimized_op_histogram

    hf, calib, held = setup
    split = run(hf, calib, "quantize{w=int4:channel},split-sparse{outliers=1}")
    both = run(hf, calib, "quantize{w=int4:channel},split-sparse{outliers=1},gptq")
    assert logits_rel_err(both, hf, held) < logits_rel_err(split, hf, held)
    path = export_model(both, tmp_path / "m.onnx", "split")
    runner = OrtModel(path, threads=1, matmulnbits_accuracy_level=0)
    for ids in (held[:1, :7], held):
        out = torch.from_numpy(runner(ids.numpy()))
        ref = both(ids)
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    hist = optimized_op_histogram(path)
    assert hist.get("com.microsoft::MatMulNBits") == 14 and hist.get("ScatterND") == 14


def test_order_and_options_are_checked():
    with pytest.raises(PipelineError, match="quantize"):
        check_order(qgraph.parse_pipeline("split-sparse"), set())
    with pytest.raises(PipelineError, match="split-sparse"):
        check_order(qgraph.parse_pipeline("quantize,gptq,split-sparse"), set())
    with pytest.raises(PipelineError, match="percentage"):
        qgraph.parse_pipeline("split-sparse{outliers=80}")
    with pytest.raises(PipelineError):
        qgraph.parse_pipeline("split-sparse{sensitivity=psychic}")
