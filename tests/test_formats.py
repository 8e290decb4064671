"""The quantization formats of qgraph.formats: spec text, stored layout, accounting by hand."""

from __future__ import annotations

import pytest
import torch

from qgraph.errors import PipelineError
from qgraph.formats import (
    ActSpec,
    WeightSpec,
    parse_act_spec,
    parse_weight_spec,
    rtn_quantize,
    sparse_storage_bits,
    storage_group,
    to_storage,
    weight_storage_bits,
)
from qgraph.kernels.quant import dequantize_weight, quantize_weight, weight_qparams


@pytest.mark.parametrize(
    "text, spec",
    [
        ("int4", WeightSpec(4, "channel", None, True)),
        ("int3:tensor:asym", WeightSpec(3, "tensor", None, False)),
        ("INT8:group128", WeightSpec(8, "group", 128, True)),
        (" int2:group7:asym ", WeightSpec(2, "group", 7, False)),
        ("int4:sym:narrow", WeightSpec(4, "channel", None, True, grid="narrow")),
        ("int4:full", WeightSpec(4, "channel", None, True, grid="full")),
    ],
)
def test_weight_spec_text_round_trips(text: str, spec: WeightSpec) -> None:
    assert parse_weight_spec(text) == spec
    assert parse_weight_spec(spec.text()) == spec


@pytest.mark.parametrize(
    "text", ["int9", "int1", "int4:group0", "int4:row", "float8", "", "int4:asym:narrow"]
)
def test_bad_weight_specs(text: str) -> None:
    with pytest.raises(PipelineError, match="weight spec"):
        parse_weight_spec(text)


def test_act_specs() -> None:
    assert parse_act_spec("none") is None
    assert parse_act_spec("int8:token") == ActSpec(8, "token", False)
    assert parse_act_spec("int4:tensor:sym") == ActSpec(4, "tensor", True)
    assert parse_act_spec(ActSpec(4, "tensor", True).text()) == ActSpec(4, "tensor", True)
    with pytest.raises(PipelineError, match="activation spec"):
        parse_act_spec("int4:group32")


def test_storage_group_prefers_blocks_onnx_runtime_fuses() -> None:
    assert storage_group(576, WeightSpec(4)) == 64  # 576 = 9 · 64
    assert storage_group(1536, WeightSpec(4)) == 256
    assert storage_group(40, WeightSpec(4)) == 40  # no power-of-two block divides 40 but 8
    assert storage_group(576, WeightSpec(4, "group", 32)) == 32


@pytest.mark.parametrize(
    "spec",
    [
        WeightSpec(4),
        WeightSpec(3, "group", 16, False),
        WeightSpec(4, "tensor"),
        WeightSpec(8, "group", 12),
        WeightSpec(4, grid="narrow"),
    ],
)
def test_stored_layout_dequantizes_to_the_kernels_weight(spec: WeightSpec) -> None:
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    scale, zero = weight_qparams(
        w,
        spec.bits,
        spec.symmetric,
        spec.granularity,
        spec.group_size,
        full_range=spec.symmetric and spec.grid == "full",
    )
    codes = quantize_weight(w, scale, zero, spec.bits, spec.group_size)
    expected = dequantize_weight(codes, scale, zero, spec.group_size)
    stored = rtn_quantize(w, spec)
    assert stored.codes.shape == (40, 24) and stored.codes.dtype == torch.int8
    rows = stored.scale.repeat_interleave(stored.group, 0)[:40]
    zeros = stored.zero.float().repeat_interleave(stored.group, 0)[:40]
    torch.testing.assert_close((stored.codes.float() - zeros) * rows, expected.T.float())
    again = to_storage(codes, scale, zero, spec)
    assert all(torch.equal(a, b) for a, b in zip(again.tensors(), stored.tensors(), strict=True))


def test_accounting_hand_numbers() -> None:
    # SmolLM2's down_proj: 576 × 1536 int4 per channel, symmetric: codes + 576 float32 scales
    assert weight_storage_bits(1536, 576, WeightSpec(4), 576) == 1536 * 576 * 4 + 576 * 32
    # asymmetric groups of 128 at 3 bits: 12 groups per row, each a scale and a 3-bit zero point
    n = 576 * 12
    assert weight_storage_bits(1536, 576, WeightSpec(3, "group", 128, False), n) == (
        1536 * 576 * 3 + n * 32 + n * 3
    )
    rows = torch.zeros(41, dtype=torch.int16)
    values = torch.zeros(41, dtype=torch.float16)
    assert sparse_storage_bits(rows, rows, values) == 41 * 48
