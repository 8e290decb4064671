"""The end-to-end job behind ``qgraph run`` and ``qgraph demo``: load, evaluate, rewrite,
evaluate again, export, run the export in ONNX Runtime, and report."""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .api import from_hf, from_onnx
from .data import load_text, sample_windows, token_windows
from .distributed import is_leader, world
from .errors import DataError
from .evaluate import perplexity
from .inspect_model import REPORT_SCHEMA
from .layer_trace import RunAnalysis
from .loaders import LoadedLM, load_causal_lm
from .model import Model
from .pass_manager import PassManager, parse_pipeline
from .saving import load_saved

# The best recipe so far for each format (see benchmarks/README.md for the measurements).
RECIPES = {
    "w8a8": "fuse-norms,rotate{seed=0},quantize{w=int8:channel,a=int8:token}",
    "w4a16": "fuse-norms,rotate{seed=0},quantize{w=int4:channel},gptq",
    # QuaRot-style W4A4 with online rotations and +5 % parameters of expansion (issue 4)
    "w4a4": "fuse-norms,rotate{seed=0,online=r2+r4},expand{budget=5},"
    "quantize{w=int4:channel,a=int4:token},gptq",
}


def onnx_tokenizer(path: Path):
    """The tokenizer saved beside a language model's ONNX file (``tokenizer.json`` and its
    config, as ``qgraph run --export`` and ONNX Runtime GenAI's builder write them)."""
    folder = path.parent
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise DataError(
            f"{path}: no tokenizer beside it (tokenizer.json), so no text can be tokenized for "
            "it; for a model that does not take token ids use --calib-inputs/--eval-inputs"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def is_language_model_file(path: str | os.PathLike) -> bool:
    """An ONNX file with a tokenizer beside it and one integer input (token ids)."""
    from .onnx_import import input_specs, read_onnx

    folder = Path(path).parent
    if not (folder / "tokenizer.json").is_file():
        return False
    specs = input_specs(read_onnx(path))
    return len(specs) == 1 and not specs[0].dtype.is_floating_point


def pass_log(model: Model) -> list[dict[str, Any]]:
    """The report's per-pass entries: name, options, time, peak memory, verification, summary."""
    keep = ("name", "options", "seconds", "peak_rss_mb", "verify_max_rel_err", "summary")
    return [{k: v for k, v in r.to_dict().items() if k in keep} for r in model.log]


def log_flagged(trace: dict[str, Any]) -> None:
    """One line on the layers whose error in ONNX Runtime departs from torch's."""
    n = len(trace["layers"])
    flagged = trace["flagged"]
    if flagged:
        more = f" (+{len(flagged) - 3} more)" if len(flagged) > 3 else ""
        log(f"ONNX Runtime diverges from torch at {len(flagged)}/{n} layers: "
            f"{', '.join(flagged[:3])}{more}")  # fmt: skip
    else:
        log(f"ONNX Runtime matches torch at all {n - len(trace['missing'])} traced layers")


def log(msg: str) -> None:
    if not is_leader():
        return  # workers calibrate silently; rank 0 speaks for the run
    sys.stderr.write(f"[qgraph] {msg}\n")
    sys.stderr.flush()


class Job:
    """Holds the loaded LM and the fixed calibration/evaluation windows shared by several recipes."""

    def __init__(
        self,
        model_spec: str | None = None,
        calib_text: str | None = None,
        eval_text: str | None = None,
        eval_windows: int = 8,
        calib_windows: int = 16,
        window: int = 512,
        progress: bool = True,
        calib_seed: int | None = None,
    ):
        t = time.perf_counter()
        self.lm: LoadedLM | None = None
        self.model_spec = model_spec
        self.saved: Path | None = None
        self.onnx: Path | None = None
        self._loaded: Model | None = None
        if model_spec is not None and str(model_spec).endswith(".onnx"):
            # a language model given as ONNX, with its tokenizer files beside it
            self.onnx = Path(model_spec)
            self.tokenizer = onnx_tokenizer(self.onnx)
            self.name, self.source = self.onnx.stem, str(self.onnx)
        elif model_spec is not None and str(model_spec).endswith(".pt2"):
            # a model saved by `qgraph run --save`: pipelines continue from it as saved
            self.saved = Path(model_spec)
            self._loaded = load_saved(self.saved)
            if self._loaded.tokenizer is None:
                raise DataError(
                    f"{self.saved}: saved without a tokenizer, so no text can be tokenized for it; "
                    "save it again with this version of qgraph"
                )
            self.name, self.source = self._loaded.name, str(self.saved)
            self.tokenizer = self._loaded.tokenizer
        else:
            self.lm = load_causal_lm(model_spec)
            self.name, self.source, self.tokenizer = self.lm.name, self.lm.source, self.lm.tokenizer
        log(f"loaded {self.name} from {self.source} in {time.perf_counter() - t:.1f}s")
        calib_text = load_text(calib_text, "calib")
        if calib_seed is None:  # the first windows of the text
            self.calib = token_windows(self.tokenizer, calib_text, window, calib_windows)
        else:
            every = token_windows(self.tokenizer, calib_text, window)
            self.calib = sample_windows(every, calib_windows, calib_seed)
        self.calib_seed = calib_seed
        self.eval = token_windows(
            self.tokenizer, load_text(eval_text, "eval"), window, eval_windows
        )
        self.progress = progress
        self._float_ppl: float | None = None

    @property
    def baseline(self) -> str:
        """What the "before" row is: the float model, or the saved model as loaded."""
        return "float32" if self.saved is None else "as saved"

    def fresh_model(self) -> Model:
        if self.onnx is not None:
            model = from_onnx(self.onnx)
            model.tokenizer = self.tokenizer
        elif self.saved is not None:
            model, self._loaded = self._loaded or load_saved(self.saved), None
        else:
            # The traced graph shares the module's tensors. Passes replace tensors rather than
            # write into them, so once the module is dropped each replaced weight is freed: the
            # process holds one copy of the weights, not the original beside the rewrite. A later
            # recipe reloads the module (memory-mapped safetensors: seconds).
            lm, self.lm = self.lm or load_causal_lm(self.model_spec), None
            model = from_hf(lm.model, lm.tokenizer, lm.name)
            model.source = lm.source
            del lm
            gc.collect()  # the module is in reference cycles: free it before passes replace weights
        model.set_calibration(self.calib)
        return model

    def float_ppl(self, model: Model) -> float:
        if self._float_ppl is None:
            self._float_ppl = perplexity(model, self.eval, progress=self.progress, desc="float ppl")
        return self._float_ppl

    def run(
        self,
        pipeline: str,
        *,
        export: str | os.PathLike | None = None,
        integer_activations: bool = False,
        fused_ops: bool = True,
        attention: str = "gqa",
        pack_qkv: bool = True,
        save: str | os.PathLike | None = None,
        save_float_weights: bool = False,
        verify_each: bool = False,
        seed: int | None = None,
        trace_layers: str | None = None,
    ) -> dict[str, Any] | None:
        """Rewrite a fresh model with ``pipeline``, evaluate it (and its export) and return the
        report. ``trace_layers`` (a regex of layer names; "" for all) adds the per-layer table,
        each pass's error and the same layers in the exported file (``docs/REPORT.md``)."""
        passes = parse_pipeline(pipeline)
        if seed is not None:
            torch.manual_seed(seed)
            for p in passes:
                if "seed" in p.opts and "seed" not in p.explicit:
                    p.opts["seed"] = seed
        t0 = time.perf_counter()
        gc.collect()  # FX graphs hold reference cycles: free the previous recipe's model first
        model = self.fresh_model()
        model.keep_float_weights = save_float_weights or trace_layers is not None
        if not is_leader():  # a worker process: calibrate its windows, leave the rest to rank 0
            PassManager(passes).run(model)
            return None
        float_acc = model.accounting()
        ppl_float = self.float_ppl(model)
        what = "float" if self.saved is None else "saved model's"
        log(
            f"{what} perplexity {ppl_float:.4f} on {self.eval.shape[0]}×{self.eval.shape[1]} tokens"
        )
        analysis = RunAnalysis(trace_layers) if trace_layers is not None else None
        trace = analysis.start(model) if analysis else None
        manager = PassManager(passes, verify_each=verify_each, print_after=True, trace=trace)
        manager.run(model)
        ppl = perplexity(model, self.eval, progress=self.progress, desc="rewritten ppl")
        acc = model.accounting()
        log(f"rewritten perplexity {ppl:.4f} ({100 * (ppl / ppl_float - 1):+.2f} %)")
        report: dict[str, Any] = {
            "schema": REPORT_SCHEMA,
            "report": "run",
            "qgraph_version": __version__,
            "model": model.name,
            "pipeline": pipeline,
            "baseline": self.baseline,
            "eval": {"windows": int(self.eval.shape[0]), "window": int(self.eval.shape[1])},
            "calibration": {
                "windows": int(self.calib.shape[0]),
                "seed": self.calib_seed,
                "workers": world()[1],
            },
            "passes": pass_log(model),
            "ppl_float": ppl_float,
            "ppl": ppl,
            "params_float": float_acc["params"],
            "params": acc["params"],
            "volume_bits_float": float_acc["volume_bits"],
            "volume_bits": acc["volume_bits"],
            "properties": sorted(model.properties),
        }
        if analysis:
            report.update(analysis.finish(model))
        if save:
            from .saving import save as save_model

            report["saved"] = str(save_model(model, save, float_weights=save_float_weights))
            log(f"saved the rewritten model to {save}")
        if export:
            report["export"] = export_and_check(
                model,
                export,
                pipeline,
                self.eval,
                self.progress,
                integer_activations,
                fused_ops,
                attention,
                pack_qkv,
            )
            if analysis:
                report["onnx_trace"] = analysis.onnx(model, report["export"]["path"])
                log_flagged(report["onnx_trace"])
        report["seconds"] = time.perf_counter() - t0
        return report


def export_and_check(
    model: Model,
    path,
    pipeline: str,
    windows: torch.Tensor,
    progress: bool,
    integer_activations: bool = False,
    fused_ops: bool = True,
    attention: str = "gqa",
    pack_qkv: bool = True,
) -> dict:
    from qgraph.backends.onnx_backend import export_model, optimized_op_histogram, ort_forward
    from qgraph.backends.onnx_decoder import export_decoder, has_attention

    t = time.perf_counter()
    path = Path(path)
    cached = has_attention(model)
    if cached:  # a decoder with a KV cache, genai_config.json and tokenizer beside it
        export_decoder(
            model, path.parent, pipeline, filename=path.name,
            integer_activations=integer_activations, fused=fused_ops, attention=attention,
            pack_qkv=pack_qkv,
        )  # fmt: skip
    else:
        path = export_model(model, path, pipeline, integer_activations=integer_activations)
    seconds = time.perf_counter() - t
    size = path.stat().st_size + sum(
        p.stat().st_size for p in path.parent.glob(path.name + ".data")
    )
    kind = "decoder with KV cache + genai_config.json" if cached else "model"
    log(f"exported {path} ({kind}, {size / 2**20:.1f} MB) in {seconds:.1f}s")
    ops = optimized_op_histogram(path)
    ort_ppl = perplexity(ort_forward(path), windows, progress=progress, desc="onnxruntime ppl")
    log(f"ONNX Runtime perplexity {ort_ppl:.4f}")
    return {
        "path": str(path),
        "kv_cache": cached,
        "file_mb": size / 2**20,
        "export_seconds": seconds,
        "ort_ppl": ort_ppl,
        "integer_activations": integer_activations,
        "fused_ops": fused_ops and cached,
        "attention": (attention if fused_ops else "standard ops") if cached else None,
        "pack_qkv": pack_qkv and cached and fused_ops and attention == "gqa",
        "ort_optimized_nodes": sum(ops.values()),
        "ort_optimized_ops": {k: v for k, v in ops.items() if "MatMul" in k or "Dequantize" in k},
    }


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write JSON atomically (temp file in the same directory, then rename)."""
    write_text(path, json.dumps(data, indent=2, default=str))


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'recipe':<10} {'ppl':>9} {'Δ vs float':>10} {'params (M)':>10} {'volume (MB)':>11} {'rewrite s':>9} {'ORT ppl':>9} {'ORT file MB':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ex = r.get("export") or {}
        rewrite = sum(p["seconds"] for p in r.get("passes", []))
        delta = 100 * (r["ppl"] / r["ppl_float"] - 1)
        lines.append(
            f"{r['label']:<10} {r['ppl']:>9.4f} {delta:>+9.2f}% {r['params'] / 1e6:>10.1f} "
            f"{r['volume_bits'] / 8 / 2**20:>11.1f} {rewrite:>9.1f} "
            f"{ex.get('ort_ppl', float('nan')):>9.4f} {ex.get('file_mb', float('nan')):>11.1f}"
        )
    return "\n".join(lines)


def float_row(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "label": report.get("baseline", "float32"),
        "ppl": report["ppl_float"],
        "ppl_float": report["ppl_float"],
        "params": report["params_float"],
        "volume_bits": report["volume_bits_float"],
        "passes": [],
    }
