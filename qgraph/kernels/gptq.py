"""GPTQ (Frantar et al., arXiv 2210.17323) as a pure tensor kernel, plus its proxy loss.

GPTQ quantizes a linear weight W [out, in] column by column and, after each column, moves
the rounding error onto the columns not yet quantized so that the layer *output* on the
calibration inputs X is preserved: it greedily minimises ||X Wᵀ - X Ŵᵀ||² whose Hessian
(per output row) is H = 2 XᵀX. The update after quantizing column j is (OBS, with the
inverse Hessian restricted to the columns still free)::

    e = (w_j - ŵ_j) / [H⁻¹]_jj            W[:, k] -= e [H⁻¹]_jk   (k > j)

and the restriction of H⁻¹ to the remaining columns is exactly the upper Cholesky factor U of
H⁻¹ read row by row (U_jk = [H⁻¹_j]_jk / sqrt([H⁻¹_j]_jj)), which is why the kernel only
needs U and never downdates H⁻¹ itself. Columns are processed in blocks of ``block_size``:
inside a block the update is applied column by column; the remaining blocks receive the
accumulated update once per block (one matrix product, the "lazy batch" of the paper).

Design decisions
----------------
* **Hessian scaling.** The Hessian is used as given: the caller may pass XᵀX, 2XᵀX or a sum
  over batches. GPTQ is invariant to a positive factor (damping is relative to mean(diag H);
  U scales by c^-1/2 and the update uses U_jk / U_jj), and so is the reported ``error``.
* **dtypes.** H is symmetrised, damped, inverted and factored in float64 (Cholesky of an
  ill-conditioned 1536x1536 XᵀX loses too much in float32); U is then cast to the working
  dtype. The working dtype of the column loop follows quant.py: float64 for float64
  weights, float32 otherwise (bfloat16/float16 weights are processed in float32). Memory is
  O(in²) float64 for the factorisation (a few copies) plus O(out·in) for the weights.
* **act_order + groups.** Columns are processed by decreasing diag(H), but groups always
  refer to ORIGINAL column indices (group g = columns [g·gs, (g+1)·gs) of the unpermuted
  weight). A group's (scale, zero) is computed when the first of its columns is reached in
  processing order, from the current (error-updated) values of all its columns, which are
  all still unquantized at that moment. So scale/zero keep quant.py's [out, in/gs] layout
  in original order, and ``dequantize_weight(codes, scale, zero)`` reproduces ``weight``
  exactly without any g_idx indirection (unlike implementations whose groups follow the
  permuted order).
* **Group parameters from current weights.** Without act_order this is the standard
  behaviour; unlike some reference code, "current" includes the updates of the columns
  already quantized in the same block (the pending lazy update is applied to the group's
  columns first), so the result does not depend on ``block_size``.
* **Per-channel parameters** are computed once, before the loop, from the weight with dead
  columns zeroed (their values never reach the output, so they must not widen the grid).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qgraph.errors import DataError
from qgraph.kernels.quant import (
    dequantize_weight,
    expand_groups,
    qrange,
    quantize_weight,
    weight_qparams,
)

__all__ = [
    "DEFAULT_CLIP_GRID",
    "GPTQResult",
    "gptq_quantize",
    "mse_clip_search",
    "refit_scales",
    "rtn_error",
    "row_proxy_errors",
]

#: Clip ratios tried by mse_clip_search: 1.0, 0.95, ..., 0.5.
DEFAULT_CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.05 * k, 2) for k in range(11))


@dataclass(frozen=True)
class GPTQResult:
    """Output of gptq_quantize.

    weight: dequantized weight [out, in] in the input dtype (== dequantize_weight(codes,
        scale, zero).to(dtype), bit for bit); codes: int8 [out, in]; scale: [out, G] float32
        (float64 for float64 weights); zero: int8 [out, G] (zeros when symmetric);
        error: rtn_error(w, hessian, weight); perm: the processing order (perm[k] is the
        original column quantized k-th) when act_order, else None.
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    error: float
    perm: torch.Tensor | None


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _all_finite(t: torch.Tensor, rows: int = 256) -> bool:
    """``torch.isfinite(t).all()`` a block of rows at a time: on a whole float64 matrix it
    allocates ~1.4 times the matrix in temporaries (8192² Hessian: 0.7 GB at GPTQ's peak)."""
    return all(bool(torch.isfinite(part).all()) for part in t.split(rows))


def check_layer_inputs(w: torch.Tensor, hessian: torch.Tensor) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(
            f"weight must be a 2-D float tensor [out, in], got {w.dtype} {tuple(w.shape)}"
        )
    inp = w.shape[1]
    if hessian.shape != (inp, inp) or not hessian.is_floating_point():
        raise ValueError(
            f"hessian must be a float tensor [{inp}, {inp}] for a weight {tuple(w.shape)}, "
            f"got {hessian.dtype} {tuple(hessian.shape)}"
        )
    if not _all_finite(w):
        raise DataError("weight contains NaN or infinite values")
    if not _all_finite(hessian):
        raise DataError("hessian contains NaN or infinite values (bad calibration data?)")


def rtn_error(w: torch.Tensor, hessian: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Hessian-weighted proxy loss of any quantized weight w_hat (RTN, GPTQ, ...).

    error = Σ_rows (w - ŵ) H (w - ŵ)ᵀ / (out · trace H), computed in float64 with H as given
    (undamped). With H = XᵀX it is ||X(W - Ŵ)ᵀ||²_F / (out · ||X||²_F): the output error GPTQ
    minimises, normalised so that it does not depend on how H was scaled (XᵀX vs 2XᵀX, number
    of samples) and equals the plain mean squared weight error when H ∝ I.
    """
    check_layer_inputs(w, hessian)
    if w_hat.shape != w.shape:
        raise ValueError(f"w_hat has shape {tuple(w_hat.shape)}, expected {tuple(w.shape)}")
    h = hessian.detach().to(device=w.device, dtype=torch.float64)
    trace = float(h.diagonal().sum())
    if not trace > 0:
        raise DataError("hessian has a non-positive trace (all inputs dead or no calibration data)")
    delta = w.detach().to(torch.float64) - w_hat.detach().to(device=w.device, dtype=torch.float64)
    return float(((delta @ h) * delta).sum()) / (w.shape[0] * trace)


def row_proxy_errors(w: torch.Tensor, hessian: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """Each row's ``(w - ŵ) H (w - ŵ)ᵀ`` in float32, unchecked and unnormalised: the cheap form of
    :func:`rtn_error` for statistics over many layers (rows of stacked weights split freely;
    divide a part's sum by its rows · trace H to get its ``rtn_error``)."""
    delta = w.detach().float() - w_hat.detach().float()
    return ((delta @ hessian.float()) * delta).sum(1)


def mse_clip_search(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    granularity: str,
    group_size: int | None = None,
    grid: Sequence[float] = DEFAULT_CLIP_GRID,
    full_range: bool = False,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) like weight_qparams, with the clip ratio chosen per row/group by error.

    For each ratio r in grid the range is shrunk by r (quant.py's clip_ratio) and the squared
    fake-quantization error of every row (channel) or group is measured; each row/group keeps
    the ratio of least error (ties: the earlier grid entry, i.e. 1.0 first by default).
    ``importance`` [in] weighs the error of each input column: with the diagonal of the layer's
    input Hessian (mean x_j²) the objective is the layer's output error under a diagonal
    approximation. Without it every column counts the same (plain weight MSE), which in LLMs
    clips the few large weights that meet the massive activation channels, the worst possible
    place to add error.
    """
    grid = [float(r) for r in grid]
    if not grid or not all(r > 0 for r in grid):
        raise ValueError(f"clip grid must be non-empty and positive, got {grid}")
    if importance is not None and importance.shape != (w.shape[1],):
        raise ValueError(
            f"importance must have shape [{w.shape[1]}] (one per input column), "
            f"got {tuple(importance.shape)}"
        )
    best_scale = best_zero = best_err = None
    gs = group_size if granularity == "group" else None
    qmin, qmax = qrange(bits)
    wf = imp = buf = None
    for r in grid:
        scale, zero = weight_qparams(
            w, bits, symmetric, granularity, group_size, clip_ratio=r, full_range=full_range
        )
        if gs is None:  # one scale per row or tensor: quantize inline, weigh columns by a GEMV
            if wf is None:
                wf = w.detach().to(scale.dtype)
                buf = torch.empty_like(wf)  # one work buffer: no large allocation per ratio
                imp = torch.ones(w.shape[1], dtype=scale.dtype, device=w.device)
                imp = imp if importance is None else importance.to(imp)
            zf = zero.to(scale.dtype)
            torch.div(wf, scale, out=buf)  # codes round(w / s) + z, clamped; then w - ŵ
            buf.round_().add_(zf).clamp_(qmin, qmax).sub_(zf).mul_(scale)
            err = torch.sub(wf, buf, out=buf).square_() @ imp
            err = err.reshape(-1, 1) if scale.shape[0] > 1 else err.sum().reshape(1, 1)
        else:
            err = _group_errors(w, scale, zero, bits, gs, importance)
        if best_err is None:
            best_scale, best_zero, best_err = scale, zero, err
            continue
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_err = torch.where(better, err, best_err)
    return best_scale, best_zero


def _group_errors(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    gs: int,
    importance: torch.Tensor | None,
) -> torch.Tensor:
    """Weighted squared fake-quantization error per group, ``[out, G]``."""
    codes = quantize_weight(w, scale, zero, bits, gs)
    err = (w.detach().to(scale.dtype) - dequantize_weight(codes, scale, zero, gs)).square()
    if importance is not None:
        err = err * importance.to(err.dtype)
    # groups are contiguous along the row, as in quant.py; a ragged last group is zero-padded
    # (zeros add no error)
    if err.shape[1] % gs:
        err = torch.nn.functional.pad(err, (0, scale.shape[1] * gs - err.shape[1]))
    return err.reshape(scale.shape[0], scale.shape[1], -1).sum(-1)


def refit_scales(
    w: torch.Tensor,
    hessian: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int | None = None,
) -> torch.Tensor:
    """Least-squares scales for fixed codes: min over s of (w - ŵ(s)) H (w - ŵ(s))ᵀ per row.

    GPTQ chooses codes against a scale fixed before its first column; once the codes are known
    the output error is a quadratic in the scales, solved here in closed form (per row one
    G×G system over its G groups, 1×1 per channel, one scalar for a per-tensor grid). A row
    keeps its old scales unless the new ones are finite, positive and lower its error, so the
    result is never worse on the objective (to float32 rounding of its products for float32
    weights; exactly so in float64). Returns the new scale in ``scale``'s layout/dtype.
    """
    check_layer_inputs(w, hessian)
    h = hessian.detach().to(device=w.device, dtype=torch.float64)
    return _refit_scales(
        w, ((h + h.T) / 2).to(_work_dtype(w.dtype)), codes, scale, zero, group_size
    )


def _refit_scales(
    w: torch.Tensor,
    h: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int | None,
) -> torch.Tensor:
    """:func:`refit_scales` without checks, for a symmetric ``h`` in ``w``'s working dtype."""
    out, inp = w.shape
    # the two big products run in the weight's working precision (float32 for float32 weights:
    # b and M have no cancellation, so the scales are as good to ~1e-6); the rest in float64
    wd = h.dtype
    wf = w.detach().to(wd)
    s_old = scale.detach().to(torch.float64)
    a = codes.to(wd) - expand_groups(zero, inp, group_size).to(wd)
    n_groups = s_old.shape[1]
    gs = inp if n_groups == 1 else (group_size or inp // n_groups)
    member = torch.zeros(inp, n_groups, dtype=torch.float64, device=w.device)
    member[torch.arange(inp), torch.arange(inp) // gs] = 1.0  # column -> its group
    # Each row's error is the quadratic  c - 2 sᵀb + sᵀ M s  in its scales s, with
    # c = w H wᵀ, b[g] = Σ_{k∈g} a_k (H w)_k and M[g, g'] = Σ_{k∈g, l∈g'} a_k H_kl a_l.
    # c does not depend on s, so it is never formed: changes of error are compared instead.
    # (the products are widened and multiplied by a in place: the bits of a.double() * x with
    # fewer [out, in] float64 temporaries: 0.4 GB less for the 1.1B model's gate/up stack)
    b = (wf @ h).double().mul_(a) @ member  # [out, G]
    if n_groups == 1:
        m = (a @ h).double().mul_(a).sum(1).reshape(out, 1, 1)
    else:
        member_w = member.to(wd)
        per_group = a.unsqueeze(1) * member_w.T.unsqueeze(0)  # [out, G, in]: a restricted to g
        m = ((per_group @ h) @ (a.unsqueeze(2) * member_w.unsqueeze(0))).double()  # [out, G, G]

    def change(s: torch.Tensor) -> torch.Tensor:
        """Each row's error at scales ``s`` minus its error at the old scales."""
        s, s0 = s.expand(out, n_groups), s_old.expand(out, n_groups)
        quad = (s.unsqueeze(1) @ m @ s.unsqueeze(2)) - (s0.unsqueeze(1) @ m @ s0.unsqueeze(2))
        return quad.reshape(out) - 2 * ((s - s0) * b).sum(1)

    per_tensor = s_old.shape[0] == 1 and out > 1
    if per_tensor:  # one scale for the whole tensor: one quadratic summed over the rows
        den = float(m.sum())
        s_new = torch.full_like(s_old, float(b.sum()) / den if den > 0 else float("nan"))
    else:
        m_reg = m + torch.eye(n_groups, dtype=m.dtype, device=m.device) * 1e-12 * (
            m.diagonal(dim1=1, dim2=2).abs().amax(1, keepdim=True).unsqueeze(2) + 1e-30
        )
        s_new = torch.linalg.solve(m_reg, b.unsqueeze(2)).squeeze(2)
    ok = torch.isfinite(s_new).all(1, keepdim=True) & (s_new > 0).all(1, keepdim=True)
    s_try = torch.where(ok, s_new, s_old.expand_as(s_new))
    if per_tensor:
        return (s_try if bool(change(s_try).sum() < 0) else s_old).to(scale.dtype)
    better = (change(s_try) < 0).unsqueeze(1)
    return torch.where(better & ok, s_try, s_old).to(scale.dtype)


#: set by ``qgraph run --workers`` to the launching process's thread count
SOLVE_THREADS_ENV = "QGRAPH_SOLVE_THREADS"


@contextmanager
def solve_threads():
    """Run the block on the thread count of the process that launched the run. The Cholesky
    factor of the same matrix differs in its last bits between 1 and 2 threads (measured), so
    workers (each with fewer threads) factorise with the launcher's count and get the bits of
    one process; a plain process keeps its own count (no slowdown)."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get(SOLVE_THREADS_ENV, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: Hessians up to this many inputs are reordered by a gather into a new matrix (at most 128 MB),
#: larger ones in place
GATHER_MAX_INPUTS = 4096


def _permute_symmetric_(h: torch.Tensor, index: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``h[index][:, index]`` written into ``h`` itself (square, contiguous), with one
    ``block × n`` buffer instead of a second ``n × n`` matrix: the columns are gathered a block
    of rows at a time, then the rows are moved along the cycles of the permutation. Pure copies,
    so the result is bit for bit the one of the gather."""
    n = h.shape[0]
    for r0 in range(0, n, block):
        rows = h[r0 : r0 + block]
        rows.copy_(torch.index_select(rows, 1, index))
    src = index.tolist()  # new row k is old row src[k]
    done = [False] * n
    for start in range(n):
        if done[start] or src[start] == start:
            continue
        saved = h[start].clone()
        k = start
        while src[k] != start:
            h[k] = h[src[k]]
            done[k] = True
            k = src[k]
        h[k] = saved
        done[k] = True
    return h


def _cholesky_inverse_upper(h_rev: torch.Tensor, damp: float, dtype: torch.dtype) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``) in ``dtype``, from the float64
    ``h_rev = J H J`` (``J`` the order reversal, ``h_rev`` symmetric and contiguous), which it
    overwrites; or a ValueError that suggests more damping.

    ``J H J = L Lᵀ`` gives ``H = R Rᵀ`` for the upper triangular ``R = J L J``, so
    ``H⁻¹ = R⁻ᵀ R⁻¹`` and ``U = R⁻¹ = J L⁻¹ J``: one factorisation and one triangular solve
    instead of two factorisations and an inversion. The factorisation runs in ``h_rev``'s own
    storage, read as the column-major matrix LAPACK works on (``h_rev.T``: the same matrix,
    since it is symmetric; given the row-major ``h_rev`` torch would factor a column-major copy
    and copy it back, one more ``in × in``), and the solve in the identity it overwrites, so
    two ``in × in`` float64 matrices are alive (8192 inputs: 1 GB). ``U`` is then written, a
    block of rows at a time, over the factor (no longer needed) in ``h_rev``'s storage, which
    the returned tensor views."""
    info = torch.empty((), dtype=torch.int32)
    with solve_threads():  # LAPACK's bits depend on its thread count: workers match one process
        lower, info = torch.linalg.cholesky_ex(h_rev.T, out=(h_rev.T, info))
        ok = int(info) == 0
        if ok:
            inv = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
            torch.linalg.solve_triangular(lower, inv, upper=False, out=inv)
            del lower
    ok = ok and bool(torch.isfinite(inv.sum()))  # one pass, no mask: NaN or inf anywhere shows
    if not ok:
        raise ValueError(
            f"GPTQ: the damped Hessian is not positive definite (Cholesky failed with "
            f"damp={damp}); increase damp (e.g. 0.1) or collect more calibration data"
        )
    n = inv.shape[0]
    u = torch.empty(0, dtype=dtype, device=inv.device)  # over the factor, no longer needed
    offset = h_rev.storage_offset() * h_rev.element_size() // u.element_size()
    u.set_(h_rev.untyped_storage(), offset, (n, n))
    for r0 in range(0, n, 256):  # u = J inv J without a full-size flipped copy
        r1 = min(r0 + 256, n)
        u[r0:r1] = inv[n - r1 : n - r0].flip(0, 1)
    return u


def float_target_weights(
    weights: list[torch.Tensor], hessian: torch.Tensor, cross: torch.Tensor, damp: float = 0.01
) -> list[torch.Tensor]:
    """For each ``W`` of layers sharing an input, the weight ``W'`` whose output error on the
    quantized model's inputs ``X`` equals, up to a constant, the error against the float model's
    output ``W X̃`` (asymmetric calibration as in GPTAQ, arXiv 2504.02692, here in closed form
    ahead of the solver).

    ``‖X̃Wᵀ − XQᵀ‖² = ‖X(W' − Q)ᵀ‖² + const`` for every ``Q`` with
    ``W' = W + (H⁻¹ ΔC Wᵀ)ᵀ``, ``H = XᵀX`` (``hessian``) and ``ΔC = Xᵀ(X̃ − X)`` (``cross``):
    the part of the float output that ``X`` can express. ``H`` is damped like GPTQ's (dead
    inputs get diagonal 1, then ``damp · mean(diag)``), which also keeps ``W'`` near ``W`` where
    ``X`` has little energy; it is factored once for the group. ``ΔC = 0`` (no quantization
    upstream) returns the weights themselves.
    """
    if not bool(cross.any()):
        return list(weights)
    h = hessian.to(torch.float64, copy=True)
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    diag += damp * float(diag.mean())
    factor = torch.linalg.cholesky(h)
    del h
    sizes = [int(w.shape[0]) for w in weights]
    w64 = torch.cat([w.to(torch.float64) for w in weights])
    shift = torch.cholesky_solve(cross.to(torch.float64) @ w64.T, factor)  # [in, Σ out]
    w64 += shift.T
    return [t.to(w.dtype) for t, w in zip(w64.split(sizes), weights, strict=True)]


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    granularity: str = "channel",
    group_size: int | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    clip: str = "none",
    clip_grid: Sequence[float] = DEFAULT_CLIP_GRID,
    full_range: bool = False,
    refit_scale: bool = False,
    with_error: bool = True,
    consume_hessian: bool = False,
    refit_hessian: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize w [out, in] with GPTQ given the Hessian [in, in] of its inputs (∝ XᵀX).

        Dead inputs (diag H == 0) get diag 1 and zero weights; damp · mean(diag H) is added to the
        diagonal. granularity is 'tensor' (one scale/zero [1, 1], fixed from the whole weight before
        any update), 'channel' (scale/zero [out, 1]) or 'group' (needs group_size; [out, ceil(in /
        group_size)], each group's grid taken when its first column is reached). ``clip`` other than
        "none" picks each row's (channel) or group's clip ratio from clip_grid by error
        (mse_clip_search): "output" weighs each column by the Hessian's diagonal (the output error of
        each column alone), "mse" by 1 (plain weight MSE); for groups it is applied to the group's
        current weights. full_range selects the
        symmetric full grid (quant.py). ``refit_scale`` re-solves the scales for the final codes by
        least squares on the same objective (refit_scales). ``with_error=False`` skips the proxy loss
    (``error`` is NaN) for callers that measure it themselves. See the module docstring for the design.
        Inputs are never modified, except with ``consume_hessian``: the caller hands over a
        contiguous float64 ``hessian`` on ``w``'s device, which is then reordered and factored in
        place instead of in a copy (one ``in × in`` float64 less; its values are garbage
        afterwards; needs ``with_error=False``). ``refit_hessian``, when given, is ``hessian``
        already cast to the working dtype (float32 for all but float64 weights): the scale refit
        reads it instead of a cast of its own (one ``in × in`` less when the caller holds one).
    """
    check_layer_inputs(w, hessian)
    qrange(bits)
    if granularity not in ("tensor", "channel", "group"):
        raise ValueError(f"unknown granularity {granularity!r}; use 'tensor', 'channel' or 'group'")
    out, inp = w.shape
    if granularity == "group":
        if group_size is None or group_size < 1:
            raise ValueError(f"granularity 'group' needs a positive group_size, got {group_size}")
        gs = group_size  # the last group may be shorter (ragged)
    else:
        gs = inp
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if not damp >= 0:
        raise ValueError(f"damp must be non-negative, got {damp}")
    if clip not in ("none", "mse", "output"):
        raise ValueError(f"clip must be 'none', 'mse' or 'output', got {clip!r}")
    if consume_hessian and with_error:
        raise ValueError("consume_hessian needs with_error=False (the error reads the Hessian)")

    device = w.device
    wd = _work_dtype(w.dtype)
    h = hessian.detach()
    owned = (
        consume_hessian
        and h.dtype == torch.float64
        and h.device == device
        and h.is_contiguous()
        and (torch.is_inference_mode_enabled() or not h.is_inference())  # else not writable
    )
    if not owned:  # a contiguous float64 copy: the caller's Hessian is left as it was
        h = torch.empty(inp, inp, dtype=torch.float64, device=device).copy_(h)
    h_symmetric = torch.equal(h, h.T)
    if not h_symmetric:  # window_hessian's are symmetric by construction
        h = (h + h.T) / 2
    h_refit = None
    if refit_scale:  # undamped; dead inputs keep diag 0
        given = (
            refit_hessian is not None
            and h_symmetric
            and refit_hessian.dtype == wd
            and refit_hessian.untyped_storage().data_ptr() != h.untyped_storage().data_ptr()
        )  # the caller's cast, unless it would be overwritten (the consumed Hessian itself)
        h_refit = refit_hessian.detach() if given else h.to(wd, copy=True)
    diag = h.diagonal()
    if not float(diag.sum()) > 0:
        raise DataError("hessian has a non-positive trace (all inputs dead or no calibration data)")
    dead = diag == 0
    diag[dead] = 1.0
    weight = w.detach().to(wd).clone()
    weight[:, dead] = 0.0

    importance = diag.clone() if clip == "output" else torch.ones_like(diag)
    importance[dead] = 0.0

    def params(block: torch.Tensor, cols: torch.Tensor | None = None):
        if clip != "none":
            imp = importance if cols is None else importance[cols]
            return mse_clip_search(
                block, bits, symmetric, "channel", None, clip_grid, full_range, imp
            )
        return weight_qparams(block, bits, symmetric, "channel", full_range=full_range)

    n_groups = -(-inp // gs)
    scale = torch.empty(out, n_groups, dtype=wd, device=device)
    zero = torch.zeros(out, n_groups, dtype=torch.int8, device=device)
    ready = [False] * n_groups
    if granularity == "channel":
        s, z = params(weight)
        scale[:, :1], zero[:, :1] = s, z
        ready[0] = True
    elif granularity == "tensor":
        if clip != "none":
            s, z = mse_clip_search(
                weight, bits, symmetric, "tensor", None, clip_grid, full_range, importance
            )
        else:
            s, z = weight_qparams(weight, bits, symmetric, "tensor", full_range=full_range)
        scale[:, :1], zero[:, :1] = s.expand(out, 1), z.expand(out, 1)
        ready[0] = True

    perm = None
    if act_order:
        perm = torch.sort(diag, descending=True, stable=True).indices
        weight = weight[:, perm]
        order = perm
    else:
        order = torch.arange(inp, device=device)
    position = torch.empty_like(order)
    position[order] = torch.arange(inp, device=device)  # permuted position of each column
    order_list = order.tolist()

    del diag  # a view of h, which is reordered next
    rev = order.flip(0)
    if inp <= GATHER_MAX_INPUTS:  # J Pᵀ H P J (P: the processing order) in one gather
        h = h[rev.unsqueeze(1), rev]
    else:  # the same in place: no second in × in float64 (~2x slower below 4096 inputs)
        h = _permute_symmetric_(h, rev)
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    u = _cholesky_inverse_upper(h, damp, wd)
    del h

    qmin, qmax = qrange(bits)
    # The loop works on the transposed weight [in, out]: a column of w is then a contiguous row,
    # which makes the per-column operations (the loop runs once per input column) several
    # times faster than on strided columns; the arithmetic per element is unchanged.
    weight_t = weight.T.contiguous()
    del weight
    codes_t = torch.empty(inp, out, dtype=torch.int8, device=device)
    grid: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # group -> contiguous (scale, zero)
    for i1 in range(0, inp, block_size):
        i2 = min(i1 + block_size, inp)
        w1 = weight_t[i1:i2].clone()
        err1 = torch.zeros(i2 - i1, out, dtype=wd, device=device)
        for i in range(i2 - i1):
            j = i1 + i
            g = order_list[j] // gs
            if not ready[g]:
                # All columns of group g are still unquantized (j is the first one reached):
                # take their current values, including this block's pending updates.
                cols = position[g * gs : (g + 1) * gs]
                inside = cols < i2
                current = torch.empty(out, cols.numel(), dtype=wd, device=device)
                current[:, inside] = w1[cols[inside] - i1].T
                later = cols[~inside]
                if later.numel():
                    current[:, ~inside] = (weight_t[later] - u[i1:j, later].T @ err1[:i]).T
                s, z = params(current, torch.arange(g * gs, min((g + 1) * gs, inp)))
                scale[:, g : g + 1], zero[:, g : g + 1] = s, z
                ready[g] = True
            if g not in grid:
                grid[g] = (scale[:, g].contiguous(), zero[:, g].to(wd))
            s, z = grid[g]
            col = w1[i]
            # quantize_weight / dequantize_weight inlined (same operations, same bits): this
            # loop runs once per column and their checks and group expansion dominated it
            q = (torch.round(col / s) + z).clamp_(qmin, qmax)
            codes_t[j] = q
            e = (col - (q - z) * s) / u[j, j]
            w1[i:] -= u[j, j:i2].unsqueeze(1) * e
            err1[i] = e
        if i2 < inp:
            weight_t[i2:] -= u[i1:i2, i2:].T @ err1

    codes = torch.empty(out, inp, dtype=torch.int8, device=device)
    codes[:, order] = codes_t.T
    group = gs if granularity == "group" else None
    if granularity == "tensor":
        scale, zero = scale[:1], zero[:1]
    if refit_scale:
        scale = _refit_scales(w, h_refit, codes, scale, zero, group)
    w_hat = dequantize_weight(codes, scale, zero, group)
    w_hat = w_hat.to(w.dtype)
    return GPTQResult(
        weight=w_hat,
        codes=codes,
        scale=scale,
        zero=zero,
        error=rtn_error(w, hessian, w_hat) if with_error else float("nan"),
        perm=perm,
    )
