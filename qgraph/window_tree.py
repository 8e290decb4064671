"""One fixed summation order over calibration windows, shared by one process and by N workers.

Floating-point addition is not associative, so a Hessian summed window after window in one
process and the same Hessian summed as two halves by two workers differ in their last bits —
and GPTQ can round a weight the other way on such a difference. Every sum over windows in
qgraph therefore follows one canonical binary tree: the sum over windows ``[lo, hi)`` is the
sum over ``[lo, m)`` plus the sum over ``[m, hi)`` with ``m = (lo + hi) // 2``. Workers own
whole subtrees (:func:`rank_span`), sum them the same way, and combine the subtrees up the
same tree (:func:`combine_order`), so any number of workers gives the bits of one process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _descend(lo: int, hi: int, ranks: range):
    """The split of ``[lo, hi)`` shared by ``ranks``: (mid, left ranks, right ranks)."""
    mid = (lo + hi) // 2
    k = (len(ranks) + 1) // 2  # half the ranks each side, where each side has enough windows
    k = max(min(k, mid - lo), len(ranks) - (hi - mid))
    return mid, ranks[:k], ranks[k:]


def rank_span(windows: int, world: int, rank: int) -> tuple[int, int]:
    """The windows ``[lo, hi)`` that worker ``rank`` of ``world`` sums: one subtree of the
    canonical tree. Workers get equal shares when ``world`` is a power of two dividing
    ``windows``; otherwise some get twice the windows of others (the tree is fixed)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    if windows < world:
        raise ValueError(
            f"{world} workers need at least {world} calibration windows, got {windows}"
        )
    lo, hi, ranks = 0, windows, range(world)
    while len(ranks) > 1:
        mid, left, right = _descend(lo, hi, ranks)
        lo, hi, ranks = (lo, mid, left) if rank in left else (mid, hi, right)
    return lo, hi


def tree_sum(lo: int, hi: int, leaf: Callable[[int], T]) -> T:
    """``Σ leaf(i)`` for ``i`` in ``[lo, hi)`` in the canonical order, computing leaves as it
    goes: at most ~log2(hi − lo) partial sums are alive at once. ``leaf`` must return a fresh
    value (the left partial sum is accumulated in place)."""
    if hi - lo < 1:
        raise ValueError("an empty sum")
    if hi - lo == 1:
        return leaf(lo)
    mid = (lo + hi) // 2
    left = tree_sum(lo, mid, leaf)
    left += tree_sum(mid, hi, leaf)
    return left


def combine_order(windows: int, world: int) -> list[tuple[int, int]]:
    """The (receiver, sender) rank pairs that combine the workers' subtree sums into the root,
    deepest first: the receiver holds the left subtree, adds the sender's right subtree to it,
    and in the end rank 0 holds the whole sum."""
    steps: list[tuple[int, int, int]] = []  # (depth, receiver, sender)

    def walk(lo: int, hi: int, ranks: range, depth: int) -> None:
        if len(ranks) == 1:
            return
        mid, left, right = _descend(lo, hi, ranks)
        walk(lo, mid, left, depth + 1)
        walk(mid, hi, right, depth + 1)
        steps.append((depth, left[0], right[0]))

    walk(0, windows, range(world), 0)
    return [(r, s) for _, r, s in sorted(steps, key=lambda step: -step[0])]
