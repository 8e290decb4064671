"""ONNX lowering, export and ONNX Runtime execution of qgraph's custom ops.

References are independent of the code under test: weights are quantized here with plain torch
math, and ORT outputs are compared with both the torch module and that plain math.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from helpers import max_rel_err
from onnx import numpy_helper
from torch.export import Dim

import qgraph.ops  # noqa: F401  (registers torch.ops.qgraph.*)
from qgraph.backends import onnx_export
from qgraph.backends.onnx_export import export_onnx, op_histogram, postprocess
from qgraph.backends.onnx_lowering import CUSTOM_TRANSLATIONS
from qgraph.backends.ort_runtime import OrtModel, optimized_op_histogram
from qgraph.errors import ExportError

ops = torch.ops.qgraph


# ---------------------------------------------------------------------------- helpers


def quantize_kn(
    weight: torch.Tensor, group_size: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of a ``[K, N]`` weight in groups of ``group_size`` rows."""
    k, n = weight.shape
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    groups = weight.reshape(k // group_size, group_size, n)
    wmin = groups.amin(1).clamp(max=0)
    wmax = groups.amax(1).clamp(min=0)
    scale = ((wmax - wmin) / (hi - lo)).clamp(min=1e-6)
    zero = torch.round(lo - wmin / scale).clamp(lo, hi)
    codes = torch.round(groups / scale[:, None]) + zero[:, None]
    codes = codes.clamp(lo, hi).reshape(k, n)
    return codes.to(torch.int8), scale.float(), zero.to(torch.int8)


def dequantize_ref(codes, scale, zero, group_size):
    g = torch.arange(codes.shape[0]) // group_size
    return (codes.float() - zero.float()[g]) * scale[g]


class QLinear(torch.nn.Module):
    def __init__(self, k: int, n: int, group_size: int, bits: int, bias: bool, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        codes, scale, zero = quantize_kn(torch.randn(k, n, generator=gen), group_size, bits)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("bias", torch.randn(n, generator=gen) if bias else None)
        self.group_size, self.bits = group_size, bits

    def forward(self, x):
        return ops.qlinear(
            x, self.codes, self.scale, self.zero, self.bias, self.group_size, self.bits
        )

    def reference(self, x):
        out = x @ dequantize_ref(self.codes, self.scale, self.zero, self.group_size)
        return out if self.bias is None else out + self.bias


class PerToken(torch.nn.Module):
    def __init__(self, bits: int, symmetric: bool):
        super().__init__()
        self.bits, self.symmetric = bits, symmetric

    def forward(self, x):
        return ops.quantize_per_token(x, self.bits, self.symmetric)


class Static(torch.nn.Module):
    def __init__(self, scale: float, zero: float, bits: int):
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale))
        self.register_buffer("zero", torch.tensor(zero))
        self.bits = bits

    def forward(self, x):
        return ops.quantize_static(x, self.scale, self.zero, self.bits)


def dyn(rank: int):
    """Dynamic leading dims: (rows,) for rank 2, (batch, seq) for rank 3."""
    if rank == 2:
        return ({0: Dim("rows")},)
    return ({0: Dim("batch"), 1: Dim("seq")},)


# ---------------------------------------------------------------------------- qlinear

QLINEAR_CASES = [
    # (K, N, group_size, bits, bias, rank)
    pytest.param(128, 64, 128, 8, True, 3, id="int8-G1-bias-rank3"),
    pytest.param(128, 64, 128, 8, False, 2, id="int8-G1-nobias-rank2"),
    pytest.param(128, 64, 32, 4, True, 3, id="int4-g32-bias-rank3"),
    pytest.param(128, 64, 32, 4, False, 2, id="int4-g32-nobias-rank2"),
    pytest.param(128, 64, 128, 4, True, 2, id="int4-G1-bias-rank2"),
    pytest.param(256, 96, 64, 3, False, 3, id="int3-g64-nobias-rank3"),
]


@pytest.mark.parametrize("k, n, group_size, bits, bias, rank", QLINEAR_CASES)
def test_qlinear_matches_torch(tmp_path, k, n, group_size, bits, bias, rank):
    module = QLinear(k, n, group_size, bits, bias)
    example = torch.randn(2, 5, k) if rank == 3 else torch.randn(6, k)
    path = export_onnx(module, (example,), tmp_path / "q.onnx", dynamic_shapes=dyn(rank))

    model = onnx.load(path)
    dtypes = {i.name: i.data_type for i in model.graph.initializer}
    weight_type = onnx.TensorProto.INT4 if bits <= 4 else onnx.TensorProto.INT8
    assert sorted(dtypes.values()).count(weight_type) == 2, dtypes  # codes and zero
    assert "Cast" not in op_histogram(model)

    exact = OrtModel(path, optimization="disable")
    fused = OrtModel(path, optimization="all", matmulnbits_accuracy_level=0)
    for shape in [(3, 7, k), (1, 1, k)] if rank == 3 else [(9, k), (1, k)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = module(x).numpy()
            independent = module.reference(x).numpy()
        assert max_rel_err(expected, independent) <= 1e-5
        assert max_rel_err(exact(x), expected) <= 1e-5
        assert max_rel_err(exact(x.numpy()), independent) <= 1e-5
        assert max_rel_err(fused(x), expected) <= 1e-4


def test_int4_blocked_is_packed_and_fused(tmp_path):
    """Weights large enough that the exporter's own folding skips them: our postprocess folds."""
    module = QLinear(256, 128, 32, 4, bias=True)
    path = export_onnx(
        module, (torch.randn(2, 3, 256),), tmp_path / "q4.onnx", dynamic_shapes=dyn(3)
    )

    model = onnx.load(path)
    int4 = {
        tuple(i.dims): i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4
    }
    assert set(int4) == {(256, 128), (8, 128)}  # codes and zero points
    # Packed round trip: the stored nibbles are exactly the codes / zero points.
    np.testing.assert_array_equal(
        numpy_helper.to_array(int4[(256, 128)]).astype(np.int8), module.codes.numpy()
    )
    np.testing.assert_array_equal(
        numpy_helper.to_array(int4[(8, 128)]).astype(np.int8), module.zero.numpy()
    )
    assert len(int4[(256, 128)].raw_data) == 256 * 128 // 2
    assert "Cast" not in op_histogram(path)

    hist = optimized_op_histogram(path, optimization="all")
    assert hist.get("com.microsoft::MatMulNBits") == 1, hist
    assert "DequantizeLinear" not in hist
    assert optimized_op_histogram(path, optimization="basic").get("DequantizeLinear") == 1

    x = torch.randn(4, 5, 256)
    with torch.no_grad():
        expected = module(x).numpy()
    assert max_rel_err(OrtModel(path, matmulnbits_accuracy_level=0)(x), expected) <= 1e-4
    assert max_rel_err(OrtModel(path, optimization="disable")(x), expected) <= 1e-5


def test_symmetric_int4_weights_export_without_zero_points(tmp_path):
    """All-zero zero points are dropped (the default, same values): ONNX Runtime's MatMulNBits
    then runs its symmetric kernel. Non-zero ones stay."""
    module = QLinear(256, 128, 32, 4, bias=False)
    centred = module.codes - module.zero.repeat_interleave(32, 0)
    module.codes.copy_(centred.clamp(-8, 7))  # symmetric codes: zero points all 0
    module.zero.zero_()
    path = export_onnx(
        module, (torch.randn(2, 3, 256),), tmp_path / "s.onnx", dynamic_shapes=dyn(3)
    )
    dq = [n for n in onnx.load(path).graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1 and len(dq[0].input) == 2
    assert optimized_op_histogram(path).get("com.microsoft::MatMulNBits") == 1
    x = torch.randn(4, 5, 256)
    with torch.no_grad():
        expected = module(x).numpy()
    assert max_rel_err(OrtModel(path, matmulnbits_accuracy_level=0)(x), expected) <= 1e-4
    asym = export_onnx(
        QLinear(256, 128, 32, 4, bias=False), (torch.randn(2, 3, 256),), tmp_path / "a.onnx",
        dynamic_shapes=dyn(3),
    )  # fmt: skip
    dq = [n for n in onnx.load(asym).graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq[0].input) == 3


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_postprocess_folds_int4_casts():
    """Without the exporter's optimizer every Cast(to=INT4) is left to postprocess."""
    module = QLinear(64, 32, 16, 4, bias=False).eval()
    program = torch.onnx.export(
        module,
        (torch.randn(3, 64),),
        dynamo=True,
        opset_version=21,
        custom_translation_table=CUSTOM_TRANSLATIONS,
        optimize=False,
        verbose=False,
    )
    before = op_histogram(program.model)
    assert before.get("Cast", 0) >= 2
    postprocess(program.model)
    assert "Cast" not in op_histogram(program.model)
    proto = ir.serde.serialize_model(program.model)
    int4 = {
        tuple(i.dims): numpy_helper.to_array(i).astype(np.int8)
        for i in proto.graph.initializer
        if i.data_type == onnx.TensorProto.INT4
    }
    np.testing.assert_array_equal(int4[(64, 32)], module.codes.numpy())
    np.testing.assert_array_equal(int4[(4, 32)], module.zero.numpy())
    # the int8 originals are gone
    assert not [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8]


@pytest.mark.parametrize("k", [64, 512])  # below / above the exporter's own folding limit
def test_out_of_range_int4_codes_are_refused(tmp_path, k):
    module = QLinear(k, 32, 32, 4, bias=False)
    module.codes[0, 0] = 9  # would silently wrap to -7 in a plain INT4 cast
    target = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="outside the INT4 range"):
        export_onnx(module, (torch.randn(2, k),), target)
    assert os.listdir(tmp_path) == []


class W4A8Block(torch.nn.Module):
    """Per-token int8 activations feeding an int4 blocked linear, then an int8 linear."""

    def __init__(self):
        super().__init__()
        self.up = QLinear(128, 256, 32, 4, bias=True, seed=1)
        self.down = QLinear(256, 64, 256, 8, bias=True, seed=2)

    def forward(self, x):
        h = self.up(ops.quantize_per_token(x, 8, False))
        return self.down(torch.relu(h))


def test_quantized_block_end_to_end(tmp_path):
    module = W4A8Block()
    path = export_onnx(
        module, (torch.randn(2, 5, 128),), tmp_path / "b.onnx", dynamic_shapes=dyn(3)
    )
    hist = optimized_op_histogram(path)
    assert hist.get("com.microsoft::MatMulNBits") == 2, hist
    x = torch.randn(3, 11, 128)
    with torch.no_grad():
        expected = module(x).numpy()
    assert max_rel_err(OrtModel(path, optimization="disable")(x), expected) <= 1e-5
    assert max_rel_err(OrtModel(path, matmulnbits_accuracy_level=0)(x), expected) <= 1e-4


# ---------------------------------------------------------------------------- activations


def per_token_step(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """One quantization step per row, computed independently of the kernel."""
    if symmetric:
        return x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    return (hi - lo) / (2**bits - 1)


def assert_fake_quant_close(actual: np.ndarray, expected: np.ndarray, step: np.ndarray) -> None:
    diff = np.abs(actual - expected)
    assert (diff <= 1e-6).mean() >= 0.999, f"{(diff > 1e-6).sum()} of {diff.size} differ"
    assert (diff <= step * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_quantize_per_token(tmp_path, bits, symmetric):
    module = PerToken(bits, symmetric)
    path = export_onnx(module, (torch.randn(2, 5, 64),), tmp_path / "t.onnx", dynamic_shapes=dyn(3))
    ort_model = OrtModel(path)
    gen = torch.Generator().manual_seed(bits + symmetric)
    x = torch.randn(8, 33, 64, generator=gen) * torch.rand(8, 33, 1, generator=gen) * 4
    x[0, 0] = 0.0  # an all-zero row exercises the scale eps
    x[1, 2] = x[1, 2].abs() + 0.1  # all-positive row exercises the asymmetric clamps
    expected = module(x).numpy()
    actual = ort_model(x)
    assert_fake_quant_close(actual, expected, per_token_step(x, bits, symmetric).numpy())
    # the quantized values take at most 2**bits distinct levels per row
    assert max(len(np.unique(r)) for r in actual.reshape(-1, 64)) <= 2**bits


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_static(tmp_path, bits):
    module = Static(scale=0.05, zero=3.0, bits=bits)
    path = export_onnx(module, (torch.randn(2, 5, 16),), tmp_path / "s.onnx", dynamic_shapes=dyn(3))
    x = torch.randn(4, 9, 16) * 4
    expected = module(x).numpy()
    actual = OrtModel(path)(x)
    assert_fake_quant_close(actual, expected, np.float32(0.05))


# ---------------------------------------------------------------------------- files


def test_metadata_written(tmp_path):
    meta = {"qgraph.pipeline": "quantize(bits=4)", "qgraph.version": "0.1.0"}
    path = export_onnx(
        QLinear(32, 16, 32, 8, True), (torch.randn(2, 32),), tmp_path / "m.onnx", metadata=meta
    )
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert props.items() >= meta.items()


class Broken(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("broken forward")


def test_failed_export_leaves_target_untouched(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous model bytes")
    with pytest.raises(ExportError, match="torch.onnx.export failed"):
        export_onnx(Broken(), (torch.randn(2, 4),), target)
    assert target.read_bytes() == b"previous model bytes"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_failed_save_leaves_target_untouched(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous model bytes")

    def half_written_save(model, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(onnx_export.ir, "save", half_written_save)
    for external in (False, True):
        with pytest.raises(ExportError, match="saving the model failed"):
            export_onnx(
                QLinear(32, 16, 32, 8, True), (torch.randn(2, 32),), target, external_data=external
            )
        assert target.read_bytes() == b"previous model bytes"
        assert os.listdir(tmp_path) == ["model.onnx"]


def test_external_data(tmp_path):
    module = QLinear(128, 64, 32, 4, True)
    target = tmp_path / "ext.onnx"
    target.write_bytes(b"old")
    path = export_onnx(
        module, (torch.randn(2, 128),), target, external_data=True, dynamic_shapes=dyn(2)
    )
    assert sorted(os.listdir(tmp_path)) == ["ext.onnx", "ext.onnx.data"]
    assert (tmp_path / "ext.onnx.data").stat().st_size >= 128 * 64 // 2
    x = torch.randn(5, 128)
    with torch.no_grad():
        expected = module(x).numpy()
    assert max_rel_err(OrtModel(path, optimization="disable")(x), expected) <= 1e-5
    assert max_rel_err(OrtModel(path, matmulnbits_accuracy_level=0)(x), expected) <= 1e-4


def test_external_data_automatic(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1000)
    export_onnx(QLinear(128, 64, 32, 4, True), (torch.randn(2, 128),), tmp_path / "big.onnx")
    export_onnx(Static(0.1, 0.0, 8), (torch.randn(2, 8),), tmp_path / "small.onnx")
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data", "small.onnx"]


def test_ort_load_failure_names_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="bad.onnx"):
        OrtModel(bad)
    with pytest.raises(ExportError, match="missing.onnx"):
        OrtModel(tmp_path / "missing.onnx")


# ---------------------------------------------------------------------------- op registration

OPCHECK_TESTS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)


def test_opcheck_qlinear():
    codes, scale, zero = quantize_kn(torch.randn(64, 16), 16, 4)
    x = torch.randn(3, 64, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    torch.library.opcheck(
        ops.qlinear.default, (x, codes, scale, zero, bias, 16, 4), test_utils=OPCHECK_TESTS
    )
    torch.library.opcheck(
        ops.qlinear.default, (x, codes, scale, zero, None, 16, 4), test_utils=OPCHECK_TESTS
    )


def test_opcheck_quantize_per_token():
    x = torch.randn(4, 3, 16, requires_grad=True)
    for symmetric in (True, False):
        torch.library.opcheck(
            ops.quantize_per_token.default, (x, 8, symmetric), test_utils=OPCHECK_TESTS
        )


def test_opcheck_quantize_static():
    x = torch.randn(4, 16, requires_grad=True) * 3
    scale, zero = torch.tensor(0.05), torch.tensor(2.0)
    torch.library.opcheck(
        ops.quantize_static.default,
        (x.detach().requires_grad_(), scale, zero, 8),
        test_utils=OPCHECK_TESTS,
    )
