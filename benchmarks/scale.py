"""Time and peak memory of the whole `qgraph run` as the model grows (issue 16, item 3).

SmolLM2-135M is the real model; the larger ones are Llama-architecture models of ~360 M
(SmolLM2-360M's shape) and ~1.07 B parameters (hidden 2048, 16 layers, Llama-3.2-1B's shape
with SmolLM2's vocabulary) with random weights, written once as Hugging Face folders under
``--workdir``: nothing of the measurement depends on the weights' values (perplexity, which
does, is left to the quality benchmarks). Each size runs in its own process under
``/usr/bin/time -v`` (the whole process's maximum RSS); the per-pass columns come from the run
report.

    .venv/bin/python benchmarks/scale.py --sizes 135m,360m,1.1b
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import header

PIPELINE = "fuse-norms,rotate{seed=0},quantize{w=int4:channel},gptq"

#: name -> overrides of SmolLM2-135M's config (None: the real model)
SIZES: dict[str, dict | None] = {
    "135m": None,
    "360m": dict(
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
        head_dim=64,
    ),
    "1.1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
    ),
}


def model_dir(size: str, workdir: Path) -> str:
    """The model spec of ``size``: the built-in name, or a random-weight folder made once."""
    overrides = SIZES[size]
    if overrides is None:
        return "smollm2-135m"
    target = workdir / f"llama-{size}-random"
    if (target / "config.json").is_file():
        return str(target)
    from transformers import AutoConfig, LlamaForCausalLM

    from qgraph.loaders import cache_dir, load_builtin

    load_builtin()  # makes sure the SmolLM2 folder (config and tokenizer) exists
    source = cache_dir() / "smollm2-135m"
    config = AutoConfig.from_pretrained(source)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=workdir))
    model.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, tmp / name)
    tmp.rename(target)
    return str(target)


def measure(spec: str, args: argparse.Namespace, workdir: Path) -> dict:
    report = workdir / f"report-{Path(spec).name}.json"
    cmd = [
        "/usr/bin/time",
        "-v",
        str(Path(sys.executable).parent / "qgraph"),
        "run",
        "--model",
        spec,
        "--pipeline",
        args.pipeline,
        "--calib-windows",
        str(args.calib_windows),
        "--eval-windows",
        str(args.eval_windows),
        "--report",
        str(report),
        "--no-progress",
    ]
    if args.workers > 1:
        cmd += ["--workers", str(args.workers)]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{spec}: qgraph run failed\n{out.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)
    rep = json.loads(report.read_text())
    return {
        "seconds": round(seconds, 1),
        "peak_mb": int(rss.group(1)) / 1024 if rss else float("nan"),
        "passes": {p["name"]: (p["seconds"], p["peak_rss_mb"]) for p in rep["passes"]},
    }


def weights_gb(spec: str) -> float:
    """Size of the folder's safetensors files (float32 weights, each tied tensor once)."""
    from qgraph.loaders import cache_dir

    folder = cache_dir() / spec if spec == "smollm2-135m" else Path(spec)
    total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return total / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="135m,360m,1.1b")
    ap.add_argument("--pipeline", default=PIPELINE)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "qgraph-scale"))
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes.split(","):
        spec = model_dir(size, workdir)
        r = measure(spec, args, workdir)
        r["size"], r["file_gb"] = size, weights_gb(spec)
        rows.append(r)
        print(f"{size}: {r['seconds']:.0f} s, peak {r['peak_mb']:.0f} MB", file=sys.stderr)
    cmd = f".venv/bin/python benchmarks/scale.py --sizes {args.sizes} --calib-windows {args.calib_windows}"
    if args.workers > 1:
        cmd += f" --workers {args.workers}"
    print(header("Time and peak memory as the model grows", cmd))
    names = list(rows[0]["passes"])
    cols = " | ".join(f"{n} s / peak MB" for n in names)
    print(f"| model | weights GB | {cols} | whole run s | peak RSS MB | peak ÷ weights |")
    print("|---|---|" + "---|" * len(names) + "---|---|---|")
    for r in rows:
        cells = " | ".join(f"{s:.0f} / {m:.0f}" for s, m in r["passes"].values())
        ratio = r["peak_mb"] * 2**20 / (r["file_gb"] * 1e9)
        print(
            f"| {r['size']} | {r['file_gb']:.2f} | {cells} | {r['seconds']:.0f} | "
            f"{r['peak_mb']:.0f} | {ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
