"""Speed of the ``qgraph::hadamard`` op against the dense matmul it replaces, torch and ORT.

The online rotation ``x @ Q`` with ``Q = diag(s) H_n / sqrt(n)`` is what the op computes in
O(n log n); a dense float32 ``Q`` costs O(n²) per row. For each hidden size, ``rows`` float32
rows (1 = one decoded token, 64 = a short prefill) go through

* torch: ``ops.hadamard(x, s, True)`` vs ``x @ Q`` (Q precomputed);
* ONNX Runtime: an exported ``hadamard`` (one ``qgraph`` node + its model-local function of
  standard ops) vs an exported ``MatMul`` with ``Q`` as an initializer.

Times are medians; each measurement stops after ``--repeats`` runs or ~3 s (at least 5 runs).
One thread by default: with other work on the machine, two threads stall on each other.

    .venv/bin/python benchmarks/hadamard_speed.py [--repeats 30] [--threads 1] [--rows 1,64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import header
from torch.export import Dim

import qgraph.ops  # noqa: F401  (registers torch.ops.qgraph.*)
from qgraph.backends.onnx_export import export_onnx
from qgraph.backends.ort_runtime import OrtModel
from qgraph.kernels.hadamard import hadamard_factorization, random_hadamard_matrix, random_signs

SIZES = [576, 1536, 4096, 8192, 14336]
SEED = 0
BUDGET_S = 3.0


class Rotate(torch.nn.Module):
    """``x @ Q`` as the op: ``hadamard(x, s, normalize=True)``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("s", random_signs(n, SEED).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qgraph.hadamard(x, self.s, True)


class Dense(torch.nn.Module):
    """``x @ Q`` with the same ``Q`` stored as a float32 matrix."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("q", random_hadamard_matrix(n, SEED).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.q


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``fn()`` after two warm-up calls."""
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 5 or time.perf_counter() - start < BUDGET_S):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def export(module: torch.nn.Module, n: int, path: Path) -> OrtModel:
    export_onnx(module, (torch.randn(2, n),), path, dynamic_shapes=({0: Dim("rows")},))
    return OrtModel(path, threads=torch.get_num_threads())


def rel_err(actual, expected) -> float:
    expected = np.asarray(expected)
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


def measure(n: int, rows: list[int], repeats: int, tmp: Path) -> list[str]:
    """Table lines for size ``n``: one per row count."""
    fact = hadamard_factorization(n)
    if fact is None:
        return [f"| {n} | unsupported | – | – | – | – | – | – | – | – |"]
    rotate, dense = Rotate(n), Dense(n)
    ort_rotate = export(rotate, n, tmp / f"hadamard{n}.onnx")
    ort_dense = export(dense, n, tmp / f"dense{n}.onnx")
    lines = []
    for r in rows:
        x = torch.randn(r, n)
        xn = x.numpy()
        with torch.inference_mode():
            reference = dense(x)
            err = max(rel_err(rotate(x), reference), rel_err(ort_rotate(xn), reference))
            t_had = timed(lambda: rotate(x), repeats)  # noqa: B023  (called right here)
            t_dense = timed(lambda: dense(x), repeats)  # noqa: B023
        o_had = timed(lambda: ort_rotate(xn), repeats)  # noqa: B023
        o_dense = timed(lambda: ort_dense(xn), repeats)  # noqa: B023
        lines.append(
            f"| {n} | {fact[0]}·{fact[1]} | {r} | {t_had:.3f} | {t_dense:.3f} | "
            f"{t_dense / t_had:.1f}× | {o_had:.3f} | {o_dense:.3f} | {o_dense / o_had:.1f}× | "
            f"{err:.1e} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,64", help="comma-separated row counts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in SIZES:
            lines += measure(n, rows, args.repeats, Path(tmp))
    cmd = (
        f".venv/bin/python benchmarks/hadamard_speed.py --repeats {args.repeats} "
        f"--threads {args.threads} --rows {args.rows}"
    )
    print(header(f"Hadamard op vs dense matmul (float32, {args.threads} thread(s))", cmd))
    print("Median ms per call; ratio = dense time / hadamard time (> 1: the op is faster).\n")
    print(
        "| n | K·m | rows | torch hadamard | torch dense | ratio | ORT hadamard | ORT dense "
        "| ratio | max rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
