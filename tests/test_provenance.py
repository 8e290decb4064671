"""Provenance: every node a pass made or changed is tagged in the graph, and the exported ONNX
nodes carry the pass and the layer in their metadata, which ``qgraph inspect`` summarises."""

from __future__ import annotations

import json

import onnx
import pytest

import qgraph
from qgraph.backends.onnx_backend import export_model
from qgraph.backends.onnx_decoder import export_decoder
from qgraph.inspect_model import inspect_onnx

PIPELINE = "fuse-norms,rotate{seed=0,online=r4},quantize{w=int4:channel}"


@pytest.fixture(scope="module")
def rewritten(llama):
    model = qgraph.from_hf(llama)
    qgraph.run_pipeline(model, PIPELINE)
    return model


def _props(node) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def test_the_log_counts_the_nodes_each_pass_made_or_changed(rewritten):
    counts = {r.name: r.summary["nodes_made_or_changed"] for r in rewritten.log}
    layers = 2  # the tiny Llama's
    # fuse-norms rescales the 5 norm readers of each layer and lm_head; rotate rewrites the
    # embedding, the 7 linear layers of each layer and lm_head, and adds one online R4 per layer
    assert counts == {"fuse-norms": 5 * layers + 1, "rotate": 1 + 7 * layers + 1 + layers,
                      "quantize": 7 * layers}  # fmt: skip


def test_exported_nodes_name_their_pass_and_layer(rewritten, tmp_path):
    path = export_model(rewritten, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    records = set(rewritten.quant)
    weights = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(weights) == len(records) == 14
    for node in weights:
        props = _props(node)
        assert props["qgraph.passes"] == "quantize"
        assert props["qgraph.layer"] in records
    assert {_props(n)["qgraph.layer"] for n in weights} == records
    rotations = [n for n in proto.graph.node if n.domain == "qgraph"]
    assert len(rotations) == 2
    assert all(_props(n)["qgraph.passes"] == "rotate" for n in rotations)
    assert {_props(n)["qgraph.layer"] for n in rotations} == {
        f"model.layers.{i}.mlp.down_proj" for i in range(2)
    }
    by_pass = inspect_onnx(path)["by_pass"]
    assert by_pass["quantize"]["layers"] == 14
    assert by_pass["quantize"]["ops"]["DequantizeLinear"] == 14


def test_the_decoder_folder_carries_provenance_too(rewritten, tmp_path):
    """Unpacked, one weight node per layer; packed (the default), q/k/v share one weight node
    that names all three, with each one's output columns."""
    records = set(rewritten.quant)
    folder = export_decoder(rewritten, tmp_path / "plain", pack_qkv=False)
    proto = onnx.load(str(folder / "model.onnx"))
    tagged = [n for n in proto.graph.node if "qgraph.passes" in _props(n)]
    assert sum(n.op_type == "DequantizeLinear" for n in tagged) == 14
    folder = export_decoder(rewritten, tmp_path / "packed")
    proto = onnx.load(str(folder / "model.onnx"))
    weights = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(weights) == 14 - 2 * 2 and all("qgraph.passes" in _props(n) for n in weights)
    named = set()
    for node in weights:
        props = _props(node)
        if "qgraph.packed_layers" not in props:
            named.add(props["qgraph.layer"])
            continue
        spans = json.loads(props["qgraph.packed_layers"])
        assert [s[0] for s in spans] == props["qgraph.layer"].split("+")
        assert [name.rsplit(".", 1)[1] for name, _, _ in spans] == ["q_proj", "k_proj", "v_proj"]
        assert spans[0][1] == 0 and spans[0][2] == spans[1][1] and spans[1][2] == spans[2][1]
        named.update(s[0] for s in spans)
    assert named == records
