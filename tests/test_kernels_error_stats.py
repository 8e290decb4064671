"""The error and range statistics against numpy float64 formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qgraph.kernels.error_stats import (
    channel_absmax,
    energies,
    outlier_ratio,
    relative_l2,
    sqnr_db,
    tensor_sqnr_db,
)


def test_sqnr_and_relative_l2_match_numpy():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 7, 11, generator=gen)
    out = ref + 0.05 * torch.randn(3, 7, 11, generator=gen)
    r, o = ref.numpy().astype(np.float64), out.numpy().astype(np.float64)
    expected = 10 * np.log10((r**2).sum() / ((o - r) ** 2).sum())
    assert tensor_sqnr_db(ref, out) == pytest.approx(expected, rel=1e-12)
    assert relative_l2(ref, out) == pytest.approx(
        np.linalg.norm(o - r) / np.linalg.norm(r), rel=1e-12
    )
    # energies add up over batches: the SQNR of the halves' sums is the SQNR of the whole
    s1, n1 = energies(ref[:1], out[:1])
    s2, n2 = energies(ref[1:], out[1:])
    assert sqnr_db(s1 + s2, n1 + n2) == pytest.approx(expected, rel=1e-12)


def test_sqnr_edge_cases():
    x = torch.ones(4)
    assert tensor_sqnr_db(x, x) == math.inf
    assert relative_l2(x, x) == 0.0
    assert tensor_sqnr_db(torch.zeros(4), x) == -math.inf
    assert relative_l2(torch.zeros(4), x) == math.inf


def test_channel_absmax_and_outlier_ratio():
    x = torch.tensor([[[1.0, -2.0, 0.5, 0.25]], [[-3.0, 1.0, 0.5, 40.0]]])  # [2, 1, 4]
    amax = channel_absmax(x)
    assert amax.tolist() == [3.0, 2.0, 0.5, 40.0]
    assert outlier_ratio(amax) == pytest.approx(40.0 / float(np.median([3.0, 2.0, 0.5, 40.0])))
    nchw = torch.zeros(2, 3, 4, 4)
    nchw[:, 1] = -5.0
    assert channel_absmax(nchw, 1).tolist() == [0.0, 5.0, 0.0]
    assert outlier_ratio(torch.zeros(3)) == 0.0
    assert outlier_ratio(torch.tensor([0.0, 0.0, 1.0])) == math.inf
