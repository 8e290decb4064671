"""What the passes that train on calibration text share (``learn-rotations``, ``qat``): the
checks of their schedule options and of the calibration data they read next-token windows from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from qgraph.errors import DataError, PipelineError
from qgraph.model import Model
from qgraph.pass_manager import Pass
from qgraph.progress import bar


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


def run_schedule(
    p: Pass,
    opt: Any,
    windows: torch.Tensor,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    set_step: Callable[[int, float], None],
) -> None:
    """``iters`` optimizer steps, one calibration window each (cycled), with a progress bar.

    ``set_step(i, decay)`` runs before step ``i`` with the linear decay factor ``1 − i/iters``
    (for the learning rate and anything else on a schedule). A non-finite loss stops the run
    with the step where it happened.
    """
    iters = p.opt("iters")
    progress = bar(total=iters, desc=p.name, unit="step", leave=False)
    for i in range(iters):
        set_step(i, 1 - i / iters)
        opt.zero_grad()
        loss = loss_of(windows[i % len(windows)][None])
        if not torch.isfinite(loss):
            raise DataError(f"{p.name}: the training loss is {float(loss)} at step {i}")
        loss.backward()
        opt.step()
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}")
    progress.close()
