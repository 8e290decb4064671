"""Loss-change estimates for moving parameters from w to w + Δw (ReQuant, arXiv 2503.01901).

Quantization moves every weight by Δw = Q(w) - w, a step far outside the region where a
Taylor expansion of the loss F holds. The post-quantization integral (PQI) integrates the
gradient along the straight path instead::

    ΔF = F(w + Δw) - F(w) = ∫₀¹ ∇F(w + tΔw)ᵀ Δw dt = Σᵢ ΔFᵢ,
    ΔFᵢ = Δwᵢ ∫₀¹ ∂ᵢF(w + tΔw) dt,

which is exact whatever the step size; only the 1-D quadrature in t is approximate. ΔFᵢ is a
per-weight sensitivity (signed: positive means quantizing weight i raises the loss).

Conventions
-----------
* ``loss_fn(params, batch) -> scalar`` is functional: ``params`` maps names to tensors (the
  caller typically wraps ``torch.func.functional_call``). Every entry of ``params`` is passed
  on each call; only the entries named in ``deltas`` are moved and differentiated, the others
  are passed detached and unchanged.
* F is the *unweighted* mean of the per-batch losses, so "gradients averaged over the
  batches" is exactly the gradient of F (give equal-sized batches if F should be the mean
  per-sample loss).
* Gradient sums are accumulated in ``accum_dtype`` (default: float64 for float64
  parameters, float32 otherwise, as in quant.py); one accumulator per moved parameter, no
  per-batch or per-node gradients are kept. Points w + tΔw are formed in the accumulation
  dtype and cast to the parameter's dtype before the loss is evaluated.
* Every estimator also reports the actual ΔF = mean_b F_b(w + Δw) - mean_b F_b(w) on the
  same batches (two forward passes per batch), so callers can judge the estimate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qgraph.errors import DataError

__all__ = [
    "QUADRATURE_RULES",
    "LossFn",
    "PQIResult",
    "SensitivityResult",
    "pqi",
    "quadrature",
    "taylor_first",
    "taylor_second",
]

#: ``loss_fn(params, batch) -> scalar loss tensor``.
LossFn = Callable[[dict[str, torch.Tensor], Any], torch.Tensor]

QUADRATURE_RULES = ("midpoint", "trapezoid")


@dataclass(frozen=True)
class SensitivityResult:
    """Per-weight loss-change estimates and their totals.

    sensitivity: name -> ΔFᵢ (shape of the parameter, accumulation dtype) for every name in
        ``deltas``; param_totals: name -> Σᵢ ΔFᵢ over that tensor; total: the predicted ΔF
        (sum over all tensors, in float64); actual: mean_b F_b(w + Δw) - mean_b F_b(w) on the
        same batches (None when not computed); base_loss: mean_b F_b(w) (None likewise);
        method: e.g. "pqi/midpoint/32", "taylor1", "taylor2/fisher".
    """

    sensitivity: dict[str, torch.Tensor]
    param_totals: dict[str, float]
    total: float
    actual: float | None
    base_loss: float | None
    method: str

    @property
    def relative_error(self) -> float | None:
        """|predicted - actual| / |actual| (inf when actual is 0 and the prediction is not)."""
        if self.actual is None:
            return None
        diff = abs(self.total - self.actual)
        if self.actual == 0.0:
            return 0.0 if diff == 0.0 else float("inf")
        return diff / abs(self.actual)


#: pqi returns the same structure as the Taylor estimators, so callers can swap them.
PQIResult = SensitivityResult


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def quadrature(rule: str, n_intervals: int) -> list[tuple[float, float]]:
    """(node t, weight) pairs approximating ∫₀¹ f(t) dt with ``n_intervals`` sub-intervals.

    midpoint: t = (k + ½)/N, weight 1/N (N gradient evaluations); trapezoid: t = k/N,
    k = 0..N, weights 1/N with ½/N at both ends (N + 1 evaluations). Both are exact for an
    integrand linear in t (a quadratic loss) and converge as O(1/N²) otherwise.
    """
    if not isinstance(n_intervals, int) or isinstance(n_intervals, bool) or n_intervals < 1:
        raise ValueError(f"n_intervals must be a positive integer, got {n_intervals!r}")
    n = n_intervals
    if rule == "midpoint":
        return [((k + 0.5) / n, 1.0 / n) for k in range(n)]
    if rule == "trapezoid":
        return [(k / n, (0.5 if k in (0, n) else 1.0) / n) for k in range(n + 1)]
    raise ValueError(f"unknown quadrature rule {rule!r}; use one of {QUADRATURE_RULES}")


def _accum_dtype(params: Mapping[str, torch.Tensor], names: list[str], dtype) -> torch.dtype:
    if dtype is not None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accum_dtype must be float32 or float64, got {dtype}")
        return dtype
    if all(params[n].dtype == torch.float64 for n in names):
        return torch.float64
    return torch.float32


def _check(
    params: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor], batches: Sequence
) -> list[str]:
    """Validate the inputs; return the names of the moved parameters (deltas' order)."""
    if not deltas:
        raise ValueError("deltas is empty: nothing to estimate")
    if len(batches) == 0:
        raise DataError("no calibration batches given")
    for name, d in deltas.items():
        if name not in params:
            raise ValueError(f"delta {name!r} has no matching parameter")
        p = params[name]
        if not p.is_floating_point() or d.shape != p.shape:
            raise ValueError(
                f"delta {name!r} must match its float parameter: "
                f"{p.dtype} {tuple(p.shape)} vs {d.dtype} {tuple(d.shape)}"
            )
        if not torch.isfinite(d).all():
            raise DataError(f"delta {name!r} contains NaN or infinite values")
    return list(deltas)


def _point(
    params: Mapping[str, torch.Tensor],
    deltas: Mapping[str, torch.Tensor],
    t: float,
    acc: torch.dtype,
    grad: bool,
) -> dict[str, torch.Tensor]:
    """params with w + tΔw for the moved entries (fresh leaves when grad), others detached."""
    point = {}
    for name, p in params.items():
        if name in deltas:
            v = p.detach().to(acc) + t * deltas[name].detach().to(device=p.device, dtype=acc)
            v = v.to(p.dtype)
            point[name] = v.requires_grad_(True) if grad else v
        else:
            point[name] = p.detach()
    return point


def _loss(loss_fn: LossFn, point: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
    loss = loss_fn(point, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor")
    if not torch.isfinite(loss).all():
        raise DataError("loss_fn returned a NaN or infinite loss")
    return loss.reshape(())


def _grad_moments(
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    deltas: Mapping[str, torch.Tensor],
    batches: Sequence,
    nodes: list[tuple[float, float]],
    acc: torch.dtype,
    squares: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(Σ_k weight_k · mean_b g_b(t_k), Σ_k weight_k · mean_b g_b(t_k)²) per moved parameter.

    g_b(t) is the gradient of batch b's loss at w + tΔw. The second sum is only formed when
    ``squares`` (the empirical Fisher diagonal when the only node is t = 0 with weight 1).
    """
    names = list(deltas)
    first = {n: torch.zeros(params[n].shape, dtype=acc, device=params[n].device) for n in names}
    second = {n: torch.zeros_like(v) for n, v in first.items()} if squares else None
    scale = 1.0 / len(batches)
    with torch.enable_grad():
        for t, weight in nodes:
            point = _point(params, deltas, t, acc, grad=True)
            leaves = [point[n] for n in names]
            for batch in batches:
                loss = _loss(loss_fn, point, batch)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                for n, g in zip(names, grads, strict=True):
                    if g is None:  # the loss does not depend on this parameter
                        continue
                    g = g.detach().to(acc)
                    first[n].add_(g, alpha=weight * scale)
                    if second is not None:
                        second[n].add_(g.square(), alpha=weight * scale)
    return first, second


def _mean_loss(
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    deltas: Mapping[str, torch.Tensor],
    batches: Sequence,
    t: float,
    acc: torch.dtype,
) -> float:
    with torch.no_grad():
        point = _point(params, deltas, t, acc, grad=False)
        total = sum(float(_loss(loss_fn, point, b).to(torch.float64)) for b in batches)
    return total / len(batches)


def _result(
    sensitivity: dict[str, torch.Tensor],
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    deltas: Mapping[str, torch.Tensor],
    batches: Sequence,
    acc: torch.dtype,
    method: str,
    compute_actual: bool,
) -> SensitivityResult:
    totals = {n: float(s.sum(dtype=torch.float64)) for n, s in sensitivity.items()}
    actual = base = None
    if compute_actual:
        base = _mean_loss(loss_fn, params, deltas, batches, 0.0, acc)
        actual = _mean_loss(loss_fn, params, deltas, batches, 1.0, acc) - base
    return SensitivityResult(
        sensitivity=sensitivity,
        param_totals=totals,
        total=float(sum(totals.values())),
        actual=actual,
        base_loss=base,
        method=method,
    )


# --------------------------------------------------------------------------------------
# estimators
# --------------------------------------------------------------------------------------


def pqi(
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    deltas: Mapping[str, torch.Tensor],
    batches: Sequence,
    n_intervals: int = 32,
    rule: str = "midpoint",
    *,
    accum_dtype: torch.dtype | None = None,
    compute_actual: bool = True,
) -> PQIResult:
    """Post-quantization integral: ΔFᵢ = Δwᵢ ∫₀¹ ∂ᵢF(w + tΔw) dt for every moved weight.

    The integral uses ``quadrature(rule, n_intervals)`` (N = 32 in the paper; N = 4 is often
    within a few percent); every node costs one forward + backward pass per batch. Exact for a
    quadratic loss at any N. Returns sensitivities for the names in ``deltas``, their total
    (the predicted ΔF) and the actual ΔF on the same batches.
    """
    names = _check(params, deltas, batches)
    nodes = quadrature(rule, n_intervals)
    acc = _accum_dtype(params, names, accum_dtype)
    mean_grad, _ = _grad_moments(loss_fn, params, deltas, batches, nodes, acc)
    sens = {n: mean_grad[n] * deltas[n].detach().to(mean_grad[n]) for n in names}
    method = f"pqi/{rule}/{n_intervals}"
    return _result(sens, loss_fn, params, deltas, batches, acc, method, compute_actual)


def taylor_first(
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    deltas: Mapping[str, torch.Tensor],
    batches: Sequence,
    *,
    accum_dtype: torch.dtype | None = None,
    compute_actual: bool = True,
) -> SensitivityResult:
    """First-order Taylor estimate ΔFᵢ = gᵢ Δwᵢ, g = ∇F(w) averaged over the batches.

    The baseline PQI improves on: it ignores how the gradient changes along the step.
    """
    names = _check(params, deltas, batches)
    acc = _accum_dtype(params, names, accum_dtype)
    g, _ = _grad_moments(loss_fn, params, deltas, batches, [(0.0, 1.0)], acc)
    sens = {n: g[n] * deltas[n].detach().to(g[n]) for n in names}
    return _result(sens, loss_fn, params, deltas, batches, acc, "taylor1", compute_actual)


def taylor_second(
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    deltas: Mapping[str, torch.Tensor],
    batches: Sequence,
    *,
    hessian_diag: Mapping[str, torch.Tensor] | None = None,
    accum_dtype: torch.dtype | None = None,
    compute_actual: bool = True,
) -> SensitivityResult:
    """Diagonal second-order Taylor estimate ΔFᵢ = gᵢ Δwᵢ + ½ Hᵢᵢ Δwᵢ².

    Hᵢᵢ is the empirical Fisher diagonal mean_b g_{b,i}² (g_b: gradient of batch b's loss at
    w) unless ``hessian_diag`` (name -> tensor of the parameter's shape) supplies it. The
    Fisher is the usual cheap, non-negative proxy of the Hessian diagonal near a minimum;
    it is only as good as that assumption, and with large batches (g_b close to the mean
    gradient) it underestimates the curvature. Off-diagonal terms are ignored, so the
    estimate is exact for a quadratic loss only when its Hessian is diagonal.
    """
    names = _check(params, deltas, batches)
    acc = _accum_dtype(params, names, accum_dtype)
    g, fisher = _grad_moments(
        loss_fn, params, deltas, batches, [(0.0, 1.0)], acc, squares=hessian_diag is None
    )
    if hessian_diag is not None:
        curv = {}
        for n in names:
            if n not in hessian_diag or hessian_diag[n].shape != params[n].shape:
                raise ValueError(
                    f"hessian_diag needs a tensor of shape {tuple(params[n].shape)} for {n!r}"
                )
            curv[n] = hessian_diag[n].detach().to(device=g[n].device, dtype=acc)
        method = "taylor2/hessian"
    else:
        assert fisher is not None
        curv, method = fisher, "taylor2/fisher"
    sens = {}
    for n in names:
        d = deltas[n].detach().to(g[n])
        sens[n] = g[n] * d + 0.5 * curv[n] * d.square()
    return _result(sens, loss_fn, params, deltas, batches, acc, method, compute_actual)
