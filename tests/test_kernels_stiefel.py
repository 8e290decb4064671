"""Cayley SGD on the orthogonal group: steps stay orthogonal, descend, and converge."""

from __future__ import annotations

import pytest
import torch

from qgraph.kernels.stiefel import CayleySGD, cayley_step, skew_gradient


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q


def test_skew_gradient_is_skew_symmetric():
    x, g = _orthogonal(12, 0), torch.randn(12, 12, dtype=torch.float64)
    a = skew_gradient(x, g)
    torch.testing.assert_close(a, -a.T)


@pytest.mark.parametrize("step", [1e-3, 0.5, 10.0])
def test_cayley_step_stays_orthogonal(step):
    x = _orthogonal(16, 1)
    a = skew_gradient(x, torch.randn(16, 16, dtype=torch.float64))
    y = cayley_step(x, a, step)
    torch.testing.assert_close(y.T @ y, torch.eye(16, dtype=torch.float64), atol=1e-12, rtol=0)


def test_cayley_step_descends_to_first_order():
    """f(X) = <C, X>: a small step changes f by -step/2 ‖A‖² (the generator's descent rate)."""
    x = _orthogonal(10, 2)
    c = torch.randn(10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a = skew_gradient(x, c)  # ∇f = C
    step = 1e-6
    change = float((c * (cayley_step(x, a, step) - x)).sum())
    expected = -step / 2 * float((a * a).sum())
    assert change == pytest.approx(expected, rel=1e-4)


def test_cayley_sgd_finds_a_target_rotation():
    """min ‖X − T‖² over orthogonal X has its minimum at X = T (distance 0)."""
    target = _orthogonal(8, 4).float()
    if torch.det(target) < 0:  # Cayley steps from I stay in SO(n), the rotations
        target[:, 0] = -target[:, 0]
    x = torch.eye(8, requires_grad=True)
    opt = CayleySGD([x], lr=0.2, momentum=0.5)
    start = float((x - target).norm())
    for i in range(300):
        opt.lr = 0.2 * (1 - i / 300) + 1e-3
        opt.zero_grad()
        ((x - target) ** 2).sum().backward()
        opt.step()
    torch.testing.assert_close(x.detach().T @ x.detach(), torch.eye(8), atol=1e-5, rtol=0)
    assert float((x.detach() - target).norm()) < 0.05 * start


def test_cayley_sgd_rejects_bad_settings():
    with pytest.raises(ValueError, match="lr"):
        CayleySGD([torch.eye(2)], lr=0)
    with pytest.raises(ValueError, match="momentum"):
        CayleySGD([torch.eye(2)], lr=1, momentum=1.0)
    with pytest.raises(ValueError, match="square"):
        cayley_step(torch.eye(2), torch.zeros(3, 3), 1.0)
