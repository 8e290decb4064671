"""Dense-and-sparse split of one weight matrix W [out, in] (ReQuant, arXiv 2503.01901).

W is stored as Q(W_dense) + S: a few weights (the sparse part S) are kept exactly, in high
precision, and the rest is quantized with the base uniform quantizer of quant.py. The
runtime form is ``y = x Q(W_dense)ᵀ + x Sᵀ``, with ``x Sᵀ`` computed by gather/scatter
(``sparse_matmul``), never by a dense copy of S.

Design decisions
----------------
* **Regrid.** ``quantize_dense`` computes the grid of the dense part on W with the sparse
  entries replaced by 0. Every range quant.py builds contains 0 (symmetric: ±amax;
  asymmetric: [min, max] widened to include 0), so a 0 never widens a range: each row/group
  gets exactly the range of its remaining weights. The same 0 then quantizes to the zero
  point and dequantizes to exactly 0, so Q(W_dense) is 0 at every sparse position and the
  dense codes are an ordinary quantized weight (backends need no masking), and
  Q(W_dense) + S equals W exactly at the sparse positions.
* **Counting.** A ratio r of a matrix with n weights means k = ⌊r·n⌋ weights (never more
  than the budget). Top-k selections are deterministic: ties go to the lower row-major
  (flat) index. Selections for growing k are nested.
* **Sparse layout.** ``SparsePart`` holds flat COO arrays ``rows``, ``cols`` (int64) and
  ``values`` sorted row-major (by row, then column), i.e. CSR without the row pointer
  (``row_ptr()`` derives it). Flat, sorted arrays make the ONNX lowering direct; see
  ``sparse_matmul``.
* **Storage accounting** is qgraph's one accounting (:mod:`qgraph.formats`, used by
  ``Model.accounting`` and the reports): the sparse part counts its values and indices as the
  graph stores them (``qgraph.sparse_ops.storage``: int16 indices, float16 values).
* **Ratio choice.** ``choose_outlier_ratio`` minimises the layer error plus a price on the
  extra bits; with no price it is the plain argmin of the error (ties: smallest ratio). See
  there for why a price (a Lagrange multiplier shared by all layers) is the useful knob.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qgraph.errors import DataError
from qgraph.formats import WeightSpec
from qgraph.kernels.gptq import rtn_error
from qgraph.kernels.quant import dequantize_weight, quantize_weight, weight_qparams

__all__ = [
    "DEFAULT_OUTLIER_RATIOS",
    "DenseQuant",
    "DenseSparseSplit",
    "DetachResult",
    "OutlierChoice",
    "WeightSpec",
    "SparsePart",
    "choose_outlier_ratio",
    "count_for_ratio",
    "layer_error",
    "outlier_mask",
    "quantize_dense",
    "significant_weight_detach",
    "sparse_matmul",
    "split_weight",
    "top_k_mask",
]

#: Outlier ratios tried by choose_outlier_ratio (fractions of the layer's weights).
DEFAULT_OUTLIER_RATIOS: tuple[float, ...] = (0.0, 0.0005, 0.001, 0.0025, 0.005, 0.01)


# --------------------------------------------------------------------------------------
# base quantizer and selections
# --------------------------------------------------------------------------------------


def count_for_ratio(ratio: float, n: int) -> int:
    """k = ⌊ratio · n⌋ (with a 1e-9 slack against float noise, e.g. 0.29 · 100)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return min(n, math.floor(ratio * n + 1e-9))


def top_k_mask(score: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the k largest entries of score (ties: lower flat index first).

    Entries where ``exclude`` is True are never selected; k is capped by the number of
    selectable entries. O(n) (topk + a threshold), no full sort.
    """
    if torch.isnan(score).any():
        raise DataError("selection score contains NaN")
    flat = score.detach().flatten()
    if not flat.is_floating_point():
        flat = flat.to(torch.float64)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    allowed = torch.ones_like(mask) if exclude is None else ~exclude.flatten()
    k = min(k, int(allowed.sum()))
    if k > 0:
        flat = flat.masked_fill(~allowed, -math.inf)
        thr = torch.topk(flat, k).values[-1]
        mask = (flat > thr) & allowed
        ties = ((flat == thr) & allowed).nonzero().squeeze(1)
        mask[ties[: k - int(mask.sum())]] = True
    return mask.reshape(score.shape)


def outlier_mask(w: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool mask [out, in] of the ⌊ratio·n⌋ largest |w| over the whole layer."""
    _check_weight(w)
    return top_k_mask(w.abs(), count_for_ratio(ratio, w.numel()))


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(
            f"weight must be a 2-D float tensor [out, in], got {w.dtype} {tuple(w.shape)}"
        )
    if not torch.isfinite(w).all():
        raise DataError("weight contains NaN or infinite values")


def _check_mask(w: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool or mask.shape != w.shape:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(w.shape)}, got {mask.dtype} {tuple(mask.shape)}"
        )


# --------------------------------------------------------------------------------------
# the sparse part
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparsePart:
    """The exactly kept weights of a layer, as row-major sorted COO arrays.

    rows, cols: int64 [nnz] (rows ascending, cols ascending within a row); values [nnz],
    float32 (float64 for float64 weights); shape: (out, in) of the dense matrix.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @classmethod
    def from_mask(cls, w: torch.Tensor, mask: torch.Tensor) -> SparsePart:
        """The entries of w where mask is True (nonzero() is row-major, hence sorted)."""
        _check_mask(w, mask)
        idx = mask.nonzero()
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        rows, cols = idx[:, 0].contiguous(), idx[:, 1].contiguous()
        return cls(rows, cols, w.detach()[rows, cols].to(dtype), (w.shape[0], w.shape[1]))

    def row_ptr(self) -> torch.Tensor:
        """CSR row pointer [out + 1] (int64): row r owns entries row_ptr[r]:row_ptr[r+1]."""
        counts = torch.bincount(self.rows, minlength=self.shape[0])
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    def to_dense(self) -> torch.Tensor:
        """Dense S [out, in] in the values' dtype (tests and debugging only)."""
        s = self.values.new_zeros(self.shape)
        s[self.rows, self.cols] = self.values
        return s


def sparse_matmul(
    x: torch.Tensor, part: SparsePart, out_features: int | None = None
) -> torch.Tensor:
    """x Sᵀ for x [..., in] -> [..., out] without forming S.

    Reference semantics (for the torch op and the ONNX lowering)::

        prod = Gather(x, cols, axis=-1) * values          # [..., nnz]
        y = zeros([..., out]); y[..., rows[j]] += prod[..., j]   (index_add_)

    Computed in promote(x.dtype, values.dtype) and returned in x's dtype. The ONNX lowering
    (``qgraph.backends.onnx_sparse``) sums each row's entries first and scatters every row
    once, because ONNX Runtime's threaded ScatterND races on repeated indices. ``out_features``
    defaults to part.shape[0]; a larger value yields zero extra columns.
    """
    out = part.shape[0] if out_features is None else out_features
    if out < part.shape[0]:
        raise ValueError(
            f"out_features {out} is smaller than the sparse part's {part.shape[0]} rows"
        )
    if x.shape[-1] != part.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the sparse part expects {part.shape[1]}")
    dtype = torch.promote_types(x.dtype, part.values.dtype)
    prod = x.to(dtype).index_select(-1, part.cols.to(x.device)) * part.values.to(x.device, dtype)
    y = torch.zeros(*x.shape[:-1], out, dtype=dtype, device=x.device)
    return y.index_add_(-1, part.rows.to(x.device), prod).to(x.dtype)


# --------------------------------------------------------------------------------------
# dense part and the split
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenseQuant:
    """The quantized dense part: codes int8 [out, in]; scale/zero as from weight_qparams;
    weight = dequantized codes in the input weight's dtype (exactly 0 at sparse positions)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    weight: torch.Tensor


@dataclass(frozen=True)
class DenseSparseSplit:
    """W ≈ dense.weight + sparse: mask is True at the sparse positions; weight is the
    reconstruction Q(W_dense) + S [out, in] in the input dtype (equal to W on the mask)."""

    dense: DenseQuant
    sparse: SparsePart
    mask: torch.Tensor
    weight: torch.Tensor


def quantize_dense(w: torch.Tensor, mask: torch.Tensor, spec: WeightSpec) -> DenseQuant:
    """Quantize W with the masked entries zeroed; the grid is fitted to the unmasked weights
    only (zeros never widen a range), and masked positions dequantize to exactly 0."""
    _check_weight(w)
    _check_mask(w, mask)
    dense = w.detach().masked_fill(mask, 0.0)
    scale, zero = weight_qparams(dense, *spec.quantizer_args())
    gs = spec.ragged_group_size
    codes = quantize_weight(dense, scale, zero, spec.bits, gs)
    return DenseQuant(codes, scale, zero, dequantize_weight(codes, scale, zero, gs).to(w.dtype))


def split_weight(w: torch.Tensor, mask: torch.Tensor, spec: WeightSpec) -> DenseSparseSplit:
    """Q(W with mask zeroed) + the exact masked entries."""
    dense = quantize_dense(w, mask, spec)
    sparse = SparsePart.from_mask(w, mask)
    weight = torch.where(mask, w.detach(), dense.weight)
    return DenseSparseSplit(dense, sparse, mask.clone(), weight)


def layer_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor | None = None) -> float:
    """Mean squared weight error, or with an input Hessian H [in, in] the output error
    tr(ΔW H ΔWᵀ) normalised as gptq.rtn_error (equal to the former when H ∝ I)."""
    if hessian is not None:
        return rtn_error(w, hessian, w_hat)
    diff = w.detach().to(torch.float64) - w_hat.detach().to(torch.float64)
    return float(diff.square().mean())


# --------------------------------------------------------------------------------------
# self-adaptive outlier ratio
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutlierChoice:
    """Result of choose_outlier_ratio.

    ratio: the chosen ratio; split: the split at that ratio; base_error: error with no
    sparse part; table: one (ratio, nnz, error, objective) row per candidate considered,
    ascending in ratio (candidates above max_ratio are left out).
    """

    ratio: float
    split: DenseSparseSplit
    base_error: float
    table: tuple[tuple[float, int, float, float], ...]

    @property
    def errors(self) -> dict[float, float]:
        return {r: e for r, _, e, _ in self.table}


def choose_outlier_ratio(
    w: torch.Tensor,
    spec: WeightSpec,
    candidates: Sequence[float] = DEFAULT_OUTLIER_RATIOS,
    *,
    hessian: torch.Tensor | None = None,
    max_ratio: float | None = None,
    price: float = 0.0,
    bits_per_outlier: float = 32.0,
) -> OutlierChoice:
    """Per-layer outlier ratio: argmin over candidates r <= max_ratio of

        J(r) = err(r) / err(0) + price · r · bits_per_outlier

    err(r) is ``layer_error`` of Q(dense) + W_o with the ⌊r·n⌋ largest-|w| weights as W_o
    (Hessian-weighted when ``hessian`` is given). Because the outliers are kept exactly,
    err(r) usually falls as r grows, so with price = 0 this is "the best ratio the cap
    allows" (ties: the smaller ratio). ``price`` puts the extra storage on the same scale:
    r · bits_per_outlier is the extra bits per weight (default 32 = a 16-bit value and a
    16-bit column index; the fixed row-pointer cost is ignored), and price is the fraction
    of this layer's base error one extra bit per weight must remove to be worth it. Using
    relative errors and one shared price for every layer makes the per-layer choices the
    Lagrangian solution of "least total relative error for a total extra-bit budget": the
    caller raises or lowers the price (bisection) until the model meets its budget, and can
    read ``table`` for any other trade-off.
    """
    _check_weight(w)
    cap = 1.0 if max_ratio is None else max_ratio
    ratios = sorted({float(r) for r in candidates if r <= cap})
    if not ratios:
        raise ValueError(f"no candidate ratio in {list(candidates)} is <= max_ratio {max_ratio}")
    if price < 0 or bits_per_outlier < 0:
        raise ValueError("price and bits_per_outlier must be non-negative")
    base_error = layer_error(
        w, split_weight(w, torch.zeros_like(w, dtype=torch.bool), spec).weight, hessian
    )
    best: tuple[float, float, DenseSparseSplit] | None = None
    table = []
    for r in ratios:
        split = split_weight(w, outlier_mask(w, r), spec)
        err = layer_error(w, split.weight, hessian)
        rel = err / base_error if base_error > 0 else 0.0
        objective = rel + price * r * bits_per_outlier
        table.append((r, split.sparse.nnz, err, objective))
        if best is None or objective < best[1]:
            best = (r, objective, split)
    assert best is not None
    return OutlierChoice(best[0], best[2], base_error, tuple(table))


# --------------------------------------------------------------------------------------
# step-wise significant-weight detach
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetachResult:
    """Result of significant_weight_detach.

    split: the final split (its mask = base_mask ∪ detached); detached: bool mask of the
    weights moved by this function; steps: per step, the flat (row-major) indices moved,
    in decreasing score order.
    """

    split: DenseSparseSplit
    detached: torch.Tensor
    steps: tuple[torch.Tensor, ...]

    @property
    def n_detached(self) -> int:
        return int(self.detached.sum())


def _ordered(score: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of mask sorted by decreasing score (ties: lower index first)."""
    idx = mask.flatten().nonzero().squeeze(1)
    order = torch.sort(-score.detach().flatten()[idx].to(torch.float64), stable=True).indices
    return idx[order]


def significant_weight_detach(
    w: torch.Tensor,
    sensitivity: torch.Tensor,
    spec: WeightSpec,
    total_ratio: float,
    step_ratio: float,
    *,
    base_mask: torch.Tensor | None = None,
    recompute: Callable[[DenseSparseSplit], torch.Tensor] | None = None,
) -> DetachResult:
    """Move the most sensitive weights into the sparse part in steps of ``step_ratio``.

    ``sensitivity`` [out, in] is a score, larger = moved first: pass |ΔFᵢ| from pqi (or ΔFᵢ
    itself to move only weights whose quantization raises the loss). Step j brings the
    number of detached weights to ⌊min(j·step_ratio, total_ratio)·n⌋, taking the highest
    scores not yet sparse (``base_mask``, e.g. the outliers, is sparse from the start and
    does not count towards total_ratio). After every step the dense remainder is
    re-quantized (its grid may shrink again). Between steps, ``recompute(split)`` — given
    the current split, whose ``weight`` yields the new Δw = weight - w and whose ``mask`` says
    what is sparse — may return a fresh score tensor (e.g. PQI rerun on the new Δw); it is
    not called after the last step.
    """
    _check_weight(w)
    if sensitivity.shape != w.shape:
        raise ValueError(
            f"sensitivity has shape {tuple(sensitivity.shape)}, expected {tuple(w.shape)}"
        )
    if not 0 < step_ratio or not 0 <= total_ratio <= 1:
        raise ValueError(
            f"need step_ratio > 0 and total_ratio in [0, 1], got {step_ratio}, {total_ratio}"
        )
    mask = torch.zeros_like(w, dtype=torch.bool) if base_mask is None else base_mask.clone()
    _check_mask(w, mask)
    n = w.numel()
    n_steps = math.ceil(total_ratio / step_ratio - 1e-9)
    detached = torch.zeros_like(mask)
    steps: list[torch.Tensor] = []
    split = split_weight(w, mask, spec)
    for j in range(1, n_steps + 1):
        target = count_for_ratio(min(j * step_ratio, total_ratio), n)
        new = top_k_mask(sensitivity, target - int(detached.sum()), exclude=mask)
        steps.append(_ordered(sensitivity, new))
        detached |= new
        mask |= new
        split = split_weight(w, mask, spec)
        if recompute is not None and j < n_steps:
            sensitivity = recompute(split)
            if sensitivity.shape != w.shape:
                raise ValueError("recompute returned a score of the wrong shape")
    return DetachResult(split, detached, tuple(steps))
