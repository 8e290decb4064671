"""One decode step of exported decoder folders in ONNX Runtime, timed on its own.

``benchmarks/decode.py`` times whole GenAI generations, which on a shared 2-core machine vary by
±15 % from run to run. This times the step that generation repeats — batch 1, one new token
after ``--past`` cached ones — with the cache bound as GenAI binds it (one preallocated buffer
per tensor, shared between past and present, for files whose ``genai_config.json`` says
``past_present_share_buffer``; a concatenated cache otherwise). The folders are interleaved
within every block of steps, and each folder's best block is reported next to its median, so
that ratios between folders (e.g. what online rotations cost) come from one run and the least
disturbed measurements.

Two different files differ in more than their rotations (and this machine's noise is as large as
what rotations cost), so ``--bypass-rotations`` also times each folder's own file with its online
rotations (the ``qgraph``-domain Hadamard nodes) cut out of the graph, written beside it as
``model.norot.onnx`` over the same weights file (removed once loaded): same weights, same
layout, wrong outputs, and the difference between the two is what the rotations cost.

    .venv/bin/python benchmarks/decode_step.py out/decode/a out/decode/b ... [--past 255]
        [--blocks 15] [--steps 40] [--bypass-rotations]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from common import header

from qgraph.backends.ort_runtime import session_options


class Step:
    """A session of one folder's ``model.onnx`` with its inputs bound for one decode step."""

    def __init__(self, folder: Path, past: int, threads: int, filename: str | None = None) -> None:
        config = json.loads((folder / "genai_config.json").read_text())
        decoder = config["model"]["decoder"]
        shared = bool(config["search"].get("past_present_share_buffer"))
        kv, head = decoder["num_key_value_heads"], decoder["head_size"]
        self.session = ort.InferenceSession(
            str(folder / (filename or decoder["filename"])), session_options(threads=threads)
        )
        self.binding = self.session.io_binding()
        self.binding.bind_cpu_input("input_ids", np.array([[42]], np.int64))
        self.binding.bind_cpu_input("attention_mask", np.ones((1, past + 1), np.int64))
        rng = np.random.default_rng(0)
        length = past + 256 if shared else past
        self.nodes = 0
        for value in self.session.get_inputs()[2:]:
            cache = rng.standard_normal((1, kv, length, head)).astype(np.float32) * 0.1
            buffer = ort.OrtValue.ortvalue_from_numpy(cache)
            self.binding.bind_ortvalue_input(value.name, buffer)
            present = value.name.replace("past_key_values.", "present.")
            if shared:
                self.binding.bind_ortvalue_output(present, buffer)
            else:
                self.binding.bind_output(present)
        self.binding.bind_output("logits")

    def run(self, steps: int) -> float:
        """Mean seconds per step over ``steps`` steps."""
        start = time.perf_counter()
        for _ in range(steps):
            self.session.run_with_iobinding(self.binding)
        return (time.perf_counter() - start) / steps


def without_rotations(folder: Path) -> tuple[str, int]:
    """Write ``model.norot.onnx`` beside the folder's model: every ``qgraph``-domain node (the
    online Hadamards) replaced by its input, the weights file shared. Returns its name and how
    many nodes were cut."""
    config = json.loads((folder / "genai_config.json").read_text())
    model = onnx.load(folder / config["model"]["decoder"]["filename"], load_external_data=False)
    renames, kept = {}, []
    for node in model.graph.node:
        if node.domain == "qgraph":
            renames[node.output[0]] = renames.get(node.input[0], node.input[0])
        else:
            kept.append(node)
    for node in kept:
        node.input[:] = [renames.get(name, name) for name in node.input]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    name = "model.norot.onnx"
    onnx.save(model, folder / name)
    return name, len(renames)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--past", type=int, default=255)
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bypass-rotations", action="store_true")
    args = ap.parse_args()
    steps = {f: Step(f, args.past, args.threads) for f in args.folders}
    cut: dict[Path, int] = {}
    if args.bypass_rotations:
        for folder in args.folders:
            name, cut[folder] = without_rotations(folder)
            steps[folder / "(no rotations)"] = Step(folder, args.past, args.threads, name)
            (folder / name).unlink()  # loaded: the session no longer needs the file
    for step in steps.values():
        step.run(20)  # warm up
    blocks: dict[Path, list[float]] = {f: [] for f in steps}
    for _ in range(args.blocks):
        for folder, step in steps.items():
            blocks[folder].append(step.run(args.steps))
    print(header("One decode step in ONNX Runtime (batch 1)", " ".join(sys.argv)))
    print(f"past {args.past} tokens; {args.blocks} blocks of {args.steps} steps, interleaved.\n")
    first = args.folders[0]
    best0 = min(blocks[first])
    print("| folder | best ms | median ms | best × first |")
    print("|---|---|---|---|")
    for folder, times in blocks.items():
        best, median = min(times), statistics.median(times)
        print(f"| {folder} | {best * 1e3:.2f} | {median * 1e3:.2f} | {best / best0:.3f} |")
    for folder, nodes in cut.items():
        bare = blocks[folder / "(no rotations)"]
        share = [1 - b / w for w, b in zip(blocks[folder], bare, strict=True)]  # same block
        print(
            f"\n{folder}: {nodes} rotation nodes; they take {1 - min(bare) / min(blocks[folder]):.1%}"
            f" of the best step, {statistics.median(share):.1%} of a step (median over blocks)"
        )


if __name__ == "__main__":
    main()
