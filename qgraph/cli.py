"""Command line: ``qgraph run``, ``demo``, ``passes``, ``inspect``, ``report``, ``generate``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import progress
from .errors import QGraphError

_SEED_LIMIT = 2**64  # torch.manual_seed takes seeds in [0, 2**64)


class _UsageError(Exception):
    """A command-line argument is invalid (raised by :class:`_Parser` instead of exiting)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors reach :func:`main` (one line, exit code 2, no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _int_range(low: int, high: int | None = None, high_text: str = "") -> Callable[[str], int]:
    """An argparse ``type=`` that accepts an integer in ``[low, high)`` with a clear message."""
    want = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high_text or high})"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if value < low or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"expected {want}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def check_output_path(option: str, path: str | os.PathLike) -> Path:
    """Fail early, before anything slow runs, if ``path`` cannot be written as a file.

    Its directory must exist and be writable (checked by creating and deleting a temporary
    file there), and the path must not be a directory or an existing file that is not
    writable. Raises :class:`QGraphError` naming ``option`` and ``path``; returns the path.
    """
    target = Path(path).expanduser()
    where = f"{option} {path}"
    if target.is_dir():
        raise QGraphError(f"{where}: is a directory; give a file path")
    if target.exists() and not target.is_file():
        raise QGraphError(f"{where}: exists and is not a regular file")
    parent = target.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise QGraphError(f"{where}: directory {parent} {what}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".qgraph-write-check-", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise QGraphError(
            f"{where}: directory {parent} is not writable ({exc.strerror or exc})"
        ) from None
    if target.exists() and not os.access(target, os.W_OK):
        raise QGraphError(f"{where}: the existing file is not writable")
    return target


def _check_output_dir(option: str, path: str | os.PathLike) -> Path:
    """Create directory ``path`` if missing and check that files can be written in it."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise QGraphError(f"{option} {path}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QGraphError(
            f"{option} {path}: cannot create the directory ({exc.strerror or exc})"
        ) from None
    check_output_path(option, out / "demo-report.json")
    return out


def _launch_workers(workers: int) -> int:
    """Re-run this command under torchrun with ``workers`` processes on this machine, the
    cores shared among them."""
    import subprocess

    argv = sys.argv[1:]
    keep, skip = [], False
    for a in argv:  # the workers are the world: drop --workers from their command line
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            keep.append(a)
    import torch

    from .kernels.gptq import SOLVE_THREADS_ENV

    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // workers)))
    env[SOLVE_THREADS_ENV] = str(torch.get_num_threads())  # factorisations as one process does
    with tempfile.TemporaryDirectory(prefix="qgraph-workers-") as logs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc-per-node={workers}", "--log-dir", logs, "-m", "qgraph.cli", *keep]
        return subprocess.run(cmd, env=env, check=False).returncode


def _cmd_run(args: argparse.Namespace) -> int:
    from .pass_manager import check_order, parse_pipeline
    from .workflow import Job, float_row, format_table

    have: set[str] = set()
    if args.model and str(args.model).endswith(".pt2"):
        from .saving import read_metadata

        meta = read_metadata(args.model)  # cheap: no graph is loaded
        have = set(meta["properties"])
        if not meta.get("float_weights"):
            have.discard("float-weights")
    check_order(parse_pipeline(args.pipeline), have)  # fail before the slow loading
    onnx_model = bool(args.model) and str(args.model).endswith(".onnx")
    if (args.calib_inputs or args.eval_inputs) and not onnx_model:
        raise QGraphError("--calib-inputs/--eval-inputs take an ONNX model (--model FILE.onnx)")
    if onnx_model and not (args.calib_inputs or args.eval_inputs):
        from .workflow import is_language_model_file

        # token ids in and a tokenizer beside it: a language model, evaluated on text
        onnx_model = not is_language_model_file(args.model)
    outputs: dict[Path, str] = {}
    for option, out in (
        ("--export", args.export),
        ("--report", args.report),
        ("--save", args.save),
        ("--html", args.html),
    ):
        if out:
            key = check_output_path(option, out).resolve()
            if key in outputs:
                raise QGraphError(f"{outputs[key]} and {option} both write {out}")
            outputs[key] = option
    if args.workers > 1 and onnx_model:
        raise QGraphError("--workers splits the calibration of language models; not ONNX models")
    if args.workers > args.calib_windows:
        raise QGraphError(
            f"--workers {args.workers} needs at least as many calibration windows "
            f"(--calib-windows {args.calib_windows})"
        )
    if args.workers > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _launch_workers(args.workers)
    trace = args.trace_layers
    if trace is None and args.html:
        trace = ""  # the page shows every layer
    if trace:
        _check_regex("--trace-layers", trace)
    if onnx_model:
        from .tensor_workflow import format_outputs, run_tensor_model

        report = run_tensor_model(
            args.model,
            args.pipeline,
            calib_inputs=args.calib_inputs,
            eval_inputs=args.eval_inputs,
            calib_samples=args.calib_samples,
            export=args.export,
            verify_each=args.verify_each,
            trace_layers=trace,
        )
        print(format_outputs(report))
        _write_reports(args, report)
        return 0
    from .distributed import init_from_env, is_leader

    if init_from_env() and not is_leader():
        progress.set_enabled(False)
    job = Job(
        args.model,
        args.calib_text,
        args.eval_text,
        args.eval_windows,
        args.calib_windows,
        args.window,
        progress=not args.no_progress,
        calib_seed=args.calib_seed,
    )
    report = job.run(
        args.pipeline,
        export=args.export,
        integer_activations=args.integer_activations,
        fused_ops=not args.standard_ops,
        attention=args.attention,
        pack_qkv=not args.no_pack_qkv,
        save=args.save,
        save_float_weights=args.save_float_weights,
        verify_each=args.verify_each,
        seed=args.seed,
        trace_layers=trace,
    )
    if report is None:  # a worker: rank 0 evaluates, exports and reports
        return 0
    print(format_table([float_row(report), {**report, "label": "rewritten"}]))
    _write_reports(args, report)
    return 0


def _write_reports(args: argparse.Namespace, report: dict) -> None:
    from .workflow import log, write_json

    if args.report:
        write_json(args.report, report)
    if args.html:
        from .html_report import write_html

        write_html(report, args.html)
        log(f"HTML report written to {args.html}")


def _check_regex(option: str, pattern: str) -> None:
    import re

    try:
        re.compile(pattern)
    except re.error as exc:
        raise QGraphError(f"{option} {pattern!r} is not a regular expression: {exc}") from None


def _cmd_demo(args: argparse.Namespace) -> int:
    from .workflow import RECIPES, Job, float_row, format_table, log, write_json

    out = _check_output_dir("--out", args.out)
    job = Job(args.model, eval_windows=args.eval_windows, progress=not args.no_progress)
    rows = []
    for label, pipeline in RECIPES.items():
        log(f"recipe {label}: {pipeline}")
        folder = out / f"{job.name}-{label}"  # one decoder folder per recipe (ORT GenAI layout)
        folder.mkdir(exist_ok=True)
        report = job.run(pipeline, export=folder / "model.onnx", verify_each=True)
        rows.append({**report, "label": label})
    table = format_table([float_row(rows[0]), *rows])
    print(table)
    write_json(out / "demo-report.json", {"rows": rows, "table": table})
    from .html_report import write_html

    write_html(rows, out / "demo-report.html")  # the recipes side by side, with their pass logs
    log(f"report written to {out / 'demo-report.json'} and {out / 'demo-report.html'}")
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    from .pass_manager import registry

    for name, cls in sorted(registry().items()):
        flags = []
        if cls.exact:
            flags.append("exact")
        if cls.requires:
            flags.append("requires " + ",".join(sorted(cls.requires)))
        if cls.provides:
            flags.append("provides " + ",".join(sorted(cls.provides)))
        if cls.forbids:
            flags.append("forbids " + ",".join(sorted(cls.forbids)))
        print(f"{name}  [{'; '.join(flags)}]")
        print(f"    {cls.help}")
        for o in cls.options:
            choices = f" one of {', '.join(map(str, o.choices))}" if o.choices else ""
            print(f"    {o.name}: {o.type.__name__} = {o.default!r}{choices} — {o.help}")
        print()
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect_model import inspect_model

    if args.html:
        check_output_path("--html", args.html)
    if args.diff:
        return _inspect_diff(args)
    if args.eval_text or args.eval_inputs:
        raise QGraphError("--eval-text/--eval-inputs measure layers of B against A: add --diff B")
    info = inspect_model(args.path)
    if args.html:
        from .html_report import write_html

        write_html(info, args.html)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['kind']} model: {args.path}")
    for key in ("params", "volume_mb", "bits_per_param", "file_mb", "opset", "params_by_dtype"):
        if key in info:
            val = info[key]
            print(f"  {key}: {val:,.3f}" if isinstance(val, float) else f"  {key}: {val}")
    print("  ops:")
    for op, n in list(info["ops"].items())[:40]:
        print(f"    {op:<40} {n}")
    if info.get("structure"):
        print("  structure:", json.dumps(info["structure"]))
    for passes, entry in (info.get("by_pass") or {}).items():
        ops = ", ".join(f"{op} {n}" for op, n in list(entry["ops"].items())[:4])
        print(f"  made by {passes}: {entry['nodes']} nodes in {entry['layers']} layers ({ops})")
    if info.get("import"):
        print(f"  passes: {info['import']}")
    for name, cap in (info.get("passes") or {}).items():
        for item in cap["can"]:
            print(f"  {name}: can {item}")
        for item in cap["cannot"]:
            print(f"  {name}: cannot {item}")
    return 0


def _inspect_diff(args: argparse.Namespace) -> int:
    from . import model_diff

    d = model_diff.diff(model_diff.describe(args.path), model_diff.describe(args.diff))
    if args.eval_text is not None or args.eval_inputs:
        a = model_diff.load_for_eval(args.path)
        b = model_diff.load_for_eval(args.diff)
        batch = model_diff.eval_batch(a, args.eval_text, args.eval_inputs)
        d["layer_error"] = model_diff.layer_output_error(a, b, batch)
        d["eval"] = {"rows": int(batch.shape[0]), "shape": list(batch.shape[1:])}
    if args.html:
        from .html_report import write_html

        write_html(d, args.html)
    print(json.dumps(d, indent=2, default=str) if args.json else model_diff.format_diff(d))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .html_report import load_reports, write_html

    check_output_path("-o", args.output)
    docs = load_reports(args.reports)
    for path, doc in zip(args.reports, docs, strict=True):
        doc.setdefault("label", Path(path).stem)
    write_html(docs[0] if len(docs) == 1 else docs, args.output)
    print(f"wrote {args.output}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generation import Sampling, generate

    sampling = Sampling(
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    out = generate(
        args.model, args.prompt, args.max_new_tokens, sampling=sampling, backend=args.backend
    )
    if args.json:
        print(json.dumps(out.to_json()))
        return 0
    print(args.prompt + (out.text or " ".join(map(str, out.tokens))))
    print(
        f"[qgraph] {len(out.tokens)} tokens ({out.backend}): prompt {out.prompt_tokens} tokens "
        f"in {out.prompt_seconds:.2f}s, decode {out.tokens_per_s:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qgraph", description="Quantize models by graph rewriting.")
    sub = p.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser("run", help="rewrite a model with a pipeline, evaluate and export it")
    run.add_argument(
        "--model",
        default=None,
        help="built-in name (smollm2-135m), .gguf file, HF directory, a .pt2 saved by --save "
        "(the pipeline continues from it), or an .onnx file (with --calib-inputs/--eval-inputs)",
    )
    run.add_argument(
        "--pipeline",
        required=True,
        help="passes to run, e.g. W4A16: 'fuse-norms,rotate{seed=0},quantize{w=int4:channel},gptq'; "
        "W4A4: 'fuse-norms,rotate{seed=0,online=r2+r4},quantize{w=int4:channel,a=int4:token},gptq' "
        "(4-bit activations need the online rotations). Slower and better: append ',qat' to "
        "fine-tune scales and codes on the calibration text; add 'learn-rotations' after "
        "rotate (with online=r4 for W4A16: 1.077x float against 1.098x; benchmarks/README.md). "
        "'qgraph passes' lists every option",
    )
    run.add_argument(
        "--calib-text",
        default=None,
        help="UTF-8 text file for calibration (default: stdlib docstrings)",
    )
    run.add_argument(
        "--eval-text",
        default=None,
        help="UTF-8 text file for evaluation (default: stdlib docstrings)",
    )
    run.add_argument(
        "--calib-inputs",
        default=None,
        help="ONNX models: .npz with one array per model input, named after it, samples stacked "
        "on a new first axis (sample i = arr[i], shaped as one call of the model)",
    )
    run.add_argument(
        "--calib-samples",
        type=_int_range(1),
        default=None,
        help="ONNX models: use only the first N samples of --calib-inputs",
    )
    run.add_argument(
        "--eval-inputs",
        default=None,
        help="ONNX models: .npz like --calib-inputs; the report gives each output's error "
        "against the original model on them (default: the calibration inputs)",
    )
    run.add_argument(
        "--eval-windows", type=_int_range(1), default=8, help="number of evaluation windows (>= 1)"
    )
    run.add_argument(
        "--calib-windows",
        type=_int_range(1),
        default=16,
        help="number of calibration windows (>= 1)",
    )
    run.add_argument(
        "--calib-seed",
        type=_int_range(0),
        default=None,
        help="draw the calibration windows at random from the whole calibration text with this "
        "seed (default: its first windows)",
    )
    run.add_argument(
        "--window",
        type=_int_range(2),
        default=512,
        help="tokens per window (>= 2: a window predicts its tokens after the first)",
    )
    run.add_argument(
        "--export",
        default=None,
        help="write the rewritten model as ONNX and evaluate it in ONNX Runtime; a language "
        "model is written as a decoder with a KV cache, with genai_config.json and its "
        "tokenizer beside it, so onnxruntime_genai.Model(folder) generates with it",
    )
    run.add_argument(
        "--integer-activations",
        action="store_true",
        help="with --export: run per-token int8/int4-quantized layers (symmetric per-channel "
        "weights) as MatMulInteger integer products; measured 1.2-1.6x faster prompt "
        "processing but 0.8-0.9x the decode speed of the default path, and 8-bit weight storage",
    )
    run.add_argument(
        "--standard-ops",
        action="store_true",
        help="with --export of a language model: keep norms, rotary embeddings and attention "
        "as standard opset-21 ops instead of one opset-23 RMSNormalization / RotaryEmbedding / "
        "Attention node each (for runtimes without opset 23; ~1.4x slower decoding in ONNX "
        "Runtime)",
    )
    run.add_argument(
        "--attention",
        choices=("gqa", "standard"),
        default="gqa",
        help="with --export of a language model: 'gqa' (default) lowers attention to ONNX "
        "Runtime's GroupQueryAttention, which writes into a cache buffer that ONNX Runtime GenAI "
        "preallocates and shares between past and present (the fastest decode step); "
        "'standard' to opset-23 Attention, which grows the cache by concatenation and takes "
        "any attention mask",
    )
    run.add_argument(
        "--no-pack-qkv",
        action="store_true",
        help="with --export of a language model and --attention gqa: keep q/k/v as three "
        "quantized layers; by default they run as one MatMulNBits feeding GroupQueryAttention "
        "packed, as the GenAI model builder's files do (the packed node names all three layers "
        "and their columns, for provenance and --trace-layers)",
    )
    run.add_argument("--report", default=None, help="write a JSON report here")
    run.add_argument(
        "--html",
        default=None,
        help="write a self-contained HTML report here: pass log, per-layer error table and "
        "plots, each pass's error per layer and, with --export, the same layers in ONNX Runtime "
        "(implies --trace-layers for every layer)",
    )
    run.add_argument(
        "--trace-layers",
        nargs="?",
        const="",
        default=None,
        metavar="REGEX",
        help="measure each quantized layer (names matching REGEX; all without one) after every "
        "pass and, with --export, in the exported file in ONNX Runtime; flags layers where they "
        "diverge (JSON report: 'layers', 'onnx_trace', passes' 'layer_sqnr_db')",
    )
    run.add_argument(
        "--save", default=None, help="save the rewritten model (.pt2, reload with qgraph.load)"
    )
    run.add_argument(
        "--save-float-weights",
        action="store_true",
        help="with --save: keep the float weights too, so gptq/learn-rounding/split-sparse can "
        "re-solve the saved model later (a larger file)",
    )
    run.add_argument(
        "--verify-each", action="store_true", help="numerically verify every exact pass"
    )
    run.add_argument(
        "--seed",
        type=_int_range(0, _SEED_LIMIT, "2**64"),
        default=None,
        help="seed for passes that take one (unless set in the pipeline)",
    )
    run.add_argument(
        "--workers",
        type=_int_range(1),
        default=1,
        help="split the calibration windows (and each layer's Hessian) over N worker processes "
        "with torch.distributed (gloo), launched here with torchrun; the model equals one "
        "process's. On a cluster run 'torchrun ... -m qgraph.cli run ...' instead",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser(
        "demo", help="run the best recipes on the default model and print a table"
    )
    demo.add_argument("--model", default=None)
    demo.add_argument("--out", default="out", help="directory for the ONNX files and the report")
    demo.add_argument(
        "--eval-windows", type=_int_range(1), default=8, help="number of evaluation windows (>= 1)"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    passes = sub.add_parser("passes", help="list every pass with its options")
    passes.set_defaults(func=_cmd_passes)

    insp = sub.add_parser(
        "inspect", help="ops, parameters, bits per weight and volume of a model or ONNX file"
    )
    insp.add_argument("path", help="model name, .pt2, .onnx, HF folder, .gguf or a JSON report")
    insp.add_argument("--json", action="store_true", help="print the report data as JSON")
    insp.add_argument("--html", default=None, help="also write the report as an HTML page")
    insp.add_argument(
        "--diff",
        default=None,
        metavar="B",
        help="compare PATH (A) with B: totals, operator counts and per-layer formats",
    )
    insp.add_argument(
        "--eval-text",
        nargs="?",
        const="",
        default=None,
        help="with --diff: each layer's output in B against A on 2 windows of this text "
        "(default text without a value)",
    )
    insp.add_argument(
        "--eval-inputs", default=None, help="with --diff: the same on the samples of an .npz"
    )
    insp.set_defaults(func=_cmd_inspect)

    rep = sub.add_parser(
        "report", help="write the HTML page of JSON reports (several runs: side by side)"
    )
    rep.add_argument("reports", nargs="+", help="JSON from run --report, inspect --json, demo")
    rep.add_argument("-o", "--output", required=True, help="the HTML file to write")
    rep.set_defaults(func=_cmd_report)

    gen = sub.add_parser(
        "generate", help="continue a text prompt with a model, in torch or ONNX Runtime GenAI"
    )
    gen.add_argument(
        "--model",
        default=None,
        help="built-in name, HF directory, .gguf, a .pt2 saved by 'qgraph run --save', or "
        "(--backend ort) a folder exported by 'qgraph run --export DIR/model.onnx'",
    )
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=_int_range(1), default=32)
    gen.add_argument("--backend", choices=("torch", "ort"), default="torch")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=_positive_float, default=1.0)
    gen.add_argument("--top-k", type=_int_range(0), default=0, help="0: no top-k cut")
    gen.add_argument("--top-p", type=_positive_float, default=1.0)
    gen.add_argument("--seed", type=_int_range(0, _SEED_LIMIT, "2**64"), default=None)
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(func=_cmd_generate)
    return p


def _debug() -> bool:
    return os.environ.get("QGRAPH_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code: 0 success, 2 usage or qgraph error, 3 internal
    error (no traceback unless ``QGRAPH_DEBUG=1``), 130 interrupted."""
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        print(f"qgraph: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    was_enabled = progress.enabled()
    if getattr(args, "no_progress", False):
        progress.set_enabled(False)
    try:
        return args.func(args)
    except QGraphError as exc:
        print(f"qgraph: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early, e.g. ``qgraph passes | head``
        try:  # keep Python from failing again when it flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except KeyboardInterrupt:
        print("qgraph: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if _debug():
            raise
        print(
            f"qgraph: internal error: {type(exc).__name__}: {exc} "
            "(set QGRAPH_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 3
    finally:
        progress.set_enabled(was_enabled)


if __name__ == "__main__":
    sys.exit(main())
