"""Error and range statistics of tensors, as pure functions (float64 sums, no state).

The per-layer report and the per-pass trace measure a layer's output against a float reference
as a signal-to-quantization-noise ratio (SQNR, dB), accumulated over batches as two energies,
and an activation's spread as the ratio of its largest per-channel range to the median one —
the outlier measure that rotations are meant to shrink.
"""

from __future__ import annotations

import math

import torch


def energies(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """``(Σ ref², Σ (out − ref)²)`` in float64: the two sums an SQNR is made of, so that
    batches can be added up before the ratio is taken."""
    ref64 = ref.detach().double()
    return float(ref64.square().sum()), float((out.detach().double() - ref64).square().sum())


def sqnr_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)``: +inf for an exact match, −inf for a zero reference."""
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def tensor_sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """SQNR (dB) of ``out`` against ``ref`` over all elements."""
    return sqnr_db(*energies(ref, out))


def relative_l2(ref: torch.Tensor, out: torch.Tensor) -> float:
    """``‖out − ref‖₂ / ‖ref‖₂`` (0 for an exact match; inf against a zero reference)."""
    signal, noise = energies(ref, out)
    if noise == 0.0:
        return 0.0
    return math.sqrt(noise / signal) if signal > 0 else math.inf


def channel_absmax(x: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
    """max |x| of each channel (float64 ``[channels]``), over every other dim."""
    moved = x.detach().movedim(channel_dim, -1)
    return moved.reshape(-1, moved.shape[-1]).abs().amax(0).double()


def outlier_ratio(absmax: torch.Tensor) -> float:
    """Largest per-channel range over the median one (1 for a flat activation; the massive
    outlier channels of LLM activations give 10–100+). 0 when every channel is zero."""
    median = float(absmax.double().quantile(0.5))  # the mean of the middle two, as numpy
    top = float(absmax.max())
    if median > 0:
        return top / median
    return math.inf if top > 0 else 0.0
