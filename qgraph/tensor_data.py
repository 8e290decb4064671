"""Calibration and evaluation data for models that are not language models, and the error of a
rewritten model's outputs against the original.

Input files are ``.npz`` archives with one array per model input, named after it, the samples
stacked on a new leading axis: sample ``i`` is ``arr[i]``, shaped exactly as one call of the
model (so an image model called on ``[1, 3, H, W]`` takes ``arr`` of ``[N, 1, 3, H, W]``).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

__all__ = ["output_error", "read_inputs", "run_samples", "stack_samples"]


def read_inputs(
    path: str | os.PathLike, names: Sequence[str], dtypes: Sequence[torch.dtype] | None = None
) -> list[torch.Tensor]:
    """The arrays of ``path`` for the model inputs ``names`` (each ``[samples, *call shape]``),
    checked: every input present, nothing unknown, one sample count, finite floats."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such input file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from None
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        raise DataError(
            f"{path}: arrays must be named after the model inputs ({', '.join(names)}); "
            f"missing: {', '.join(missing) or '-'}; unknown: {', '.join(extra) or '-'}"
        )
    counts = {n: arrays[n].shape[0] if arrays[n].ndim else 0 for n in names}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise DataError(
            f"{path}: every array needs the same number (>= 1) of samples on its first axis; "
            f"got {counts}"
        )
    out = []
    for i, name in enumerate(names):
        array = arrays[name]
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise DataError(f"{path}: input {name!r} has {bad} NaN/inf value(s)")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if dtypes is not None and tensor.dtype != dtypes[i]:
            if tensor.is_floating_point() != dtypes[i].is_floating_point:
                raise DataError(
                    f"{path}: input {name!r} is {array.dtype}, the model takes {dtypes[i]}"
                )
            tensor = tensor.to(dtypes[i])
        out.append(tensor)
    return out


def stack_samples(samples: torch.Tensor) -> torch.Tensor:
    """Samples ``[N, B, ...]`` of a single-input model as one calibration batch ``[N·B, ...]``:
    qgraph calibrates one row of it at a time, which for a model whose batch rows do not
    interact (every eval-mode CNN) sees exactly the values of the N calls."""
    if samples.dim() < 2:
        raise DataError(f"samples must be [N, batch, ...], got shape {tuple(samples.shape)}")
    return samples.reshape(-1, *samples.shape[2:])


def run_samples(
    forward: Callable[..., object], samples: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Call ``forward`` on each sample (``arr[i]`` of every input) and concatenate each output
    over the samples along a new leading axis."""
    per_output: list[list[torch.Tensor]] = []
    for i in range(samples[0].shape[0]):
        outs = forward(*(s[i] for s in samples))
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        if not per_output:
            per_output = [[] for _ in outs]
        for acc, value in zip(per_output, outs, strict=True):
            acc.append(torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value))
    return [torch.stack(v) for v in per_output]


def output_error(reference: torch.Tensor, output: torch.Tensor) -> dict[str, float]:
    """Max abs error, relative L2 error ``‖y - r‖ / ‖r‖`` and SQNR ``10 log10(‖r‖² / ‖y - r‖²)``
    in dB (``inf`` when equal), computed in float64."""
    r, y = reference.double(), output.double()
    if r.shape != y.shape:
        raise DataError(
            f"output shape {tuple(y.shape)} differs from the reference {tuple(r.shape)}"
        )
    noise = (y - r).square().sum().item()
    signal = r.square().sum().item()
    return {
        "max_abs": (y - r).abs().max().item() if r.numel() else 0.0,
        "rel_l2": (noise**0.5) / (signal**0.5) if signal > 0 else float("inf"),
        "sqnr_db": 10 * np.log10(signal / noise) if noise > 0 else float("inf"),
    }
