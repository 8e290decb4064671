"""Passes, their typed options, textual pipelines and the instrumented pass manager.

A pipeline is text such as ``fuse-norms,rotate{seed=0},quantize{w=int8:channel,a=int8:token}``
or a list of :class:`Pass` objects. Before anything runs, the manager checks every pass's
``requires`` against the properties the model has and the passes before it provide, so an
invalid order fails at once with a message that says what to add.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import psutil
import torch

from .errors import PassError, PipelineError, QGraphError, VerificationError
from .graph_edits import forget_erased_nodes
from .memory import trim
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
    #: analyses (names in qgraph.model.ANALYSES) still valid after the pass; the rest are dropped
    preserves: ClassVar[frozenset[str]] = frozenset()
    exact: ClassVar[bool] = False
    #: chooses every selected layer's grid and codes again from the float weights (gptq,
    #: learn-rounding), so a pass right before it may leave a cheap placeholder grid
    resolves_grids: ClassVar[bool] = False

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

    def check(self, model: Model) -> None:
        """Refuse, before anything runs, a model this pass cannot work on (raise a QGraphError
        that says what to do). Facts the pipeline order cannot tell (calibration data, ...)."""

    def run(self, model: Model) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        inner = ",".join(f"{k}={format_value(self.opts[k])}" for k in sorted(self.explicit))
        return f"{self.name}{{{inner}}}" if inner else self.name


def format_value(value: Any) -> str:
    """An option value as pipeline text, quoted when it holds , { } or quotes."""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if not re.search(r"[,{}'\"\s]", text):
        return text
    return f"'{text}'" if "'" not in text else f'"{text}"'


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"pass name {cls.name!r} is empty or already registered")
    REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    from . import passes  # noqa: F401  (registers the built-in passes)

    return REGISTRY


_NAME = re.compile(r"[A-Za-z][\w-]*")
_KEY = re.compile(r"[A-Za-z][\w-]*")


class _Scanner:
    """Reads pipeline text: ``name{key=value,key='quoted, {value}'},name2``."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def error(self, what: str) -> PipelineError:
        snippet = self.text[self.pos : self.pos + 30]
        return PipelineError(
            f"cannot parse pipeline at character {self.pos}: {what} (at {snippet!r})"
        )

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def word(self, pattern: re.Pattern, what: str) -> str:
        self.skip()
        m = pattern.match(self.text, self.pos)
        if m is None:
            raise self.error(f"expected {what}")
        self.pos = m.end()
        return m.group(0)

    def value(self, pass_name: str, key: str) -> str:
        self.skip()
        quote = self.peek()
        if quote in ("'", '"'):
            end = self.text.find(quote, self.pos + 1)
            if end < 0:
                raise self.error(f"pass '{pass_name}': option '{key}' has an unterminated {quote}")
            value = self.text[self.pos + 1 : end]
            self.pos = end + 1
            return value
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ",{}":
            self.pos += 1
        if self.peek() == "{":
            raise self.error(
                f"pass '{pass_name}': option '{key}' contains '{{'; quote a value holding , {{ or }}"
                f", e.g. {key}='{self.text[start : start + 12]}...'"
            )
        return self.text[start : self.pos].strip()

    def options(self, pass_name: str) -> dict[str, str]:
        opts: dict[str, str] = {}
        self.pos += 1  # the opening brace
        self.skip()
        if self.peek() == "}":
            self.pos += 1
            return opts
        while True:
            key = self.word(_KEY, f"an option name of pass '{pass_name}'")
            self.skip()
            if self.peek() != "=":
                raise self.error(f"pass '{pass_name}': option '{key}' is not of the form key=value")
            self.pos += 1
            if key in opts:
                raise PipelineError(f"pass '{pass_name}': option '{key}' is given twice")
            opts[key] = self.value(pass_name, key)
            self.skip()
            sep = self.peek()
            self.pos += 1
            if sep == "}":
                return opts
            if sep != ",":
                self.pos -= 1
                raise self.error(f"pass '{pass_name}': expected ',' or '}}' after option '{key}'")


def parse_pipeline(text: str) -> list[Pass]:
    r"""Parse ``name{key=value,...},name2`` into pass objects, with errors that point at the text.

    A value holding ``,``, ``{`` or ``}`` (a regex such as ``layers\.(0|1)\.`` or ``{2,3}``) is
    written in single or double quotes; the quoted text is taken literally.
    """
    passes = registry()
    if not text or not text.strip():
        raise PipelineError("empty pipeline")
    scan = _Scanner(text.strip())
    out: list[Pass] = []
    while True:
        name = scan.word(_NAME, "a pass name")
        if name not in passes:
            close = [p for p in passes if p.split("-")[0] == name.split("-")[0]]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PipelineError(
                f"unknown pass '{name}'{hint}; known passes: {', '.join(sorted(passes))}"
            )
        scan.skip()
        opts = scan.options(name) if scan.peek() == "{" else {}
        out.append(passes[name](**opts))
        scan.skip()
        if not scan.peek():
            return out
        if scan.peek() != ",":
            raise scan.error(f"expected ',' after pass '{name}'")
        scan.pos += 1


#: Missing property -> (the property that makes "add X before it" the wrong advice, what to do).
PROPERTY_HINTS = {
    "float-weights": (
        "quantized",
        "the float weights it re-solves from are not in this model (a model saved without "
        "them): save with qgraph.save(model, path, float_weights=True) or "
        "'qgraph run --save-float-weights', or start again from the float model",
    ),
}


def check_order(passes: list[Pass], properties: set[str]) -> None:
    have = set(properties)
    providers = {prop: p.name for p in reversed(list(registry().values())) for prop in p.provides}
    for i, p in enumerate(passes):
        missing = p.requires - have
        hinted = [
            m for m in sorted(missing) if m in PROPERTY_HINTS and PROPERTY_HINTS[m][0] in have
        ]
        if hinted:
            raise PipelineError(
                f"pass '{p.name}' (position {i + 1}) requires {hinted[0]}: "
                f"{PROPERTY_HINTS[hinted[0]][1]}"
            )
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
        trace=None,
    ):
        """``trace``: a :class:`~qgraph.layer_trace.PassTrace` that records, after each pass, the
        model's output error and each quantized layer's error into the pass's summary."""
        self.passes = parse_pipeline(passes) if isinstance(passes, str) else list(passes)
        self.trace = trace
        self.verify_each = verify_each
        self.verify_tol = verify_tol
        self.print_after = print_after
        self.stream = stream or sys.stderr

    def run(self, model: Model) -> Model:
        check_order(self.passes, model.properties)
        if self.trace is not None:
            self.trace.start(model)
        for i, p in enumerate(self.passes):
            token = _NEXT.set(self.passes[i + 1] if i + 1 < len(self.passes) else None)
            last = _LAST.set(i + 1 == len(self.passes))
            try:
                self.run_one(p, model)
            finally:
                _NEXT.reset(token)
                _LAST.reset(last)
        return model

    def run_one(self, p: Pass, model: Model, parent: str | None = None) -> PassRecord:
        """Run one pass with instrumentation; its record goes to ``model.log``.

        Any exception escaping the pass becomes a :class:`~qgraph.errors.QGraphError` that names
        the pass and, when the pass said which layer it was working on (:func:`working_on`), the
        layer. After the pass every analysis it does not declare in ``preserves`` is dropped.
        """
        p.check(model)
        probe = ref = None
        if self.verify_each:
            probe = model.probe_inputs()
            ref = model(*probe)
        before = _op_histogram(model)
        signatures = _signatures(model.gm)
        start = time.perf_counter()
        token = _MANAGER.set(self)
        try:
            with _PeakRss() as mem, _failures_named(p.name):
                summary = p.run(model) or {}
        finally:
            _MANAGER.reset(token)
            # the nodes the pass erased, and the tensors in their meta, are freed only once
            # the graph's name table lets go of them (graph_edits.forget_erased_nodes)
            forget_erased_nodes(model.gm.graph)
            # the pass's freed temporaries go back to the system, not a fragmented heap; a
            # model of real size also has the cycles of its dropped graph nodes collected (a
            # full collection costs ~0.3 s, too much to pay after every pass on small models)
            trim(collect=_tensor_bytes(model) >= COLLECT_MIN_BYTES)
        seconds = time.perf_counter() - start
        preserved = model.cached_analyses()
        model.invalidate(p.preserves)
        model.properties |= set(p.provides)
        err = None
        if self.verify_each:
            self._check_preserved(p, model, preserved)
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
        summary_nodes = tag_provenance(model, p.name, signatures)
        if summary_nodes:
            summary = {**summary, "nodes_made_or_changed": summary_nodes}
        summary = {**summary, "op_diff": diff}
        if self.trace is not None:
            summary.update(self.trace.after_pass(model))
        record = PassRecord(p.name, dict(p.opts), seconds, mem.peak / 2**20, err, summary, parent)
        model.log.append(record)
        if self.print_after:
            self.stream.write(format_record(record) + "\n")
        return record

    @staticmethod
    def _check_preserved(p: Pass, model: Model, before: dict[str, Any]) -> None:
        """A pass that claims to preserve an analysis must leave it as a fresh one computes it."""
        from .model import ANALYSES

        for name in p.preserves & set(before):
            cached = before[name]
            if not hasattr(cached, "fingerprint"):
                continue
            if cached.fingerprint() != ANALYSES[name](model).fingerprint():
                raise VerificationError(
                    f"pass '{p.name}' declares that it preserves the analysis '{name}' but "
                    "changed it; remove it from the pass's preserves"
                )


#: models at least this large (their tensors) get a garbage collection after each pass
COLLECT_MIN_BYTES = 64 * 2**20


def _tensor_bytes(model: Model) -> int:
    gm = model.gm
    return sum(t.nbytes for t in (*gm.parameters(), *gm.buffers()))


def _signatures(gm) -> dict[Any, tuple]:
    """What each call node computes from: its target and its inputs (attribute names for
    constants), to tell after a pass which nodes it made or changed."""
    from .graph_edits import get_tensor

    def key(a):
        if hasattr(a, "op"):  # a constant by name and tensor (a rebound weight is a change);
            if a.op == "get_attr":  # a computed input only by position, so a node whose input
                return a.target, id(get_tensor(gm, a.target))  # was replaced is not "changed"
            return "·"
        if isinstance(a, (list, tuple)):
            return tuple(key(x) for x in a)
        return a

    return {
        node: (node.target, *(key(a) for a in node.args))
        for node in gm.graph.nodes
        if node.op == "call_function"
    }


def tag_provenance(model: Model, pass_name: str, before: dict[Any, tuple]) -> int:
    """Record in ``node.meta["qgraph"]`` (pass list, layer) every call node the pass made or
    changed; the ONNX export copies it into the file's node metadata. Returns how many."""
    from .structure import weight_name

    after = _signatures(model.gm)
    changed = [n for n, sig in after.items() if before.get(n) != sig]
    if not changed:
        return 0
    layers = {r.codes_attr: r.name for r in model.quant.values()}
    layers.update({r.sparse.values_attr: r.name for r in model.quant.values() if r.sparse})
    sv = model.structure
    by_node = {lin.node: lin.name for lin in sv.linears + sv.convs}
    for node in changed:
        info = node.meta.setdefault("qgraph", {"passes": [], "layer": None})
        info["passes"].append(pass_name)
        if info["layer"] is None:
            info["layer"] = _layer_of(node, layers, by_node, weight_name)
    return len(changed)


def _layer_of(node, layers: dict[str, str], by_node: dict, weight_name) -> str | None:
    """The layer a node belongs to: its own (a linear layer, or a quantized one by its codes),
    else that of its first reader (an online rotation or quantizer in front of a layer)."""
    for candidate in (node, *list(node.users)[:1]):
        if candidate in by_node:
            return by_node[candidate]
        for a in candidate.args:
            if hasattr(a, "op") and a.op == "get_attr":
                if a.target in layers:
                    return layers[a.target]
                if not a.target.startswith("qg_"):
                    return weight_name(a.target)
    return None


_MANAGER: contextvars.ContextVar[PassManager | None] = contextvars.ContextVar(
    "qgraph_manager", default=None
)
_LAYER: contextvars.ContextVar[str | None] = contextvars.ContextVar("qgraph_layer", default=None)
_NEXT: contextvars.ContextVar[Pass | None] = contextvars.ContextVar("qgraph_next", default=None)
_LAST: contextvars.ContextVar[bool] = contextvars.ContextVar("qgraph_last", default=False)


def is_last_pass() -> bool:
    """True while the last pass of a pipeline runs (not nested, not a lone ``run_one``)."""
    return _LAST.get()


def measures_each_pass() -> bool:
    """True when the running manager measures the model after each pass (``--trace-layers``,
    ``--verify-each``): a pass must then leave a complete model, not placeholders for the next."""
    manager = _MANAGER.get()
    return manager is not None and (manager.trace is not None or manager.verify_each)


def next_pass() -> Pass | None:
    """The pass the running pipeline runs after the current one (None when it is the last, runs
    alone, or runs nested inside another pass)."""
    return _NEXT.get()


def run_nested(p: Pass, model: Model, parent: Pass) -> PassRecord:
    """Run ``p`` from inside ``parent``'s run through the active pass manager, so it gets a log
    record (marked with its parent), an op diff and verification like any other pass."""
    manager = _MANAGER.get() or PassManager([])
    token, last = _NEXT.set(None), _LAST.set(False)
    try:
        return manager.run_one(p, model, parent=parent.name)
    finally:
        _NEXT.reset(token)
        _LAST.reset(last)


@contextlib.contextmanager
def working_on(layer: str) -> Iterator[None]:
    """Say which layer the running pass is working on, for error messages."""
    token = _LAYER.set(layer)
    try:
        yield
    except Exception as exc:
        if getattr(exc, "qgraph_layer", None) is None:
            exc.qgraph_layer = layer  # the innermost layer, read once the stack has unwound
        raise
    finally:
        _LAYER.reset(token)


@contextlib.contextmanager
def _failures_named(pass_name: str) -> Iterator[None]:
    try:
        yield
    except QGraphError as exc:
        layer = getattr(exc, "qgraph_layer", None)
        if layer and layer not in str(exc):
            exc.args = (f"{exc} (pass '{pass_name}', layer {layer})", *exc.args[1:])
        raise
    except Exception as exc:
        layer = getattr(exc, "qgraph_layer", None)
        where = f"pass '{pass_name}'" + (f" at layer {layer}" if layer else "")
        raise PassError(
            f"{where} failed: {type(exc).__name__}: {exc}. The model was left part-rewritten; "
            "start again from the model before the pipeline"
        ) from exc


def format_record(r: PassRecord, width: int = 110) -> str:
    """A few lines for people: time, memory, verification, op diff and the scalar notes of the
    summary. Tables and per-layer details (dicts, lists) stay in the log and the JSON report."""
    verify = f", verify {r.verify_max_rel_err:.2e}" if r.verify_max_rel_err is not None else ""
    if "output_sqnr_db" in r.summary:  # the trace's figure for the whole model (PassTrace)
        db = r.summary["output_sqnr_db"]
        verify += ", output SQNR " + ("exact" if db is None else f"{db:.1f} dB")
    nested = f" (in {r.parent})" if r.parent else ""
    diff = ", ".join(f"{k}{v:+d}" for k, v in sorted(r.summary.get("op_diff", {}).items()))
    notes, hidden = [], 0
    for key, value in r.summary.items():
        if key in ("op_diff", "output_sqnr_db"):
            continue
        if isinstance(value, (dict, list, tuple, set)):
            hidden += 1
        elif isinstance(value, float):
            notes.append(f"{key} {value:.4g}")
        elif value is not None:
            notes.append(f"{key} {value}")
    line = ", ".join(notes)
    if len(line) > width:
        line = line[: width - 3].rsplit(", ", 1)[0] + ", ..."
    if hidden:
        line += ("; " if line else "") + "details in the report"
    return (
        f"[qgraph] {r.name}{nested}: {r.seconds:.2f}s, peak RSS {r.peak_rss_mb:.0f} MB{verify}"
        + (f"\n    ops: {diff}" if diff else "")
        + (f"\n    {line}" if line else "")
    )
