"""Cost of one online Hadamard rotation in ONNX Runtime for each way of splitting its size.

The export runs an ``n = K · m`` point rotation as ``Reshape → MatMul(H_K, ·) → MatMul(·, H_m)
→ Reshape`` on a ``[1, 1, n]`` decode-step input; factors of two may move between ``K`` and
``m`` (``backends/onnx_hadamard.export_factorization``). This times a chain of ``--chain`` such
rotations per split, minus a chain of Identity nodes, interleaved over ``--blocks`` blocks, and
prints microseconds per rotation (best block and median).

    .venv/bin/python benchmarks/hadamard_split.py [--n 1536] [--blocks 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from common import header
from onnx import TensorProto, helper, numpy_helper

from qgraph.backends.onnx_hadamard import export_factorization
from qgraph.kernels.hadamard import hadamard_factorization


def chain(n: int, k: int | None, length: int, threads: int) -> ort.InferenceSession:
    """``length`` rotations split as ``k · (n / k)`` (dense matrices of the right sizes; the
    values do not change the time), or Identity nodes when ``k`` is None."""
    nodes, inits, x = [], [], "x"
    rng = np.random.default_rng(0)

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array, name))
        return name

    for i in range(length):
        if k is None:
            nodes.append(helper.make_node("Identity", [x], [f"y{i}"]))
        else:
            m = n // k
            shape_in = const(f"s{i}", np.array([0, 0, k, m], np.int64))
            shape_out = const(f"t{i}", np.array([0, 0, n], np.int64))
            left = const(f"l{i}", rng.standard_normal((k, k)).astype(np.float32))
            right = const(f"r{i}", rng.standard_normal((m, m)).astype(np.float32))
            nodes += [
                helper.make_node("Reshape", [x, shape_in], [f"a{i}"]),
                helper.make_node("MatMul", [left, f"a{i}"], [f"b{i}"]),
                helper.make_node("MatMul", [f"b{i}", right], [f"c{i}"]),
                helper.make_node("Reshape", [f"c{i}", shape_out], [f"y{i}"]),
            ]
        x = f"y{i}"
    io = [helper.make_tensor_value_info(v, TensorProto.FLOAT, [1, 1, n]) for v in ("x", x)]
    graph = helper.make_graph(nodes, "chain", [io[0]], [io[1]], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), opts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--chain", type=int, default=30)
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    k0, m0 = hadamard_factorization(args.n)
    splits = [k0 * 2**j for j in range(int(np.log2(m0)) + 1) if m0 // 2**j >= 4]
    sessions = {k: chain(args.n, k, args.chain, args.threads) for k in [None, *splits]}
    x = {"x": np.random.default_rng(1).standard_normal((1, 1, args.n)).astype(np.float32)}
    times: dict = {k: [] for k in sessions}
    for session in sessions.values():
        for _ in range(args.runs):
            session.run(None, x)
    for _ in range(args.blocks):
        for k, session in sessions.items():
            start = time.perf_counter()
            for _ in range(args.runs):
                session.run(None, x)
            times[k].append((time.perf_counter() - start) / args.runs)
    print(header(f"One {args.n}-point online Hadamard in ONNX Runtime", " ".join(sys.argv)))
    print(f"chains of {args.chain} rotations on [1, 1, {args.n}], {args.threads} threads.\n")
    print("| split K · m | µs per rotation, best | median | export's choice |")
    print("|---|---|---|---|")
    base_best, base_median = min(times[None]), statistics.median(times[None])
    chosen = export_factorization(args.n)[0]
    for k in splits:
        best = (min(times[k]) - base_best) / args.chain * 1e6
        median = (statistics.median(times[k]) - base_median) / args.chain * 1e6
        mark = "yes" if k == chosen else ""
        print(f"| {k} · {args.n // k} | {best:.1f} | {median:.1f} | {mark} |")


if __name__ == "__main__":
    main()
