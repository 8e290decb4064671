"""Which layers a pass touches: one selector for every pass.

A layer is matched by its label ``"<layer-name> <role>"`` (e.g. ``"model.layers.3.mlp.down_proj
mlp_out"``) against a regex to include (``all`` = every layer) and one to exclude (empty =
none). Passes declare the two options with :func:`selector_options` and build the selector
with :meth:`LayerSelector.from_pass`, so the syntax, defaults and errors are the same
everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .errors import PipelineError


def selector_options(exclude: str = "lm_head", what: str = "layers") -> tuple[Any, Any]:
    """The ``layers`` and ``exclude`` options of a pass (``Option`` objects)."""
    from .pass_manager import Option

    return (
        Option(
            "layers",
            str,
            "all",
            f"regex searched in '<layer-name> <role>' selecting {what} (all: every one); quote "
            "it if it contains , { or }",
        ),
        Option(
            "exclude",
            str,
            exclude,
            f"regex searched in '<layer-name> <role>' of {what} to leave alone (empty: none)",
        ),
    )


@dataclass(frozen=True)
class LayerSelector:
    include: str = "all"
    exclude: str = ""
    _inc: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)
    _exc: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key, pattern, attr in (
            ("layers", self.include, "_inc"),
            ("exclude", self.exclude, "_exc"),
        ):
            if (key == "layers" and pattern == "all") or not pattern:
                continue
            try:
                object.__setattr__(self, attr, re.compile(pattern))
            except re.error as exc:
                raise PipelineError(
                    f"option {key}={pattern!r} is not a valid regex: {exc}"
                ) from None

    @classmethod
    def from_pass(cls, p: Any) -> LayerSelector:
        """The selector of a pass that declared :func:`selector_options`."""
        try:
            return cls(p.opt("layers"), p.opt("exclude"))
        except PipelineError as exc:
            raise PipelineError(f"pass '{p.name}': {exc}") from None

    def matches(self, name: str, role: str = "") -> bool:
        label = f"{name} {role}"
        if self._inc is not None and not self._inc.search(label):
            return False
        return not (self._exc is not None and self._exc.search(label))

    def select(self, items: list, name=lambda x: x.name, role=lambda x: x.role) -> list:
        """The items whose (name, role) match, in their order."""
        return [x for x in items if self.matches(name(x), role(x))]

    @property
    def is_everything(self) -> bool:
        return self._inc is None and self._exc is None

    def describe(self) -> str:
        parts = [f"layers={self.include!r}"]
        if self.exclude:
            parts.append(f"exclude={self.exclude!r}")
        return ", ".join(parts)
