"""Calibration and evaluation text, token windows, and finiteness checks.

The default text source is the docstrings of the Python standard library: every Python install
has them, so calibration and perplexity runs work offline on a fresh machine, and no third-party
text has to be shipped in the repository. The text differs slightly between Python versions but
is fixed for a given install.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from qgraph.errors import DataError

SPLITS = ("calib", "eval")

# Fixed, disjoint module lists. Only pure-Python modules that exist on Python 3.10-3.13+ and
# import without side effects (no GUI, no network, no printing). Related modules (email.*,
# json.*, ...) stay in one split so that shared boilerplate paragraphs cannot leak across.
_EVAL_MODULES: tuple[str, ...] = (
    "argparse",
    "difflib",
    "email._policybase",
    "email.charset",
    "email.feedparser",
    "email.generator",
    "email.header",
    "email.headerregistry",
    "email.message",
    "email.parser",
    "email.policy",
    "email.utils",
    "http.client",
    "http.cookiejar",
    "http.cookies",
    "http.server",
    "ipaddress",
    "statistics",
    "tarfile",
    "threading",
    "xml.etree.ElementTree",
    "zipfile",
)

_CALIB_MODULES: tuple[str, ...] = (
    "ast",
    "asyncio.base_events",
    "asyncio.events",
    "asyncio.futures",
    "asyncio.locks",
    "asyncio.protocols",
    "asyncio.queues",
    "asyncio.streams",
    "asyncio.tasks",
    "asyncio.transports",
    "collections",
    "collections.abc",
    "concurrent.futures._base",
    "concurrent.futures.process",
    "concurrent.futures.thread",
    "configparser",
    "contextlib",
    "csv",
    "dataclasses",
    "enum",
    "fractions",
    "functools",
    "inspect",
    "json",
    "json.decoder",
    "json.encoder",
    "logging",
    "logging.config",
    "logging.handlers",
    "optparse",
    "pathlib",
    "pickle",
    "queue",
    "random",
    "shutil",
    "smtplib",
    "subprocess",
    "tempfile",
    "textwrap",
    "typing",
    "unittest.case",
    "unittest.loader",
    "unittest.mock",
    "unittest.result",
    "unittest.suite",
    "urllib.parse",
    "urllib.request",
    "uuid",
)

# Paragraphs at least this long that occur in eval text disqualify a calib docstring.
_MIN_SHARED_PARAGRAPH = 40


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _own_docstrings(module: Any) -> Iterator[str]:
    """Yield the module's docstring, then those of the classes, functions and methods it defines.

    Raw ``__doc__`` is used rather than ``inspect.getdoc`` so inherited docstrings are not repeated
    for every subclass; members re-exported from other modules are skipped for the same reason.
    """
    yield getattr(module, "__doc__", None)
    name = module.__name__
    for _, obj in sorted(vars(module).items()):
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) != name:
            continue
        yield obj.__doc__
        if inspect.isclass(obj):
            for _, member in sorted(vars(obj).items()):
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                elif isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member):
                    yield member.__doc__


@functools.cache
def _module_docstrings(modules: tuple[str, ...]) -> tuple[str, ...]:
    """Cleaned, de-duplicated docstrings of ``modules``, modules in sorted order."""
    seen: set[str] = set()
    out: list[str] = []
    with warnings.catch_warnings():
        # Some modules (typing, asyncio) warn about deprecated names on import or attribute access.
        warnings.simplefilter("ignore")
        for mod_name in sorted(modules):
            try:
                module = importlib.import_module(mod_name)
            except ImportError:
                # A stripped-down Python may lack a module; the text just gets shorter.
                continue
            for doc in _own_docstrings(module):
                if not isinstance(doc, str):
                    continue
                doc = inspect.cleandoc(doc).strip()
                if doc and doc not in seen:
                    seen.add(doc)
                    out.append(doc)
    return tuple(out)


def _paragraphs(doc: str) -> list[str]:
    return [p.strip() for p in doc.split("\n\n") if len(p.strip()) >= _MIN_SHARED_PARAGRAPH]


@functools.cache
def stdlib_docstring_text(split: str) -> str:
    """Deterministic English prose from stdlib docstrings; ``split`` is "calib" or "eval".

    The splits come from disjoint module lists, and calib additionally drops every docstring that
    shares a paragraph with eval, so evaluation never measures text the model was calibrated on.
    """
    _check_split(split)
    eval_docs = _module_docstrings(_EVAL_MODULES)
    if split == "eval":
        docs: tuple[str, ...] = eval_docs
    else:
        eval_set = set(eval_docs)
        eval_paras = {p for d in eval_docs for p in _paragraphs(d)}
        docs = tuple(
            d
            for d in _module_docstrings(_CALIB_MODULES)
            if d not in eval_set and not any(p in eval_paras for p in _paragraphs(d))
        )
    return "\n\n".join(docs)


def load_text(source: str | os.PathLike[str] | None, split: str) -> str:
    """Text for ``split`` from ``source``: None or "stdlib" for stdlib docstrings, else a file.

    A file is used as-is for either split; it must be non-empty UTF-8 (a BOM is tolerated).
    """
    _check_split(split)
    if source is None or (isinstance(source, str) and source == "stdlib"):
        return stdlib_docstring_text(split)
    path = Path(source)
    if not path.exists():
        raise DataError(f"text file {str(path)!r} does not exist")
    if path.is_dir():
        raise DataError(f"text file {str(path)!r} is a directory, not a file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"text file {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"text file {str(path)!r} is not valid UTF-8: {exc.reason} at byte {exc.start}"
        ) from exc
    if not text.strip():
        raise DataError(f"text file {str(path)!r} is empty (no non-whitespace text)")
    return text


def _encode(tokenizer: Any, text: str) -> list[int]:
    if callable(tokenizer):
        # verbose=False silences the "sequence length is longer than the specified maximum"
        # warning: the whole text is tokenized once on purpose and cut into windows afterwards.
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    if hasattr(tokenizer, "encode"):
        return list(tokenizer.encode(text))
    raise TypeError(f"tokenizer {type(tokenizer).__name__} is neither callable nor has encode()")


def token_windows(
    tokenizer: Any, text: str, window: int = 512, max_windows: int | None = None
) -> torch.Tensor:
    """Tokenize ``text`` once and cut it into non-overlapping ``window``-token rows.

    Tokenizing the whole text (rather than each window) keeps token boundaries identical to what
    the model sees in running text; the incomplete tail is dropped so every row has equal length.
    Returns a LongTensor ``[n, window]`` with at most ``max_windows`` rows.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    ids = _encode(tokenizer, text)
    n = len(ids) // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise DataError(
            f"text has {len(ids)} tokens but at least {window} are needed for one window of "
            f"{window} tokens"
        )
    return torch.tensor(ids[: n * window], dtype=torch.long).reshape(n, window)


def sample_windows(windows: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` of the rows of ``windows`` drawn without replacement by ``seed``, in text order: a
    different calibration sample of the same text for each seed (the first ``n`` rows are the
    unseeded default)."""
    if not 1 <= n <= len(windows):
        raise DataError(
            f"cannot sample {n} calibration windows from {len(windows)}: the text is too short "
            "for that many windows, give a longer text or ask for fewer"
        )
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return windows[order[:n].sort().values]


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise DataError if ``t`` holds NaN or Inf, so bad inputs fail loudly before they spread."""
    if not (t.is_floating_point() or t.is_complex()):
        return
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(torch.isinf(t).sum())
    first = tuple(int(i) for i in (~finite).nonzero()[0].tolist())
    raise DataError(
        f"tensor {name!r} (shape {tuple(t.shape)}) has {n_nan} NaN and {n_inf} Inf values; "
        f"first non-finite value at index {first}"
    )
