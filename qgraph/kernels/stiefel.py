"""Gradient steps that keep a square matrix orthogonal (Cayley SGD on the orthogonal group).

SpinQuant (arXiv 2405.16406) learns its rotations this way. Given an orthogonal ``X`` and the
Euclidean gradient ``G`` of a loss at ``X``, ``A = G Xᵀ − X Gᵀ`` is skew-symmetric and the Cayley
transform ``Y(τ) = (I + τ/2 A)⁻¹ (I − τ/2 A) X`` is orthogonal for every ``τ`` and starts in a
descent direction (``dY/dτ = −A X``, and ``⟨G, −A X⟩ = −½‖A‖² ≤ 0``). Orthogonality is exact up
to the linear solve's rounding, so no re-orthogonalisation is needed after a step.
"""

from __future__ import annotations

import torch


def skew_gradient(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``A = G Xᵀ − X Gᵀ``: the gradient as a skew-symmetric generator acting from the left."""
    return grad @ x.T - x @ grad.T


def cayley_step(x: torch.Tensor, generator: torch.Tensor, step: float) -> torch.Tensor:
    """``(I + step/2 · A)⁻¹ (I − step/2 · A) X`` for a skew-symmetric ``A`` (computed in float64:
    the solve is n×n and keeping ``X`` orthogonal to 1e-12 costs nothing at these sizes)."""
    if x.dim() != 2 or x.shape[0] != x.shape[1] or generator.shape != x.shape:
        raise ValueError(
            f"cayley_step needs square X and A of one shape, got {tuple(x.shape)} and "
            f"{tuple(generator.shape)}"
        )
    a = generator.double() * (step / 2.0)
    eye = torch.eye(x.shape[0], dtype=torch.float64, device=x.device)
    y = torch.linalg.solve(eye + a, (eye - a) @ x.double())
    return y.to(x.dtype)


class CayleySGD:
    """SGD with momentum on orthogonal matrices, every step a Cayley retraction.

    The momentum buffer accumulates the skew generators ``A``. Each step is scaled so that
    ``step · ‖A‖_F`` equals ``lr`` (a rotation "angle" per step), which makes ``lr`` independent
    of the loss's scale; ``lr`` may change between steps (a schedule).
    """

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float = 0.9):
        if not lr > 0:
            raise ValueError(f"CayleySGD: lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"CayleySGD: momentum must be in [0, 1), got {momentum}")
        self.params = params
        self.lr = lr
        self.momentum = momentum
        self._buf: list[torch.Tensor | None] = [None] * len(params)

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            a = skew_gradient(p.double(), p.grad.double())
            buf = self._buf[i]
            buf = a if buf is None else self.momentum * buf + a
            self._buf[i] = buf
            norm = float(buf.norm())
            if norm > 0:
                p.copy_(cayley_step(p, buf, self.lr / norm))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
