"""Errors qgraph raises. Each says what is wrong and where (pass, node, tensor, file)."""

from __future__ import annotations


class QGraphError(Exception):
    """Base class of every error qgraph raises on purpose."""


class PipelineError(QGraphError):
    """A pipeline text or pass configuration is invalid (unknown pass/option, bad type, order)."""


class TraceError(QGraphError):
    """A model could not be traced to a graph."""


class ModelFileError(QGraphError):
    """A model file is missing, unreadable, truncated or of an unknown format."""


class PassError(QGraphError):
    """A pass failed on this model; the message names the pass and, where known, the layer."""


class StructureError(QGraphError):
    """The graph has a structure a pass cannot rewrite safely."""


class VerificationError(QGraphError):
    """An exact pass changed the function beyond tolerance."""


class DataError(QGraphError):
    """Calibration/evaluation data or weights are invalid (NaN, too short, wrong shape)."""


class NoHadamardError(QGraphError, ValueError):
    """No Hadamard matrix of the requested order is known to qgraph."""


class ExportError(QGraphError):
    """A model could not be exported or the exported file does not run."""
