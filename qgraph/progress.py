"""The process-wide progress-bar switch and the one way qgraph makes a progress bar.

``qgraph run --no-progress`` turns the switch off; every bar made with :func:`bar` is then
disabled. With the switch on, a bar keeps tqdm's automatic behaviour (``disable=None``: shown only
when stderr is a terminal) unless the caller passes ``disable`` itself.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

_enabled = True


def set_enabled(on: bool) -> None:
    """Turn every progress bar made by :func:`bar` on (the default) or off."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    """Whether progress bars are allowed in this process."""
    return _enabled


def bar(iterable: Iterable[Any] | None = None, **tqdm_kwargs: Any) -> tqdm:
    """A ``tqdm`` over ``iterable`` (or a manual one, with ``total=``) writing to stderr.

    Disabled when the switch is off; otherwise ``disable`` defaults to ``None`` (tqdm's automatic
    choice), and a caller's ``disable=True`` still hides it.
    """
    if not _enabled:
        tqdm_kwargs["disable"] = True
    else:
        tqdm_kwargs.setdefault("disable", None)
    tqdm_kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, **tqdm_kwargs)
