"""``qgraph::sparse_matmul``: the sparse half of a dense-and-sparse weight split.

A split linear layer runs as ``add(qlinear(x, ...), sparse_matmul(x, rows, cols, values, out))``,
i.e. ``y = x Q(W)ᵀ + x Sᵀ``, where ``S [out, in]`` holds the few weights kept in high precision
(:class:`qgraph.kernels.sparse_split.SparsePart`). ``S`` is never made dense: the op gathers
``x[..., cols]``, scales by ``values`` and adds into ``rows`` (``index_add_``), the semantics of
:func:`qgraph.kernels.sparse_split.sparse_matmul`, which it calls. Its ONNX lowering lives in
:mod:`qgraph.backends.onnx_sparse`. Importing this module registers the op.

Arguments: ``rows``/``cols`` integer ``[nnz]`` — stored as int16 when the layer's dimensions
allow (:func:`storage`), widened to int64 here — (sorted row-major by ``SparsePart``; the op itself
does not need the order), ``values`` float ``[nnz]``; repeated ``(row, col)`` pairs add up.
Computed in ``promote(x.dtype, values.dtype)`` and returned in ``x``'s dtype.

Autograd (both again sparse, never a dense ``S``):

* ``grad_x = grad @ S``: the op itself on the transposed part (``rows`` ↔ ``cols``), so it is
  differentiable again;
* ``grad_values[j] = Σ_batch grad[..., rows[j]] · x[..., cols[j]]``.

``rows``/``cols`` get no gradient.
"""

from __future__ import annotations

import torch

from .kernels.sparse_split import SparsePart
from .kernels.sparse_split import sparse_matmul as _sparse_matmul_kernel

__all__ = ["sparse_matmul", "storage"]

LIB = "qgraph"


def _check_args(x, rows, cols, values, out_features: int) -> None:
    torch._check(x.dim() >= 1, lambda: "sparse_matmul: x needs at least one dimension")
    torch._check(
        rows.dim() == 1 and cols.dim() == 1 and values.dim() == 1,
        lambda: "sparse_matmul: rows, cols and values must be 1-D",
    )
    torch._check(
        rows.shape[0] == cols.shape[0] and cols.shape[0] == values.shape[0],
        lambda: (
            f"sparse_matmul: rows, cols and values must have one length, got "
            f"{rows.shape[0]}, {cols.shape[0]}, {values.shape[0]}"
        ),
    )
    torch._check(
        not rows.is_floating_point() and not cols.is_floating_point(),
        lambda: "sparse_matmul: rows and cols must be integer tensors",
    )
    torch._check(out_features >= 0, lambda: "sparse_matmul: out_features must be >= 0")


@torch.library.custom_op(f"{LIB}::sparse_matmul", mutates_args=())
def sparse_matmul(
    x: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    out_features: int,
) -> torch.Tensor:
    """``x @ Sᵀ`` of shape ``[..., out_features]`` with ``S[rows[j], cols[j]] += values[j]``."""
    _check_args(x, rows, cols, values, out_features)
    part = SparsePart(_index(rows), _index(cols), values, (out_features, x.shape[-1]))
    return _sparse_matmul_kernel(x, part, out_features)


def _index(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.int32, torch.int64) else t.long()


def storage(part: SparsePart) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, values) as a split layer stores them: indices in the narrowest of
    int16/int32 that holds them, values in float16 — what bits-per-weight accounting counts."""
    rows = part.rows.to(_narrow(part.shape[0]))
    cols = part.cols.to(_narrow(part.shape[1]))
    return rows, cols, part.values.to(torch.float16)


def _narrow(size: int) -> torch.dtype:
    return torch.int16 if size <= 2**15 else torch.int32


@sparse_matmul.register_fake
def _sparse_matmul_fake(x, rows, cols, values, out_features):
    _check_args(x, rows, cols, values, out_features)
    return x.new_empty((*x.shape[:-1], out_features))


def _setup(ctx, inputs, output):
    x, rows, cols, values, out_features = inputs
    ctx.save_for_backward(x, rows, cols, values)
    ctx.in_features = x.shape[-1]


def _backward(ctx, grad):
    x, rows, cols, values = ctx.saved_tensors
    grad_x = grad_values = None
    if ctx.needs_input_grad[0]:
        # grad @ S: the transposed part (rows <-> cols) applied to grad.
        grad_x = sparse_matmul(grad, cols, rows, values, ctx.in_features)
    if ctx.needs_input_grad[3]:
        dtype = torch.promote_types(torch.promote_types(grad.dtype, x.dtype), values.dtype)
        prod = grad.to(dtype).index_select(-1, _index(rows)) * x.to(dtype).index_select(
            -1, _index(cols)
        )
        if prod.dim() > 1:
            prod = prod.flatten(0, -2).sum(0)
        grad_values = prod.to(values.dtype)
    return grad_x, None, None, grad_values, None


sparse_matmul.register_autograd(_backward, setup_context=_setup)
