"""ONNX lowering of ``qgraph::sparse_matmul`` (``x @ Sᵀ`` with a COO sparse ``S``).

PROTOTYPE: variant chosen by env var for measurement.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import onnx_ir as ir
import torch
from onnxscript import opset21 as op

import qgraph.sparse_ops  # noqa: F401  (registers torch.ops.qgraph.sparse_matmul)

__all__ = ["SPARSE_TRANSLATIONS", "sparse_matmul"]

_RANK = {
    ir.DataType.FLOAT16: 1,
    ir.DataType.BFLOAT16: 1,
    ir.DataType.FLOAT: 2,
    ir.DataType.DOUBLE: 3,
}


def _compute_dtype(a: ir.DataType | None, b: ir.DataType | None) -> ir.DataType:
    if a is None or b is None:
        return a or b or ir.DataType.FLOAT
    if a == b:
        return a
    ra, rb = _RANK.get(a, 2), _RANK.get(b, 2)
    if ra == rb:  # float16 with bfloat16
        return ir.DataType.FLOAT
    return a if ra > rb else b


def _cast(value, dtype: ir.DataType):
    return value if value.dtype == dtype else op.Cast(value, to=dtype)


def _ints(values: list[int]):
    return op.Constant(value=ir.tensor(values, dtype=ir.DataType.INT64))


def _zeros_like_out(x, out_features: int, dtype: ir.DataType):
    shape = op.Concat(op.Shape(x, end=-1), _ints([out_features]), axis=0)
    return op.ConstantOfShape(shape, value=ir.tensor([0], dtype=dtype))


def sparse_matmul(x, rows, cols, values, out_features: int):
    dtype = _compute_dtype(x.dtype, values.dtype)
    xf = _cast(x, dtype)
    vf = _cast(values, dtype)
    variant = os.environ.get("QG_SPARSE", "elements")
    if variant == "elements":
        prod = op.Mul(op.Gather(xf, cols, axis=-1), vf)
        idx = op.Expand(rows, op.Shape(prod))
        y = op.ScatterElements(
            _zeros_like_out(xf, out_features, dtype), idx, prod, axis=-1, reduction="add"
        )
    else:
        flat = op.Reshape(xf, op.Concat(_ints([-1]), op.Shape(xf, start=-1), axis=0))
        xt = op.Transpose(flat, perm=[1, 0])  # [in, N]
        g = op.Gather(xt, cols, axis=0)  # [nnz, N]
        prod = op.Mul(g, op.Unsqueeze(vf, _ints([1])))
        n = op.Shape(flat, start=0, end=1)
        zeros = op.ConstantOfShape(
            op.Concat(_ints([out_features]), n, axis=0), value=ir.tensor([0], dtype=dtype)
        )
        yt = op.ScatterND(zeros, op.Unsqueeze(rows, _ints([1])), prod, reduction="add")
        y = op.Reshape(
            op.Transpose(yt, perm=[1, 0]),
            op.Concat(op.Shape(xf, end=-1), _ints([out_features]), axis=0),
        )
    return y if dtype == x.dtype else op.Cast(y, to=x.dtype)


SPARSE_TRANSLATIONS: dict[Callable, Callable] = {
    torch.ops.qgraph.sparse_matmul.default: sparse_matmul,
}
