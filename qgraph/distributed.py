"""Worker processes with torch.distributed: which windows this process calibrates on, and the
exact reduction of per-worker sums.

qgraph does not run its own process pool. ``qgraph run --workers N`` launches ``torchrun``
(``torch.distributed.run``) on this machine; on a cluster the same command runs under
``torchrun --nnodes M --nproc-per-node K ... -m qgraph.cli run ...`` unchanged. Each worker
loads the model and applies the same pipeline; the calibration windows are split among the
workers along the canonical summation tree (:mod:`qgraph.window_tree`), and each layer's
Hessian is combined up that tree, so the result has the bits of a single process. Rank 0
evaluates, exports and reports; the others only calibrate.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .window_tree import combine_order, rank_span

#: rank 0 evaluates the float model alone before the first collective of a pass: long on 1B models
TIMEOUT = datetime.timedelta(hours=4)


def init_from_env() -> bool:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); True if joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return True


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_leader() -> bool:
    return world()[0] == 0


def my_windows(windows: int) -> tuple[int, int]:
    """The calibration windows ``[lo, hi)`` this process sums over."""
    rank, size = world()
    return rank_span(windows, size, rank)


def sum_over_workers(local: torch.Tensor, windows: int) -> torch.Tensor:
    """The sum of every worker's ``local`` subtree sum in the canonical order, on every worker.
    ``local`` is consumed (rank 0 accumulates into it)."""
    rank, size = world()
    if size == 1:
        return local
    local = local.contiguous()
    for receiver, sender in combine_order(windows, size):
        if rank == sender:
            dist.send(local, dst=receiver)
        elif rank == receiver:
            other = torch.empty_like(local)
            dist.recv(other, src=sender)
            local += other
            del other
    dist.broadcast(local, src=0)
    return local
