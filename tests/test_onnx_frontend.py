"""ONNX in: an ONNX model runs through the same passes as the torch module it came from, and
its int8 export runs as integer kernels in ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import qgraph
from qgraph.backends.onnx_backend import export_model, optimized_op_histogram
from qgraph.errors import DataError, ModelFileError, PipelineError, TraceError
from qgraph.graph_edits import get_tensor
from qgraph.tensor_data import output_error, read_inputs

PIPELINE = "fuse-norms,quantize{w=int8:channel,a=int8:tensor,exclude=none}"


class SmallCNN(torch.nn.Module):
    """Conv+BN+ReLU, a depthwise conv, a residual add, concat, pooling, resize, a linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = torch.nn.BatchNorm2d(8)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.b2 = torch.nn.BatchNorm2d(8)
        self.pw = torch.nn.Conv2d(16, 8, 1)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        z = torch.nn.functional.hardswish(self.b2(self.dw(y))) + y
        z = torch.cat([z, torch.nn.functional.max_pool2d(y, 3, 1, 1)], dim=1)
        z = self.pw(z)
        z = torch.nn.functional.avg_pool2d(z, 2)
        z = torch.nn.functional.interpolate(z, scale_factor=2.0, mode="nearest")
        return self.head(z.mean((2, 3)))


def _integer_convs(ops: dict[str, int]) -> int:
    return sum(v for k, v in ops.items() if k.endswith("QLinearConv"))


def _cnn() -> SmallCNN:
    torch.manual_seed(0)
    net = SmallCNN().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (net.b1, net.b2):
            bn.running_mean.copy_(torch.randn(8, generator=gen) * 0.2)
            bn.running_var.copy_(torch.rand(8, generator=gen) + 0.5)
            bn.weight.copy_(torch.rand(8, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(8, generator=gen) * 0.2)
    return net


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand((n, 3, 16, 16), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory):
    """SmallCNN exported to ONNX by torch's own exporter, with a dynamic batch."""
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _cnn(),
            (_images(2, 0),),
            str(path),
            dynamo=True,
            input_names=["image"],
            output_names=["scores"],
            dynamic_shapes=({0: batch},),
        )
    return path


def test_import_computes_what_onnx_runtime_computes(cnn_onnx):
    model = qgraph.load(cnn_onnx)
    x = _images(3, 5)  # another batch size than traced: the batch dim stays dynamic
    ours = model(x)
    ref = ort.InferenceSession(str(cnn_onnx)).run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, _cnn()(x), rtol=1e-5, atol=1e-5)
    summary = model.structure.summary()
    assert (summary["convs"], summary["linears"]) == (3, 1)
    assert model.input_names == ("image",) and model.output_names == ("scores",)


def test_same_codes_from_torch_and_from_onnx(cnn_onnx):
    """One network given as torch and as ONNX: same quantized codes and scales per layer."""
    calib = _images(6, 1)
    via_torch = qgraph.from_module(_cnn(), (_images(2, 0),), input_names=("image",))
    via_onnx = qgraph.load(cnn_onnx)
    for m in (via_torch, via_onnx):
        m.set_calibration(calib)
        qgraph.run_pipeline(m, PIPELINE)
    a, b = list(via_torch.quantized), list(via_onnx.quantized)
    assert [x.record.kind for x in a] == [x.record.kind for x in b] == ["conv"] * 3 + ["linear"]
    for la, lb in zip(a, b, strict=True):
        codes_a, scale_a, _ = la.stored(via_torch.gm)
        codes_b, scale_b, _ = lb.stored(via_onnx.gm)
        assert torch.equal(codes_a, codes_b), la.name
        torch.testing.assert_close(scale_a, scale_b, rtol=1e-6, atol=0)
    x = _images(4, 9)
    torch.testing.assert_close(via_torch(x), via_onnx(x), rtol=1e-4, atol=1e-4)


def test_int8_export_runs_integer_convolutions(cnn_onnx, tmp_path):
    model = qgraph.load(cnn_onnx)
    x = _images(4, 7)
    ref = model(x)
    model.set_calibration(_images(8, 1))
    qgraph.run_pipeline(model, PIPELINE)
    records = list(model.quant.values())
    assert sum(r.kind == "conv" for r in records) == 3
    assert all(r.out_range == "minmax" for r in records if r.kind == "conv")
    out = model(x)
    assert output_error(ref, out)["sqnr_db"] > 25  # int8 on a small net: close to float
    path = export_model(model, tmp_path / "q.onnx")
    ops = optimized_op_histogram(path)
    # every conv runs as an integer kernel (ONNX's QLinearConv or ORT's NHWC variant)
    assert _integer_convs(ops) == 3, ops
    got = torch.from_numpy(ort.InferenceSession(str(path)).run(None, {"image": x.numpy()})[0])
    # integer accumulation vs float fake quantization: only rounding ties flip a code
    assert output_error(out, got)["sqnr_db"] > 35
    assert abs(output_error(ref, got)["sqnr_db"] - output_error(ref, out)["sqnr_db"]) < 2


def test_conv_bias_sits_on_the_integer_grid(cnn_onnx):
    """With a static input the conv bias is rounded to s_x·s_w[o], the int32 grid the integer
    kernel adds it on, so torch and the file agree."""
    model = qgraph.load(cnn_onnx)
    model.set_calibration(_images(4, 1))
    qgraph.run_pipeline(model, PIPELINE)
    node = next(b.node for b in model.quantized if b.record.kind == "conv")
    assert node.args[0].target is torch.ops.qgraph.quantize_static.default
    x_scale = float(get_tensor(model.gm, node.args[0].args[1].target))
    w_scale = get_tensor(model.gm, node.args[2].target)
    bias = get_tensor(model.gm, node.args[4].target)
    steps = bias / (x_scale * w_scale)
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)


def test_group_weights_and_per_token_activations_are_refused_for_convs(cnn_onnx):
    model = qgraph.load(cnn_onnx)
    model.set_calibration(_images(2, 1))
    with pytest.raises(PipelineError, match="conv layers"):
        qgraph.run_pipeline(model, "quantize{w=int4:group32,exclude=none}")
    with pytest.raises(PipelineError, match="per-token"):
        qgraph.run_pipeline(model, "quantize{w=int8:channel,a=int8:token,exclude=none}")


def test_gptq_leaves_conv_layers_on_round_to_nearest(cnn_onnx):
    model = qgraph.load(cnn_onnx)
    model.set_calibration(_images(4, 1))
    qgraph.run_pipeline(model, "quantize{w=int4:channel,exclude=none},gptq")
    solvers = {r.name: (r.kind, r.solver) for r in model.quant.values()}
    assert {s for k, s in solvers.values() if k == "conv"} == {"rtn"}
    assert {s for k, s in solvers.values() if k == "linear"} == {"gptq"}


# -- bad input --------------------------------------------------------------------------


def _graph_model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_unknown_ops_are_listed(tmp_path):
    proto = _graph_model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Mish", ["a"], ["b"], name="act"),
            helper.make_node("Frobnicate", ["b"], ["y"], domain="com.example", name="odd"),
        ],
        [_vi("x", [1, 4])],
        [_vi("y", [1, 4])],
    )
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(TraceError, match=r"Mish \(first at 'act'\).*com.example::Frobnicate"):
        qgraph.load(path)


def test_control_flow_is_refused(tmp_path):
    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["o"])], "b", [], [_vi("o", [1])]
    )
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    proto = _graph_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch, name="gate")],
        [cond, _vi("x", [1])],
        [_vi("y", [1])],
    )
    path = tmp_path / "if.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(TraceError, match="'gate' is control flow"):
        qgraph.load(path)


def test_external_data_outside_the_folder_is_refused(tmp_path):
    weight = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    (tmp_path / "m.data").write_bytes(weight.raw_data)
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../m.data"), ("offset", "0"), ("length", "64")):
        weight.external_data.add(key=key, value=value)
    proto = _graph_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [_vi("x", [1, 4])],
        [_vi("y", [1, 4])],
        [weight],
    )
    inner = tmp_path / "inner"
    inner.mkdir()
    onnx.save(proto, str(inner / "m.onnx"))
    with pytest.raises(ModelFileError, match="outside the model's folder"):
        qgraph.load(inner / "m.onnx")


def test_corrupt_file_is_refused(tmp_path, cnn_onnx):
    path = tmp_path / "broken.onnx"
    path.write_bytes(cnn_onnx.read_bytes()[:200])
    with pytest.raises(ModelFileError, match="broken.onnx"):
        qgraph.load(path)


def test_dynamic_dims_need_example_inputs(tmp_path):
    proto = _graph_model(
        [helper.make_node("Relu", ["x"], ["y"])], [_vi("x", ["n", 3, "h", "w"])], [_vi("y", None)]
    )
    path = tmp_path / "dyn.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(TraceError, match="dynamic dims"):
        qgraph.load(path)
    model = qgraph.from_onnx(path, (torch.randn(1, 3, 5, 7),))
    x = torch.randn(1, 3, 5, 7)
    torch.testing.assert_close(model(x), torch.relu(x))


def test_npz_inputs_are_checked(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, image=np.zeros((2, 1, 3, 4, 4), np.float32))
    (arr,) = read_inputs(good, ["image"])
    assert arr.shape == (2, 1, 3, 4, 4)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, img=np.zeros((2, 1, 3, 4, 4), np.float32))
    with pytest.raises(DataError, match="missing: image; unknown: img"):
        read_inputs(wrong, ["image"])
    nan = tmp_path / "nan.npz"
    bad = np.zeros((2, 1, 3, 4, 4), np.float32)
    bad[1, 0, 0, 0, 0] = np.nan
    np.savez(nan, image=bad)
    with pytest.raises(DataError, match="1 NaN"):
        read_inputs(nan, ["image"])
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        read_inputs(junk, ["image"])


def test_output_error_matches_numpy():
    gen = np.random.default_rng(0)
    r = gen.standard_normal((3, 7))
    y = r + 0.01 * gen.standard_normal((3, 7))
    err = output_error(torch.from_numpy(r), torch.from_numpy(y))
    noise = ((y - r) ** 2).sum()
    assert err["sqnr_db"] == pytest.approx(10 * np.log10((r**2).sum() / noise), rel=1e-12)
    assert err["rel_l2"] == pytest.approx(np.sqrt(noise / (r**2).sum()), rel=1e-12)
    assert err["max_abs"] == pytest.approx(np.abs(y - r).max(), rel=1e-12)
    assert output_error(torch.from_numpy(r), torch.from_numpy(r))["sqnr_db"] == float("inf")


def test_cli_runs_an_onnx_model_with_npz_inputs(cnn_onnx, tmp_path):
    calib, evals = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, image=_images(6, 1).numpy()[:, None])
    np.savez(evals, image=_images(3, 2).numpy()[:, None])
    report_path, out = tmp_path / "r.json", tmp_path / "q.onnx"
    proc = subprocess.run(
        [
            sys.executable, "-m", "qgraph.cli", "run", "--model", str(cnn_onnx),
            "--pipeline", PIPELINE, "--calib-inputs", str(calib), "--eval-inputs", str(evals),
            "--export", str(out), "--report", str(report_path), "--no-progress",
            "--html", str(tmp_path / "r.html"),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert report["calibration_samples"] == 6 and report["eval_samples"] == 3
    # --html: the per-layer table and the same layers in ONNX Runtime, convolutions included
    kinds = [r["kind"] for r in report["layers"]]
    assert kinds.count("conv") == 3 and all(20 < r["sqnr_db"] < 80 for r in report["layers"])
    trace = report["onnx_trace"]
    assert trace["flagged"] == [] and trace["missing"] == []
    assert "Error per pass, torch and ONNX Runtime" in (tmp_path / "r.html").read_text()

    assert report["import_error"]["scores"]["sqnr_db"] > 100  # the import is exact
    torch_err = report["output_error"]["scores"]
    ort_err = report["export"]["output_error"]["scores"]
    assert 20 < torch_err["sqnr_db"] < 100 and abs(ort_err["sqnr_db"] - torch_err["sqnr_db"]) < 2
    assert _integer_convs(report["export"]["ort_optimized_ops"]) == 3
    assert "scores" in proc.stdout and "SQNR" in proc.stdout


# -- a language model given as ONNX ------------------------------------------------------


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """A tiny Llama traced from torch, and the same network read back from qgraph's own float
    ONNX export (dynamic batch and sequence)."""
    from helpers import tiny_llama

    hf = tiny_llama()
    path = tmp_path_factory.mktemp("llm") / "llama.onnx"
    export_model(qgraph.from_hf(hf), path)
    return hf, path


def test_llm_from_onnx_is_the_same_network(llama_pair):
    hf, path = llama_pair
    via_onnx = qgraph.load(path)
    ids = torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(via_onnx(ids), qgraph.from_hf(hf)(ids), rtol=1e-5, atol=1e-5)
    summary = via_onnx.structure.summary()
    # RMSNorm spelled Pow/ReduceMean/Sqrt/Reciprocal, the tied lm_head as MatMul(Transpose(E)),
    # attention written out as MatMul/Softmax/MatMul
    assert summary["norms"]["rms"] == 5 and summary["residual_norms"] == 5
    assert summary["embeddings"][0]["tied"] and not summary["issues"]
    assert summary["roles"] == qgraph.from_hf(hf).structure.summary()["roles"]
    assert summary["attention"] == {"layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16}


def test_llm_from_onnx_rotates_and_quantizes_like_the_torch_route(llama_pair):
    hf, path = llama_pair
    pipeline = "fuse-norms,rotate{seed=0,online=r2+r4},quantize{w=int4:channel}"
    via_torch, via_onnx = qgraph.from_hf(hf), qgraph.load(path)
    for m in (via_torch, via_onnx):
        qgraph.run_pipeline(m, pipeline, verify_each=True)  # rotate checked exact on each
    a, b = list(via_torch.quantized), list(via_onnx.quantized)
    assert len(a) == len(b) == 14
    for la, lb in zip(a, b, strict=True):
        assert torch.equal(la.stored(via_torch.gm)[0], lb.stored(via_onnx.gm)[0]), la.name
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(via_onnx(ids), via_torch(ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(qgraph.QGraphError, match="written out as MatMul/Softmax"):
        qgraph.run_pipeline(qgraph.load(path), "fuse-norms,rotate{seed=0,online=r3}")


def test_lstm_is_read_and_kept_in_float(tmp_path):
    """A bidirectional ONNX LSTM (gates i, o, f, c) runs as one torch LSTM, equal to ONNX
    Runtime; it is not a linear layer, so quantize leaves it in float."""
    gen = np.random.default_rng(0)
    hidden, size, dirs = 8, 5, 2
    weights = {
        "W": gen.standard_normal((dirs, 4 * hidden, size)).astype(np.float32) * 0.3,
        "R": gen.standard_normal((dirs, 4 * hidden, hidden)).astype(np.float32) * 0.3,
        "B": gen.standard_normal((dirs, 8 * hidden)).astype(np.float32) * 0.1,
        "F": gen.standard_normal((2 * hidden, 4)).astype(np.float32),
    }
    nodes = [
        helper.make_node(
            "LSTM",
            ["x", "W", "R", "B"],
            ["y", "yh", "yc"],
            hidden_size=hidden,
            direction="bidirectional",
        ),  # fmt: skip
        helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["yt", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "F"], ["out"]),
    ]
    inits = [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()]
    inits.append(onnx.numpy_helper.from_array(np.array([0, 0, -1], np.int64), "shape"))
    proto = _graph_model(nodes, [_vi("x", [7, "batch", size])], [_vi("out", None)], inits, 14)
    path = tmp_path / "lstm.onnx"
    onnx.save(proto, str(path))
    x = gen.standard_normal((7, 3, size)).astype(np.float32)
    model = qgraph.from_onnx(path, (torch.from_numpy(x),))
    ref = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(model(torch.from_numpy(x)).numpy(), ref, atol=1e-5, rtol=0)
    model.set_calibration(torch.from_numpy(x))
    qgraph.run_pipeline(model, "quantize{w=int8:channel,exclude=none}")
    assert list(model.quant) == ["F"]  # the head; the LSTM stays float


def _byte_tokenizer(folder) -> None:
    """A 256-symbol byte-level tokenizer saved as tokenizer.json (the tiny Llama's vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(folder))


def test_cli_runs_a_language_model_given_as_onnx_on_text(llama_pair, tmp_path):
    """An ONNX LM with its tokenizer beside it runs the text job: perplexity before and after,
    the float number equal to the torch model's on the same windows."""
    from qgraph.data import load_text, token_windows
    from qgraph.evaluate import perplexity

    hf, path = llama_pair
    folder = tmp_path / "lm"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(path.read_bytes())
    _byte_tokenizer(folder)
    report_path = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "qgraph.cli", "run", "--model", str(folder / "model.onnx"),
            "--pipeline", "fuse-norms,rotate{seed=0},quantize{w=int8:channel}",
            "--window", "64", "--eval-windows", "2", "--calib-windows", "2",
            "--report", str(report_path), "--no-progress",
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(report_path.read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    windows = token_windows(tok, load_text(None, "eval"), 64, 2)
    torch_ppl = perplexity(qgraph.from_hf(hf), windows)
    assert report["ppl_float"] == pytest.approx(torch_ppl, rel=1e-4)
    assert report["ppl"] == pytest.approx(report["ppl_float"], rel=0.02)  # int8 weights


def test_every_tensor_sample_is_calibrated(cnn_onnx):
    """Samples given as tensors are the user's calibration set: all of them are used (the
    calib-batches default of 8 counts token windows), unless the pipeline says otherwise."""
    x = _images(12, 1)
    x[11] *= 5  # only the last sample reaches 5
    for opts, hi in (("", float(x.max())), (",calib-batches=8", float(x[:8].max()))):
        model = qgraph.load(cnn_onnx)
        model.set_calibration(x)
        qgraph.run_pipeline(model, f"quantize{{w=int8:channel,a=int8:tensor,exclude=none{opts}}}")
        first = next(b.node for b in model.quantized).args[0]
        scale = float(get_tensor(model.gm, first.args[1].target))
        assert scale == pytest.approx(hi / 255, rel=1e-6)  # the image input: min 0


def test_external_data_beside_the_model_is_read(cnn_onnx, tmp_path):
    proto = onnx.load(str(cnn_onnx))
    path = tmp_path / "ext.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, location="ext.data", size_threshold=256)
    assert (tmp_path / "ext.data").stat().st_size > 1000
    x = _images(2, 3)
    ref = ort.InferenceSession(str(path)).run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(qgraph.load(path)(x).numpy(), ref, rtol=1e-5, atol=1e-5)
