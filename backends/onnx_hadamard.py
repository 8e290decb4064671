"""ONNX lowering of ``qgraph::hadamard``: a ``qgraph``-domain node plus a model-local function.

A file that uses the op stays readable (one ``qgraph::Hadamard576`` node per rotation, not ~50
butterfly nodes) and still runs in stock ONNX Runtime, which inlines model-local functions at
load time: each function body uses standard ONNX ops only.

Two halves, because the exporter offers no public way to add a function from a translation:

* :func:`hadamard` (the translation) emits the node, through an ``onnx.defs.OpSchema`` made for
  the variant, so the exporter's op recorder treats it like any other op;
* :func:`add_hadamard_functions` (run by ``onnx_export.postprocess``) adds the function of every
  variant the graph calls, and the ``qgraph`` opset import. It is idempotent.

Variants are named ``Hadamard{n}[T][_unscaled][_nosigns]``: ``T`` for ``transpose=True``,
``_unscaled`` for ``normalize=False`` and ``_nosigns`` when ``signs`` is None (the node then
has the single input ``x``). The name is all :func:`add_hadamard_functions` needs.

Function body, with ``n = K * m`` (:func:`export_factorization`: the kernel's factorization with
factors of two moved into ``K``, the same matrix) and ``r = min(m, RADIX)``::

    x * signs                          (signs given, not transpose)
    Reshape [-1, K, m]
    MatMul(C, ·)                       (K > 1; C = H_Kᵀ, or H_K for transpose: y[k'] =
                                        sum_k H_K[k, k'] x[k], as in the kernel)
    MatMul(·, H_m)                     (m ≤ DENSE_MAX: every Sylvester stage at once), else
    Reshape [-1, r] → MatMul(·, H_r)   (r > 1: the butterfly stages h = 1 ... r/2 at once)
    log2(m/r) × [Reshape [-1, 2, h] → Split → Add, Sub → Concat]   (h = r, 2r, ..., m/2)
    Reshape Shape(x)
    · * signs                          (signs given, transpose)

``1/sqrt(n)`` (normalize) is folded into the first matrix constant. The stages act on
different index bits and commute, so this is the kernel's transform up to float rounding.

Constants are stored in float64 and ``CastLike``-d to ``x``: one function serves every float
dtype, each entry rounded once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import numpy as np
import onnx
import onnx.defs
import onnx_ir as ir
from onnxscript import opset21 as op
from onnxscript import values

from qgraph.errors import ExportError
from qgraph.kernels.hadamard import (
    _base_matrix,
    _no_hadamard,
    hadamard_factorization,
    hadamard_matrix,
)

__all__ = [
    "QGRAPH_DOMAIN",
    "QGRAPH_OPSET_VERSION",
    "HadamardVariant",
    "add_hadamard_functions",
    "build_function",
    "hadamard",
    "is_qgraph_function",
]

QGRAPH_DOMAIN = "qgraph"
QGRAPH_OPSET_VERSION = 1
RADIX = 16
"""The lowest ``log2(RADIX)`` butterfly stages run as one ``[-1, 16] @ H_16`` MatMul: ONNX
Runtime's Split/Concat over blocks of 1-8 floats are slow (at 4096 × 64 rows, 7.1 ms with
butterflies only, 1.0 ms like this on one EPYC core)."""

DENSE_MAX = 128
"""Sizes up to this run as one dense ``[n, n]`` MatMul (e.g. R3's 64-point rotations of q and
k), and so does the power-of-two factor ``m ≤ DENSE_MAX`` of a larger size (R4's
1536 = 24 · 64: a 24 × 24 and a 64 × 64 MatMul): a hundred multiply-adds per value cost
less than the per-node overhead of the staged form, which dominates a decode step in ONNX
Runtime."""

LEFT_MAX = 256
"""The largest ``K`` :func:`export_factorization` makes: the ``K × K`` matrix is the left operand,
which ONNX Runtime does not prepack, and its cost per value grows with ``K``."""


def export_factorization(n: int) -> tuple[int, int]:
    """``(K, m)`` with ``n = K · m`` for the ONNX bodies: the kernel's ``(K₀, m₀)`` regrouped as
    ``(K₀ · 2^j, m₀ / 2^j)``.

    Sylvester's ``H_{m₀} = H_{2^j} ⊗ H_{m₀/2^j}``, so ``H_{K₀} ⊗ H_{m₀} = (H_{K₀} ⊗ H_{2^j}) ⊗
    H_{m₀/2^j}``: the same matrix (:func:`left_base_matrix` builds the left factor). ``j`` makes
    both parts dense MatMuls (``m ≤ DENSE_MAX``, ``K ≤ LEFT_MAX``) at the least cost
    ``2K + m`` per value (the unpacked left operand counts double; ties keep the larger ``m``).
    Measured on a 2-core EPYC (``benchmarks/hadamard_split.py``), one rotation of a 1536 vector
    takes 6.5–7.5 µs as ``24 · 64`` against 7.8–14 µs as the kernel's ``12 · 128``. Without
    such a ``j`` it is the kernel's pair.
    Raises :class:`NoHadamardError` for an unsupported size.
    """
    fact = hadamard_factorization(n)
    if fact is None:
        raise _no_hadamard(n)
    k, m = fact
    options = [(2 * k * 2**j + m // 2**j, j) for j in range(int(math.log2(m)) + 1)
               if m // 2**j <= DENSE_MAX and k * 2**j <= LEFT_MAX]  # fmt: skip
    if not options:
        return k, m
    j = min(options)[1]
    return k * 2**j, m // 2**j


def left_base_matrix(n: int, k: int) -> np.ndarray:
    """float64 ``H_K`` of :func:`export_factorization`'s ``(K, ·)``: ``H_{K₀} ⊗ H_{K/K₀}``."""
    k0 = hadamard_factorization(n)[0]
    base = _base_matrix(k0).numpy()
    return base if k == k0 else np.kron(base, _base_matrix(k // k0).numpy())


_FLOAT_TYPES = ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"]
_NAME = re.compile(r"Hadamard(?P<n>[1-9][0-9]*)(?P<t>T?)(?P<u>_unscaled)?(?P<s>_nosigns)?")


@dataclasses.dataclass(frozen=True)
class HadamardVariant:
    """Everything that shapes one function body; two calls of a variant share its function."""

    n: int
    transpose: bool
    normalize: bool
    signs: bool

    @property
    def op_type(self) -> str:
        return (
            f"Hadamard{self.n}{'T' if self.transpose else ''}"
            f"{'' if self.normalize else '_unscaled'}{'' if self.signs else '_nosigns'}"
        )

    @classmethod
    def from_op_type(cls, op_type: str) -> HadamardVariant | None:
        """The variant an op type names, or None for any other op type."""
        match = _NAME.fullmatch(op_type)
        if match is None:
            return None
        return cls(int(match["n"]), bool(match["t"]), not match["u"], not match["s"])

    def factorization(self) -> tuple[int, int]:
        """(K, m) of the body (:func:`export_factorization`); raises :class:`NoHadamardError`
        (the kernel's message, with the nearest good size) for an unsupported size."""
        return export_factorization(self.n)


def is_qgraph_function(function: ir.Function) -> bool:
    """True for the functions this module adds: ``light_optimize`` must not inline them."""
    return function.domain == QGRAPH_DOMAIN


# ------------------------------------------------------------------ translation (node)


@functools.cache
def _node_op(variant: HadamardVariant) -> values.Op:
    """An onnxscript op for the variant, with a schema made for it: the exporter's op
    recorder needs a schema to record a node, and ``qgraph`` ops have none registered."""
    param = onnx.defs.OpSchema.FormalParameter
    inputs = [param("x", "T")] + ([param("signs", "T")] if variant.signs else [])
    schema = onnx.defs.OpSchema(
        variant.op_type,
        QGRAPH_DOMAIN,
        QGRAPH_OPSET_VERSION,
        inputs=inputs,
        outputs=[param("y", "T")],
        type_constraints=[("T", _FLOAT_TYPES, "float tensors")],
    )
    return values.Op(values.Opset(QGRAPH_DOMAIN, QGRAPH_OPSET_VERSION), variant.op_type, schema)


def _static_last_dim(x) -> int:
    dim = x.shape[-1] if x.shape is not None and len(x.shape) else None
    if not isinstance(dim, int):
        raise ExportError(
            f"hadamard: the last dimension of the input must be static to export, got {dim}"
        )
    return dim


def hadamard(x, signs, normalize: bool, transpose: bool = False):
    """Translation of ``qgraph::hadamard``: one ``qgraph::Hadamard{n}...`` node.

    ``signs`` is cast to ``x``'s dtype here, in the main graph, where it folds into the
    initializer (the torch kernel converts it the same way).
    """
    variant = HadamardVariant(_static_last_dim(x), bool(transpose), bool(normalize),
                              signs is not None)  # fmt: skip
    variant.factorization()  # fail at export, not when ONNX Runtime loads the file
    if signs is None:
        return _node_op(variant)(x)
    if signs.dtype is None or x.dtype is None or signs.dtype != x.dtype:
        signs = op.CastLike(signs, x)
    return _node_op(variant)(x, signs)


# ------------------------------------------------------------------ function body


class _Body:
    """Records the nodes of one function body, naming every value: a file saved after
    ``postprocess`` alone (no ``NameFixPass``) must still have valid value names."""

    def __init__(self) -> None:
        self.nodes: list[ir.Node] = []

    def op(self, op_type: str, inputs, attributes=None, num_outputs: int = 1) -> list[ir.Value]:
        node = ir.Node(
            "",
            op_type,
            inputs,
            attributes=ir.convenience.convert_attributes(attributes or {}),
            num_outputs=num_outputs,
            name=f"n{len(self.nodes)}_{op_type}",
        )
        for i, out in enumerate(node.outputs):
            out.name = f"v{len(self.nodes)}_{i}"
        self.nodes.append(node)
        return list(node.outputs)

    def one(self, op_type: str, *inputs, **attributes) -> ir.Value:
        return self.op(op_type, list(inputs), attributes)[0]

    def const(self, array: np.ndarray) -> ir.Value:
        return self.one("Constant", value=ir.tensor(array))

    def float_const(self, array: np.ndarray, like: ir.Value) -> ir.Value:
        """A float64 constant in ``like``'s dtype, whatever that is."""
        return self.one("CastLike", self.const(np.asarray(array, dtype=np.float64)), like)


def _butterflies(body: _Body, y: ir.Value, m: int, h: int) -> ir.Value:
    """Sylvester stages ``h, 2h, ..., m/2`` on the last axis of ``[..., m]`` data: stage ``h``
    maps each pair of ``h``-blocks ``(a, b)`` to ``(a + b, a - b)``, as the kernel does."""
    split = body.const(np.array([1, 1], dtype=np.int64)) if h < m else None
    while h < m:
        pairs = body.one("Reshape", y, body.const(np.array([-1, 2, h], dtype=np.int64)))
        a, b = body.op("Split", [pairs, split], {"axis": 1}, num_outputs=2)
        y = body.one("Concat", body.one("Add", a, b), body.one("Sub", a, b), axis=1)
        h *= 2
    return y


def build_function(variant: HadamardVariant, onnx_opset: int = 21) -> ir.Function:
    """The model-local function of ``variant`` (standard ops of opset ``onnx_opset`` only).

    ``1/sqrt(n)`` is folded into the first matrix constant (there is one unless ``n = 1``,
    where the scale is 1), which saves a pass over the data.
    """
    k, m = variant.factorization()
    r = min(m, RADIX)
    body = _Body()
    x = ir.Value(name="x")
    signs = ir.Value(name="signs") if variant.signs else None
    scale = 1.0 / math.sqrt(variant.n) if variant.normalize else 1.0

    y = body.one("Mul", x, signs) if signs is not None and not variant.transpose else x
    if variant.n <= DENSE_MAX:
        h_n = hadamard_matrix(variant.n).numpy()
        dense = (h_n.T if variant.transpose else h_n) * scale
        y = body.one("MatMul", y, body.float_const(dense, x))
        return _finish(body, variant, x, signs, y, onnx_opset)
    y = body.one("Reshape", y, body.const(np.array([-1, k, m], dtype=np.int64)))
    if k > 1:  # y[r, k', j] = sum_k H_K[k, k'] y[r, k, j] = (H_Kᵀ @ y[r])[k', j]
        h_k = left_base_matrix(variant.n, k)
        left = (h_k if variant.transpose else h_k.T) * scale
        y = body.one("MatMul", body.float_const(left, x), y)
        scale = 1.0
    if m <= DENSE_MAX:  # all Sylvester stages as one [m, m] MatMul (e.g. R4's 1536 = 24 · 64)
        y = body.one("MatMul", y, body.float_const(_base_matrix(m).numpy() * scale, x))
    else:
        if r > 1:  # the first log2(r) stages at once: H_m = H_{m/r} (x) H_r, H_r symmetric
            y = body.one("Reshape", y, body.const(np.array([-1, r], dtype=np.int64)))
            y = body.one("MatMul", y, body.float_const(_base_matrix(r).numpy() * scale, x))
        y = _butterflies(body, y, m, r)
    y = body.one("Reshape", y, body.one("Shape", x))
    return _finish(body, variant, x, signs, y, onnx_opset)


def _finish(body: _Body, variant: HadamardVariant, x, signs, y, onnx_opset: int) -> ir.Function:
    if signs is not None and variant.transpose:
        y = body.one("Mul", y, signs)
    y.name = "y"

    inputs = [x] + ([signs] if signs is not None else [])
    graph = ir.Graph(inputs, [y], nodes=body.nodes, opset_imports={"": onnx_opset},
                     name=variant.op_type)  # fmt: skip
    return ir.Function(QGRAPH_DOMAIN, variant.op_type, graph=graph, attributes=[])


# ------------------------------------------------------------------ post-processing


def _qgraph_nodes(model: ir.Model) -> list[ir.Node]:
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    return [
        node
        for graph in graphs
        for node in ir.traversal.RecursiveGraphIterator(graph)
        if node.domain == QGRAPH_DOMAIN
    ]


def add_hadamard_functions(model: ir.Model) -> int:
    """Add the function of every ``qgraph::Hadamard…`` variant the model calls and is missing,
    and the ``qgraph`` opset import; returns how many functions were added."""
    added = 0
    onnx_opset = model.opset_imports.get("", 21)
    for node in _qgraph_nodes(model):
        variant = HadamardVariant.from_op_type(node.op_type)
        if variant is None:
            continue
        expected = 2 if variant.signs else 1
        if len(node.inputs) != expected:
            raise ExportError(
                f"post-processing: node {node.name!r} ({node.op_type}) has "
                f"{len(node.inputs)} inputs, expected {expected}"
            )
        model.opset_imports.setdefault(QGRAPH_DOMAIN, QGRAPH_OPSET_VERSION)
        key = (QGRAPH_DOMAIN, variant.op_type, "")
        if key not in model.functions:
            model.functions[key] = build_function(variant, onnx_opset)
            added += 1
    return added
