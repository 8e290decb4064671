"""What the passes that train on calibration text share (``learn-rotations``, ``qat``): the
checks of their schedule options and of the calibration data they read next-token windows from.
"""

from __future__ import annotations

import torch

from qgraph.errors import DataError, PipelineError
from qgraph.model import Model
from qgraph.pass_manager import Pass


def validate_schedule(p: Pass) -> None:
    """``iters`` and ``calib-windows`` ≥ 1, ``length`` 0 (whole window) or ≥ 2, ``lr`` > 0."""
    for key in ("iters", "calib-windows"):
        if p.opt(key) < 1:
            raise PipelineError(f"{p.name}: {key} must be >= 1, got {p.opt(key)}")
    if p.opt("length") < 0 or p.opt("length") == 1:
        raise PipelineError(
            f"{p.name}: length must be 0 (whole window) or >= 2, got {p.opt('length')}"
        )
    if not p.opt("lr") > 0:
        raise PipelineError(f"{p.name}: lr must be positive, got {p.opt('lr')}")


def check_token_calibration(p: Pass, model: Model, purpose: str) -> None:
    """Refuse a model without calibration text (token windows), saying what it is for."""
    if model.calibration is None or model.calibration.dtype != torch.long:
        raise DataError(
            f"{p.name}: needs calibration text (token windows) for its {purpose} "
            "(Model.set_calibration or --calib-text)"
        )
