"""Orthogonal rotations applied to weight matrices, with the fast transform where it exists."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import hadamard
from .chunked import map_columns, map_rows


@dataclass
class Rotation:
    """An orthogonal ``Q`` (n×n); ``right(x) = x @ Q`` over the last dim.

    A randomized Hadamard ``Q = diag(s) H / √n`` is applied with the O(n log n) transform;
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
        """``x @ Q`` in float64, without autograd: weights are rotated once and never
        differentiated here (model weights arrive as parameters that require grad, which sent
        the transform down its slower differentiable path and recorded a graph)."""
        with torch.no_grad():
            x64 = x.detach().double()
            if self.signs is not None:
                return hadamard.fast_hadamard_transform(x64, True, self.signs)
            return x64 @ self.matrix


def rotate_input(weight: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """``W Q`` for ``W`` of shape ``[out, in]``: the layer now reads ``x Q`` and computes the same."""
    return map_rows(rot.right, weight)


def rotate_output(weight: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """``Qᵀ W`` for ``W [out, in]`` (or a bias ``[out]``): the layer's output becomes ``y Q``."""
    return map_columns(rot.right, weight)
