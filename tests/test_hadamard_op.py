"""The ``qgraph::hadamard`` op in torch and its ONNX lowering (custom node + local function).

References are independent of the fast transform: dense float64 ``(x * s) @ H / sqrt(n)`` with
``H = hadamard_matrix(n)``, the explicit Kronecker product.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim

import qgraph.ops  # noqa: F401  (registers torch.ops.qgraph.*)
from qgraph.backends.onnx_export import export_onnx, op_histogram, postprocess
from qgraph.backends.onnx_hadamard import (
    DENSE_MAX,
    LEFT_MAX,
    QGRAPH_DOMAIN,
    HadamardVariant,
    add_hadamard_functions,
    build_function,
    export_factorization,
    left_base_matrix,
)
from qgraph.backends.onnx_hadamard_fold import (
    FoldedHadamard,
    fold_hadamard_signs,
    folded_matrices,
)
from qgraph.backends.onnx_lowering import CUSTOM_TRANSLATIONS
from qgraph.backends.ort_runtime import OrtModel, optimized_op_histogram
from qgraph.errors import ExportError, NoHadamardError
from qgraph.kernels.hadamard import (
    _base_matrix,
    hadamard_factorization,
    hadamard_matrix,
)

ops = torch.ops.qgraph

SIZES = [1, 2, 12, 20, 112, 256, 576, 1536]  # 112 = 28·4, 576 = 36·16, 1536 = 24·64


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def signs_of(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (1 - 2 * torch.randint(0, 2, (n,), generator=gen)).to(torch.float64)


def dense(x, signs, normalize: bool, transpose: bool) -> np.ndarray:
    """float64 ``(x * s) @ H`` or ``(x @ Hᵀ) * s``, divided by sqrt(n) when normalized."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    h = hadamard_matrix(n).numpy()
    s = np.ones(n) if signs is None else np.asarray(signs, dtype=np.float64)
    y = (x @ h.T) * s if transpose else (x * s) @ h
    return y / math.sqrt(n) if normalize else y


def assert_close(actual, expected, tol: float) -> None:
    expected = np.asarray(expected)
    atol = tol * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=tol, atol=atol)


def test_chosen_sizes_cover_the_interesting_factors():
    assert [hadamard_factorization(n) for n in (112, 576, 1536, 14336)] == [
        (28, 4), (36, 16), (12, 128), (28, 512)
    ]  # fmt: skip
    for k in (12, 20, 28):  # transpose bugs only show with a non-symmetric H_K
        assert not torch.equal(_base_matrix(k), _base_matrix(k).T)


# ---------------------------------------------------------------------------- torch op

VARIANTS = [  # (signs, normalize, transpose)
    pytest.param(True, True, False, id="signs"),
    pytest.param(True, True, True, id="signs-T"),
    pytest.param(False, True, False, id="nosigns"),
    pytest.param(True, False, True, id="unscaled-T"),
]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("with_signs, normalize, transpose", VARIANTS)
def test_torch_op_matches_dense(n, with_signs, normalize, transpose):
    signs = signs_of(n) if with_signs else None
    x = torch.randn(2, 3, n, dtype=torch.float64)
    y = ops.hadamard(x, signs, normalize, transpose)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert_close(y, dense(x, signs, normalize, transpose), 1e-12)

    x32 = x.float()
    y32 = ops.hadamard(x32, signs, normalize, transpose)
    assert y32.dtype == torch.float32
    assert_close(y32, dense(x32, signs, normalize, transpose), 1e-5)


@pytest.mark.parametrize("n", [12, 112, 64])
def test_transpose_is_the_inverse(n):
    x, s = torch.randn(5, n, dtype=torch.float64), signs_of(n)
    back = ops.hadamard(ops.hadamard(x, s, True), s, True, True)
    torch.testing.assert_close(back, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n, transpose", [(12, False), (20, True), (576, False), (64, True)])
def test_autograd_matches_dense(n, transpose):
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    s, g = signs_of(n), torch.randn(3, n, dtype=torch.float64)
    (grad,) = torch.autograd.grad((ops.hadamard(x, s, True, transpose) * g).sum(), x)
    # y = x A  =>  dL/dx = g Aᵀ; A from the dense reference applied to the identity.
    a = dense(np.eye(n), s, True, transpose)
    assert_close(grad, g.numpy() @ a.T, 1e-12)


@pytest.mark.parametrize("n, with_signs, transpose", [(12, True, False), (8, False, True)])
def test_opcheck(n, with_signs, transpose):
    x = torch.randn(2, n, requires_grad=True)
    args = (x, signs_of(n).float() if with_signs else None, True, transpose)
    torch.library.opcheck(ops.hadamard.default, args)


@pytest.mark.parametrize("n", [18, 7, 188])  # 188 = 4·47: divisible by 4, still unknown
def test_unsupported_size_raises(n):
    with pytest.raises(NoHadamardError, match=f"order {n}"):
        ops.hadamard(torch.randn(2, n), None, True)


# ---------------------------------------------------------------------------- function body


def single_node_model(variant: HadamardVariant, dtype: ir.DataType) -> bytes:
    """``y = qgraph::Hadamard…(x[, signs])`` and its function: the lowering without torch."""
    x = ir.Value(name="x", type=ir.TensorType(dtype), shape=ir.Shape(["rows", variant.n]))
    inputs = [x]
    if variant.signs:
        inputs.append(ir.Value(name="s", type=ir.TensorType(dtype), shape=ir.Shape([variant.n])))
    node = ir.Node(QGRAPH_DOMAIN, variant.op_type, inputs, version=1)
    node.outputs[0].name = "y"
    graph = ir.Graph(inputs, node.outputs, nodes=[node], opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    assert add_hadamard_functions(model) == 1
    assert add_hadamard_functions(model) == 0  # idempotent
    return ir.to_proto(model).SerializeToString()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("with_signs, normalize, transpose", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_function_body_matches_dense_in_ort(n, with_signs, normalize, transpose, dtype):
    variant = HadamardVariant(n, transpose, normalize, with_signs)
    ir_dtype = ir.DataType.FLOAT if dtype == np.float32 else ir.DataType.DOUBLE
    session = ort.InferenceSession(
        single_node_model(variant, ir_dtype), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(n).standard_normal((3, n)).astype(dtype)
    feeds = {"x": x}
    signs = signs_of(n).numpy()
    if with_signs:
        feeds["s"] = signs.astype(dtype)
    (y,) = session.run(None, feeds)
    assert y.dtype == dtype and y.shape == x.shape
    expected = dense(x, signs if with_signs else None, normalize, transpose)
    assert_close(y, expected, 1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("n", [1, 12, 576, 14336, 2**16])
def test_function_uses_standard_ops_only(n):
    function = build_function(HadamardVariant(n, True, True, True))
    domains = {node.domain for node in function}
    assert domains == {""}
    ops_used = {node.op_type for node in function}
    assert ops_used <= {"Constant", "CastLike", "Mul", "Reshape", "Shape", "MatMul", "Split",
                        "Add", "Sub", "Concat"}  # fmt: skip
    k, m = export_factorization(n)
    stages = sum(node.op_type == "Split" for node in function)
    matmuls = sum(node.op_type == "MatMul" for node in function)
    if n <= DENSE_MAX:  # small sizes: one dense MatMul, fewer nodes for ORT to run
        assert (stages, matmuls) == (0, 1)
        return
    staged = m > DENSE_MAX  # else one [m, m] MatMul; staged, the 4 lowest stages are one
    assert stages == (int(math.log2(m)) - 4 if staged else 0)  # 16×16 MatMul
    assert matmuls == (k > 1) + (m > 1)
    assert staged == (n == 2**16)  # K would exceed LEFT_MAX: the kernel's (1, 2^16)


@pytest.mark.parametrize("n", [144, 256, 576, 1536, 4096, 11008, 14336, 2**16])
def test_export_factorization_is_the_kernel_s_matrix(n):
    """Regrouped factors of two: ``left ⊗ H_m`` is exactly ``hadamard_matrix(n)``."""
    k, m = export_factorization(n)
    assert k * m == n and k <= LEFT_MAX
    if m > DENSE_MAX:
        assert (k, m) == hadamard_factorization(n)  # nothing to regroup within LEFT_MAX
        return
    product = np.kron(left_base_matrix(n, k), hadamard_matrix(m).numpy())
    np.testing.assert_array_equal(product, hadamard_matrix(n).numpy())


def test_export_factorization_picks_the_cheaper_split():
    got = {n: export_factorization(n) for n in (576, 1536, 4096, 14336)}
    assert got == {576: (36, 16), 1536: (24, 64), 4096: (32, 128), 14336: (112, 128)}


def test_variant_names_round_trip():
    for n in (1, 576):
        for t in (False, True):
            for normalize in (False, True):
                for signs in (False, True):
                    v = HadamardVariant(n, t, normalize, signs)
                    assert HadamardVariant.from_op_type(v.op_type) == v
    assert HadamardVariant(576, True, True, True).op_type == "Hadamard576T"
    assert HadamardVariant(64, False, False, False).op_type == "Hadamard64_unscaled_nosigns"
    assert HadamardVariant.from_op_type("Hadamard") is None
    assert HadamardVariant.from_op_type("Hadamard012") is None


# ---------------------------------------------------------------------------- export


class Rotated(torch.nn.Module):
    """``hadamard(x @ W, s, ...)``: the rotation behind a linear layer, as in a rotated model."""

    def __init__(self, n: int, with_signs: bool, normalize: bool, transpose: bool):
        super().__init__()
        gen = torch.Generator().manual_seed(n)
        self.register_buffer("w", torch.randn(n, n, generator=gen) / math.sqrt(n))
        self.register_buffer("s", signs_of(n) if with_signs else None)  # float64: cast in ONNX
        self.normalize, self.transpose = normalize, transpose

    def forward(self, x):
        return ops.hadamard(x @ self.w, self.s, self.normalize, self.transpose)


def exported_op_type(n: int, signs, normalize: bool, transpose: bool, rank: int) -> str:
    """The op type export gives: folded when the signs fold (any signs at n ≤ DENSE_MAX)."""
    matrices = folded_matrices(n, None if signs is None else signs.numpy(), normalize, transpose)
    if matrices is not None:
        return FoldedHadamard(n, rank if len(matrices) == 2 else None).op_type
    if folded_matrices(n, None, normalize, transpose) is None:  # staged butterflies
        return HadamardVariant(n, transpose, normalize, signs is not None).op_type
    return FoldedHadamard(n, rank, "last" if transpose else "first").op_type


def load_functions(path) -> dict[str, onnx.FunctionProto]:
    return {f.name: f for f in onnx.load(path).functions}


EXPORT_CASES = [  # every variant for a K-only and a K·2^k size, one each for the others
    *(pytest.param(n, *v.values, id=f"{n}-{v.id}") for n in (12, 1536) for v in VARIANTS),
    pytest.param(576, True, True, False, id="576-signs"),
    pytest.param(256, True, True, True, id="256-signs-T"),
]


@pytest.mark.parametrize("n, with_signs, normalize, transpose", EXPORT_CASES)
def test_exported_module_runs_in_ort(tmp_path, n, with_signs, normalize, transpose):
    module = Rotated(n, with_signs, normalize, transpose)
    path = export_onnx(
        module, (torch.randn(2, n),), tmp_path / "h.onnx", dynamic_shapes=({0: Dim("rows")},)
    )
    name = exported_op_type(n, module.s, normalize, transpose, rank=2)
    assert op_histogram(path) == {"MatMul": 1, f"qgraph::{name}": 1}
    proto = onnx.load(path)
    assert {o.domain: o.version for o in proto.opset_import}[QGRAPH_DOMAIN] == 1
    functions = load_functions(path)
    assert list(functions) == [name] and functions[name].domain == QGRAPH_DOMAIN
    assert {node.domain for node in functions[name].node} == {""}
    onnx.checker.check_model(proto, full_check=True)

    runner = OrtModel(path)
    for rows in (1, 5):
        x = torch.randn(rows, n)
        with torch.no_grad():
            expected = module(x).numpy()
        assert_close(runner(x), expected, 1e-5)
        reference = dense(x.double() @ module.w.double(), module.s, normalize, transpose)
        assert_close(runner(x), reference, 1e-5)


def test_two_sizes_give_two_functions_and_ort_inlines_them(tmp_path):
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randn(12, 64) / 8)
            self.register_buffer("s", signs_of(12).float())

        def forward(self, x):  # two Hadamard12 calls share one function
            a = ops.hadamard(x, self.s, True)
            b = ops.hadamard(ops.hadamard(a, self.s, True, True) @ self.w, None, True, True)
            return b, ops.hadamard(x * 2, self.s, True)

    module = Two()
    path = export_onnx(
        module, (torch.randn(2, 3, 12),), tmp_path / "two.onnx",
        dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},),
    )  # fmt: skip
    hist = op_histogram(path)  # signs and scales folded into per-call matrices (n ≤ DENSE_MAX)
    assert hist["qgraph::Hadamard12_folded"] == 3 and hist["qgraph::Hadamard64_folded"] == 1
    assert sorted(load_functions(path)) == ["Hadamard12_folded", "Hadamard64_folded"]
    assert not any(key.startswith("qgraph::") for key in optimized_op_histogram(path))
    matrices = {n.input[1] for n in onnx.load(path).graph.node if n.domain == QGRAPH_DOMAIN}
    assert len(matrices) == 3  # the two forward calls with the same signs share one matrix

    x = torch.randn(4, 2, 12)
    outputs = OrtModel(path).run(x)
    with torch.no_grad():
        for actual, expected in zip(outputs, module(x), strict=True):
            assert_close(actual, expected.numpy(), 1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_postprocess_adds_functions_to_a_raw_export():
    """``torch.onnx.export`` with the translations alone leaves the node without a function."""
    module = Rotated(20, True, True, True).eval()
    program = torch.onnx.export(
        module, (torch.randn(3, 20),), dynamo=True, optimize=False, verbose=False,
        opset_version=21, custom_translation_table=CUSTOM_TRANSLATIONS,
    )  # fmt: skip
    assert op_histogram(program.model)["qgraph::Hadamard20T"] == 1
    assert not program.model.functions
    postprocess(program.model)
    assert (QGRAPH_DOMAIN, "Hadamard20_folded", "") in program.model.functions
    assert program.model.opset_imports[QGRAPH_DOMAIN] == 1


class Bare(torch.nn.Module):
    def forward(self, x):
        return ops.hadamard(x, None, True)


def test_unsupported_size_fails_at_export(tmp_path):
    module = Bare()  # torch.export runs the fake kernel, which does not look at n
    with pytest.raises(ExportError, match="order 18"):
        export_onnx(module, (torch.randn(2, 18),), tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


# ---------------------------------------------------------------------------- folded signs


def kronecker_signs(n: int, seed: int) -> torch.Tensor:
    """Signs of rank one over the transform's ``(K, m)`` grid: ``s[k·m + j] = a_k b_j``."""
    k, m = export_factorization(n)
    return torch.kron(signs_of(k, seed), signs_of(m, seed + 1))


def folded_dense(matrices: list[np.ndarray], n: int) -> np.ndarray:
    """The ``[n, n]`` map ``x ↦ y`` of folded matrices: ``M``, or ``kron(Lᵀ, R)`` for
    ``y = vec(L · X · R)`` with ``X`` the row-major ``[K, m]`` view of ``x``."""
    if len(matrices) == 1:
        return matrices[0]
    left, right = matrices
    return np.kron(left.T, right)


@pytest.mark.parametrize("n", [12, 64, 112, 576, 1536])
@pytest.mark.parametrize("normalize, transpose", [(True, False), (True, True), (False, True)])
def test_folded_matrices_are_the_transform(n, normalize, transpose):
    signs = kronecker_signs(n, 7).numpy()
    matrices = folded_matrices(n, signs, normalize, transpose)
    assert matrices is not None and len(matrices) == (1 if n <= DENSE_MAX else 2)
    expected = dense(np.eye(n), signs, normalize, transpose)
    np.testing.assert_allclose(folded_dense(matrices, n), expected, rtol=0, atol=1e-15)


def test_signs_fold_only_when_rank_one_over_the_grid():
    assert folded_matrices(64, signs_of(64).numpy(), True, False) is not None  # dense: any
    assert folded_matrices(1536, signs_of(1536).numpy(), True, False) is None
    assert folded_matrices(1536, None, True, False) is not None
    assert folded_matrices(256, None, True, False) is not None  # regrouped as 4 · 64
    assert folded_matrices(2**16, None, True, False) is None  # K = 1: staged butterflies
    s = kronecker_signs(1536, 0)
    k, m = export_factorization(1536)
    assert not torch.equal(s, s.reshape(k, m)[0].repeat(k))  # both factors are random
    assert set(s.tolist()) == {-1.0, 1.0}


def _rank3_model(n: int, signs: np.ndarray, transpose: bool) -> ir.Model:
    """``y = qgraph::Hadamard…(x, signs)`` on a ``[batch, seq, n]`` input, signs constant."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT),
                 shape=ir.Shape(["batch", "seq", n]))  # fmt: skip
    s = ir.Value(name="s", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([n]))
    s.const_value = ir.Tensor(signs.astype(np.float32), name="s")
    node = ir.Node(QGRAPH_DOMAIN, HadamardVariant(n, transpose, True, True).op_type, [x, s],
                   version=1)  # fmt: skip
    node.outputs[0].name = "y"
    node.outputs[0].type, node.outputs[0].shape = x.type, x.shape
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[s],
                     opset_imports={"": 21}, name="rotation")  # fmt: skip
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("n", [64, 576, 1536])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("rank_one", [True, False])
def test_folding_is_bit_exact_in_ort(n, transpose, rank_one):
    """Rank-one signs fold into the matrices; others keep a Mul. Either way no Shape node and
    the output equals the general function's bit for bit."""
    signs = (kronecker_signs(n, 1) if rank_one else signs_of(n, 1)).numpy()
    general, folded = _rank3_model(n, signs, transpose), _rank3_model(n, signs, transpose)
    assert fold_hadamard_signs(folded) == 1
    assert add_hadamard_functions(general) == 1 and add_hadamard_functions(folded) == 0
    x = np.random.default_rng(n).standard_normal((2, 5, n)).astype(np.float32)
    outputs = []
    for model in (general, folded):
        proto = ir.to_proto(model)
        onnx.checker.check_model(proto, full_check=True)
        session = ort.InferenceSession(proto.SerializeToString(),
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        outputs.append(session.run(None, {"x": x})[0])
    np.testing.assert_array_equal(outputs[1], outputs[0])
    assert_close(outputs[1], dense(x, signs, True, transpose), 1e-5)
    kinds = [node.op_type for node in folded.functions.values().__iter__().__next__()]
    assert "Shape" not in kinds
    assert kinds.count("Mul") == (0 if rank_one or n <= DENSE_MAX else 1)


def test_signs_fed_at_run_time_keep_a_mul_and_unknown_rank_the_general_function():
    model = _rank3_model(576, kronecker_signs(576, 0).numpy(), False)
    model.graph.initializers.pop("s")
    model.graph.inputs.append(model.graph.node(0).inputs[1])  # signs fed at run time
    model.graph.node(0).inputs[1].const_value = None
    assert fold_hadamard_signs(model) == 1
    assert model.graph.node(0).op_type == "Hadamard576_folded_rank3_signsfirst"
    assert [i.name for i in model.graph.node(0).inputs[:2]] == ["x", "s"]
    model = _rank3_model(1536, signs_of(1536).numpy(), False)
    model.graph.inputs[0].shape = None  # rank unknown: the reshapes cannot be static
    assert fold_hadamard_signs(model) == 0
