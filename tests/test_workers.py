"""Worker processes: the canonical window tree, the exact cross-worker Hessian, the stepping
interpreter, and `qgraph run --workers 2` giving one process's model bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama

import qgraph
from qgraph.calibration import StepRun, window_cross, window_hessian
from qgraph.window_tree import combine_order, rank_span, tree_sum


@pytest.mark.parametrize("windows", [1, 2, 3, 5, 8, 15, 16, 17])
def test_rank_spans_partition_the_windows_in_rank_order(windows: int) -> None:
    for world in range(1, min(windows, 6) + 1):
        spans = [rank_span(windows, world, r) for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == windows
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert all(hi > lo for lo, hi in spans)


def test_more_workers_than_windows_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 4 calibration windows"):
        rank_span(3, 4, 0)


def _leaves(n: int) -> list[torch.Tensor]:
    """Values whose sum depends on the order: magnitudes spread over 12 decades."""
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(64, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-6, 6, (64,))
        for _ in range(n)
    ]


@pytest.mark.parametrize("windows,world", [(16, 2), (16, 4), (15, 2), (16, 3), (7, 5)])
def test_workers_combined_up_the_tree_give_one_process_bits(windows: int, world: int) -> None:
    leaves = _leaves(windows)
    one = tree_sum(0, windows, lambda i: leaves[i].clone())
    held = {}
    for r in range(world):
        lo, hi = rank_span(windows, world, r)
        held[r] = tree_sum(lo, hi, lambda i: leaves[i].clone())
    for receiver, sender in combine_order(windows, world):
        held[receiver] += held.pop(sender)
    assert list(held) == [0]
    assert torch.equal(held[0], one)
    # and the order matters for these values: a plain left-to-right sum has other bits
    plain = leaves[0].clone()
    for x in leaves[1:]:
        plain += x
    assert windows < 3 or not torch.equal(plain, one)


def test_window_hessian_matches_float64() -> None:
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 40, 700, generator=gen) for _ in range(5)]
    ref = sum((x.reshape(-1, 700).double().T @ x.reshape(-1, 700).double()) for x in xs)
    for block in (256, 512, 700):  # blocks are mirrored: exactly symmetric
        got = window_hessian(xs, block=block)
        assert torch.equal(got, got.T)
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-6


def test_window_cross_matches_float64() -> None:
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(1, 40, 700, generator=gen) for _ in range(5)]
    ts = [x + 0.1 * torch.randn(x.shape, generator=gen) for x in xs]
    ref = sum(
        x.reshape(-1, 700).double().T @ (t - x).reshape(-1, 700).double()
        for x, t in zip(xs, ts, strict=True)
    )
    for block in (256, 700):
        got = window_cross(xs, ts, block=block)
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_step_runs_reach_the_graph_output_of_each_window() -> None:
    model = qgraph.from_hf(tiny_llama(vocab=96), name="tiny")
    batch = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(2))
    output = next(n for n in model.gm.graph.nodes if n.op == "output")
    middle = [n for n in model.gm.graph.nodes if n.op == "call_function"][40]
    with torch.inference_mode():
        runs = [StepRun(model.gm, batch[i : i + 1]) for i in range(3)]
        for run in runs:
            run.advance(middle)  # all windows to a cut, then on to the end
        for i, run in enumerate(runs):
            run.advance(output)
            got = run.env[output.args[0][0]]
            assert torch.equal(got, model.gm(batch[i : i + 1]))
        with pytest.raises(ValueError, match="not ahead"):
            runs[0].advance(middle)


def _tiny_folder(path: Path) -> Path:
    from qgraph.loaders import cache_dir, load_builtin

    load_builtin()  # the SmolLM2 tokenizer files
    hf = tiny_llama(vocab=49152, hidden=64, intermediate=128, max_positions=512, random_norms=True)
    hf.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(cache_dir() / "smollm2-135m" / name, path / name)
    return path


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    gm = qgraph.load(path).gm
    return {**dict(gm.named_parameters()), **dict(gm.named_buffers())}


def test_two_workers_give_one_process_model_bit_for_bit(tmp_path: Path) -> None:
    folder = _tiny_folder(tmp_path / "tiny")
    pipeline = "fuse-norms,rotate{seed=0},quantize{w=int4:channel},gptq"
    saved = {}
    for workers in (1, 2):
        saved[workers] = tmp_path / f"w{workers}.pt2"
        cmd = [sys.executable, "-m", "qgraph.cli", "run", "--model", str(folder)]
        cmd += ["--pipeline", pipeline, "--calib-windows", "4", "--window", "64"]
        cmd += ["--eval-windows", "1", "--save", str(saved[workers]), "--no-progress"]
        cmd += ["--workers", str(workers), "--report", str(tmp_path / f"w{workers}.json")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "w2.json").read_text())
    assert report["calibration"]["workers"] == 2
    one, two = _tensors(saved[1]), _tensors(saved[2])
    assert one.keys() == two.keys() and len(one) > 10
    assert all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to vary the thread count")
def test_gptq_factorisation_uses_the_launchers_thread_count(monkeypatch) -> None:
    """Workers run with fewer threads than one process; LAPACK's Cholesky differs in its last
    bits between 1 and 2 threads, so the kernel factorises with the launcher's thread count."""
    from qgraph.kernels.gptq import SOLVE_THREADS_ENV, _cholesky_inverse_upper

    monkeypatch.setenv(SOLVE_THREADS_ENV, "2")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2048, 1536, generator=gen) * torch.rand(1536, generator=gen) * 3
    h = (x.T @ x).double() + torch.eye(1536, dtype=torch.float64)
    before = torch.get_num_threads()
    got = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got[threads] = _cholesky_inverse_upper(h.flip(0, 1).clone(), 0.01, torch.float64)
            assert torch.get_num_threads() == threads  # restored after the factorisation
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[1], got[2])
    ref = torch.linalg.inv(h)  # and it is the factor: U^T U = H^-1
    assert ((got[1].T @ got[1] - ref).abs().max() / ref.abs().max()).item() < 1e-9


def test_more_workers_than_calibration_windows_is_a_usage_error(capsys) -> None:
    from qgraph.cli import main

    code = main(["run", "--pipeline", "quantize{w=int4:channel},gptq", "--workers", "3"]
                + ["--calib-windows", "2", "--no-progress"])  # fmt: skip
    assert code == 2
    assert "--workers 3 needs at least as many calibration windows" in capsys.readouterr().err
