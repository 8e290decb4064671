"""One decode step of SmolLM2's attention in ONNX Runtime, three ways: the opset-23 ``Attention``
qgraph exports (the cache grows by concatenation), ``com.microsoft::GroupQueryAttention`` with
the same growing cache, and ``GroupQueryAttention`` writing into one preallocated cache buffer
bound as both past and present (what ONNX Runtime GenAI does with
``past_present_share_buffer``). 9 query heads, 3 KV heads, head size 64, batch 1, one new token.

    .venv/bin/python benchmarks/attention_ops.py [--past 255] [--max-length 2048]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from common import header
from onnx import TensorProto
from onnx import helper as oh

HEADS, KV_HEADS, HEAD = 9, 3, 64


def _model(kind: str) -> bytes:
    def tensor(name, elem, shape):
        return oh.make_tensor_value_info(name, elem, shape)

    f = TensorProto.FLOAT
    inputs = [tensor("q", f, [1, 1, HEADS * HEAD]), tensor("k", f, [1, 1, KV_HEADS * HEAD])]
    inputs += [tensor("v", f, [1, 1, KV_HEADS * HEAD])]
    inputs += [tensor(n, f, [1, KV_HEADS, "past", HEAD]) for n in ("past_k", "past_v")]
    outputs = [tensor(n, f, None) for n in ("out", "present_k", "present_v")]
    names = ["out", "present_k", "present_v"]
    if kind == "attention":
        inputs.append(tensor("mask", TensorProto.BOOL, [1, 1, 1, "total"]))
        node = oh.make_node(
            "Attention", ["q", "k", "v", "mask", "past_k", "past_v"], names,
            q_num_heads=HEADS, kv_num_heads=KV_HEADS, scale=HEAD**-0.5,
        )  # fmt: skip
    else:
        inputs += [tensor("seqlens_k", TensorProto.INT32, [1])]
        inputs += [tensor("total", TensorProto.INT32, [])]
        node = oh.make_node(
            "GroupQueryAttention", [i.name for i in inputs], names, domain="com.microsoft",
            num_heads=HEADS, kv_num_heads=KV_HEADS, scale=HEAD**-0.5,
        )  # fmt: skip
    graph = oh.make_graph([node], kind, inputs, outputs)
    opsets = [oh.make_opsetid("", 23), oh.make_opsetid("com.microsoft", 1)]
    return oh.make_model(graph, opset_imports=opsets).SerializeToString()


def _median_us(call, calls: int = 300, repeats: int = 7) -> float:
    for _ in range(50):
        call()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--past", type=int, default=255)
    ap.add_argument("--max-length", type=int, default=2048)
    args = ap.parse_args()
    past, rng = args.past, np.random.default_rng(0)
    feeds = {
        "q": rng.standard_normal((1, 1, HEADS * HEAD), np.float32),
        "k": rng.standard_normal((1, 1, KV_HEADS * HEAD), np.float32),
        "v": rng.standard_normal((1, 1, KV_HEADS * HEAD), np.float32),
        "past_k": rng.standard_normal((1, KV_HEADS, past, HEAD), np.float32),
        "past_v": rng.standard_normal((1, KV_HEADS, past, HEAD), np.float32),
    }
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    rows, outs = {}, {}
    for kind in ("attention", "gqa"):
        session = ort.InferenceSession(_model(kind), opts, providers=["CPUExecutionProvider"])
        run = dict(feeds)
        if kind == "attention":
            run["mask"] = np.ones((1, 1, 1, past + 1), bool)
        else:
            run["seqlens_k"] = np.array([past], np.int32)
            run["total"] = np.array(past + 1, np.int32)
        outs[kind] = session.run(None, run)[0]
        rows[f"{kind}, cache grown by concatenation"] = _median_us(
            lambda s=session, r=run: s.run(None, r)
        )
    # one preallocated buffer per cache, bound as input and output: the new token is written in place
    buffers = []
    for name in ("past_k", "past_v"):
        full = np.zeros((1, KV_HEADS, args.max_length, HEAD), np.float32)
        full[:, :, :past] = feeds[name]
        buffers.append(ort.OrtValue.ortvalue_from_numpy(full))
    binding = session.io_binding()
    for name in ("q", "k", "v"):
        binding.bind_cpu_input(name, feeds[name])
    binding.bind_ortvalue_input("past_k", buffers[0])
    binding.bind_ortvalue_input("past_v", buffers[1])
    binding.bind_cpu_input("seqlens_k", np.array([past], np.int32))
    binding.bind_cpu_input("total", np.array(past + 1, np.int32))
    binding.bind_output("out")
    binding.bind_ortvalue_output("present_k", buffers[0])
    binding.bind_ortvalue_output("present_v", buffers[1])
    session.run_with_iobinding(binding)
    shared = binding.copy_outputs_to_cpu()[0]
    rows["gqa, one shared cache buffer"] = _median_us(lambda: session.run_with_iobinding(binding))
    error = max(float(np.abs(o - outs["attention"]).max()) for o in (outs["gqa"], shared))
    print(header("One attention decode step in ONNX Runtime (SmolLM2 shapes)", " ".join(sys.argv)))
    print(f"past {past} tokens; largest output difference to `Attention`: {error:.1e}\n")
    print("| attention | µs per call (median of 7 × 300) | × Attention |")
    print("|---|---|---|")
    base = rows["attention, cache grown by concatenation"]
    for name, us in rows.items():
        print(f"| {name} | {us:.1f} | {us / base:.2f} |")


if __name__ == "__main__":
    main()
