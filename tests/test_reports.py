"""The per-layer report, the per-pass trace, the same layers in ONNX Runtime, diffs and the HTML
page (opened in a real headless Chromium when one is installed; ``make test`` installs it)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import numpy as np
import onnx
import pytest
import torch
from helpers import fresh_copy, tiny_llama
from onnx import numpy_helper

import qgraph
from qgraph.backends.onnx_backend import export_model
from qgraph.cli import main
from qgraph.errors import DataError
from qgraph.html_report import render, write_html
from qgraph.layer_report import layer_rows
from qgraph.layer_trace import PassTrace, RunAnalysis, compare_with_onnx
from qgraph.model_diff import diff, layer_output_error
from qgraph.pass_manager import PassManager
from qgraph.workflow import pass_log

# ---------------------------------------------------------------------------- per-layer table


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(16, 32)
        self.l2 = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


def _rtn_full(w: np.ndarray) -> np.ndarray:
    """int4 per-channel round-to-nearest on the full grid (absmax / 8, codes −8..7)."""
    scale = np.abs(w).max(axis=1, keepdims=True) / 8
    return np.clip(np.round(w / scale), -8, 7) * scale


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return 10 * math.log10((ref**2).sum() / ((out - ref) ** 2).sum())


def test_layer_rows_match_numpy_on_a_two_layer_mlp():
    torch.manual_seed(0)
    mlp = _MLP().eval()
    x = torch.randn(4, 5, 16)
    model = qgraph.from_module(mlp, (x[:1],))
    model.set_calibration(x)
    qgraph.run_pipeline(model, "quantize{w=int4:channel,clip=none}")
    rows = layer_rows(model, x)
    assert [r["name"] for r in rows] == ["l1", "l2"]

    xs = x.numpy().astype(np.float64)
    w1, b1 = mlp.l1.weight.detach().double().numpy(), mlp.l1.bias.detach().double().numpy()
    w2, b2 = mlp.l2.weight.detach().double().numpy(), mlp.l2.bias.detach().double().numpy()
    q1, q2 = _rtn_full(w1), _rtn_full(w2)
    y1 = xs @ q1.T + b1
    h = np.maximum(y1, 0)
    expected_sqnr = [_sqnr(xs @ w1.T + b1, y1), _sqnr(h @ w2.T + b2, h @ q2.T + b2)]
    expected_werr = [np.linalg.norm(q - w) / np.linalg.norm(w) for q, w in ((q1, w1), (q2, w2))]
    for row, sqnr, werr in zip(rows, expected_sqnr, expected_werr, strict=True):
        assert row["weight"] == "int4:channel:sym:full" and row["bits"] == 4
        assert row["sqnr_db"] == pytest.approx(sqnr, abs=1e-3)
        assert row["weight_rel_err"] == pytest.approx(werr, abs=1e-4)
    # the activation each layer reads: its range and max/median channel range
    for row, act in zip(rows, (xs, h), strict=True):
        channel = np.abs(act).reshape(-1, act.shape[-1]).max(axis=0)
        assert row["act_absmax"] == pytest.approx(channel.max(), rel=1e-5)
        assert row["act_outlier_ratio"] == pytest.approx(
            channel.max() / np.median(channel), rel=1e-4
        )


# ---------------------------------------------------------------------------- per-pass trace


def test_pass_trace_records_each_pass_error(model):
    trace = PassTrace(model.calibration[:2])
    PassManager(
        "fuse-norms,rotate{seed=0},quantize{w=int4:channel,clip=none},gptq", trace=trace
    ).run(model)
    by_name = {r.name: r.summary for r in model.log}
    # exact passes keep the output to float precision; quantizing costs tens of dB
    for exact in ("fuse-norms", "rotate"):  # None: bit-identical
        assert by_name[exact]["output_sqnr_db"] is None or by_name[exact]["output_sqnr_db"] > 100
    assert "layer_sqnr_db" not in by_name["rotate"]
    assert by_name["quantize"]["output_sqnr_db"] < 60
    rtn = by_name["quantize"]["layer_sqnr_db"]
    solved = by_name["gptq"]["layer_sqnr_db"]
    assert set(rtn) == set(model.quant) == set(solved)
    # GPTQ minimises each layer's output error on these calibration inputs
    assert np.mean(list(solved.values())) > np.mean(list(rtn.values())) + 1.0
    assert by_name["gptq"]["output_sqnr_db"] > by_name["quantize"]["output_sqnr_db"]


# ---------------------------------------------------------------------------- ONNX Runtime


@pytest.fixture(scope="module")
def split_model():
    """A tiny Llama with online rotations, W4 + per-token int8 activations and a sparse split."""
    from helpers import calibrated

    model = calibrated(tiny_llama(random_norms=True))
    pipeline = "fuse-norms,rotate{online=r2+r4},quantize{w=int4:channel,a=int8:token},split-sparse"
    qgraph.run_pipeline(model, pipeline)
    return model


def test_onnx_layers_match_torch_and_a_tampered_scale_is_flagged(split_model, tmp_path, capsys):
    model = split_model
    path = export_model(model, tmp_path / "m.onnx", "test")
    # the file alone says which layers it holds and in what format (from its node metadata)
    assert main(["inspect", str(path), "--json", "--html", str(tmp_path / "i.html")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["report"] == "inspect" and {r["name"] for r in info["layers"]} == set(model.quant)
    assert all(r["bits"] == 4 for r in info["layers"])
    assert "Nodes by the passes that made them" in (tmp_path / "i.html").read_text()
    result = compare_with_onnx(model, path)
    layers = {e["name"]: e for e in result["layers"]}
    assert set(layers) == set(model.quant)
    assert result["flagged"] == [] and result["missing"] == []
    assert any(r.sparse is not None for r in model.quant.values())  # split layers are traced too
    for e in layers.values():
        # the same to a few hundredths of a dB: ORT computes the folded rotations as static
        # matrices in another float order, so a per-token int8 rounding tie may flip (0.02 dB
        # measured); the tampered scale below costs > 1 dB
        assert e["in_file"] and abs(e["ort_sqnr_db"] - e["torch_sqnr_db"]) < 0.05
        assert e["agreement_db"] is None or e["agreement_db"] > 60  # None: bit-identical

    # a wrong scale in the file: that layer is flagged, and only that one — later layers read
    # the damaged activations, but each is judged on the input ONNX Runtime gave it
    proto = onnx.load(str(path))
    victim = "model.layers.1.mlp.up_proj"
    key = "qg_" + victim.replace(".", "_") + "_scale"
    for init in proto.graph.initializer:
        if init.name == key:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.25, key))
            break
    else:
        raise AssertionError(f"no initializer {key}")
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    result = compare_with_onnx(model, bad)
    assert result["flagged"] == [victim]
    entry = next(e for e in result["layers"] if e["name"] == victim)
    assert entry["agreement_db"] < 20 and entry["ort_sqnr_db"] < entry["torch_sqnr_db"] - 1


def test_onnx_capture_of_a_decoder_with_kv_cache(tmp_path):
    from helpers import calibrated

    from qgraph.backends.onnx_decoder import export_decoder

    model = calibrated(tiny_llama(random_norms=True))
    qgraph.run_pipeline(model, "fuse-norms,rotate{online=all},quantize{w=int4:channel},gptq")
    folder = export_decoder(model, tmp_path / "dec", "test")
    result = compare_with_onnx(model, folder / "model.onnx")
    assert result["flagged"] == [] and result["missing"] == []
    assert len(result["layers"]) == len(model.quant)


# ---------------------------------------------------------------------------- diffs


def test_layer_output_error_between_models(traced):
    a = fresh_copy(traced)
    b = fresh_copy(traced)
    qgraph.run_pipeline(b, "quantize{w=int8:channel}")
    c = fresh_copy(traced)
    qgraph.run_pipeline(c, "fuse-norms,rotate{seed=0},quantize{w=int8:channel}")
    batch = traced.calibration[:2]
    rows = layer_output_error(a, b, batch)
    assert len(rows) == len(b.quant) + 1  # and the float lm_head
    assert all(30 < r["output_sqnr_db"] < 80 for r in rows if "lm_head" not in r["layer"])
    rotated = {r["layer"]: r for r in layer_output_error(a, c, batch)}
    for name, r in rotated.items():
        if name.endswith(("o_proj", "down_proj", "v_proj")):
            assert "rotated basis" in r["note"]
        else:  # q/k/gate/up outputs do not depend on the basis of the stream: comparable
            assert 20 < r["output_sqnr_db"] < 80, (name, r)


def test_inspect_diff_of_saved_models(traced, tmp_path, capsys):
    a, b = fresh_copy(traced), fresh_copy(traced)
    qgraph.run_pipeline(b, "quantize{w=int4:channel}")
    qgraph.save(a, tmp_path / "a.pt2")
    qgraph.save(b, tmp_path / "b.pt2")
    argv = ["inspect", str(tmp_path / "a.pt2"), "--diff", str(tmp_path / "b.pt2")]
    assert main([*argv, "--json", "--html", str(tmp_path / "d.html")]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["report"] == "diff" and d["schema"] == "qgraph.report/1"
    ops = {r["op"]: r["B − A"] for r in d["ops"]}
    n = len(b.quant)
    assert ops["qlinear.default"] == n and ops["linear.default"] == -n
    assert len(d["layers"]) == n and all(r["A"] is None for r in d["layers"])
    volume = next(t for t in d["totals"] if t["quantity"] == "volume_mb")
    assert volume["B"] < volume["A"]
    assert "Operators that differ" in (tmp_path / "d.html").read_text()
    # a tokenizer-less model cannot be evaluated on text: said plainly
    assert main([*argv, "--eval-text"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_diff_of_two_reports():
    a = {"model": "m", "params": 100, "volume_bits": 3200, "ppl": 10.0, "layers": []}
    b = {"model": "m", "params": 100, "volume_bits": 800, "ppl": 11.0,
         "layers": [{"name": "x", "weight": "int8:channel:sym:full"}]}  # fmt: skip
    d = diff(a, b)
    totals = {t["quantity"]: t for t in d["totals"]}
    assert totals["bits_per_param"]["A"] == 32 and totals["bits_per_param"]["B"] == 8
    assert totals["ppl"]["B − A"] == pytest.approx(1.0)
    assert d["layers"] == [{"layer": "x", "A": None, "B": "int8:channel:sym:full"}]
    # a file's layer (stored layout, scales replicated in blocks) against a record: bits only
    rec = {
        "layers": [
            {"name": "q", "weight": "int4:channel:sym:full", "bits": 4, "solver": "gptq"},
            {"name": "k", "weight": "int8:channel:sym:full", "bits": 8, "solver": "rtn"},
        ]
    }
    file = {"layers": [{"name": "q", "weight": "int4:group64", "bits": 4},
                       {"name": "k", "weight": "int4:group64", "bits": 4}]}  # fmt: skip
    assert [r["layer"] for r in diff(rec, file)["layers"]] == ["k"]


# ---------------------------------------------------------------------------- HTML


@pytest.fixture(scope="module")
def run_report(split_model, tmp_path_factory):
    """A run report with every section: per-pass trace, layer table, ONNX Runtime trace."""
    from helpers import calibrated

    model = calibrated(tiny_llama(random_norms=True))
    pipeline = "fuse-norms,rotate{online=r2+r4},mixed-precision{budget=5},gptq"
    analysis = RunAnalysis()
    PassManager(pipeline, trace=analysis.start(model)).run(model)
    report = {"schema": "qgraph.report/1", "report": "run", "model": "tiny", "pipeline": pipeline,
              "ppl_float": 11.0, "ppl": 12.0, "passes": pass_log(model), "params": 10**6,
              "volume_bits": 8e6, **analysis.finish(model)}  # fmt: skip
    path = export_model(model, tmp_path_factory.mktemp("run") / "m.onnx", pipeline)
    report["onnx_trace"] = analysis.onnx(model, path)
    report["export"] = {"ort_ppl": 12.01, "path": str(path)}
    return json.loads(json.dumps(report))  # as read back from the JSON file


def test_html_page_has_every_section(run_report):
    page = render(run_report)
    for heading in ("Passes", "Layers", "Error per pass, torch and ONNX Runtime", "Recipes"):
        assert f"<h2>{heading}</h2>" in page
    assert page.count("<svg") >= 5  # recipes, pass error, layer error, activations, bits
    # self-contained: nothing is fetched
    assert re.findall(r"(?:src|href)\s*=\s*[\"']?(?:https?:|//)", page) == []
    assert re.findall(r"url\(\s*[\"']?(?!#)", page) == []  # only references within the page
    assert "<script" not in page and "<link" not in page
    assert "<metadata>" not in page
    with pytest.raises(DataError):
        render([])


_CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _CHROMIUM is None and not os.environ.get("QGRAPH_REQUIRE_BROWSER"),
    reason="no chromium (make test installs Debian's)",
)
def test_html_report_in_headless_chromium(run_report, tmp_path):
    """The page in a real browser: loads with no console errors and no requests, shows the
    tables with one row per layer and the plots at a visible size."""
    sync_api = pytest.importorskip("playwright.sync_api")
    assert _CHROMIUM, "QGRAPH_REQUIRE_BROWSER is set but chromium is not installed"
    path = write_html(run_report, tmp_path / "report.html")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=_CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        try:
            page = browser.new_page()
            problems, requests = [], []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.resolve().as_uri())
            page.wait_for_load_state("load")
            assert problems == []
            assert requests == [path.resolve().as_uri()]
            assert page.title() == "qgraph report — tiny"
            layer_table = page.locator("h2:has-text('Layers') ~ div.scroll table").first
            assert layer_table.locator("tr").count() == len(run_report["layers"]) + 1
            svgs = page.locator("figure svg")
            assert svgs.count() >= 5
            for i in range(svgs.count()):
                box = svgs.nth(i).bounding_box()
                assert box and box["width"] > 200 and box["height"] > 100
            assert page.get_by_text("model.layers.1.mlp.down_proj").count() >= 2
        finally:
            browser.close()


def test_report_command_writes_pages(run_report, tmp_path, capsys):
    a, b = tmp_path / "w8.json", tmp_path / "w4.json"
    a.write_text(json.dumps(run_report))
    b.write_text(json.dumps({**run_report, "ppl": 13.0}))
    out = tmp_path / "both.html"
    assert main(["report", str(a), str(b), "-o", str(out)]) == 0
    page = out.read_text()
    assert "<h2>Recipes</h2>" in page and "Recipe w4" in page and "Recipe w8" in page
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["report", str(bad), "-o", str(tmp_path / "x.html")]) == 2
    assert "is not JSON" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


def test_run_analysis_reuses_the_trace_measurement(model):
    """The layer table is built from the pass trace's last measurement of the model; it equals a
    fresh measurement."""
    analysis = RunAnalysis()
    PassManager("quantize{w=int4:channel,a=int8:token}", trace=analysis.start(model)).run(model)
    rows = analysis.finish(model)["layers"]
    assert set(analysis.measured) == set(model.quant)
    assert rows == layer_rows(model, analysis.batch)
