"""mixed-precision: the allocation (a pure function) and the pass on a tiny model."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import tiny_llama, tokens, traced_copy

import qgraph
from qgraph.passes.mixed_precision import allocate_bits

QLINEAR = torch.ops.qgraph.qlinear.default


def model_loss(sens, bits, b_min):
    return sum(s * 4.0 ** (b_min - b) for s, b in zip(sens, bits, strict=True))


def test_allocation_respects_budget_and_orders_by_sensitivity():
    sizes = [100] * 6
    sens = [5.0, 0.1, 3.0, 0.01, 1.0, 0.5]
    bits = allocate_bits(sizes, sens, [3, 4, 8], budget=4.5)
    assert sum(n * b for n, b in zip(sizes, bits, strict=True)) <= 4.5 * sum(sizes)
    for i, j in itertools.permutations(range(6), 2):
        if sens[i] > sens[j]:
            assert bits[i] >= bits[j]
    assert allocate_bits(sizes, sens, [3, 4, 8], budget=3.0) == [3] * 6
    assert allocate_bits(sizes, sens, [3, 4, 8], budget=8.0) == [8] * 6
    with pytest.raises(qgraph.PipelineError):
        allocate_bits(sizes, sens, [3, 4, 8], budget=2.5)


def test_allocation_matches_the_exhaustive_optimum():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        sizes = torch.randint(1, 5, (5,), generator=gen).mul(64).tolist()
        sens = torch.rand(5, generator=gen).pow(3).tolist()
        budget = 3.0 + 2.0 * float(torch.rand(1, generator=gen))
        greedy = allocate_bits(sizes, sens, [3, 4, 8], budget)
        best = min(
            model_loss(sens, combo, 3)
            for combo in itertools.product([3, 4, 8], repeat=5)
            if sum(n * b for n, b in zip(sizes, combo, strict=True)) <= budget * sum(sizes)
        )
        assert sum(n * b for n, b in zip(sizes, greedy, strict=True)) <= budget * sum(sizes)
        assert model_loss(sens, greedy, 3) <= best * (1 + 1e-9) + 1e-15


def test_pass_allocates_and_quantizes_each_layer_at_its_width(llama96):
    hf = llama96
    model = traced_copy(hf)
    model.set_calibration(tokens(256, 4, 64, seed=1))
    qgraph.run_pipeline(model, "mixed-precision{budget=4.5,choices=3+4+8},gptq")
    summary = next(r for r in model.log if r.name == "mixed-precision").summary
    assert summary["average_bits"] <= 4.5
    allocation = summary["allocation"]
    assert len(allocation) == 14
    top_name, _, top_bits = summary["most_sensitive"][0]
    assert top_bits == max(allocation.values())
    seen = 0
    for layer in model.quantized:
        assert layer.node.target is QLINEAR
        assert layer.node.args[6] == layer.record.weight.bits == allocation[layer.name]
        seen += 1
    assert seen == 14
    linear_sizes = [
        m.weight.numel() for name, m in hf.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    ]  # fmt: skip
    assert model.accounting()["quantized_params"] == sum(linear_sizes)


def test_default_widths_and_budget_below_them():
    """The default widths are 4 and 8; a budget below the narrowest width is refused."""
    hf = tiny_llama(layers=1, tied=False, max_positions=2048)  # was built unseeded
    model = traced_copy(hf)
    model.set_calibration(tokens(256, 2, 32, seed=3))
    qgraph.run_pipeline(model, "mixed-precision{budget=5}")
    summary = next(r for r in model.log if r.name == "mixed-precision").summary
    assert set(summary["allocation"].values()) <= {4, 8}
    assert 4.0 < summary["average_bits"] <= 5.0
    with pytest.raises(qgraph.PipelineError, match="below the smallest width 4"):
        qgraph.run_pipeline(traced_copy(hf), "mixed-precision{budget=3.5}")
