"""Row-independent float64 work on large weights, a chunk of rows at a time.

Folding a norm into a 49152×576 head or rotating an embedding in float64 needs a float64 copy
of the whole matrix and temporaries besides: several times the model's largest tensor. Done a
chunk at a time into a tensor of the result's dtype, the transient stays a few megabytes and
the result is bit-identical (each row is computed the same way).

The transient is not one chunk but about a dozen: the fast Hadamard transform's temporaries and
the heap blocks they leave behind. Rotating SmolLM2's 49152×576 embedding cost +305 MB (108 of
them the result) with 16 MB chunks and +136 MB with 2 MB chunks, at the same speed; at 16 MB it
set the whole ``qgraph run``'s peak (issue 16).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CHUNK_BYTES = 2 << 20
"""Float64 working memory per chunk (its transients are ~12× this, see above)."""


def map_rows(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``fn(x)`` for an ``fn`` that treats the rows of a 2-D ``x`` independently (and keeps its
    shape), evaluated on chunks of rows and written into a new tensor of ``dtype`` (default
    ``x``'s)."""
    if x.dim() != 2:
        return fn(x).to(dtype or x.dtype)
    out = torch.empty(x.shape, dtype=dtype or x.dtype)
    step = max(1, CHUNK_BYTES // (8 * max(1, x.shape[1])))
    with torch.no_grad():
        for i in range(0, x.shape[0], step):
            out[i : i + step] = fn(x[i : i + step])
    return out


def map_columns(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Like :func:`map_rows` for an ``fn`` that treats the *columns* of ``x`` independently;
    ``fn`` receives chunks of ``xᵀ``'s rows."""
    if x.dim() != 2:
        return fn(x).to(dtype or x.dtype)
    return map_rows(fn, x.T, dtype).T.contiguous()
