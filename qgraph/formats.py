"""Quantization formats: what a quantized layer stores and how it is counted.

The weight and activation specs, the stored layout of ``qgraph::qlinear`` (codes ``[in, out]``,
scales and zero points ``[ceil(in / group), out]``) and the storage accounting live here, beside
the op that consumes them, so that every pass, saving and both backends read one definition.
Pure data and tensor functions; nothing here knows about graphs.

Weight spec text: ``int<b>[:channel|:tensor|:group<g>][:sym|:asym][:full|:narrow]`` (default
channel, sym, full). The symmetric grid is full range (scale amax / 2^(b-1), all 2^b codes) unless
``:narrow`` asks for amax / (2^(b-1) - 1), which leaves the most negative code unused.
Activation spec text: ``none``, ``int<b>:token[:sym|:asym]`` (dynamic per token, default asym)
or ``int<b>:tensor[:sym|:asym]`` (static per tensor, calibrated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from .errors import PipelineError
from .kernels import quant as qk

__all__ = [
    "CLIPS",
    "GRIDS",
    "ActSpec",
    "StoredWeight",
    "WeightSpec",
    "choose_grid",
    "fake_quantize",
    "parse_act_spec",
    "parse_weight_spec",
    "rtn_quantize",
    "sparse_storage_bits",
    "storage_group",
    "to_storage",
    "weight_storage_bits",
]

_SPEC = re.compile(r"^int([2-8])((?::[a-z0-9]+)*)$")

#: Bits of one stored scale (float32) in the accounting.
SCALE_BITS = 32
#: How a weight grid is chosen: the full min/max range (none), or per row/group the clip ratio
#: of least error: plain weight MSE (mse), or weighted per input column by the mean square of
#: the layer's input on calibration data (output: the layer's output error, diagonal approx.).
CLIPS = ("none", "mse", "output")
#: Symmetric weight grids: amax / 2^(b-1) over all codes, or amax / (2^(b-1) - 1).
GRIDS = ("full", "narrow")


@dataclass(frozen=True)
class WeightSpec:
    """A uniform weight quantizer: the arguments of :func:`qgraph.kernels.quant.weight_qparams`."""

    bits: int
    granularity: str = "channel"  # tensor | channel | group
    group_size: int | None = None
    symmetric: bool = True
    clip_ratio: float = 1.0  # < 1 shrinks the min/max range (kernels that search clipping)
    grid: str = "full"  # symmetric grids only: full (amax / 2^(b-1)) | narrow (amax / qmax)

    def __post_init__(self) -> None:
        qk.qrange(self.bits)
        if self.granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"unknown granularity {self.granularity!r}")
        if self.granularity == "group" and not (self.group_size and self.group_size > 0):
            raise ValueError(
                f"granularity 'group' needs a positive group_size, got {self.group_size}"
            )
        if self.grid not in GRIDS:
            raise ValueError(f"unknown grid {self.grid!r}; use one of {', '.join(GRIDS)}")
        if not self.symmetric and self.grid != "full":
            raise ValueError("a narrow grid is a symmetric-only choice (asym uses all codes)")

    def quantizer_args(self) -> tuple:
        """(bits, symmetric, granularity, group_size, clip_ratio, full_range): the positional
        arguments the kernels' ``weight_qparams`` / ``fake_quantize_weight`` take after ``w``."""
        return (
            self.bits,
            self.symmetric,
            self.granularity,
            self.group_size,
            self.clip_ratio,
            self.full_range,
        )

    @property
    def full_range(self) -> bool:
        """What the kernels' ``full_range`` argument must be for this spec."""
        return self.symmetric and self.grid == "full"

    @property
    def ragged_group_size(self) -> int | None:
        """``group_size`` as the kernels take it (None unless grouped)."""
        return self.group_size if self.granularity == "group" else None

    def with_bits(self, bits: int) -> WeightSpec:
        return replace(self, bits=bits)

    def text(self) -> str:
        """The spec as written in a pipeline (parse_weight_spec(spec.text()) == spec)."""
        gran = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        sym = f"sym:{self.grid}" if self.symmetric else "asym"
        return f"int{self.bits}:{gran}:{sym}"


@dataclass(frozen=True)
class ActSpec:
    """An activation quantizer: dynamic per token or static per tensor."""

    bits: int
    mode: str  # token | tensor
    symmetric: bool

    def text(self) -> str:
        return f"int{self.bits}:{self.mode}:{'sym' if self.symmetric else 'asym'}"


def parse_weight_spec(text: str) -> WeightSpec:
    m = _SPEC.match(text.strip().lower())
    if not m:
        raise PipelineError(
            f"weight spec {text!r} is not "
            "int<2-8>[:channel|:tensor|:group<g>][:sym|:asym][:full|:narrow]"
        )
    bits, gran, group, sym, grid = int(m.group(1)), "channel", None, True, "full"
    for part in filter(None, m.group(2).split(":")):
        if part in ("channel", "tensor"):
            gran = part
        elif part.startswith("group") and part[5:].isdigit() and int(part[5:]) > 0:
            gran, group = "group", int(part[5:])
        elif part in ("sym", "asym"):
            sym = part == "sym"
        elif part in GRIDS:
            grid = part
        else:
            raise PipelineError(f"unknown part {part!r} in weight spec {text!r}")
    if not sym and grid == "narrow":
        raise PipelineError(
            f"weight spec {text!r}: :narrow applies to symmetric grids only "
            "(asymmetric grids always use all codes)"
        )
    return WeightSpec(bits, gran, group, sym, grid=grid)


def parse_act_spec(text: str) -> ActSpec | None:
    if text.strip().lower() in ("none", "", "float"):
        return None
    m = _SPEC.match(text.strip().lower())
    if not m:
        raise PipelineError(
            f"activation spec {text!r} is not none or int<2-8>:token|tensor[:sym|:asym]"
        )
    bits, mode, sym = int(m.group(1)), "token", False
    for part in filter(None, m.group(2).split(":")):
        if part in ("token", "tensor"):
            mode = part
        elif part in ("sym", "asym"):
            sym = part == "sym"
        else:
            raise PipelineError(f"unknown part {part!r} in activation spec {text!r}")
    return ActSpec(bits, mode, sym)


# -- stored layout ------------------------------------------------------------------------


def storage_group(in_features: int, spec: WeightSpec) -> int:
    """Rows of ``[in, out]`` codes that share one scale row in the stored form.

    Per-channel/per-tensor scales are stored as identical blocks of a power-of-two size (16–256)
    when the input size allows, so that ONNX Runtime can fuse ``DequantizeLinear → MatMul``
    into ``MatMulNBits``; this is the same function, only a different layout.
    """
    if spec.granularity == "group":
        return spec.group_size
    for block in (256, 128, 64, 32, 16):
        if in_features % block == 0:
            return block
    return in_features


@dataclass(frozen=True)
class StoredWeight:
    """A weight as ``qgraph::qlinear`` stores it."""

    codes: torch.Tensor  # int8 [in, out]
    scale: torch.Tensor  # float32 [ceil(in / group), out]
    zero: torch.Tensor  # int8, same shape as scale
    group: int  # rows of codes per scale row
    n_scales: int  # distinct scales the quantizer defines (what the accounting counts)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.codes, self.scale, self.zero


def to_storage(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: WeightSpec
) -> StoredWeight:
    """From the kernels' layout (codes ``[out, in]``, scale/zero ``[out or 1, G]``) to the stored
    layout (codes ``[in, out]``, scale/zero ``[ceil(in / group), out]``)."""
    out_f, in_f = codes.shape
    group = storage_group(in_f, spec)
    n_scales = scale.numel() if spec.granularity != "tensor" else 1
    reps = -(-in_f // group)  # a ragged last group is allowed (ONNX blocks use ceil too)
    scale_kn = scale.expand(out_f, -1).T
    zero_kn = zero.expand(out_f, -1).T
    if scale_kn.shape[0] != reps:
        scale_kn = scale_kn.repeat_interleave(reps // scale_kn.shape[0], 0)
        zero_kn = zero_kn.repeat_interleave(reps // zero_kn.shape[0], 0)
    return StoredWeight(
        codes.T.contiguous(),
        scale_kn.contiguous().float(),
        zero_kn.contiguous().to(torch.int8),
        group,
        n_scales,
    )


def choose_grid(
    w: torch.Tensor,
    spec: WeightSpec,
    clip: str = "none",
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of ``w [out, in]`` on ``spec``'s grid, in the kernels' layout.

    The one place where a spec becomes a grid, so RTN, GPTQ's reference, learned rounding,
    mixed precision and the split agree. ``clip="mse"`` searches a clip ratio per row/group
    (:func:`qgraph.kernels.gptq.mse_clip_search`); ``clip="output"`` weighs each input
    column's error by ``importance`` (the mean square of the layer's input per column).
    """
    if clip not in CLIPS:
        raise PipelineError(f"clip must be one of {', '.join(CLIPS)}; got {clip!r}")
    if clip == "output" and importance is None:
        raise ValueError("clip='output' needs the importance of each input column")
    if clip != "none":
        from .kernels.gptq import mse_clip_search

        return mse_clip_search(
            w,
            spec.bits,
            spec.symmetric,
            spec.granularity,
            spec.group_size,
            full_range=spec.full_range,
            importance=importance if clip == "output" else None,
        )
    return qk.weight_qparams(w, *spec.quantizer_args())


def rtn_quantize(
    w: torch.Tensor,
    spec: WeightSpec,
    clip: str = "none",
    importance: torch.Tensor | None = None,
) -> StoredWeight:
    """Round-to-nearest ``w [out, in]`` on the grid :func:`choose_grid` picks."""
    wf = w.float()
    scale, zero = choose_grid(wf, spec, clip, importance)
    codes = qk.quantize_weight(wf, scale, zero, spec.bits, spec.ragged_group_size)
    return to_storage(codes, scale, zero, spec)


def fake_quantize(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """The weight a layer quantized round-to-nearest on ``spec`` computes with, in w's dtype."""
    return qk.fake_quantize_weight(w, *spec.quantizer_args())


# -- accounting ---------------------------------------------------------------------------


def weight_storage_bits(
    in_features: int, out_features: int, spec: WeightSpec, n_scales: int
) -> int:
    """Codes at their width plus the distinct scales (float32) and, when asymmetric, the zero
    points at the code width. Scales replicated only to suit ONNX Runtime's blocked kernels are
    not counted twice."""
    bits = in_features * out_features * spec.bits + n_scales * SCALE_BITS
    if not spec.symmetric:
        bits += n_scales * spec.bits
    return bits


def sparse_storage_bits(*tensors: torch.Tensor) -> int:
    """A sparse side branch as stored: its values and row/column indices at their dtypes' widths."""
    return sum(t.numel() * t.element_size() * 8 for t in tensors)
