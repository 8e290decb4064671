"""qgraph::sparse_matmul (x @ Sᵀ for a COO sparse S): torch op, autograd, ONNX lowering, ORT.

References are dense float64 matrices built here with plain torch (``index_put`` with
accumulate, so repeated (row, col) pairs add up), independent of the code under test.
"""

from __future__ import annotations

import onnx
import pytest
import torch
from helpers import max_rel_err
from torch.export import Dim

import qgraph.sparse_ops  # noqa: F401  (registers torch.ops.qgraph.sparse_matmul)
from qgraph.backends import onnx_export
from qgraph.backends.onnx_export import export_onnx, op_histogram
from qgraph.backends.onnx_sparse import SMALL_BATCH, SPARSE_TRANSLATIONS
from qgraph.backends.ort_runtime import OrtModel, optimized_op_histogram
from qgraph.formats import WeightSpec
from qgraph.kernels.sparse_split import outlier_mask, split_weight

ops = torch.ops.qgraph
F64 = torch.float64

OPCHECK_TESTS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)


# ---------------------------------------------------------------------------- helpers


def random_part(
    out: int, inp: int, nnz: int, seed: int = 0, repeats: bool = False, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, values), row-major sorted; with ``repeats`` some (row, col) pairs repeat."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randperm(out * inp, generator=gen)[:nnz]
    if repeats and nnz >= 4:
        flat[nnz // 2 :] = flat[: nnz - nnz // 2]  # every pair twice (or so)
        flat[-1] = flat[0]  # and one three times
    flat = flat.sort().values
    values = torch.randn(nnz, generator=gen, dtype=dtype)
    return flat // inp, flat % inp, values


def dense(rows, cols, values, out: int, inp: int) -> torch.Tensor:
    """Dense S [out, in] in float64, differentiable w.r.t. values; repeats accumulate."""
    s = torch.zeros(out, inp, dtype=F64)
    return s.index_put((rows, cols), values.to(F64), accumulate=True)


@pytest.fixture
def sparse_export(monkeypatch):
    """export_onnx with the sparse translation registered (it is the same dict object)."""
    for target, fn in SPARSE_TRANSLATIONS.items():
        monkeypatch.setitem(onnx_export.CUSTOM_TRANSLATIONS, target, fn)
    return export_onnx


# ---------------------------------------------------------------------------- torch op


@pytest.mark.parametrize("shape", [(7,), (5, 24), (2, 3, 24)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("repeats", [False, True], ids=["unique", "repeats"])
def test_matches_dense(shape, repeats):
    shape = shape[:-1] + (24,)
    out, inp, nnz = 10, 24, 40
    rows, cols, values = random_part(out, inp, nnz, seed=1, repeats=repeats)
    if repeats:
        pairs = set(zip(rows.tolist(), cols.tolist(), strict=True))
        assert len(pairs) < nnz
    x = torch.randn(shape)
    y = ops.sparse_matmul(x, rows, cols, values, out)
    assert y.shape == (*shape[:-1], out) and y.dtype == torch.float32
    expected = x.to(F64) @ dense(rows, cols, values, out, inp).T
    torch.testing.assert_close(y.to(F64), expected, rtol=1e-6, atol=1e-6)


def test_wider_output_and_dtypes():
    rows, cols, values = random_part(6, 16, 20, seed=2)
    s = dense(rows, cols, values, 9, 16)  # out_features 9 > 6 rows: zero columns 6..8
    x = torch.randn(3, 16, dtype=F64)
    y = ops.sparse_matmul(x, rows, cols, values, 9)
    assert y.dtype == F64 and y.shape == (3, 9)
    torch.testing.assert_close(y, x @ s.T, rtol=1e-12, atol=1e-12)
    assert (y[:, 6:] == 0).all()
    # bfloat16 activations: computed in float32 (the values' dtype), returned in bfloat16
    xb = torch.randn(4, 16).to(torch.bfloat16)
    yb = ops.sparse_matmul(xb, rows, cols, values, 9)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, (xb.to(F64) @ s.T).to(torch.bfloat16))


def test_empty_sparse_part():
    rows = cols = torch.zeros(0, dtype=torch.int64)
    values = torch.zeros(0, requires_grad=True)
    x = torch.randn(2, 3, 8, requires_grad=True)
    y = ops.sparse_matmul(x, rows, cols, values, 5)
    assert y.shape == (2, 3, 5) and (y == 0).all()
    y.sum().backward()
    assert (x.grad == 0).all() and values.grad.shape == (0,)


def test_bad_arguments():
    rows, cols, values = random_part(4, 8, 6)
    with pytest.raises(RuntimeError, match="one length"):
        ops.sparse_matmul(torch.randn(2, 8), rows, cols[:-1], values, 4)
    with pytest.raises(RuntimeError, match="1-D"):
        ops.sparse_matmul(torch.randn(2, 8), rows[None], cols, values, 4)


@pytest.mark.parametrize("repeats", [False, True], ids=["unique", "repeats"])
def test_autograd_matches_dense(repeats):
    out, inp = 12, 20
    rows, cols, values = random_part(out, inp, 30, seed=3, repeats=repeats, dtype=F64)
    x = torch.randn(2, 5, inp, dtype=F64)
    upstream = torch.randn(2, 5, out, dtype=F64)

    x1, v1 = x.clone().requires_grad_(), values.clone().requires_grad_()
    (ops.sparse_matmul(x1, rows, cols, v1, out) * upstream).sum().backward()
    x2, v2 = x.clone().requires_grad_(), values.clone().requires_grad_()
    ((x2 @ dense(rows, cols, v2, out, inp).T) * upstream).sum().backward()

    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v1.grad, v2.grad, rtol=1e-12, atol=1e-12)


def test_gradcheck_and_second_order():
    rows, cols, values = random_part(5, 7, 12, seed=4, repeats=True, dtype=F64)
    x = torch.randn(3, 7, dtype=F64, requires_grad=True)
    values.requires_grad_()

    def fn(x, values):
        return ops.sparse_matmul(x, rows, cols, values, 6)

    assert torch.autograd.gradcheck(fn, (x, values))
    assert torch.autograd.gradgradcheck(fn, (x, values))


def test_opcheck():
    rows, cols, values = random_part(6, 16, 20, seed=5, repeats=True)
    empty = torch.zeros(0, dtype=torch.int64)
    cases = [
        (torch.randn(3, 16), rows, cols, values, 6),
        (torch.randn(2, 4, 16), rows, cols, values, 8),
        (torch.randn(16), rows, cols, values, 6),
        (torch.randn(2, 3, 16), empty, empty, torch.zeros(0), 6),
    ]
    for x, r, c, v, out in cases:
        args = (x.requires_grad_(), r, c, v.clone().requires_grad_(), out)
        torch.library.opcheck(ops.sparse_matmul.default, args, test_utils=OPCHECK_TESTS)


# ---------------------------------------------------------------------------- ONNX


class SparseOnly(torch.nn.Module):
    def __init__(self, rows, cols, values, out: int):
        super().__init__()
        self.register_buffer("rows", rows)
        self.register_buffer("cols", cols)
        self.register_buffer("values", values)
        self.out = out

    def forward(self, x):
        return ops.sparse_matmul(x, self.rows, self.cols, self.values, self.out)


def test_onnx_sparse_only_both_branches(tmp_path, sparse_export):
    """Dynamic rows N on both sides of SMALL_BATCH (GatherElements vs Gather branch), and
    repeated (row, col) pairs; ORT against the dense float64 reference."""
    out, inp = 48, 64
    rows, cols, values = random_part(out, inp, 150, seed=6, repeats=True)
    s = dense(rows, cols, values, out, inp)
    path = sparse_export(
        SparseOnly(rows, cols, values, out),
        (torch.randn(6, inp),),
        tmp_path / "s.onnx",
        dynamic_shapes=({0: Dim("rows")},),
    )
    hist = op_histogram(path)
    assert hist.get("If") == 1 and hist.get("ScatterND") == 1, hist
    assert hist.get("GatherElements") == 1 and hist.get("Gather") == 1, hist
    for optimization in ("disable", "all"):
        model = OrtModel(path, optimization=optimization)
        for n in (1, SMALL_BATCH - 1, SMALL_BATCH, 40):
            x = torch.randn(n, inp)
            assert max_rel_err(model(x), x.to(F64) @ s.T) <= 1e-6, (optimization, n)


def quantized_split(out: int, inp: int, ratio: float, group: int, seed: int):
    """A weight with a few large entries, split into Q(W_dense) (4-bit asymmetric, groups of
    ``group`` inputs) + S (the ⌊ratio·n⌋ largest |w|), with qgraph.kernels' quantizer."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) * (1 + 9 * torch.rand(out, inp, generator=gen) ** 8)
    return split_weight(w, outlier_mask(w, ratio), WeightSpec(4, "group", group, False))


class SplitLinear(torch.nn.Module):
    """``y = qlinear(x, Q(W_dense)) + sparse_matmul(x, S)``: a dense-and-sparse linear."""

    def __init__(self, out: int, inp: int, ratio: float, group: int = 32, seed: int = 0):
        super().__init__()
        split = quantized_split(out, inp, ratio, group, seed)
        # quant.py's layout (codes [out, in], scale/zero [out, G]) -> qlinear's [in, out]
        self.register_buffer("codes", split.dense.codes.T.contiguous())
        self.register_buffer("scale", split.dense.scale.T.contiguous())
        self.register_buffer("zero", split.dense.zero.T.contiguous())
        self.register_buffer(
            "bias", torch.randn(out, generator=torch.Generator().manual_seed(seed))
        )
        self.register_buffer("rows", split.sparse.rows)
        self.register_buffer("cols", split.sparse.cols)
        self.register_buffer("values", split.sparse.values)
        self.group, self.out, self.inp = group, out, inp
        self.weight = split.weight  # Q(W_dense) + S [out, in], for the reference only
        self.nnz = split.sparse.nnz

    def forward(self, x):
        dense_part = ops.qlinear(x, self.codes, self.scale, self.zero, self.bias, self.group, 4)
        return dense_part + ops.sparse_matmul(x, self.rows, self.cols, self.values, self.out)

    def reference(self, x):
        return x.to(F64) @ self.weight.to(F64).T + self.bias.to(F64)


class TwoSplits(torch.nn.Module):
    """Two split layers reading the same input (like q/k projections), then a third."""

    def __init__(self):
        super().__init__()
        self.a = SplitLinear(64, 128, 0.01, seed=1)
        self.b = SplitLinear(64, 128, 0.02, seed=2)
        self.c = SplitLinear(32, 64, 0.0, seed=3)  # empty sparse part

    def forward(self, x):
        return self.c(self.a(x) * self.b(x))


def float_initializer_shapes(path) -> list[tuple[int, ...]]:
    model = onnx.load(path)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}
    return [tuple(i.dims) for i in model.graph.initializer if i.data_type in floats]


def test_split_linear_onnx(tmp_path, sparse_export):
    module = SplitLinear(96, 128, 0.02)
    assert module.nnz == int(0.02 * 96 * 128)
    seq = 5
    path = sparse_export(
        module,
        (torch.randn(2, seq, 128),),
        tmp_path / "split.onnx",
        dynamic_shapes=({0: Dim("batch")},),
    )

    # S is stored as [nnz] arrays, never densely
    shapes = float_initializer_shapes(path)
    assert (96, 128) not in shapes and (128, 96) not in shapes, shapes
    # exactly: scale [G, out], bias, values [nnz, 1] (S's values, unsqueezed once at export)
    assert sorted(shapes) == sorted([(128 // 32, 96), (96,), (module.nnz, 1)]), shapes

    # ORT still fuses the dense part into MatMulNBits
    hist = optimized_op_histogram(path)
    assert hist.get("com.microsoft::MatMulNBits") == 1, hist
    assert "DequantizeLinear" not in hist and hist.get("ScatterND") == 1, hist

    exact = OrtModel(path, optimization="disable")
    fused = OrtModel(path, optimization="all", matmulnbits_accuracy_level=0)
    for batch in (1, 7):  # N = 5 and 35: both sides of SMALL_BATCH
        x = torch.randn(batch, seq, 128)
        with torch.no_grad():
            expected = module(x).numpy()
        assert max_rel_err(expected, module.reference(x)) <= 1e-5
        assert max_rel_err(exact(x), expected) <= 1e-5
        assert max_rel_err(fused(x), expected) <= 1e-5


def test_two_splits_and_empty_part_onnx(tmp_path, sparse_export):
    """Two sparse layers on one input (CSE must keep their branches apart) and nnz = 0."""
    module = TwoSplits()
    path = sparse_export(
        module,
        (torch.randn(2, 3, 128),),
        tmp_path / "two.onnx",
        dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},),
    )
    hist = op_histogram(path)
    assert hist.get("ScatterND") == 2 and hist.get("If") == 2, hist
    assert optimized_op_histogram(path).get("com.microsoft::MatMulNBits") == 3
    model = OrtModel(path, optimization="all", matmulnbits_accuracy_level=0)
    for shape in [(1, 1, 128), (3, 11, 128)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = module(x).numpy()
        assert max_rel_err(model(x), expected) <= 1e-5


def test_empty_sparse_part_onnx_is_zeros(tmp_path, sparse_export):
    empty = torch.zeros(0, dtype=torch.int64)
    module = SparseOnly(empty, empty, torch.zeros(0), 12)
    path = sparse_export(
        module, (torch.randn(2, 3, 8),), tmp_path / "e.onnx", dynamic_shapes=({0: Dim("b")},)
    )
    assert "ScatterND" not in op_histogram(path)
    y = OrtModel(path)(torch.randn(4, 3, 8))
    assert y.shape == (4, 3, 12) and not y.any()


@pytest.mark.parametrize(
    "x_dtype, v_dtype",
    [(F64, torch.float32), (torch.float16, torch.float32), (torch.float16, torch.float16)],
    ids=["x64-v32", "x16-v32", "x16-v16"],
)
def test_onnx_dtypes(tmp_path, sparse_export, x_dtype, v_dtype):
    """Output in x's dtype; 16-bit x with 16-bit values is computed in float32 in ONNX (ORT's
    ScatterND has no float16 add), so it is compared with the float64 reference."""
    out, inp = 40, 30
    rows, cols, values = random_part(out, inp, 60, seed=7, dtype=v_dtype)
    module = SparseOnly(rows, cols, values, out)
    path = sparse_export(
        module,
        (torch.randn(3, inp, dtype=x_dtype),),
        tmp_path / "d.onnx",
        dynamic_shapes=({0: Dim("n")},),
    )
    model = OrtModel(path)
    for n in (2, 20):
        x = torch.randn(n, inp, dtype=x_dtype)
        actual = model(x)
        assert actual.dtype == torch.empty(0, dtype=x_dtype).numpy().dtype
        reference = x.to(F64) @ dense(rows, cols, values, out, inp).T
        if v_dtype == torch.float16:
            assert max_rel_err(actual, reference) <= 1e-3
        else:
            assert max_rel_err(actual, ops.sparse_matmul(x, rows, cols, values, out)) <= 1e-7
            assert max_rel_err(actual, reference) <= (1e-6 if x_dtype == F64 else 1e-3)


def test_onnx_static_shapes(tmp_path, sparse_export):
    """Without dynamic dims the optimizer sees constant shapes; the graph must survive it."""
    rows, cols, values = random_part(40, 30, 60, seed=8)
    module = SparseOnly(rows, cols, values, 40)
    for n in (3, 20):
        x = torch.randn(2, n, 30)
        path = sparse_export(module, (x,), tmp_path / f"static{n}.onnx")
        assert max_rel_err(OrtModel(path)(x), module(x)) <= 1e-7
