"""Shared set-up of the benchmarks: the real SmolLM2, fixed windows, a machine description."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

from qgraph.workflow import Job


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
            cpu,
        )
    except OSError:
        name = cpu
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def header(title: str, command: str) -> str:
    today = datetime.date.today().isoformat()
    return f"## {title}\n\n`{command}` — {machine()} — {today}\n"


def job(eval_windows: int = 16, calib_windows: int = 16) -> Job:
    return Job(None, eval_windows=eval_windows, calib_windows=calib_windows, progress=False)
