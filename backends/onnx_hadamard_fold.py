"""Fold a Hadamard node's constant signs and scale into its matrices: fewer nodes per rotation.

A ``qgraph::Hadamard{n}`` function multiplies by the signs in a node of its own and, being
rank-generic, reshapes back through a ``Shape`` node. In a decode step of ONNX Runtime every
node costs a few microseconds whatever its size, and an R1–R4 model runs four online
rotations per layer (R3 on queries and keys, R4, o_proj's), so such nodes add up.

When the signs are an initializer they can live inside the matrices instead, bit for bit:

* ``n ≤ DENSE_MAX``: ``(x ∘ s) H c = x (D_s H c)``, one ``MatMul`` (R3's 64-point rotations of
  queries and keys; any signs);
* ``n = K · m`` with ``1 < K`` and ``1 < m ≤ DENSE_MAX`` (:func:`export_factorization`: R4's
  1536 = 24 · 64, o_proj's 576 = 36 · 16): with ``X`` the ``[K, m]`` view of ``x``,
  ``H = H_K ⊗ H_m`` gives ``y = H_Kᵀ c (X ∘ S) H_m``; when ``S = a bᵀ`` (rank one),
  ``X ∘ S = D_a X D_b`` and ``y = (H_Kᵀ c D_a) X (D_b H_m)``: ``Reshape → MatMul → MatMul →
  Reshape``, with static reshapes for the input's rank.
* other signs (``rotate`` draws independent ones; rank-one signs were tried and made W4A4 worse,
  31.08 against 28.54 on SmolLM2, seed 0) keep a ``Mul`` of their own, before the reshape (or
  after it, transposed), but still get the static reshapes: five nodes instead of the general
  function's six.

Multiplying by ±1 is exact and round-to-nearest is symmetric, so every product keeps its
magnitude and each sum is the old sum times a sign: the result equals the unfolded function's.
Sizes with ``K = 1`` or ``m > DENSE_MAX`` (staged butterflies) and inputs of unknown rank or
dtype keep the general function.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import onnx_ir as ir

from qgraph.kernels.hadamard import _base_matrix, hadamard_matrix

from .onnx_hadamard import (
    DENSE_MAX,
    QGRAPH_DOMAIN,
    QGRAPH_OPSET_VERSION,
    HadamardVariant,
    export_factorization,
    left_base_matrix,
)

__all__ = ["FoldedHadamard", "fold_hadamard_signs", "folded_matrices"]

_NAME = re.compile(
    r"Hadamard(?P<n>[1-9][0-9]*)_folded(?:_rank(?P<r>[1-9][0-9]*))?(?:_signs(?P<s>first|last))?"
)
_FLOATS = {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


@dataclasses.dataclass(frozen=True)
class FoldedHadamard:
    """A folded variant: ``y = x @ M`` (dense, ``rank`` None) or ``y = L · X · R`` on the
    ``[..., K, m]`` view of a rank-``rank`` input. Its matrices are the node's inputs, after
    ``x`` and, when ``signs`` is ``"first"`` (``x ∘ s`` before) or ``"last"`` (``∘ s`` after),
    the signs."""

    n: int
    rank: int | None
    signs: str | None = None

    @property
    def op_type(self) -> str:
        return (f"Hadamard{self.n}_folded" + (f"_rank{self.rank}" if self.rank else "")
                + (f"_signs{self.signs}" if self.signs else ""))  # fmt: skip

    @classmethod
    def from_op_type(cls, op_type: str) -> FoldedHadamard | None:
        match = _NAME.fullmatch(op_type)
        if match is None:
            return None
        return cls(int(match["n"]), int(match["r"]) if match["r"] else None, match["s"])

    def build_function(self, onnx_opset: int) -> ir.Function:
        """Body of standard ops: one ``MatMul``, or ``Reshape → MatMul → MatMul → Reshape``
        (with a ``Mul`` by the signs first or last)."""
        x = ir.Value(name="x")
        nodes: list[ir.Node] = []

        def add(op_type: str, inputs: list[ir.Value], **attributes) -> ir.Value:
            node = ir.Node("", op_type, inputs, name=f"n{len(nodes)}_{op_type}",
                           attributes=ir.convenience.convert_attributes(attributes))  # fmt: skip
            node.outputs[0].name = f"v{len(nodes)}"
            nodes.append(node)
            return node.outputs[0]

        def shape(dims: list[int]) -> ir.Value:
            return add("Constant", [], value=ir.tensor(np.array(dims, dtype=np.int64)))

        signs = ir.Value(name="signs") if self.signs else None
        inputs = [x] + ([signs] if signs is not None else [])
        y = add("Mul", [x, signs]) if self.signs == "first" else x
        if self.rank is None:
            matrix = ir.Value(name="matrix")
            inputs.append(matrix)
            y = add("MatMul", [y, matrix])
        else:
            k, m = export_factorization(self.n)
            left, right = ir.Value(name="left"), ir.Value(name="right")
            inputs += [left, right]
            keep = [0] * (self.rank - 1)  # Reshape's 0 copies the input's dimension
            y = add("Reshape", [y, shape(keep + [k, m])])
            y = add("MatMul", [left, y])
            y = add("MatMul", [y, right])
            y = add("Reshape", [y, shape(keep + [self.n])])
        if self.signs == "last":
            y = add("Mul", [y, signs])
        y.name = "y"
        graph = ir.Graph(inputs, [y], nodes=nodes, opset_imports={"": onnx_opset},
                         name=self.op_type)  # fmt: skip
        return ir.Function(QGRAPH_DOMAIN, self.op_type, graph=graph, attributes=[])


def folded_matrices(
    n: int, signs: np.ndarray | None, normalize: bool, transpose: bool
) -> list[np.ndarray] | None:
    """float64 matrices of the folded transform of ``x`` (``[M]`` or ``[L, R]``), or None.

    Not transposed, the transform is ``(x ∘ s) H c``; transposed, ``(x Hᵀ c) ∘ s``, with
    ``H = hadamard_matrix(n)`` and ``c = 1/√n`` when normalized. The scale sits where the
    general function puts it (the first matrix), so the rounding is the same.
    """
    c = 1.0 / math.sqrt(n) if normalize else 1.0
    s = np.ones(n) if signs is None else np.asarray(signs, dtype=np.float64).reshape(n)
    if n <= DENSE_MAX:
        h = hadamard_matrix(n).numpy()
        return [(h.T * c) * s[None, :]] if transpose else [s[:, None] * (h * c)]
    k, m = export_factorization(n)
    if k == 1 or not 1 < m <= DENSE_MAX:
        return None
    grid = s.reshape(k, m)
    a, b = grid[:, 0], grid[0, :] * grid[0, 0]
    if not np.array_equal(np.outer(a, b), grid):
        return None  # signs not rank-one over (K, m): they need their own Mul
    h_k, h_m = left_base_matrix(n, k), _base_matrix(m).numpy()
    if transpose:  # D_a (H_K c X H_m) D_b
        return [a[:, None] * (h_k * c), h_m.T * b[None, :]]
    return [(h_k.T * c) * a[None, :], b[:, None] * h_m]


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant array, also through the ``Cast``/``CastLike`` the translation puts
    on float64 signs (±1 is exact in every float type); None when fed at run time."""
    if value is None or value.is_graph_input():
        return None
    producer = value.producer()
    if producer is not None and producer.op_type in ("Cast", "CastLike") and producer.domain == "":
        return _constant(producer.inputs[0])
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def fold_hadamard_signs(model: ir.Model) -> int:
    """Replace every foldable ``qgraph::Hadamard…`` node of the main graph by its folded
    variant, with its matrices as initializers in the input's dtype (shared between nodes with
    the same signs), and add the variants' functions; returns how many nodes were folded."""
    graph = model.graph
    onnx_opset = model.opset_imports.get("", 21)
    shared: dict[tuple, list[ir.Value]] = {}
    folded = 0
    for node in list(graph):
        variant = HadamardVariant.from_op_type(node.op_type)
        if node.domain != QGRAPH_DOMAIN or variant is None:
            continue
        x = node.inputs[0]
        signs = _constant(node.inputs[1]) if variant.signs else None
        if x is None or x.dtype not in _FLOATS:
            continue
        rank = len(x.shape) if x.shape is not None else None
        side = None
        matrices = None
        if signs is not None or not variant.signs:
            matrices = folded_matrices(variant.n, signs, variant.normalize, variant.transpose)
        if matrices is None and rank:  # signs that do not fold: a Mul of their own
            side = "last" if variant.transpose else "first"
            matrices = folded_matrices(variant.n, None, variant.normalize, variant.transpose)
            signs = None
        if matrices is None or (len(matrices) == 2 and not rank):
            continue
        key = (variant, side, None if signs is None else signs.tobytes(), x.dtype)
        if key not in shared:
            dtype = x.dtype.numpy()
            folded_signs = "_".join(v.name for v in node.inputs[1:]) if signs is not None else ""
            stem = f"hadamard{variant.n}_{folded_signs or 'plain'}"  # side Mul: sign-free
            parts = ("matrix",) if len(matrices) == 1 else ("left", "right")
            shared[key] = [_initializer(graph, f"{stem}_{part}", array.astype(dtype))
                           for part, array in zip(parts, matrices, strict=True)]  # fmt: skip
        target = FoldedHadamard(variant.n, rank if len(matrices) == 2 else None, side)
        sign_input = [node.inputs[1]] if side else []
        new = ir.Node(QGRAPH_DOMAIN, target.op_type, [x, *sign_input, *shared[key]],
                      version=QGRAPH_OPSET_VERSION, name=node.name)  # fmt: skip
        new.metadata_props.update(node.metadata_props)  # provenance: pass, layer, FX node
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [new], list(node.outputs), list(new.outputs)
        )
        function_key = (QGRAPH_DOMAIN, target.op_type, "")
        if function_key not in model.functions:
            model.functions[function_key] = target.build_function(onnx_opset)
        model.opset_imports.setdefault(QGRAPH_DOMAIN, QGRAPH_OPSET_VERSION)
        folded += 1
    return folded


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    while name in graph.initializers:
        name += "_"
    value = ir.Value(name=name, shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))  # fmt: skip
    value.const_value = ir.Tensor(array, name=name)
    graph.register_initializer(value)
    return value
