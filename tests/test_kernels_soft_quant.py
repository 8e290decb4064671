"""The QAT estimators against float64 numpy references and their defining properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qgraph.kernels.soft_quant import (
    annealed_sharpness,
    estimate_codes,
    hard_codes,
    sigmoid_round,
    soft_clamp,
    ste_round,
)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def _staircase_ref(x: np.ndarray, t: float, reach: int = 12) -> np.ndarray:
    """The staircase as the sum of *all* sigmoid steps at k + ½ within ``reach`` of x (the
    steps further out are 0 or 1 to float64 precision), counted from a common base."""
    base = np.floor(x)
    k = np.arange(-reach, reach + 1)[:, None]
    steps = _sigmoid(t * (x[None] - (base[None] + k + 0.5)))
    return base - reach + steps.sum(0)  # the steps below x add up to ≈ reach


@pytest.mark.parametrize("t", [4.0, 8.0, 24.0])
def test_sigmoid_round_matches_the_full_staircase(t):
    x = np.linspace(-6.3, 6.3, 2001)
    ref = _staircase_ref(x, t)
    out = sigmoid_round(torch.from_numpy(x), t).numpy()
    # the three kept steps leave out σ(−3t/2)-sized tails on each side
    assert np.abs(out - ref).max() <= 2 * _sigmoid(-1.5 * t) + 1e-12


def test_sigmoid_round_is_continuous_where_the_one_term_form_jumps():
    t, eps = 4.0, 1e-9
    n = torch.tensor([-3.0, 0.0, 2.0], dtype=torch.float64)
    jump = sigmoid_round(n, t) - sigmoid_round(n - eps, t)
    assert float(jump.abs().max()) < 2 * _sigmoid(-1.5 * t) + 1e-6  # ≈ 0.005

    def one_term(x):
        f = torch.floor(x)
        return f + torch.sigmoid(t * (x - f - 0.5))

    one_jump = one_term(n) - one_term(n - eps)
    assert float(one_jump.abs().min()) > 2 * _sigmoid(-t / 2) - 1e-6  # ≈ 0.24


@pytest.mark.parametrize("t", [4.0, 16.0])
def test_sigmoid_round_gradient_at_integers(t):
    x = torch.tensor([-2.0, 0.0, 5.0], dtype=torch.float64, requires_grad=True)
    sigmoid_round(x, t).sum().backward()
    s = _sigmoid(t / 2)
    expected = 2 * t * s * (1 - s) + t * _sigmoid(1.5 * t) * _sigmoid(-1.5 * t)
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-9)


def test_sigmoid_round_tends_to_round_away_from_half_integers():
    x = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    away = (x - torch.floor(x) - 0.5).abs() > 0.1
    err = (sigmoid_round(x, 200.0) - torch.round(x))[away].abs().max()
    assert float(err) < 1e-6


def test_soft_clamp_matches_formula_and_its_limits():
    x = np.linspace(-20, 20, 4001)
    lo, hi, t = -8.0, 7.0, 6.0
    g = lambda v: _sigmoid(t * v)  # noqa: E731
    ref = x * g(x - lo) * g(hi - x) + lo * g(lo - x) + hi * g(x - hi)
    out = soft_clamp(torch.from_numpy(x), lo, hi, t).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-12)
    inside = (x > lo + 3) & (x < hi - 3)
    assert np.abs(out[inside] - x[inside]).max() < 1e-5
    assert np.abs(out[x < lo - 3] - lo).max() < 1e-5
    assert np.abs(out[x > hi + 3] - hi).max() < 1e-5
    # at the bound it is the bound, and still passes gradient
    xb = torch.tensor([hi], dtype=torch.float64, requires_grad=True)
    y = soft_clamp(xb, lo, hi, t)
    y.backward()
    assert abs(y.item() - hi) < 1e-12 and xb.grad.item() > 0.1


def test_ste_round_and_gate():
    x = torch.tensor([-9.7, -3.5, -0.4, 0.6, 2.5, 8.2], dtype=torch.float64, requires_grad=True)
    y = ste_round(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    x.grad = None
    codes = estimate_codes(x, -8, 7, "ste", 1.0)
    assert torch.equal(codes.detach(), torch.tensor([-8.0, -4.0, -0.0, 1.0, 2.0, 7.0]).double())
    codes.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # the clamp is a hard gate


def test_sigmoid_estimator_approaches_hard_codes():
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(4096, generator=gen, dtype=torch.float64) * 6
    hard = hard_codes(c, -8, 7)
    assert float(hard.min()) == -8 and float(hard.max()) == 7
    near = (c - torch.floor(c) - 0.5).abs() < 0.05
    errs = [
        float((estimate_codes(c, -8, 7, "sigmoid", t) - hard)[~near].abs().max())
        for t in (4, 16, 64, 256)
    ]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3, errs
    with pytest.raises(ValueError, match="estimator"):
        estimate_codes(c, -8, 7, "gumbel", 4.0)


def test_annealed_sharpness_is_geometric():
    values = [annealed_sharpness(i, 5, 4.0, 64.0) for i in range(5)]
    np.testing.assert_allclose(values, [4, 8, 16, 32, 64])
    assert annealed_sharpness(0, 1, 4.0, 64.0) == 64.0


def test_sigmoid_estimator_gradient_is_the_composite_one():
    """The memory-saving autograd (recompute in backward) gives the composite's gradient."""
    gen = torch.Generator().manual_seed(1)
    c = (torch.randn(64, 32, generator=gen, dtype=torch.float64) * 5).requires_grad_(True)
    g = torch.randn(64, 32, generator=gen, dtype=torch.float64)
    out = estimate_codes(c, -8, 7, "sigmoid", 6.0)
    (grad,) = torch.autograd.grad(out, c, g)
    x = c.detach().requires_grad_(True)
    ref = sigmoid_round(soft_clamp(x, -8, 7, 6.0), 6.0)
    (grad_ref,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(out.detach(), ref.detach())
    assert torch.allclose(grad, grad_ref, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda v: estimate_codes(v, -8, 7, "sigmoid", 3.0), (c[:4, :4].detach().requires_grad_(),)
    )
