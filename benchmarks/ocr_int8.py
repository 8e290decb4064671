"""Seed 002 on real CNNs: int8 PP-OCRv4 (RapidOCR's ONNX files) calibrated on one batch or ten,
with each activation range method, power-of-two scales on and off, against ONNX Runtime's own
``quantize_static``.

Task metrics on text lines rendered with the machine's DejaVu fonts (``ocr_data.py``):
* rec (text recognizer, opset 12): readings identical to the float model's, exact-match and
  character accuracy against the rendered text;
* cls (0°/180° classifier, opset 11): agreement with float and accuracy, half the lines flipped;
* det (DBNet text detector, opset 12): IoU of the text mask (map > 0.3) with float's, on pages
  of rendered lines ("identical to float" is that IoU for det).

Usage: ``python benchmarks/ocr_int8.py [--models rec,cls] [--eval 200] [--quick]``; results go to
``benchmarks/results/ocr_int8.json`` and a table to stdout.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).parent))
import ocr_data  # noqa: E402
from common import header  # noqa: E402

import qgraph  # noqa: E402
from qgraph.backends.onnx_backend import export_model, optimized_op_histogram  # noqa: E402
from qgraph.tensor_data import output_error  # noqa: E402
from qgraph.workflow import write_json  # noqa: E402

BATCH = 16  # one calibration batch, as in the paper's single-batch setting
DET_THRESHOLD = 0.3  # RapidOCR's binarization threshold of the detector's text map
RANGES = (
    ("minmax", "range=minmax"),
    ("percentile 99.99", "range=percentile"),
    ("mse", "range=mse"),
    ("klj", "range=klj"),
    ("klj pow2", "range=klj,pow2=true"),
)


def pipeline(range_opts: str, images: int) -> str:
    return (
        f"fuse-norms,quantize{{w=int8:channel,a=int8:tensor,{range_opts},exclude=none,"
        f"calib-batches={images}}}"
    )


def session(path, threads: int = 2) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def in_chunks(forward, x: np.ndarray, chunk: int = 25) -> np.ndarray:
    return np.concatenate([np.asarray(forward(x[i : i + chunk])) for i in range(0, len(x), chunk)])


class Task:
    """One model with its inputs, its float outputs and a task metric."""

    def __init__(self, kind: str, n_eval: int, n_calib: int):
        self.kind = kind
        self.path = ocr_data.model_path(kind)
        shape = ocr_data.REC_SHAPE if kind == "rec" else ocr_data.CLS_SHAPE
        if kind == "det":  # pages of rendered lines; the task metric is the text-mask IoU
            self.eval_x, self.calib_x = (
                ocr_data.page_batch(n_eval, 1),
                ocr_data.page_batch(n_calib, 2),
            )
        else:
            self.eval_x, self.lines = ocr_data.text_batch(n_eval, 1, "eval", shape)
            self.calib_x, _ = ocr_data.text_batch(n_calib, 2, "calib", shape)
        if kind == "cls":  # half the lines upside down: label 1 (180°)
            self.labels = np.arange(n_eval) % 2
            self.eval_x[self.labels == 1] = self.eval_x[self.labels == 1, :, ::-1, ::-1]
            flip = np.arange(n_calib) % 2 == 1
            self.calib_x[flip] = self.calib_x[flip, :, ::-1, ::-1]
        elif kind == "rec":
            self.alphabet = ocr_data.characters(self.path)
        self.float_out = in_chunks(lambda x: session(self.path).run(None, {"x": x})[0], self.eval_x)
        self.float_read = self.readings(self.float_out)

    def readings(self, out: np.ndarray) -> list:
        if self.kind == "det":
            return list(out > DET_THRESHOLD)
        if self.kind == "cls":
            return list(out.argmax(-1))
        return [s.strip() for s in ocr_data.ctc_decode(out, self.alphabet)]

    def score(self, out: np.ndarray) -> dict:
        read = self.readings(out)
        if self.kind == "det":  # text pixels found by both / by either (float's threshold)
            mask, ref = np.stack(read), np.stack(self.float_read)
            same = float((mask & ref).sum() / max((mask | ref).sum(), 1))
        else:
            same = float(np.mean([a == b for a, b in zip(read, self.float_read, strict=True)]))
        row = {
            "identical_to_float": same,
            "sqnr_db": output_error(torch.from_numpy(self.float_out), torch.from_numpy(out))[
                "sqnr_db"
            ],
        }
        if self.kind == "det":
            row["accuracy"] = same  # no ground truth boxes: agreement with float is the metric
        elif self.kind == "cls":
            row["accuracy"] = float(np.mean(np.array(read) == self.labels))
        else:
            row["accuracy"] = float(
                np.mean([a == b for a, b in zip(read, self.lines, strict=True)])
            )
            row["char_accuracy"] = float(
                np.mean(
                    [ocr_data.char_accuracy(a, b) for a, b in zip(read, self.lines, strict=True)]
                )
            )
        return row


def qgraph_row(task: Task, range_opts: str, n_calib: int, export_to: Path | None) -> dict:
    t = time.perf_counter()
    model = qgraph.from_onnx(task.path, (torch.from_numpy(task.calib_x[:1].copy()),))
    model.set_calibration(torch.from_numpy(task.calib_x[:n_calib].copy()))
    qgraph.run_pipeline(model, pipeline(range_opts, n_calib))
    rewrite = time.perf_counter() - t
    out = in_chunks(lambda x: model(torch.from_numpy(x.copy())).numpy(), task.eval_x)
    row = {"pipeline": pipeline(range_opts, n_calib), "calib_images": n_calib, "rewrite_s": rewrite}
    row.update(task.score(out))
    if export_to is not None:
        path = export_model(model, export_to)
        ort_out = in_chunks(lambda x: session(path).run(None, {"x": x})[0], task.eval_x)
        row["ort"] = task.score(ort_out)
        ops = optimized_op_histogram(path)
        row["ort_integer_ops"] = {k: v for k, v in ops.items() if "QLinear" in k or "Integer" in k}
    return row


class _Reader:
    """ONNX Runtime's calibration data reader over our calibration images."""

    def __init__(self, x: np.ndarray, batch: int):
        self.items = iter([{"x": x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.items, None)


def ort_rows(task: Task, n_calib: int, folder: Path) -> list[dict]:
    """ONNX Runtime's quantize_static (QDQ, per-channel int8 weights, min/max and entropy), as
    given and after upgrading the model to opset 13. Its calibrator keeps every intermediate
    output of every calibration image in memory (160 recognizer lines took over 24 GB and were
    killed), so it gets one batch."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    rows = []
    upgraded = folder / f"{task.kind}_opset13.onnx"
    onnx.save(onnx.version_converter.convert_version(onnx.load(str(task.path)), 13), str(upgraded))
    for label, source in (("as given", task.path), ("opset 13", upgraded)):
        for method in (CalibrationMethod.MinMax, CalibrationMethod.Entropy):
            out_path = folder / f"{task.kind}_ort_{label.replace(' ', '')}_{method.name}.onnx"
            row = {"anchor": f"onnxruntime quantize_static ({label}, {method.name})"}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    quantize_static(
                        str(source),
                        str(out_path),
                        _Reader(task.calib_x[:n_calib], BATCH),
                        quant_format=QuantFormat.QDQ,
                        per_channel=True,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=method,
                    )
                out = in_chunks(
                    lambda x, p=out_path: session(p).run(None, {"x": x})[0], task.eval_x
                )
                row.update(task.score(out))
            except Exception as exc:  # the point of this row: report what ORT does
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            rows.append(row)
    return rows


def latency(path: Path, x: np.ndarray, repeats: int = 30) -> float:
    """Median ms of one call on one image (2 threads)."""
    sess = session(path)
    one = x[:1]
    for _ in range(3):
        sess.run(None, {"x": one})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {"x": one})
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="rec,cls")
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--batches", default="1,10", help="calibration sizes in batches of 16")
    ap.add_argument("--quick", action="store_true", help="minmax, mse and klj only")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ocr_int8.json"))
    ap.add_argument("--parts", default="qgraph,ort,latency", help="rows to run")
    ap.add_argument(
        "--latency-recipe",
        default="range=mse",
        help="quantize range options timed by --parts latency",
    )
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not ocr_data.fonts_available() or ocr_data.models_dir() is None:
        sys.exit("needs the DejaVu fonts and rapidocr-onnxruntime (make setup)")
    batches = [int(b) for b in args.batches.split(",")]
    ranges = [r for r in RANGES if not args.quick or r[0] in ("minmax", "mse", "klj")]
    results: dict = {"machine": header("OCR int8", " ".join(sys.argv)), "models": {}}
    folder = Path(tempfile.mkdtemp(prefix="qgraph-ocr-"))
    for kind in args.models.split(","):
        task = Task(kind, args.eval, BATCH * max(batches))
        rows = [{"label": "float", **task.score(task.float_out)}]
        for n in batches if "qgraph" in parts else ():
            for label, opts in ranges:
                export_to = folder / f"{kind}_{n}_{label.replace(' ', '_')}.onnx"
                row = qgraph_row(task, opts, BATCH * n, export_to)
                row["label"] = f"qgraph {label}, {n} batch{'es' if n > 1 else ''}"
                rows.append(row)
                print(_line(row), flush=True)
                _save(args.out, results, kind, rows)
        for row in ort_rows(task, BATCH, folder) if "ort" in parts else ():
            row["label"] = row.pop("anchor")
            rows.append(row)
            print(_line(row), flush=True)
            _save(args.out, results, kind, rows)
        if "latency" not in parts:
            continue
        candidates = [r for r in rows if "pipeline" in r]
        best = (
            max(candidates, key=lambda r: r["ort"]["identical_to_float"])
            if candidates
            else {
                "label": args.latency_recipe,
                "pipeline": pipeline(args.latency_recipe, BATCH),
                "calib_images": BATCH,
            }  # fmt: skip
        )
        best_path = folder / "best.onnx"
        model = qgraph.from_onnx(task.path, (torch.from_numpy(task.calib_x[:1].copy()),))
        model.set_calibration(torch.from_numpy(task.calib_x[: best["calib_images"]].copy()))
        qgraph.run_pipeline(model, best["pipeline"])
        export_model(model, best_path)
        speed = {
            "float_ms": latency(task.path, task.eval_x),
            "int8_ms": latency(best_path, task.eval_x),
        }
        speed["speedup"] = speed["float_ms"] / speed["int8_ms"]
        results["models"].setdefault(kind, {"rows": rows})["latency"] = {
            "recipe": best["label"],
            **speed,
        }
        print(f"{kind}: float {speed['float_ms']:.1f} ms, int8 {speed['int8_ms']:.1f} ms "
              f"({speed['speedup']:.2f}x) with {best['label']}")  # fmt: skip
        write_json(args.out, results)
    print(table(results))


def _save(path: str, results: dict, kind: str, rows: list[dict]) -> None:
    """Write what is measured so far (a crash keeps the finished rows)."""
    results["models"].setdefault(kind, {})["rows"] = rows
    write_json(path, results)


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['label']:<52} {row['error']}"
    ort_same = row.get("ort", {}).get("identical_to_float", float("nan"))
    return (
        f"{row['label']:<52} same {100 * row['identical_to_float']:6.1f} %  "
        f"acc {100 * row['accuracy']:5.1f} %  SQNR {row['sqnr_db']:5.1f} dB  "
        f"ORT same {100 * ort_same:6.1f} %"
    )


def table(results: dict) -> str:
    out = []
    for kind, data in results["models"].items():
        out.append(f"\n{kind}\n")
        out.append("| recipe | identical to float | accuracy | SQNR dB | in ORT: identical |")
        out.append("|---|---|---|---|---|")
        for r in data["rows"]:
            if "error" in r:
                out.append(f"| {r['label']} | fails: {r['error']} | | | |")
                continue
            ort_same = r.get("ort", {}).get("identical_to_float")
            ort_text = f"{100 * ort_same:.1f} %" if ort_same is not None else ""
            out.append(
                f"| {r['label']} | {100 * r['identical_to_float']:.1f} % | "
                f"{100 * r['accuracy']:.1f} % | {r['sqnr_db']:.1f} | {ort_text} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    main()
