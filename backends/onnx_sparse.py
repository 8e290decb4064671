"""ONNX lowering of ``qgraph::sparse_matmul``: ``x @ Sᵀ`` for a COO sparse ``S``, in standard ops.

A plain Python function of onnxscript opset-21 ops, like the lowerings in
:mod:`qgraph.backends.onnx_lowering` (an ``@onnxscript.script`` function fails as a translation
with torch 2.13 + onnxscript 0.7). ``S`` is never made dense: the file holds ``rows``, ``cols``
and ``values`` as ``[nnz]`` tensors, nothing of shape ``[out, in]``.

Graph, with ``x`` flattened to ``[N, in]`` (N = product of the leading dims)::

    flat = Reshape(x, [-1, in]);  vcol = values[:, None]
    pt = If(N < SMALL_BATCH,
            then: Mul(Transpose(GatherElements(flat, Expand(cols32, [N, nnz]), axis=1)), vcol),
            else: Mul(Gather(Transpose(flat), cols32, axis=0), vcol))              # [nnz, N]
    # runs of equal consecutive rows (constants, folded): run_rows [R, 1], last [R, 1]
    c = CumSum(Cast(pt, double), axis=0)                                           # [nnz, N]
    e = GatherND(c, last);  sums = Cast(e - Concat(zeros [1, N], e[:-1]))           # [R, N]
    yt = ScatterND(zeros [out, N], run_rows, sums, reduction="add")                # [out, N]
    y = Reshape(Transpose(yt), [..., out])

Why this shape (ONNX Runtime 1.32 CPU, 576 × 1536 layer, nnz = 4423, one thread):

* ``ScatterND`` on the transposed ``[out, N]`` writes whole rows of N values per index;
  ``ScatterElements(reduction="add")`` on ``[N, out]`` works element by element and needs
  ``rows`` expanded to ``[N, nnz]`` int64: about 10-20× slower at N = 128.
* ``ScatterND`` must never get one row twice: ONNX Runtime's CPU kernel splits the indices
  among its intra-op threads and adds without synchronisation, so two entries of one row added
  at once lose one of them (SmolLM2, W3 + split-sparse, two threads: one layer's sparse output
  25 % off, logits several percent of the largest one off, differently from run to run; exact
  with one thread). So the entries of a row are summed first: ``SparsePart`` stores them
  sorted by row, so each row's entries are one run, and a run's sum is a difference of float64
  prefix sums (exact to the rounding of the result). Rows in another order still give the
  right sums (a row in several runs is then scattered more than once, with that race again).
* ``Gather`` costs a fixed ~8 ns per index (it copies one block per index), which dominates at
  N = 1 (~40 µs); ``GatherElements`` with expanded indices costs ~1 ns per element and no
  per-index overhead, so it is the faster gather for a few rows and the slower one for many.
  ``If`` picks per call (its own overhead is a few µs); the crossover is near N = 16-32.
* Gather indices are int32 (half the bytes of the expanded ``[N, nnz]`` index tensor);
  ``ScatterND`` takes int64 only.

The arithmetic is the kernel's (:func:`qgraph.kernels.sparse_split.sparse_matmul`): a product
per nonzero in ``promote(x, values)`` dtype, summed per output row (possibly in another order, so
results agree to float rounding), cast back to ``x``'s dtype. One exception: when that dtype is
float16/bfloat16 (both operands 16-bit) the lowering computes in float32, because ONNX Runtime's
CPU ``ScatterND`` has no float16 ``add``; it then differs from torch by float16 rounding. An
empty sparse part (``nnz = 0``, known from the static shape of ``cols``) lowers to zeros of the
output shape (ONNX Runtime would also run the general graph with empty tensors).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
import torch
from onnxscript import opset21 as op

import qgraph.sparse_ops  # noqa: F401  (registers torch.ops.qgraph.sparse_matmul)

__all__ = ["SMALL_BATCH", "SPARSE_TRANSLATIONS", "sparse_matmul"]

SMALL_BATCH = 16
"""Flattened batch sizes N below this use the GatherElements branch, the rest Gather."""

_FLOAT_RANK = {
    ir.DataType.FLOAT16: 1,
    ir.DataType.BFLOAT16: 1,
    ir.DataType.FLOAT: 2,
    ir.DataType.DOUBLE: 3,
}


def _compute_dtype(a: ir.DataType | None, b: ir.DataType | None) -> ir.DataType:
    """``torch.promote_types`` for the float dtypes the op sees (float16 + bfloat16 = float)."""
    if a is None or b is None:
        return a or b or ir.DataType.FLOAT
    if a == b:
        return a
    ra, rb = _FLOAT_RANK.get(a, 2), _FLOAT_RANK.get(b, 2)
    if ra == rb:
        return ir.DataType.FLOAT
    return a if ra > rb else b


def _cast(value, dtype: ir.DataType):
    return value if value.dtype == dtype else op.Cast(value, to=dtype)


def _ints(values: list[int]):
    return op.Constant(value=ir.tensor(values, dtype=ir.DataType.INT64))


def _zeros(shape, dtype: ir.DataType):
    return op.ConstantOfShape(shape, value=ir.tensor([0], dtype=dtype))


def _static_length(value) -> int | None:
    shape = value.shape
    if shape is None or len(shape) != 1 or not isinstance(shape[0], int):
        return None
    return shape[0]


def _branch(name: str, build: Callable[[ir.tape.Tape], ir.Value]) -> ir.Graph:
    """A subgraph without inputs whose nodes (recorded on a tape) read outer-scope values."""
    tape = ir.tape.Tape()
    out = build(tape)
    return ir.Graph(inputs=[], outputs=[out], nodes=tape.nodes, name=name)


def _row_runs(rows):
    """The runs of equal consecutive ``rows``: each run's row ``[R, 1]`` and its last entry
    ``[R, 1]`` (int64), so run ``k`` holds the entries ``last[k-1] < j <= last[k]``.

    ``SparsePart`` stores its entries sorted by row, so its runs are its distinct rows. The
    input is a constant (the stored ``rows``), so the exporter's constant folding (or ONNX
    Runtime's, at load) evaluates all of this once.
    """
    rows64 = _cast(rows, ir.DataType.INT64)
    head = op.Slice(rows64, _ints([0]), _ints([-1]), _ints([0]))  # rows[:-1]
    tail = op.Slice(rows64, _ints([1]), _ints([2**62]), _ints([0]))  # rows[1:]
    is_last = op.Concat(
        op.Not(op.Equal(head, tail)),
        op.Constant(value=ir.tensor([True], dtype=ir.DataType.BOOL)),
        axis=0,
    )  # [nnz]: the entry ends a run
    run_rows = op.Unsqueeze(op.Compress(rows64, is_last, axis=0), _ints([1]))
    return run_rows, op.Transpose(op.NonZero(is_last), perm=[1, 0])


def sparse_matmul(x, rows, cols, values, out_features: int):
    """``x @ Sᵀ`` with ``S[rows[j], cols[j]] += values[j]``; see the module docstring."""
    out_shape = op.Concat(op.Shape(x, end=-1), _ints([out_features]), axis=0)
    if _static_length(cols) == 0:
        return _zeros(out_shape, x.dtype)

    dtype = _compute_dtype(x.dtype, values.dtype)
    if _FLOAT_RANK.get(dtype) == 1:  # ORT's ScatterND has no 16-bit float reduction
        dtype = ir.DataType.FLOAT
    flat = op.Reshape(_cast(x, dtype), op.Concat(_ints([-1]), op.Shape(x, start=-1), axis=0))
    n = op.Shape(flat, start=0, end=1)  # [1]
    cols32 = op.Cast(cols, to=ir.DataType.INT32)
    index_shape = op.Concat(n, op.Shape(cols), axis=0)  # [N, nnz]
    vals_col = op.Unsqueeze(_cast(values, dtype), _ints([1]))  # [nnz, 1]

    def few_rows(t: ir.tape.Tape) -> ir.Value:
        idx = t.op("Expand", [cols32, index_shape])
        gathered = t.op("GatherElements", [flat, idx], {"axis": 1})
        return t.op("Mul", [t.op("Transpose", [gathered], {"perm": [1, 0]}), vals_col])

    def many_rows(t: ir.tape.Tape) -> ir.Value:
        gathered = t.op(
            "Gather", [t.op("Transpose", [flat], {"perm": [1, 0]}), cols32], {"axis": 0}
        )
        return t.op("Mul", [gathered, vals_col])

    small = op.Squeeze(op.Less(n, _ints([SMALL_BATCH])))
    prod_t = op.If(
        small,
        then_branch=_branch("sparse_matmul_few_rows", few_rows),
        else_branch=_branch("sparse_matmul_many_rows", many_rows),
    )  # [nnz, N]
    # One sum per run of equal rows (float64 prefix sums at the runs' last entries, minus the
    # previous run's), so ScatterND gets each row once: see the module docstring for why.
    run_rows, last = _row_runs(rows)
    axis0 = op.Constant(value=ir.tensor(0, dtype=ir.DataType.INT64))
    prefix = op.CumSum(op.Cast(prod_t, to=ir.DataType.DOUBLE), axis0)  # [nnz, N]
    at_ends = op.GatherND(prefix, last)  # [R, N]: the sum up to each run's last entry
    zero_row = _zeros(op.Concat(_ints([1]), n, axis=0), ir.DataType.DOUBLE)
    before = op.Concat(zero_row, op.Slice(at_ends, _ints([0]), _ints([-1]), _ints([0])), axis=0)
    sums = op.Cast(op.Sub(at_ends, before), to=dtype)  # [R, N]
    zeros_t = _zeros(op.Concat(_ints([out_features]), n, axis=0), dtype)  # [out, N]
    y_t = op.ScatterND(zeros_t, run_rows, sums, reduction="add")  # [out, N]
    y = op.Reshape(op.Transpose(y_t, perm=[1, 0]), out_shape)
    return y if dtype == x.dtype else op.Cast(y, to=x.dtype)


SPARSE_TRANSLATIONS: dict[Callable, Callable] = {
    torch.ops.qgraph.sparse_matmul.default: sparse_matmul,
}
"""``torch.ops.qgraph.sparse_matmul.default`` → its ONNX translation (merge into the table)."""
