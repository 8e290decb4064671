"""Passes, their typed options, textual pipelines and the instrumented pass manager.

A pipeline is text such as ``fuse-norms,rotate{seed=0},quantize{w=int8:channel,a=int8:token}``
or a list of :class:`Pass` objects. Before anything runs, the manager checks every pass's
``requires`` against the properties the model has and the passes before it provide, so an
invalid order fails at once with a message that says what to add.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import psutil
import torch

from .errors import PipelineError, VerificationError
from .model import Model, PassRecord


@dataclass(frozen=True)
class Option:
    """A typed pass option with its default and help text."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None

    def parse(self, pass_name: str, raw: Any) -> Any:
        value = raw
        if isinstance(raw, str) and self.type is not str:
            text = raw.strip()
            try:
                if self.type is bool:
                    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(text)
                    value = text.lower() in ("true", "1", "yes")
                else:
                    value = self.type(text)
            except ValueError:
                raise PipelineError(
                    f"pass '{pass_name}': option '{self.name}' expects {self.type.__name__}, "
                    f"got {raw!r}"
                ) from None
        elif not isinstance(raw, self.type) or (self.type is int and isinstance(raw, bool)):
            if self.type is float and isinstance(raw, int) and not isinstance(raw, bool):
                value = float(raw)
            else:
                raise PipelineError(
                    f"pass '{pass_name}': option '{self.name}' expects {self.type.__name__}, "
                    f"got {type(raw).__name__} {raw!r}"
                )
        if self.choices is not None and value not in self.choices:
            raise PipelineError(
                f"pass '{pass_name}': option '{self.name}' must be one of "
                f"{', '.join(map(str, self.choices))}; got {value!r}"
            )
        return value


class Pass:
    """Base class of a rewrite. Subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    forbids: ClassVar[frozenset[str]] = frozenset()  # properties after which it may not run
    exact: ClassVar[bool] = False

    def __init__(self, **opts: Any):
        known = {o.name: o for o in self.options}
        self.opts: dict[str, Any] = {o.name: o.default for o in self.options}
        self.explicit: set[str] = set()
        for key, raw in opts.items():
            key = key.replace("_", "-")
            if key not in known:
                raise PipelineError(
                    f"pass '{self.name}' has no option '{key}'; its options are: "
                    f"{', '.join(known) or '(none)'}"
                )
            self.opts[key] = known[key].parse(self.name, raw)
            self.explicit.add(key)
        self.validate()

    def validate(self) -> None:
        """Check option combinations; raise PipelineError naming the pass."""

    def opt(self, key: str) -> Any:
        return self.opts[key]

    def run(self, model: Model) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        inner = ",".join(f"{k}={self.opts[k]}" for k in sorted(self.explicit))
        return f"{self.name}{{{inner}}}" if inner else self.name


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"pass name {cls.name!r} is empty or already registered")
    REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    from . import passes  # noqa: F401  (registers the built-in passes)

    return REGISTRY


_ITEM = re.compile(r"\s*([A-Za-z][\w-]*)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def parse_pipeline(text: str) -> list[Pass]:
    """Parse ``name{key=value,...},name2`` into pass objects, with errors that point at the text."""
    passes = registry()
    if not text or not text.strip():
        raise PipelineError("empty pipeline")
    out: list[Pass] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if m is None or m.end() == pos:
            raise PipelineError(
                f"cannot parse pipeline at character {pos}: {text[pos : pos + 30]!r}"
            )
        name, body = m.group(1), m.group(2)
        if name not in passes:
            close = [p for p in passes if p.split("-")[0] == name.split("-")[0]]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PipelineError(
                f"unknown pass '{name}'{hint}; known passes: {', '.join(sorted(passes))}"
            )
        opts: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in (body or "").split(","))):
            if "=" not in item:
                raise PipelineError(f"pass '{name}': option {item!r} is not of the form key=value")
            key, value = (s.strip() for s in item.split("=", 1))
            opts[key] = value
        out.append(passes[name](**opts))
        pos = m.end()
    return out


def check_order(passes: list[Pass], properties: set[str]) -> None:
    have = set(properties)
    providers = {prop: p.name for p in reversed(list(registry().values())) for prop in p.provides}
    for i, p in enumerate(passes):
        missing = p.requires - have
        if missing:
            need = ", ".join(sorted(missing))
            add = ", ".join(sorted({providers.get(m, "?") for m in missing}))
            raise PipelineError(
                f"pass '{p.name}' (position {i + 1}) requires {need}; add '{add}' before it"
            )
        clash = p.forbids & have
        if clash:
            raise PipelineError(
                f"pass '{p.name}' (position {i + 1}) cannot run once the model is "
                f"{', '.join(sorted(clash))}; move it before the pass that made it so"
            )
        have |= p.provides


class _PeakRss:
    """Samples this process's resident memory in a thread to find a pass's peak."""

    def __init__(self, interval: float = 0.01):
        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def relative_error(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, tuple[int, ...]]:
    """max |out - ref| / max |ref| and the index of the worst element."""
    diff = (out.double() - ref.double()).abs()
    flat = int(diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    scale = float(ref.double().abs().max()) or 1.0
    return float(diff.max()) / scale, index


def _op_histogram(model: Model) -> Counter:
    return Counter(
        str(getattr(n.target, "__name__", n.target))
        for n in model.gm.graph.nodes
        if n.op == "call_function"
    )


class PassManager:
    """Runs passes in order with timing, peak memory, optional verification and diffs."""

    def __init__(
        self,
        passes: list[Pass] | str,
        *,
        verify_each: bool = False,
        verify_tol: float = 1e-4,
        print_after: bool = False,
        stream=None,
    ):
        self.passes = parse_pipeline(passes) if isinstance(passes, str) else list(passes)
        self.verify_each = verify_each
        self.verify_tol = verify_tol
        self.print_after = print_after
        self.stream = stream or sys.stderr

    def run(self, model: Model) -> Model:
        check_order(self.passes, model.properties)
        for p in self.passes:
            self.run_one(p, model)
        return model

    def run_one(self, p: Pass, model: Model) -> PassRecord:
        probe = ref = None
        if self.verify_each:
            probe = model.probe_inputs()
            ref = model(*probe)
        before = _op_histogram(model)
        start = time.perf_counter()
        with _PeakRss() as mem:
            summary = p.run(model) or {}
        seconds = time.perf_counter() - start
        model.invalidate()
        model.properties |= set(p.provides)
        err = None
        if self.verify_each:
            out = model(*probe)
            err, index = relative_error(ref, out)
            if p.exact and err > self.verify_tol:
                raise VerificationError(
                    f"pass '{p.name}' is exact but changed the output: max |Δ|/max|ref| = {err:.3g} "
                    f"> {self.verify_tol:g}; worst element at index {index} "
                    f"(ref {float(ref[index]):.6g}, got {float(out[index]):.6g})"
                )
        after = _op_histogram(model)
        diff = {k: after[k] - before[k] for k in set(before) | set(after) if after[k] != before[k]}
        summary = {**summary, "op_diff": diff}
        record = PassRecord(p.name, dict(p.opts), seconds, mem.peak / 2**20, err, summary)
        model.log.append(record)
        if self.print_after:
            self.stream.write(format_record(record) + "\n")
        return record


def format_record(r: PassRecord) -> str:
    verify = f", verify {r.verify_max_rel_err:.2e}" if r.verify_max_rel_err is not None else ""
    diff = ", ".join(f"{k}{v:+d}" for k, v in sorted(r.summary.get("op_diff", {}).items()))
    notes = {k: v for k, v in r.summary.items() if k != "op_diff"}
    return (
        f"[qgraph] {r.name}: {r.seconds:.2f}s, peak RSS {r.peak_rss_mb:.0f} MB{verify}"
        + (f"\n    ops: {diff}" if diff else "")
        + (f"\n    {notes}" if notes else "")
    )
