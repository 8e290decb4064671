"""One self-contained HTML page from report data (``docs/REPORT.md`` describes the data).

The page takes whatever sections the data has — a run's summary, pass log, per-layer table and
per-pass trace; an inspection's ops, provenance and capabilities; a diff; several runs side by
side — and draws the plots a person would rather look at than read with matplotlib, inlined as
SVG with text kept as text. No scripts, fonts or styles are fetched: the file opens offline.
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import DataError

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1180px;
color:#1d2330;padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px}h2{margin-top:36px;border-bottom:1px solid #d8dce3;
padding-bottom:4px}code{background:#f2f4f7;padding:1px 4px;border-radius:3px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #d8dce3;
padding:3px 8px;text-align:left;vertical-align:top}th{background:#f2f4f7;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.flag td{background:#fde8e8}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #d8dce3;border-radius:6px;
padding:8px 14px;min-width:120px}.card b{display:block;font-size:1.3em}.muted{color:#667085}
figure{margin:12px 0}figcaption{font-size:13px;color:#667085}.scroll{max-height:560px;
overflow:auto;border:1px solid #eef0f3}
"""


# ---------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "svg.fonttype": "none",  # text stays text: no embedded glyphs, the page's fonts
            "svg.hashsalt": "qgraph",  # stable element ids, so a report is reproducible
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    return plt


def _svg(fig) -> str:
    plt = _pyplot()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    # drop the RDF metadata block: namespaces only, and noise in a page
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.S)
    return text[text.index("<svg") :]


def _plain_numbers():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}")


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{html.escape(caption)}</figcaption></figure>"


def plot_layer_error(layers: Sequence[dict], onnx: dict | None) -> str | None:
    """Each layer's output SQNR along depth (torch), with ONNX Runtime's beside it."""
    points = [(r["index"], r["sqnr_db"]) for r in layers if r.get("sqnr_db") is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.2))
    roles = sorted({r.get("role", "") for r in layers})
    cmap = plt.get_cmap("tab10")
    for i, role in enumerate(roles):
        pts = [(r["index"], r["sqnr_db"]) for r in layers if r.get("role") == role]
        pts = [p for p in pts if p[1] is not None]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=14, color=cmap(i % 10), label=role)
    ax.plot(*zip(*points, strict=True), color="#98a2b3", lw=0.6, zorder=0)
    if onnx:
        index = {r["name"]: r["index"] for r in layers}
        ort = [
            (index[e["name"]], e["ort_sqnr_db"])
            for e in onnx.get("layers", [])
            if e.get("ort_sqnr_db") is not None and e["name"] in index
        ]
        if ort:
            ax.scatter(*zip(*ort, strict=True), s=28, facecolors="none", edgecolors="black",
                       label="ONNX Runtime", lw=0.8)  # fmt: skip
        for name in onnx.get("flagged", []):
            if name in index:
                ax.axvline(index[name], color="#d92d20", lw=1, alpha=0.6)
    ax.set_xlabel("layer (graph order)")
    ax.set_ylabel("output SQNR (dB)")
    ax.legend(fontsize=7, ncol=min(8, len(roles) + 1), loc="lower left", bbox_to_anchor=(0, 1.0),
              frameon=False)  # fmt: skip
    return _svg(fig)


def plot_activation_ranges(layers: Sequence[dict], before: dict[str, dict]) -> str | None:
    """Outlier ratio and max |x| of every layer's input, before and after the pipeline."""
    names = [r["name"] for r in layers if r.get("act_outlier_ratio") is not None]
    if not names:
        return None
    after = {r["name"]: r for r in layers}
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    xs = list(range(len(names)))
    for ax, key, label in (
        (axes[0], "act_outlier_ratio", "max / median channel range"),
        (axes[1], "act_absmax", "max |x|"),
    ):
        if before:
            ys = [(before.get(n) or {}).get(key) for n in names]
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y]
            if pts:
                ax.plot(*zip(*pts, strict=True), "x", ms=4, color="#d92d20", label="before")
        ys = [after[n].get(key) for n in names]
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y]
        if pts:
            ax.plot(*zip(*pts, strict=True), ".", ms=4, color="#1570ef", label="after")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_plain_numbers())
        ax.yaxis.set_minor_formatter(_plain_numbers())
        ax.set_xlabel("layer input (graph order)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, frameon=False)
    return _svg(fig)


def plot_bits(layers: Sequence[dict]) -> str | None:
    """Weight bits per layer: the mixed-precision allocation."""
    pts = [(r["index"], r["bits"]) for r in layers if r.get("bits")]
    if not pts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 2.2))
    ax.bar(*zip(*pts, strict=True), width=0.9, color="#7a5af8")
    ax.set_xlabel("layer (graph order)")
    ax.set_ylabel("weight bits")
    ax.set_yticks(sorted({b for _, b in pts}))
    return _svg(fig)


def plot_recipes(rows: Sequence[dict]) -> str | None:
    """Perplexity of each recipe (and of the float model) as bars."""
    rows = [r for r in rows if isinstance(r.get("ppl"), (int, float))]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(rows) + 2), 3))
    labels = [r["label"] for r in rows]
    ax.bar(labels, [r["ppl"] for r in rows], color="#1570ef")
    ort = [(r["label"], r["ort_ppl"]) for r in rows if r.get("ort_ppl") is not None]
    if ort:
        ax.scatter(*zip(*ort, strict=True), marker="D", color="black", s=18, zorder=3,
                   label="ONNX Runtime")  # fmt: skip
        ax.legend(fontsize=7, frameon=False)
    floats = [r["ppl_float"] for r in rows if r.get("ppl_float")]
    if floats:
        ax.axhline(floats[0], color="#667085", lw=0.8, ls="--")
    ax.set_ylabel("perplexity")
    ax.tick_params(axis="x", labelrotation=20)
    return _svg(fig)


def plot_pass_error(passes: Sequence[dict]) -> str | None:
    """The model output's SQNR against the float output after each pass."""
    pts = [
        (f"{i + 1}. {p['name']}", p["summary"].get("output_sqnr_db"))
        for i, p in enumerate(passes)
        if "output_sqnr_db" in (p.get("summary") or {})
    ]
    if not pts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.0 * len(pts) + 2), 2.8))
    cap = 120.0
    values = [cap if v is None else min(v, cap) for _, v in pts]
    ax.bar([p[0] for p in pts], values, color="#12b76a")
    for i, (_, v) in enumerate(pts):
        ax.text(i, min(cap, v or cap), "exact" if v is None else f"{v:.1f}", ha="center",
                va="bottom", fontsize=7)  # fmt: skip
    ax.set_ylabel("output SQNR (dB)")
    ax.tick_params(axis="x", labelrotation=20)
    return _svg(fig)


def plot_ops(ops: dict[str, int], top: int = 20) -> str | None:
    items = list(ops.items())[:top]
    if not items:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.22 * len(items) + 0.8))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#667085")
    ax.set_xlabel("nodes")
    return _svg(fig)


# ---------------------------------------------------------------------------------- tables


def _cell(value: Any) -> str:
    if value is None:
        return "<td class='muted'>–</td>"
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, float):
        if math.isnan(value):
            return "<td class='muted'>nan</td>"
        text = f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
        return f"<td class='num'>{text}</td>"
    if isinstance(value, int):
        return f"<td class='num'>{value:,}</td>"
    if isinstance(value, (dict, list)):
        value = json.dumps(value, default=str)
        if len(value) > 160:
            value = value[:157] + "…"
    return f"<td>{html.escape(str(value))}</td>"


def table(rows: Iterable[dict], columns: Sequence[str], flag: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cls = " class='flag'" if flag and row.get(flag) else ""
        body.append(f"<tr{cls}>" + "".join(_cell(row.get(c)) for c in columns) + "</tr>")
    return f"<div class='scroll'><table><tr>{head}</tr>{''.join(body)}</table></div>"


def _cards(items: Sequence[tuple[str, Any]]) -> str:
    out = []
    for label, value in items:
        if value is None:
            continue
        text = f"{value:,.4g}" if isinstance(value, float) else html.escape(str(value))
        out.append(
            f"<div class='card'><span class='muted'>{html.escape(label)}</span><b>{text}</b></div>"
        )
    return f"<div class='cards'>{''.join(out)}</div>"


# ---------------------------------------------------------------------------------- sections


def _run_sections(doc: dict) -> list[str]:
    out = []
    export = doc.get("export") or {}
    ppl, ppl_float = doc.get("ppl"), doc.get("ppl_float")
    delta = 100 * (ppl / ppl_float - 1) if ppl and ppl_float else None
    out.append(
        _cards(
            [
                (
                    "float perplexity" if doc.get("baseline", "float32") == "float32" else "before",
                    ppl_float,
                ),
                ("rewritten perplexity", ppl),
                ("Δ vs float (%)", delta),
                ("ONNX Runtime perplexity", export.get("ort_ppl")),
                ("parameters (M)", doc["params"] / 1e6 if doc.get("params") else None),
                ("volume (MB)", doc["volume_bits"] / 8 / 2**20 if doc.get("volume_bits") else None),
                ("file (MB)", export.get("file_mb")),
                ("seconds", doc.get("seconds")),
            ]
        )
    )
    out += _output_error_section(doc)
    out += _pass_sections(doc.get("passes") or [])
    out += _layer_sections(doc)
    return out


def _output_error_section(doc: dict) -> list[str]:
    rows = []
    for source, errors in (
        ("rewritten", doc.get("output_error")),
        ("imported", doc.get("import_error")),
    ):
        for name, err in (errors or {}).items():
            rows.append({"model": source, "output": name, **err})
    for name, err in ((doc.get("export") or {}).get("output_error") or {}).items():
        rows.append({"model": "ONNX Runtime", "output": name, **err})
    if not rows:
        return []
    cols = ["model", "output", *[k for k in rows[0] if k not in ("model", "output")]]
    return ["<h2>Output error</h2>", table(rows, cols)]


def _pass_sections(passes: Sequence[dict]) -> list[str]:
    if not passes:
        return []
    rows = []
    for i, p in enumerate(passes):
        summary = p.get("summary") or {}
        diff = summary.get("op_diff") or {}
        options = ", ".join(f"{k}={v}" for k, v in (p.get("options") or {}).items())
        rows.append(
            {
                "#": i + 1,
                "pass": p["name"] + (f" (in {p['parent']})" if p.get("parent") else ""),
                "options": options if len(options) <= 140 else options[:137] + "…",
                "seconds": p.get("seconds"),
                "peak RSS (MB)": p.get("peak_rss_mb"),
                "verified max rel. error": p.get("verify_max_rel_err"),
                "output SQNR (dB)": summary.get("output_sqnr_db"),
                "nodes made or changed": summary.get("nodes_made_or_changed"),
                "op diff": ", ".join(f"{k} {v:+d}" for k, v in sorted(diff.items())),
            }
        )
    out = ["<h2>Passes</h2>", table(rows, list(rows[0]))]
    svg = plot_pass_error(passes)
    if svg:
        out.append(_figure(svg, "The model's output against the float model's output after each "
                                "pass, on the probe batch (exact passes stay near float precision)."))  # fmt: skip
    notes = []
    for p in passes:
        summary = {k: v for k, v in (p.get("summary") or {}).items()
                   if k not in ("op_diff", "layer_sqnr_db", "output_sqnr_db", "nodes_made_or_changed")}  # fmt: skip
        if summary:
            notes.append(f"<details><summary>{html.escape(p['name'])}: summary</summary><pre>"
                         f"{html.escape(json.dumps(summary, indent=1, default=str)[:20000])}</pre></details>")  # fmt: skip
    return out + notes


def _layer_sections(doc: dict) -> list[str]:
    layers = doc.get("layers") or []
    onnx = doc.get("onnx_trace")
    out = []
    if layers:
        out.append("<h2>Layers</h2>")
        svg = plot_layer_error(layers, onnx)
        if svg:
            out.append(_figure(svg, "Each quantized layer's output error against its float weights "
                                    "on the same input (calibration windows), higher is better; "
                                    "circles: the same layer in ONNX Runtime; red lines: flagged."))  # fmt: skip
        svg = plot_activation_ranges(layers, doc.get("activations_before") or {})
        if svg:
            out.append(_figure(svg, "The activation each layer reads: outlier ratio and range, "
                                    "before the pipeline (float model) and after (what is quantized)."))  # fmt: skip
        if any(r.get("bits") for r in layers):
            svg = plot_bits(layers)
            if svg:
                out.append(_figure(svg, "Weight bits per layer (the mixed-precision allocation)."))
        cols = [c for c in ("index", "name", "role", "kind", "weight", "act", "solver", "in_features",
                            "out_features", "sqnr_db", "weight_rel_err", "act_absmax",
                            "act_outlier_ratio", "expansion", "sparse_share")
                if any(c in r for r in layers)]  # fmt: skip
        out.append(table(layers, cols))
    trace = _trace_rows(doc.get("passes") or [], onnx)
    if trace:
        rows, cols = trace
        out.append("<h2>Error per pass, torch and ONNX Runtime</h2>")
        out.append(
            "<p class='muted'>Each layer's output SQNR (dB) after each pass that changed it, "
            "then in the exported file in ONNX Runtime on the same inputs, with the agreement "
            "of ONNX Runtime's output with torch's. Flagged rows diverge.</p>"
        )
        out.append(table(rows, cols, flag="flagged"))
    return out


def _trace_rows(passes: Sequence[dict], onnx: dict | None) -> tuple[list[dict], list[str]] | None:
    columns: list[str] = []
    by_layer: dict[str, dict] = {}
    for i, p in enumerate(passes):
        per_layer = (p.get("summary") or {}).get("layer_sqnr_db")
        if not per_layer:
            continue
        col = f"{i + 1}. {p['name']}"
        columns.append(col)
        for name, value in per_layer.items():
            by_layer.setdefault(name, {"layer": name})[col] = value
    extra: list[str] = []
    if onnx:
        extra = ["torch (probe)", "ONNX Runtime", "agreement", "flagged"]
        for e in onnx.get("layers", []):
            row = by_layer.setdefault(e["name"], {"layer": e["name"]})
            agreement = e.get("agreement_db")
            if agreement is None and e.get("in_file"):
                agreement = "bit-identical"
            row.update({"torch (probe)": e.get("torch_sqnr_db"), "ONNX Runtime": e.get("ort_sqnr_db"),
                        "agreement": agreement, "flagged": e.get("flagged")})  # fmt: skip
    if not by_layer:
        return None
    last = next((p["summary"]["layer_sqnr_db"] for p in reversed(passes)
                 if (p.get("summary") or {}).get("layer_sqnr_db")), {})  # fmt: skip
    order = {
        name: i
        for i, name in enumerate([*last, *(e["name"] for e in (onnx or {}).get("layers", []))])
    }
    rows = sorted(by_layer.values(), key=lambda r: order.get(r["layer"], len(order)))
    return rows, ["layer", *columns, *extra]


def _inspect_sections(doc: dict) -> list[str]:
    out = [
        _cards(
            [
                ("parameters (M)", doc["params"] / 1e6 if doc.get("params") else None),
                ("volume (MB)", doc.get("volume_mb")),
                ("bits / parameter", doc.get("bits_per_param")),
                ("file (MB)", doc.get("file_mb")),
            ]
        )
    ]
    ops = doc.get("ops") or {}
    if ops:
        out.append("<h2>Operators</h2>")
        svg = plot_ops(ops)
        if svg:
            out.append(_figure(svg, "The most frequent operators."))
        out.append(table([{"op": k, "nodes": v} for k, v in ops.items()], ["op", "nodes"]))
    if doc.get("by_pass"):
        out.append("<h2>Nodes by the passes that made them</h2>")
        rows = [{"passes": k, **v} for k, v in doc["by_pass"].items()]
        out.append(table(rows, ["passes", "nodes", "layers", "ops"]))
    if doc.get("passes") and isinstance(doc["passes"], dict):
        out.append("<h2>What each pass can and cannot do</h2><ul>")
        for name, cap in doc["passes"].items():
            for item in cap.get("can", []):
                out.append(f"<li><b>{html.escape(name)}</b> can {html.escape(item)}</li>")
            for item in cap.get("cannot", []):
                out.append(f"<li><b>{html.escape(name)}</b> cannot {html.escape(item)}</li>")
        out.append("</ul>")
    out += _pass_sections(doc.get("pass_log") or [])
    if doc.get("layers"):
        out += _layer_sections(doc)
    return out


def _diff_sections(doc: dict) -> list[str]:
    out = [
        f"<p>A: <code>{html.escape(str(doc['a']['path']))}</code> &nbsp; "
        f"B: <code>{html.escape(str(doc['b']['path']))}</code></p>"
    ]
    totals = doc.get("totals") or []
    if totals:
        out += ["<h2>Totals</h2>", table(totals, ["quantity", "A", "B", "B − A"])]
    if doc.get("ops"):
        out += ["<h2>Operators that differ</h2>", table(doc["ops"], ["op", "A", "B", "B − A"])]
    if doc.get("layers"):
        cols = [
            c
            for c in ("layer", "A", "B", "output_sqnr_db", "note")
            if any(c in r for r in doc["layers"])
        ]
        out += ["<h2>Layers</h2>", table(doc["layers"], cols)]
    return out


def _recipes_sections(docs: Sequence[dict]) -> list[str]:
    rows = []
    for i, d in enumerate(docs):
        if not rows and d.get("ppl_float") is not None:
            rows.append({"label": d.get("baseline", "float32"), "ppl": d["ppl_float"],
                         "ppl_float": d["ppl_float"]})  # fmt: skip
        rows.append(
            {
                "label": d.get("label") or f"{i + 1}",
                "pipeline": d.get("pipeline"),
                "ppl": d.get("ppl"),
                "ppl_float": d.get("ppl_float"),
                "ort_ppl": (d.get("export") or {}).get("ort_ppl"),
                "params (M)": d["params"] / 1e6 if d.get("params") else None,
                "volume (MB)": d["volume_bits"] / 8 / 2**20 if d.get("volume_bits") else None,
            }
        )
    out = ["<h2>Recipes</h2>"]
    svg = plot_recipes(rows)
    if svg:
        out.append(_figure(svg, "Perplexity of each recipe on the evaluation windows (dashed: "
                                "float); diamonds: the exported file in ONNX Runtime."))  # fmt: skip
    out.append(table(rows, ["label", "pipeline", "ppl", "ort_ppl", "params (M)", "volume (MB)"]))
    return out


# ---------------------------------------------------------------------------------- page


def render(data: dict | Sequence[dict]) -> str:
    """The HTML page for one report (a run, an inspection, a diff, a demo) or several runs."""
    docs = list(data) if isinstance(data, (list, tuple)) else [data]
    if len(docs) == 1 and "rows" in docs[0]:  # `qgraph demo`'s report
        docs = list(docs[0]["rows"])
    if not docs or not all(isinstance(d, dict) for d in docs):
        raise DataError("a report is a JSON object (or a list of them)")
    first = docs[0]
    title = first.get("model") or first.get("path") or "model"
    body: list[str] = []
    if len(docs) > 1:
        body += _recipes_sections(docs)
        for i, d in enumerate(docs):
            body.append(f"<h2>Recipe {html.escape(str(d.get('label') or i + 1))}: "
                        f"<code>{html.escape(str(d.get('pipeline', '')))}</code></h2>")  # fmt: skip
            body += _run_sections(d)
    elif first.get("report") == "diff":
        title = "diff"
        body += _diff_sections(first)
    elif "ppl" in first or "output_error" in first:
        body.append(f"<p>Pipeline <code>{html.escape(str(first.get('pipeline', '')))}</code></p>")
        if first.get("ppl") is not None:
            body += _recipes_sections(docs)
        body += _run_sections(first)
    else:
        body += _inspect_sections(first)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    version = first.get("qgraph_version", __version__)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>qgraph report — {html.escape(str(title))}</title><style>{_CSS}</style></head>"
        f"<body><h1>qgraph report — {html.escape(str(title))}</h1>"
        f"<p class='muted'>qgraph {html.escape(str(version))} · written {stamp}</p>"
        + "\n".join(body)
        + "</body></html>"
    )


def write_html(data: dict | Sequence[dict], path: str | os.PathLike) -> Path:
    """Render ``data`` and write it atomically to ``path``."""
    from .workflow import write_text

    return write_text(path, render(data))


def load_reports(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """Read report JSON files (``qgraph run --report``, ``inspect --json``, ``demo``)."""
    docs = []
    for p in paths:
        try:
            docs.append(json.loads(Path(p).read_text()))
        except FileNotFoundError:
            raise DataError(f"report {p} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"report {p} is not JSON: {exc}") from None
        if not isinstance(docs[-1], dict):
            raise DataError(f"report {p}: expected a JSON object, got {type(docs[-1]).__name__}")
    return docs
