"""Command line: ``qgraph run``, ``qgraph demo``, ``qgraph passes``, ``qgraph inspect``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import QGraphError


def _cmd_run(args: argparse.Namespace) -> int:
    from .pass_manager import check_order, parse_pipeline
    from .workflow import Job, float_row, format_table, write_json

    check_order(parse_pipeline(args.pipeline), set())  # fail before the slow loading
    for out in (args.export, args.report, args.save):
        if out and not Path(out).resolve().parent.is_dir():
            raise QGraphError(f"output directory of {out} does not exist")
    job = Job(
        args.model,
        args.calib_text,
        args.eval_text,
        args.eval_windows,
        args.calib_windows,
        args.window,
        progress=not args.no_progress,
    )
    report = job.run(
        args.pipeline,
        export=args.export,
        save=args.save,
        verify_each=args.verify_each,
        seed=args.seed,
    )
    print(format_table([float_row(report), {**report, "label": "rewritten"}]))
    if args.report:
        write_json(args.report, report)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .workflow import RECIPES, Job, float_row, format_table, log, write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    job = Job(args.model, eval_windows=args.eval_windows, progress=not args.no_progress)
    rows = []
    for label, pipeline in RECIPES.items():
        log(f"recipe {label}: {pipeline}")
        report = job.run(pipeline, export=out / f"{job.lm.name}-{label}.onnx", verify_each=True)
        rows.append({**report, "label": label})
    table = format_table([float_row(rows[0]), *rows])
    print(table)
    write_json(out / "demo-report.json", {"rows": rows, "table": table})
    log(f"report written to {out / 'demo-report.json'}")
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
        print(f"{name}  [{'; '.join(flags)}]")
        print(f"    {cls.help}")
        for o in cls.options:
            choices = f" one of {', '.join(map(str, o.choices))}" if o.choices else ""
            print(f"    {o.name}: {o.type.__name__} = {o.default!r}{choices} — {o.help}")
        print()
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect_model import inspect_model

    info = inspect_model(args.path)
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qgraph", description="Quantize models by graph rewriting.")
    sub = p.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser("run", help="rewrite a model with a pipeline, evaluate and export it")
    run.add_argument(
        "--model", default=None, help="built-in name (smollm2-135m), .gguf file or HF directory"
    )
    run.add_argument(
        "--pipeline",
        required=True,
        help="e.g. 'fuse-norms,rotate{seed=0},quantize{w=int4:channel}'",
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
        "--eval-windows", type=int, default=8, help="number of 512-token evaluation windows"
    )
    run.add_argument("--calib-windows", type=int, default=16, help="number of calibration windows")
    run.add_argument("--window", type=int, default=512, help="tokens per window")
    run.add_argument(
        "--export",
        default=None,
        help="write the rewritten model as ONNX and evaluate it in ONNX Runtime",
    )
    run.add_argument("--report", default=None, help="write a JSON report here")
    run.add_argument(
        "--save", default=None, help="save the rewritten model (.pt2, reload with qgraph.load)"
    )
    run.add_argument(
        "--verify-each", action="store_true", help="numerically verify every exact pass"
    )
    run.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for passes that take one (unless set in the pipeline)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser(
        "demo", help="run the best recipes on the default model and print a table"
    )
    demo.add_argument("--model", default=None)
    demo.add_argument("--out", default="out")
    demo.add_argument("--eval-windows", type=int, default=8)
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_cmd_demo)

    passes = sub.add_parser("passes", help="list every pass with its options")
    passes.set_defaults(func=_cmd_passes)

    insp = sub.add_parser(
        "inspect", help="ops, parameters, bits per weight and volume of a model or ONNX file"
    )
    insp.add_argument("path")
    insp.add_argument("--json", action="store_true")
    insp.set_defaults(func=_cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QGraphError as exc:
        print(f"qgraph: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
