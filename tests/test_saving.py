"""Save and reload: a rewritten model comes back with its online rotations, expansion and
quantization intact and computes exactly the same outputs; bad files fail clearly."""

from __future__ import annotations

import os
import zipfile

import pytest
import torch
from helpers import hf_logits, probe_inputs, tokens, traced_copy

import qgraph
from qgraph.errors import ExportError, ModelFileError

HADAMARD = torch.ops.qgraph.hadamard.default
QLINEAR = torch.ops.qgraph.qlinear.default


def count(model: qgraph.Model, target) -> int:
    return sum(1 for n in model.gm.graph.nodes if n.op == "call_function" and n.target is target)


@pytest.fixture(scope="module")
def rewritten(llama_exact):
    model = traced_copy(llama_exact)
    model.set_calibration(tokens(128, 4, 32, seed=0))
    qgraph.run_pipeline(
        model,
        "fuse-norms,rotate{online=all},expand{step=1},quantize{w=int4:channel,a=int8:token},gptq",
    )
    return model


def test_reloaded_model_is_identical(rewritten, tmp_path):
    path = qgraph.save(rewritten, tmp_path / "model.pt2")
    assert sorted(os.listdir(tmp_path)) == ["model.pt2"]  # no temporary left behind
    back = qgraph.load(path)
    for ids in probe_inputs(128):  # several batch sizes and lengths: dynamic shapes survive
        assert torch.equal(back(ids), rewritten(ids))
    assert count(back, HADAMARD) == count(rewritten, HADAMARD) == 8
    assert count(back, QLINEAR) == count(rewritten, QLINEAR) == 14
    assert back.properties == rewritten.properties - {"float-weights"}  # not saved by default
    assert [r.name for r in back.log] == ["fuse-norms", "rotate", "expand", "quantize", "gptq"]
    assert back.log[2].summary["widths"] == rewritten.log[2].summary["widths"]
    assert back.accounting() == rewritten.accounting()
    # the structure view recognises the reloaded graph's online rotations
    expanded = [
        n for n in back.gm.graph.nodes if n.target is torch.ops.aten.constant_pad_nd.default
    ]
    assert len(expanded) == 4


def test_reloaded_model_decodes_with_a_cache_like_the_original(rewritten, tmp_path):
    """A program loaded from a ``.pt2`` keeps torch.export's shape asserts, which pinned the
    traced mask code and broke cached decoding (``qgraph generate --model saved.pt2``)."""
    from qgraph.generation import decode
    from qgraph.kv_cache import cached_decoder

    back = qgraph.load(qgraph.save(rewritten, tmp_path / "model.pt2"))
    prompt = tokens(128, 1, 6, seed=4)[0].tolist()
    want = decode(cached_decoder(rewritten), prompt, 5)[0]
    assert decode(cached_decoder(back), prompt, 5)[0] == want


def test_reloaded_float_model_can_be_rewritten_further(llama_exact, tmp_path):
    hf = llama_exact
    model = traced_copy(hf)
    qgraph.run_pipeline(model, "fuse-norms,rotate{online=r4}")
    back = qgraph.load(qgraph.save(model, tmp_path / "m.pt2"))
    qgraph.run_pipeline(back, "expand{step=2}", verify_each=True)
    ids = probe_inputs(128)[3]
    ref = hf_logits(hf, ids)
    assert float((back(ids) - ref).abs().max() / ref.abs().max()) < 1e-4


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        qgraph.load(tmp_path / "missing.pt2")
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(ModelFileError, match="not a zip"):
        qgraph.load(junk)
    other = tmp_path / "other.pt2"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(ModelFileError):
        qgraph.load(other)


def test_failed_save_keeps_the_existing_file(rewritten, tmp_path, monkeypatch):
    target = tmp_path / "model.pt2"
    target.write_bytes(b"previous contents")

    def broken(program, f, **kw):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", broken)
    with pytest.raises(ExportError, match="disk full"):
        qgraph.save(rewritten, target)
    assert target.read_bytes() == b"previous contents"
    assert sorted(os.listdir(tmp_path)) == ["model.pt2"]


def test_onnx_file_keeps_online_rotations_and_expansion(llama_exact, tmp_path):
    """The exported file holds the online rotations as qgraph-domain nodes with model-local
    functions; reloaded in stock ONNX Runtime it computes what the torch graph and the original
    Hugging Face model compute (float: exact; W4A16: same as torch)."""
    import onnx

    from qgraph.backends.onnx_backend import export_model
    from qgraph.backends.ort_runtime import OrtModel, optimized_op_histogram

    hf = llama_exact
    for pipeline, to_hf in (
        ("fuse-norms,rotate{online=all},expand{step=3}", 1e-4),
        ("fuse-norms,rotate{online=all},expand{step=1},quantize{w=int4:channel}", None),
    ):
        model = traced_copy(hf)
        qgraph.run_pipeline(model, pipeline)
        path = export_model(model, tmp_path / "m.onnx", pipeline)
        proto = onnx.load(path)
        qnodes = [n.op_type for n in proto.graph.node if n.domain == "qgraph"]
        assert len(qnodes) == 8 and {f.name for f in proto.functions} == set(qnodes)
        assert sum(1 for n in proto.graph.node if n.op_type == "Pad") == 4
        runner = OrtModel(path, threads=1, matmulnbits_accuracy_level=0)
        for ids in probe_inputs(128):
            out = torch.from_numpy(runner(ids.numpy()))
            ref = model(ids)
            assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
            if to_hf:
                hf_ref = hf_logits(hf, ids)
                assert float((out - hf_ref).abs().max() / hf_ref.abs().max()) < to_hf
        if to_hf is None:
            assert optimized_op_histogram(path).get("com.microsoft::MatMulNBits") == 14


def test_split_sparse_model_round_trips(llama_exact, tmp_path):
    model = traced_copy(llama_exact)
    model.set_calibration(tokens(128, 4, 32, seed=1))
    qgraph.run_pipeline(model, "quantize{w=int3:channel},split-sparse{outliers=1}")
    back = qgraph.load(qgraph.save(model, tmp_path / "s.pt2"))
    for ids in probe_inputs(128)[:3]:
        assert torch.equal(back(ids), model(ids))
    assert back.accounting() == model.accounting()
    sparse = [n for n in back.gm.graph.nodes if n.target is torch.ops.qgraph.sparse_matmul.default]
    assert len(sparse) == 14
    assert {b.sparse_node for b in back.quantized} == set(sparse)
    assert [b.record for b in back.quantized] == [b.record for b in model.quantized]
