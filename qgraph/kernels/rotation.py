"""Orthogonal rotations applied to weight matrices, with the fast transform where it exists."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import hadamard


@dataclass
class Rotation:
    """An orthogonal ``Q`` (n×n); ``right(x) = x @ Q`` over the last dim.

    A randomized Hadamard ``Q = diag(s) H / √n`` is applied as small Kronecker-factor GEMMs;
    any other ``Q`` (the random-orthogonal fallback) with a dense float64 matmul.
    """

    n: int
    description: str
    signs: torch.Tensor | None = None  # randomized Hadamard
    matrix: torch.Tensor | None = None  # dense fallback

    @classmethod
    def make(cls, n: int, seed: int, kind: str = "hadamard") -> Rotation:
        if kind == "hadamard" and hadamard.is_hadamard_size(n):
            k, m = hadamard.hadamard_factorization(n)
            desc = f"randomized Hadamard of order {n} = {k}·{m} (seed {seed})"
            return cls(n, desc, signs=hadamard.random_signs(n, seed))
        q, desc = hadamard.orthogonal_matrix(n, seed, "random" if kind == "hadamard" else kind)
        if kind == "hadamard":
            desc = (
                f"no Hadamard matrix of order {n} is known; using a random orthogonal matrix "
                f"(QR of a Gaussian, seed {seed})"
            )
        return cls(n, desc, matrix=q)

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Q`` (no autograd: weights are rotated once, never differentiated here). A
        Hadamard rotation runs in ``x``'s precision when that is float32 — the Kronecker GEMMs
        are accurate to ~2 ulp of the result (tests/test_kernels_hadamard.py), the rotated
        model matches the float one to ~1e-6 — else in float64; a dense ``Q`` in float64."""
        with torch.no_grad():
            if self.signs is not None:
                work = x.detach() if x.dtype in (torch.float32, torch.float64) else x.double()
                return hadamard.kronecker_hadamard_transform(work, self.signs)
            return x.detach().double() @ self.matrix


def rotate_input(weight: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """``W Q`` for ``W`` of shape ``[out, in]``: the layer now reads ``x Q`` and computes the same."""
    return rot.right(weight).to(weight.dtype)


def rotate_output(weight: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """``Qᵀ W`` for ``W [out, in]`` (or a bias ``[out]``): the layer's output becomes ``y Q``."""
    if weight.dim() == 1:
        return rot.right(weight).to(weight.dtype)
    return rot.right(weight.T).T.contiguous().to(weight.dtype)
