"""``qgraph inspect A --diff B``: what differs between two models, files or run reports.

Each side is described as report data (:func:`describe`): an inspection of a model name, a
``.pt2``, an ONNX file, or a run report read back. The diff lists totals, operator counts and
per-layer formats that differ; with evaluation inputs, each layer's output in B is measured
against the same layer in A on the same inputs (:func:`layer_output_error`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from .errors import DataError
from .kernels.error_stats import energies, sqnr_db
from .layer_report import Probe, float_probes, json_number, measure, quantized_probes

#: Roles whose output is in the residual stream's basis (changed by R1) and the V projection's
#: (changed by R2): their outputs in a rotated model cannot be compared with a float model's.
_R1_ROLES = ("attn_o", "mlp_out")
_R2_ROLES = ("attn_v", "attn_qkv")


def describe(spec: str | os.PathLike) -> dict[str, Any]:
    """Report data for one side of a diff: a JSON report as written, else an inspection."""
    from .inspect_model import inspect_model

    if str(spec).endswith(".json"):
        from .html_report import load_reports

        doc = load_reports([spec])[0]
        if "rows" in doc:  # a demo report: one recipe per row, not one model
            raise DataError(f"{spec}: a demo report holds several recipes; diff one run's report")
        return {**doc, "path": str(spec)}
    return {**inspect_model(str(spec)), "path": str(spec)}


def _totals(doc: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    if doc.get("params") is not None:
        out["params"] = float(doc["params"])
    if doc.get("volume_mb") is not None:
        out["volume_mb"] = float(doc["volume_mb"])
    elif doc.get("volume_bits") is not None:
        out["volume_mb"] = float(doc["volume_bits"]) / 8 / 2**20
    if doc.get("bits_per_param") is not None:
        out["bits_per_param"] = float(doc["bits_per_param"])
    elif "volume_mb" in out and out.get("params"):
        out["bits_per_param"] = out["volume_mb"] * 8 * 2**20 / out["params"]
    for key in ("file_mb", "ppl"):
        if doc.get(key) is not None:
            out[key] = float(doc[key])
    if (doc.get("export") or {}).get("ort_ppl") is not None:
        out["ort_ppl"] = float(doc["export"]["ort_ppl"])
    return out


def _layer_formats(doc: dict[str, Any]) -> dict[str, tuple[str, int | None, bool]]:
    """``{layer: (format text, weight bits, from records)}``. A file's layers are read off its
    stored tensors, where per-channel scales may be replicated into blocks for ONNX Runtime's
    kernels, so a file and a record are compared on their bits only."""
    out = {}
    for row in doc.get("layers") or []:
        text = row.get("weight") or "float"
        if row.get("act"):
            text += f", act {row['act']}"
        if row.get("expansion"):
            text += f", in {row['expansion']}"
        if row.get("sparse_share"):
            text += f", sparse {100 * row['sparse_share']:.2f} %"
        out[row["name"]] = (text, row.get("bits"), "solver" in row)
    return out


def _same_format(a: tuple | None, b: tuple | None) -> bool:
    if a is None or b is None:
        return a is b
    if a[2] and b[2]:  # both from records: the whole format
        return a[0] == b[0]
    return a[1] == b[1]


def diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The differences between two report data (totals, operators, per-layer formats)."""
    from .inspect_model import REPORT_SCHEMA

    ta, tb = _totals(a), _totals(b)
    totals = [
        {
            "quantity": k,
            "A": ta.get(k),
            "B": tb.get(k),
            "B − A": tb[k] - ta[k] if k in ta and k in tb else None,
        }  # fmt: skip
        for k in dict.fromkeys([*ta, *tb])
    ]
    ops_a, ops_b = a.get("ops") or {}, b.get("ops") or {}
    ops = [
        {
            "op": op,
            "A": ops_a.get(op, 0),
            "B": ops_b.get(op, 0),
            "B − A": ops_b.get(op, 0) - ops_a.get(op, 0),
        }  # fmt: skip
        for op in sorted(set(ops_a) | set(ops_b))
        if ops_a.get(op, 0) != ops_b.get(op, 0)
    ]
    ops.sort(key=lambda r: -abs(r["B − A"]))
    la, lb = _layer_formats(a), _layer_formats(b)
    layers = [
        {"layer": name, "A": (la.get(name) or (None,))[0], "B": (lb.get(name) or (None,))[0]}
        for name in dict.fromkeys([*la, *lb])
        if not _same_format(la.get(name), lb.get(name))
    ]
    return {
        "schema": REPORT_SCHEMA,
        "report": "diff",
        "a": {"path": a.get("path"), "model": a.get("model"), "pipeline": a.get("pipeline")},
        "b": {"path": b.get("path"), "model": b.get("model"), "pipeline": b.get("pipeline")},
        "totals": totals,
        "ops": ops,
        "layers": layers,
    }


def _probes(model) -> dict[str, Probe]:
    """Every linear layer and convolution by name: the quantized ones, then the float ones."""
    out = {p.name: p for p in quantized_probes(model)}
    for p in float_probes(model):
        out.setdefault(p.name, p)
    return out


def _rotated_roles(model) -> set[str]:
    roles: set[str] = set()
    for r in model.log:
        if r.name == "rotate" and "r1" in r.summary:
            roles.update(_R1_ROLES)
        if r.name == "rotate" and "r2" in r.summary:
            roles.update(_R2_ROLES)
        if r.name == "learn-rotations":
            roles.update(_R1_ROLES + _R2_ROLES)
    return roles


def layer_output_error(model_a, model_b, batch: torch.Tensor) -> list[dict[str, Any]]:
    """Each layer's output in B against the same layer in A on ``batch`` (SQNR, dB). Layers
    whose output a rotation moved to another basis in one model and not the other are named
    but not compared."""
    pa, pb = _probes(model_a), _probes(model_b)
    heads_a = [n for n, p in pa.items() if p.role == "lm_head"]
    heads_b = [n for n, p in pb.items() if p.role == "lm_head"]
    if len(heads_a) == len(heads_b) == 1 and heads_a != heads_b:
        # a tied head is named after the embedding it reads; untied (rotate) it is its own
        pb[heads_a[0]] = dataclasses.replace(pb.pop(heads_b[0]), name=heads_a[0])
    common = [n for n in pa if n in pb]
    if not common:
        raise DataError("the two models have no layer name in common to compare")
    basis = _rotated_roles(model_a) ^ _rotated_roles(model_b)
    comparable = [n for n in common if pb[n].role not in basis]
    ma, _ = measure(model_a, batch, [pa[n] for n in comparable], keep_outputs=True)
    mb, _ = measure(model_b, batch, [pb[n] for n in comparable], keep_outputs=True)
    rows = []
    for name in common:
        if name not in ma:
            rows.append({"layer": name, "note": "output in a rotated basis in one model only"})
            continue
        signal = noise = 0.0
        for ya, yb in zip(ma[name].outputs, mb[name].outputs, strict=True):
            if ya.shape != yb.shape:
                break
            s, n = energies(ya, yb)
            signal, noise = signal + s, noise + n
        else:
            rows.append({"layer": name, "output_sqnr_db": json_number(sqnr_db(signal, noise))})
            continue
        rows.append(
            {"layer": name, "note": f"shapes differ: {tuple(ya.shape)} vs {tuple(yb.shape)}"}
        )
    return rows


def eval_batch(model, eval_text: str | None, eval_inputs: str | None) -> torch.Tensor:
    """The inputs a diff measures layers on: 2 windows of 256 tokens of ``eval_text`` (tokenized
    with the model's tokenizer), or the first 8 samples of an ``.npz``."""
    if eval_inputs:
        from .onnx_import import input_specs, read_onnx
        from .tensor_data import read_inputs, stack_samples

        source = Path(model.source)
        if source.suffix != ".onnx":
            raise DataError("--eval-inputs takes models read from ONNX files; use --eval-text")
        specs = input_specs(read_onnx(source))
        data = read_inputs(eval_inputs, [s.name for s in specs], [s.dtype for s in specs])
        return stack_samples(data[0][:8])
    if model.tokenizer is None:
        raise DataError(f"{model.name} has no tokenizer: give --eval-inputs FILE.npz")
    from .data import load_text, token_windows

    return token_windows(model.tokenizer, load_text(eval_text or None, "eval"), 256, 2)


def load_for_eval(spec: str):
    """A model to run for the layer comparison (a name, HF folder, ``.gguf``, ``.pt2`` or float
    ONNX file); a run report holds no weights."""
    from .api import load

    if str(spec).endswith(".json"):
        raise DataError(
            f"{spec}: a run report holds no weights; for per-layer output errors give models "
            "(a name, a .pt2 saved by 'qgraph run --save', or an ONNX file)"
        )
    return load(spec)


def format_diff(d: dict[str, Any]) -> str:
    """A short text for the terminal; the JSON (``--json``) has everything."""
    lines = [f"A: {d['a']['path']}", f"B: {d['b']['path']}"]
    for t in d["totals"]:
        if t["A"] is None or t["B"] is None:
            continue
        lines.append(f"  {t['quantity']:<16} {t['A']:>14,.4g} → {t['B']:>14,.4g}")
    if d["ops"]:
        lines.append("  ops: " + ", ".join(f"{r['op']} {r['B − A']:+d}" for r in d["ops"][:12]))
    if d["layers"]:
        lines.append(f"  {len(d['layers'])} layers differ in format, e.g.:")
        for r in d["layers"][:5]:
            lines.append(f"    {r['layer']}: {r['A'] or '–'} → {r['B'] or '–'}")
    errors = [r for r in d.get("layer_error", []) if r.get("output_sqnr_db") is not None]
    if errors:
        worst = min(errors, key=lambda r: r["output_sqnr_db"])
        mean = sum(r["output_sqnr_db"] for r in errors) / len(errors)
        lines.append(
            f"  layer outputs of B against A: mean {mean:.1f} dB over {len(errors)} layers, "
            f"worst {worst['output_sqnr_db']:.1f} dB at {worst['layer']}"
        )
    return "\n".join(lines)
