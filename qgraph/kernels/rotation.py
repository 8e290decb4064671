"""Orthogonal rotations applied to weight matrices, with the fast transform where it exists."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import hadamard
from .chunked import map_columns, map_rows


@dataclass
class Rotation:
    """An orthogonal ``Q`` (n×n); ``right(x) = x @ Q`` over the last dim.

    A randomized Hadamard ``Q = diag(s) H / √n`` is applied to float32 weights with one small
    float32 GEMM per Kronecker factor (``float32_gemms``, ~3× faster, a few ulp) or else with
    the O(n log n) transform in float64 (correctly rounded); any other ``Q`` (the
    random-orthogonal fallback) with a dense float64 matmul.
    """

    n: int
    description: str
    signs: torch.Tensor | None = None  # randomized Hadamard
    matrix: torch.Tensor | None = None  # dense fallback
    float32_gemms: bool = False

    @classmethod
    def make(
        cls, n: int, seed: int, kind: str = "hadamard", float32_gemms: bool = False
    ) -> Rotation:
        if kind == "hadamard" and hadamard.is_hadamard_size(n):
            k, m = hadamard.hadamard_factorization(n)
            desc = f"randomized Hadamard of order {n} = {k}·{m} (seed {seed})"
            return cls(n, desc, signs=hadamard.random_signs(n, seed), float32_gemms=float32_gemms)
        q, desc = hadamard.orthogonal_matrix(n, seed, "random" if kind == "hadamard" else kind)
        if kind == "hadamard":
            desc = (
                f"no Hadamard matrix of order {n} is known; using a random orthogonal matrix "
                f"(QR of a Gaussian, seed {seed})"
            )
        return cls(n, desc, matrix=q)

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Q`` in float64 (float32 for float32 ``x`` with ``float32_gemms``), without
        autograd: weights are rotated once and never differentiated here (model weights arrive as parameters that require grad, which sent
        the transform down its slower differentiable path and recorded a graph)."""
        with torch.no_grad():
            if self.signs is not None and self.float32_gemms and x.dtype == torch.float32:
                return hadamard.hadamard_by_gemms(x.detach(), True, self.signs)
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
