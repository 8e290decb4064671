"""Differentiable stand-ins for rounding and clamping (QAT, arXiv 2410.10849).

Quantization-aware training needs a gradient through ``round`` and ``clamp``. The
straight-through estimator (STE) uses the true step forward and the identity backward (a hard
0/1 gate at the clamp bounds). The continuous approximations replace both by smooth functions
whose sharpness ``t`` is raised during training towards the true step:

- sigmoid rounding: the staircase as a sum of sigmoid steps at the half-integers. The common
  one-term form ``⌊x⌋ + σ(t (x − ⌊x⌋ − ½))`` jumps by ``2σ(−t/2)`` at every integer (0.24 at
  ``t = 4``) and its gradient vanishes there, exactly where weights initialised from their
  codes sit. Keeping the steps on both sides (``k ± ½`` and ``k + 3/2``) makes the function
  continuous to within ``σ(−3t/2)`` and gives integers a gradient of ``2tσ(t/2)σ(−t/2)``.
- SoftClamp: ``x·g(x−a)·g(b−x) + a·g(a−x) + b·g(x−b)`` with ``g = σ(t ·)``, so values near a
  bound still receive gradient.

All functions are pure and elementwise; ``t`` is a Python float.
"""

from __future__ import annotations

import torch

ESTIMATORS = ("sigmoid", "ste")


def sigmoid_round(x: torch.Tensor, sharpness: float) -> torch.Tensor:
    """Smooth rounding: the sigmoid steps at ``⌊x⌋ − ½``, ``⌊x⌋ + ½`` and ``⌊x⌋ + 3/2``."""
    base = torch.floor(x).detach()
    frac = x - base
    steps = (
        torch.sigmoid(sharpness * (frac + 0.5))
        + torch.sigmoid(sharpness * (frac - 0.5))
        + torch.sigmoid(sharpness * (frac - 1.5))
    )
    return base - 1.0 + steps


def soft_clamp(x: torch.Tensor, lo: float, hi: float, sharpness: float) -> torch.Tensor:
    """SoftClamp to ``[lo, hi]``: the identity inside, the bounds outside, smooth in between."""

    def gate(v: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(sharpness * v)

    return x * gate(x - lo) * gate(hi - x) + lo * gate(lo - x) + hi * gate(x - hi)


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def estimate_codes(
    c: torch.Tensor, qmin: int, qmax: int, estimator: str, sharpness: float
) -> torch.Tensor:
    """Integer codes of the continuous codes ``c`` (``w / s + z``) as the estimator sees them.

    ``ste``: ``round(clamp(c))`` with straight-through rounding and a hard clamp gate.
    ``sigmoid``: ``sigmoid_round(soft_clamp(c))`` at ``sharpness``.
    """
    if estimator == "ste":
        return ste_round(c.clamp(qmin, qmax))
    if estimator == "sigmoid":
        return _SigmoidCodes.apply(c, qmin, qmax, sharpness)
    raise ValueError(f"unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")


class _SigmoidCodes(torch.autograd.Function):
    """``sigmoid_round(soft_clamp(c))`` that keeps only ``c`` for its backward and recomputes the
    rest there: autograd of the composite keeps about ten weight-sized tensors per layer alive
    until the backward (15 GB on SmolLM2), this one, one."""

    @staticmethod
    def forward(ctx, c: torch.Tensor, qmin: int, qmax: int, sharpness: float) -> torch.Tensor:
        ctx.save_for_backward(c)
        ctx.args = (qmin, qmax, sharpness)
        return sigmoid_round(soft_clamp(c, qmin, qmax, sharpness), sharpness)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (c,) = ctx.saved_tensors
        qmin, qmax, sharpness = ctx.args
        with torch.enable_grad():
            x = c.detach().requires_grad_(True)
            y = sigmoid_round(soft_clamp(x, qmin, qmax, sharpness), sharpness)
            (dx,) = torch.autograd.grad(y, x, grad)
        return dx, None, None, None


def hard_codes(c: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The codes the trained model stores: ``clamp(round(c))`` (what both estimators approach)."""
    return torch.round(c.detach()).clamp(qmin, qmax)


def annealed_sharpness(step: int, steps: int, start: float, end: float) -> float:
    """Geometric schedule from ``start`` (step 0) to ``end`` (last step)."""
    if steps <= 1:
        return end
    return start * (end / start) ** (step / (steps - 1))
