"""Learned rounding (AdaRound, Nagel et al. arXiv 2004.10568) as a pure tensor kernel.

Gradient-based PTQ in the sense of Yvinec et al. (arXiv 2308.07662): the quantization grid
(scale, zero) is kept fixed and only the *rounding direction* of every weight (down or up) is
learned, by minimising the layer's output reconstruction error on calibration data.

Each weight gets a soft variable V; with the rectified sigmoid
``h(V) = clamp(sigmoid(V)·(ζ − γ) + γ, 0, 1)`` (ζ = 1.1, γ = −0.1) the soft weight is::

    ŵ = s · (clamp(floor(w / s) + h(V) + z, qmin, qmax) − z)

and the loss is the Hessian proxy of ``rtn_error`` plus AdaRound's rounding regulariser::

    L = tr(ΔW H ΔWᵀ) / (out · tr H · mean(s²))  +  reg · Σ (1 − |2h(V) − 1|^β) / numel

with ΔW = W − Ŵ and H = XᵀX, so no activations are stored. β is annealed linearly from
``beta[0]`` to ``beta[1]`` after a warm-up fraction ``warmup`` of the iterations, during which
the regulariser is off. Adam updates V only. The final rounding is up where h(V) ≥ 0.5, i.e.
where V ≥ 0 (h(0) = 0.5 exactly), so every learned code differs from the round-to-nearest code
by at most one step.

Design decisions
----------------
* **Reconstruction term in grid units; reg default 1.** The soft weight starts *at* w (h(V) =
  frac(w / s)), where the reconstruction term and its gradient are zero: the regulariser is
  what drives V away from the start, and the reconstruction term steers which way. With the
  raw proxy of ``rtn_error`` (a mean squared weight error, ≈ s²/12 at RTN) the balance would
  depend on the layer's scale (a reg of 0.01 is worth 5 on a layer with s ≈ 0.05 and 400 on
  one with s ≈ 0.005). Dividing the proxy by mean(s²) (a constant, so its minimiser is
  unchanged) makes the balance scale-free. With the short schedules used here (hundreds of
  iterations, not AdaRound's 20k) a weak regulariser leaves most decisions at RTN: on a
  32x64 int3 test layer reg = 0.01 / 0.1 / 1 / 10 cut the proxy error by 8 / 33 / 44 / 46 %
  versus RTN, hence the default reg = 1.
* **RTN-equivalent start.** V starts where h(V) = frac(w / s). At exact (or numerically
  ambiguous) halves the sign of V is set to match ``torch.round`` (half to even), so that
  ``iters=0`` returns exactly quant.py's round-to-nearest codes.
* **Never worse than RTN on the proxy.** The hard-rounded result is compared with RTN on the
  (float64) proxy and RTN is kept if it is better (``fell_back`` says so). With enough
  iterations this essentially never happens; it guards against a bad ``lr``/``reg``.
* **Fixed grid.** (scale, zero) come from ``weight_qparams`` unless the caller passes its own
  (e.g. the MSE-clipped grid the ``quantize`` pass chose); learning never changes the grid, so
  the result is stored exactly like RTN codes.
* **float32, deterministic.** Everything runs in float32 (a float64 H is cast); there is no
  sampling (H summarises all calibration inputs), so results are reproducible bit for bit;
  ``seed`` is accepted for API stability (reserved for stochastic variants) and has no effect.
* **Autograd inside inference mode.** Passes call kernels under ``torch.inference_mode``; the
  optimisation re-enables autograd locally and works on fresh (non-inference) copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qgraph.kernels.gptq import check_layer_inputs, rtn_error
from qgraph.kernels.quant import (
    dequantize_weight,
    expand_groups,
    qrange,
    quantize_weight,
    weight_qparams,
)

__all__ = ["GAMMA", "ZETA", "RoundingResult", "learn_rounding"]

#: Stretch of the rectified sigmoid (AdaRound's ζ and γ).
ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class RoundingResult:
    """Output of learn_rounding.

    weight: dequantized weight [out, in], float32 (== dequantize_weight(codes, scale, zero,
        group_size) bit for bit); codes: int8 [out, in]; scale: [out or 1, G] float32;
        zero: int8 [out or 1, G]; error: rtn_error(w, hessian, weight) (float64 proxy);
        rtn_error: the same proxy for round-to-nearest on the same grid; fell_back: True when
        the learned rounding was worse than RTN on the proxy and RTN was returned instead.
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    error: float
    rtn_error: float
    fell_back: bool


class _QuadraticForm(torch.autograd.Function):
    """``Σ (δ H) ⊙ δ`` for symmetric H with one matmul per call: the gradient ``2 δ H`` reuses
    the forward product (autograd would compute a second one — half the cost of an iteration)."""

    @staticmethod
    def forward(ctx, delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        prod = delta @ h
        ctx.save_for_backward(prod)
        return (prod * delta).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (prod,) = ctx.saved_tensors
        return 2.0 * grad * prod, None


def _h(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _check(w: torch.Tensor, hessian: torch.Tensor, iters, lr, reg, beta, warmup) -> None:
    check_layer_inputs(w, hessian)
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 0:
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not reg >= 0:
        raise ValueError(f"reg must be non-negative, got {reg}")
    if len(beta) != 2 or not (beta[0] > 0 and beta[1] > 0):
        raise ValueError(f"beta must be two positive numbers (start, end), got {beta!r}")
    if not 0.0 <= warmup <= 1.0:
        raise ValueError(f"warmup must be in [0, 1], got {warmup}")


def learn_rounding(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    granularity: str = "channel",
    group_size: int | None = None,
    iters: int = 200,
    lr: float = 1e-2,
    reg: float = 1.0,
    beta: tuple[float, float] = (20.0, 2.0),
    warmup: float = 0.2,
    seed: int = 0,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
) -> RoundingResult:
    """Learn the up/down rounding of w [out, in] on the fixed grid, given H [in, in] ∝ XᵀX.

    granularity 'tensor' | 'channel' | 'group' (group_size; the last group may be ragged).
    scale/zero (quant.py's layout, both or neither) override the weight_qparams grid.
    See the module docstring for the method and design. Inputs are never modified.
    """
    _check(w, hessian, iters, lr, reg, beta, warmup)
    qmin, qmax = qrange(bits)
    out, inp = w.shape
    gs = group_size if granularity == "group" else None
    wf = w.detach().float()
    if (scale is None) != (zero is None):
        raise ValueError("pass both scale and zero, or neither")
    if scale is None:
        scale, zero = weight_qparams(wf, bits, symmetric, granularity, group_size)
    scale = scale.detach().float()
    zero = zero.detach().to(torch.int8)
    rtn_codes = quantize_weight(wf, scale, zero, bits, gs)
    rtn_weight = dequantize_weight(rtn_codes, scale, zero, gs)
    err_rtn = rtn_error(wf, hessian, rtn_weight)
    del seed  # reserved for stochastic variants; the optimisation itself is deterministic

    with torch.inference_mode(False), torch.enable_grad():
        s = expand_groups(scale, inp, gs).expand(out, inp).clone()
        z = expand_groups(zero, inp, gs).expand(out, inp).float().clone()
        x = wf.clone() / s  # same division as quantize_weight
        base = torch.floor(x)
        up_rtn = (torch.round(x) - base) > 0  # round half to even, like quantize_weight
        frac = (x - base).clamp(0.0, 1.0)
        p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
        v0 = torch.log(p) - torch.log1p(-p)  # h(v0) = frac
        # match torch.round at (numerical) ties: V >= 0 <=> rounds up
        v0 = torch.where(up_rtn, v0.clamp_min(0.0), v0.clamp_max(-1e-4))
        v = v0.clone().requires_grad_(True)

        h = hessian.detach().to(device=w.device, dtype=torch.float64)
        trace = float(h.diagonal().sum())
        h32 = ((h + h.T) / 2).float()  # exactly symmetric, as _QuadraticForm assumes
        norm = 1.0 / (out * max(trace, 1e-30) * float((s * s).mean()))
        opt = torch.optim.Adam([v], lr=lr)
        start = int(warmup * iters)
        wt = wf.clone()
        for t in range(iters):
            hv = _h(v)
            w_soft = s * ((base + hv + z).clamp(qmin, qmax) - z)
            delta = wt - w_soft
            loss = _QuadraticForm.apply(delta, h32) * norm
            if t >= start and reg > 0:
                rel = (t - start) / max(1, iters - start)
                b = beta[1] + (beta[0] - beta[1]) * (1.0 - rel)
                loss = loss + reg * (1.0 - (2.0 * hv - 1.0).abs().pow(b)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        up = v.detach() >= 0.0

    codes = (base + up.float() + z).clamp(qmin, qmax).to(torch.int8)
    weight = dequantize_weight(codes, scale, zero, gs)
    err = rtn_error(wf, hessian, weight)
    fell_back = err > err_rtn
    if fell_back:
        codes, weight, err = rtn_codes, rtn_weight, err_rtn
    return RoundingResult(weight, codes, scale, zero, err, err_rtn, fell_back)
