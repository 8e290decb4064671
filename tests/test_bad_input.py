"""Bad models, bad data, bad files and bad command lines fail loudly, with errors that say where."""

from __future__ import annotations

import os
import time

import numpy as np
import onnx
import pytest
import torch
from helpers import raises_naming, tiny_llama
from onnx import TensorProto, helper
from torch import nn

import qgraph
import qgraph.loaders
import qgraph.workflow
from qgraph.backends.onnx_backend import export_model
from qgraph.cli import main
from qgraph.inspect_model import inspect_model
from qgraph.loaders import load_causal_lm


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent Python control flow
            return self.lin(x)
        return -self.lin(x)


class TwoLinear(nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)) * self.scale)


def float_model(module: nn.Module | None = None) -> qgraph.Model:
    return qgraph.from_module(module or TwoLinear(), (torch.randn(2, 8),))


# ---------------------------------------------------------------------------- tracing


def test_untraceable_model_raises_trace_error() -> None:
    with pytest.raises(qgraph.TraceError) as info:
        qgraph.from_module(Branchy(), (torch.randn(2, 8),))
    msg = str(info.value)
    assert "Branchy" in msg
    assert "data-dependent" in msg.lower()  # names the cause
    assert "GuardOnDataDependentSymNode" in msg  # and the underlying error
    assert info.value.__cause__ is not None
    assert isinstance(info.value, qgraph.QGraphError)


# ---------------------------------------------------------------------------- non-finite data


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_from_module(bad: float) -> None:
    module = TwoLinear()
    with torch.no_grad():
        module.b.weight[2, 5] = bad
    with pytest.raises(qgraph.DataError) as info:
        float_model(module)
    msg = str(info.value)
    assert "b.weight" in msg and "(2, 5)" in msg
    assert ("1 NaN" in msg) == (bad != bad)


def test_nan_weight_from_hf_names_the_tensor() -> None:
    hf = tiny_llama(  # its own: the test writes a NaN into it
        vocab=64, hidden=32, intermediate=64, heads=2, kv_heads=1, head_dim=16, tied=False,
        max_positions=64,
    )  # fmt: skip
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight[3, 7] = float("nan")
    with raises_naming(qgraph.DataError, "model.layers.1.mlp.up_proj.weight", "NaN", "(3, 7)"):
        qgraph.from_hf(hf)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_calibration_data(bad: float) -> None:
    model = float_model()
    data = torch.randn(4, 8)
    data[1, 3] = bad
    with pytest.raises(qgraph.DataError, match="calibration"):
        model.set_calibration(data)
    assert model.calibration is None


def test_empty_or_unbatched_calibration_data() -> None:
    model = float_model()
    with pytest.raises(qgraph.DataError, match="non-empty batch"):
        model.set_calibration(torch.randn(0, 8))
    with pytest.raises(qgraph.DataError, match="non-empty batch"):
        model.set_calibration(torch.randn(8))


def test_float_module_static_quantization_with_calibration() -> None:
    module = TwoLinear()
    model = float_model(module)
    with pytest.raises(qgraph.DataError, match="calibration"):
        qgraph.run_pipeline(model, "quantize{a=int8:tensor}")
    calib = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    model.set_calibration(calib)
    qgraph.run_pipeline(model, "quantize{w=int8:channel,a=int8:tensor}")
    x = calib[:3]  # inside the calibrated ranges: nothing is clipped
    with torch.no_grad():
        ref = module(x)
    assert float((model(x) - ref).abs().max() / ref.abs().max()) < 0.02


def test_calibration_overflowing_to_inf_raises() -> None:
    model = float_model(TwoLinear(scale=1e38))
    model.set_calibration(torch.full((2, 8), 1e4))  # finite data, non-finite activations
    with pytest.raises(qgraph.DataError, match="non-finite"):
        qgraph.run_pipeline(model, "quantize{w=int8:channel,a=int8:tensor}")


# ---------------------------------------------------------------------------- model files


def _write_gguf(path) -> bytes:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_tensor(
        "token_embd.weight", np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    )
    writer.add_tensor("output_norm.weight", np.ones(32, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_truncated_gguf(tmp_path) -> None:
    full = _write_gguf(tmp_path / "full.gguf")
    assert len(full) > 4000
    for name, data in [
        ("x.gguf", full[:1000]),
        ("y.gguf", full[:100]),
        ("z.gguf", os.urandom(1000)),
    ]:
        path = tmp_path / name
        path.write_bytes(data)
        with raises_naming(qgraph.ModelFileError, str(path)):
            load_causal_lm(path)


def test_missing_gguf(tmp_path) -> None:
    with pytest.raises(qgraph.ModelFileError, match="does not exist"):
        load_causal_lm(tmp_path / "absent.gguf")


@pytest.mark.parametrize(
    "config",
    ["{not json", '{"model_type": "no-such-architecture"}', "", '["a", "list"]'],
)
def test_hf_directory_with_bad_config(tmp_path, config: str) -> None:
    (tmp_path / "config.json").write_text(config)
    with raises_naming(qgraph.ModelFileError, str(tmp_path)):
        load_causal_lm(tmp_path)


def test_hf_directory_without_config(tmp_path) -> None:
    with pytest.raises(qgraph.ModelFileError, match="config.json"):
        load_causal_lm(tmp_path)


def test_nonexistent_or_unsupported_path(tmp_path) -> None:
    with pytest.raises(qgraph.ModelFileError, match="neither a built-in"):
        load_causal_lm(tmp_path / "nothing-here")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(qgraph.ModelFileError, match="unsupported"):
        load_causal_lm(other)


def _small_onnx() -> bytes:
    w = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], np.ones(64 * 64, np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return model.SerializeToString()


def test_inspect_valid_then_damaged_onnx(tmp_path) -> None:
    data = _small_onnx()
    good = tmp_path / "good.onnx"
    good.write_bytes(data)
    info = inspect_model(str(good))
    assert info["kind"] == "onnx" and info["ops"] == {"MatMul": 1}
    for name, content in [("garbage.onnx", os.urandom(700)), ("cut.onnx", data[: len(data) // 2])]:
        bad = tmp_path / name
        bad.write_bytes(content)
        with raises_naming(qgraph.ModelFileError, name):
            inspect_model(str(bad))
    with pytest.raises(qgraph.ModelFileError, match="does not exist"):
        inspect_model(str(tmp_path / "absent.onnx"))


# ---------------------------------------------------------------------------- export


def test_export_into_missing_directory_writes_nothing(tmp_path) -> None:
    model = float_model()
    before = sorted(p.name for p in tmp_path.iterdir())
    target = tmp_path / "missing" / "m.onnx"
    with raises_naming(qgraph.ExportError, "missing"):
        export_model(model, target, "quantize")
    assert not target.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---------------------------------------------------------------------------- command line


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the CLI tries to load a model."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the CLI loaded a model before validating its arguments")

    monkeypatch.setattr(qgraph.workflow, "Job", refuse)
    monkeypatch.setattr(qgraph.workflow, "load_causal_lm", refuse)
    monkeypatch.setattr(qgraph.loaders, "load_causal_lm", refuse)
    return calls


def test_cli_rejects_bad_order_before_loading(capsys, no_loading) -> None:
    start = time.perf_counter()
    assert main(["run", "--pipeline", "rotate"]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "fuse-norms" in err and "qgraph: error" in err
    assert no_loading == []


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (
            ["run", "--pipeline", "fuse-norms", "--report", "/nonexistent/dir/r.json"],
            "/nonexistent/dir",
        ),
        (
            ["run", "--pipeline", "fuse-norms", "--export", "/nonexistent/dir/m.onnx"],
            "/nonexistent/dir",
        ),
        (["run", "--pipeline", "rotate{seed=abc}"], "expects int"),
        (["run", "--pipeline", "fuse-norms,bogus"], "unknown pass 'bogus'"),
        (["run", "--pipeline", "quantize{w=int9}"], "weight spec"),
    ],
)
def test_cli_rejects_bad_arguments_before_loading(capsys, no_loading, argv, fragment) -> None:
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err
    assert no_loading == []


def test_cli_inspect_damaged_onnx(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 50)
    assert main(["inspect", str(bad)]) == 2
    assert "cannot read ONNX file" in capsys.readouterr().err


def test_cli_inspect_valid_onnx(tmp_path, capsys) -> None:
    good = tmp_path / "good.onnx"
    onnx.save_model(onnx.load_from_string(_small_onnx()), str(good))
    assert main(["inspect", str(good)]) == 0
    assert "MatMul" in capsys.readouterr().out
