"""Tests of qgraph.kernels.pqi: exactness on quadratics, convergence on a tiny MLP."""

from __future__ import annotations

import pytest
import torch

from qgraph.errors import DataError
from qgraph.kernels.pqi import pqi, quadrature, taylor_first, taylor_second
from qgraph.kernels.quant import fake_quantize_weight

F64 = torch.float64

# --------------------------------------------------------------------------------------
# quadratic: F_b(w) = ½ wᵀA_b w + b_bᵀw on w = vec(W), W [3, 4]; a second parameter v
# enters linearly and is never moved
# --------------------------------------------------------------------------------------

SHAPE = (3, 4)
N = 12


def _spd(gen: torch.Generator, diagonal: bool = False) -> torch.Tensor:
    if diagonal:
        return torch.diag(torch.rand(N, generator=gen, dtype=F64) + 0.5)
    m = torch.randn(N, N, generator=gen, dtype=F64)
    return m @ m.T / N + 0.5 * torch.eye(N, dtype=F64)


def _quadratic_batches(n_batches: int = 3, diagonal: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (_spd(gen, diagonal), torch.randn(N, generator=gen, dtype=F64)) for _ in range(n_batches)
    ]


def _quad_loss(params, batch):
    a, b = batch
    w = params["w"].reshape(-1)
    return 0.5 * w @ a @ w + b @ w + params["v"].sum() * w.sum()


def _quad_setup(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    params = {
        "w": torch.randn(SHAPE, generator=gen, dtype=F64),
        "v": torch.randn(2, generator=gen, dtype=F64),
    }
    deltas = {"w": 0.7 * torch.randn(SHAPE, generator=gen, dtype=F64)}
    return params, deltas


def _mean_ab(batches):
    a = torch.stack([a for a, _ in batches]).mean(0)
    b = torch.stack([b for _, b in batches]).mean(0)
    return a, b


def _hand_gradient(params, batches):
    """∇F(w) of the mean quadratic: Ā w + b̄ + Σv."""
    a, b = _mean_ab(batches)
    w = params["w"].reshape(-1)
    return a @ w + b + params["v"].sum()


def _hand_delta_f(params, deltas, batches) -> float:
    a, _ = _mean_ab(batches)
    d = deltas["w"].reshape(-1)
    return float(_hand_gradient(params, batches) @ d + 0.5 * d @ a @ d)


@pytest.mark.parametrize("n_intervals", [1, 2, 5, 32])
@pytest.mark.parametrize("rule", ["midpoint", "trapezoid"])
def test_pqi_exact_on_quadratic(n_intervals, rule):
    batches = _quadratic_batches()
    params, deltas = _quad_setup()
    res = pqi(_quad_loss, params, deltas, batches, n_intervals, rule)
    expected = _hand_delta_f(params, deltas, batches)
    assert res.total == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert res.actual == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert set(res.sensitivity) == {"w"}
    assert res.sensitivity["w"].shape == SHAPE and res.sensitivity["w"].dtype == F64
    # per weight: ΔF_i = Δw_i · ∂_iF(w + Δw/2) (the integrand is linear in t)
    a, _ = _mean_ab(batches)
    d = deltas["w"].reshape(-1)
    per_weight = d * (_hand_gradient(params, batches) + 0.5 * a @ d)
    torch.testing.assert_close(res.sensitivity["w"].reshape(-1), per_weight, rtol=1e-12, atol=1e-13)
    assert res.param_totals["w"] == pytest.approx(res.total, rel=1e-14)
    assert res.method == f"pqi/{rule}/{n_intervals}"
    assert res.relative_error < 1e-10


def test_taylor_first_hand_math():
    batches = _quadratic_batches()
    params, deltas = _quad_setup()
    res = taylor_first(_quad_loss, params, deltas, batches)
    g = _hand_gradient(params, batches)
    torch.testing.assert_close(res.sensitivity["w"].reshape(-1), g * deltas["w"].reshape(-1))
    assert res.total == pytest.approx(float(g @ deltas["w"].reshape(-1)), rel=1e-12)
    # the missing curvature term is exactly the first-order error on a quadratic
    a, _ = _mean_ab(batches)
    d = deltas["w"].reshape(-1)
    assert res.actual - res.total == pytest.approx(float(0.5 * d @ a @ d), rel=1e-10)


def test_taylor_second_exact_with_diagonal_hessian():
    batches = _quadratic_batches(diagonal=True)
    params, deltas = _quad_setup()
    a, _ = _mean_ab(batches)
    res = taylor_second(
        _quad_loss, params, deltas, batches, hessian_diag={"w": a.diagonal().reshape(SHAPE)}
    )
    assert res.method == "taylor2/hessian"
    assert res.total == pytest.approx(_hand_delta_f(params, deltas, batches), rel=1e-12)
    assert res.total == pytest.approx(res.actual, rel=1e-12)


def test_taylor_second_fisher_hand_math():
    batches = _quadratic_batches()
    params, deltas = _quad_setup()
    res = taylor_second(_quad_loss, params, deltas, batches)
    w = params["w"].reshape(-1)
    grads = torch.stack([a @ w + b + params["v"].sum() for a, b in batches])
    fisher = grads.square().mean(0)
    d = deltas["w"].reshape(-1)
    expected = grads.mean(0) * d + 0.5 * fisher * d.square()
    assert res.method == "taylor2/fisher"
    torch.testing.assert_close(res.sensitivity["w"].reshape(-1), expected)


# --------------------------------------------------------------------------------------
# non-quadratic: a tiny 2-layer tanh MLP with cross-entropy, both weights quantized to 2 bits
# --------------------------------------------------------------------------------------

IN, HID, CLASSES, BATCH = 6, 10, 4, 16


def _mlp_setup(dtype=F64, n_batches: int = 4):
    gen = torch.Generator().manual_seed(7)
    params = {
        "w1": torch.randn(HID, IN, generator=gen, dtype=F64) * 0.8,
        "b1": torch.randn(HID, generator=gen, dtype=F64) * 0.1,
        "w2": torch.randn(CLASSES, HID, generator=gen, dtype=F64) * 0.8,
    }
    params = {k: v.to(dtype) for k, v in params.items()}
    deltas = {
        n: fake_quantize_weight(params[n], 2, True, "tensor") - params[n] for n in ("w1", "w2")
    }
    batches = [
        (
            torch.randn(BATCH, IN, generator=gen, dtype=F64).to(dtype),
            torch.randint(0, CLASSES, (BATCH,), generator=gen),
        )
        for _ in range(n_batches)
    ]
    return params, deltas, batches


def _mlp_loss(params, batch):
    x, y = batch
    h = torch.tanh(x @ params["w1"].T + params["b1"])
    return torch.nn.functional.cross_entropy(h @ params["w2"].T, y)


def test_pqi_converges_on_mlp():
    params, deltas, batches = _mlp_setup()
    ns = [1, 2, 4, 8, 16, 32]
    results = [pqi(_mlp_loss, params, deltas, batches, n) for n in ns]
    actual = results[0].actual
    assert abs(actual) > 1e-2  # a real, non-infinitesimal step
    errors = [abs(r.total - actual) for r in results]
    assert errors[-1] < 1e-2 * errors[0]
    assert errors[-1] < 2e-4 * abs(actual)
    # monotone once the rule resolves the curvature (N = 1 and 2 may swap), and the
    # midpoint rule's O(1/N²): halving the step divides the error by about 4
    for coarse, fine in zip(errors[1:], errors[2:], strict=False):
        assert fine < coarse
    assert 3.0 < errors[-2] / errors[-1] < 5.0
    for r in results:
        assert r.actual == actual  # same batches, same actual ΔF
        per = {n: float(s.sum()) for n, s in r.sensitivity.items()}
        assert sum(per.values()) == pytest.approx(r.total, rel=1e-12)
        assert per == pytest.approx(r.param_totals, rel=1e-12)
    # both rules agree in the limit; the Taylor estimates do not have to
    trap = pqi(_mlp_loss, params, deltas, batches, 32, "trapezoid")
    assert trap.total == pytest.approx(actual, rel=1e-3)


def test_batch_average_equals_gradient_of_mean_loss():
    """Equal batches, mean-reduced loss: averaging over 4 batches == one concatenated batch."""
    params, deltas, batches = _mlp_setup()
    whole = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    for fn in (taylor_first, lambda *a: pqi(*a, n_intervals=3)):
        split, joined = fn(_mlp_loss, params, deltas, batches), fn(_mlp_loss, params, deltas, whole)
        for n in deltas:
            torch.testing.assert_close(split.sensitivity[n], joined.sensitivity[n])
        assert split.actual == pytest.approx(joined.actual, rel=1e-10)


def test_float32_params_accumulate_in_float32_and_float64_option():
    params, deltas, batches = _mlp_setup(dtype=torch.float32)
    res32 = pqi(_mlp_loss, params, deltas, batches, 4)
    res64 = pqi(_mlp_loss, params, deltas, batches, 4, accum_dtype=F64)
    assert res32.sensitivity["w1"].dtype == torch.float32
    assert res64.sensitivity["w1"].dtype == F64
    assert res32.total == pytest.approx(res64.total, rel=1e-4)
    # inputs are never modified and carry no gradient afterwards
    assert all(p.grad is None and not p.requires_grad for p in params.values())


def test_unmoved_parameters_and_no_grad_context():
    params, deltas, batches = _mlp_setup()
    with torch.no_grad():
        res = pqi(_mlp_loss, params, {"w2": deltas["w2"]}, batches, 2, compute_actual=False)
    assert set(res.sensitivity) == {"w2"}
    assert res.actual is None and res.base_loss is None and res.relative_error is None


def test_quadrature_rules():
    assert quadrature("midpoint", 2) == [(0.25, 0.5), (0.75, 0.5)]
    assert quadrature("trapezoid", 2) == [(0.0, 0.25), (0.5, 0.5), (1.0, 0.25)]
    for rule in ("midpoint", "trapezoid"):
        assert sum(w for _, w in quadrature(rule, 7)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        quadrature("simpson", 4)
    with pytest.raises(ValueError):
        quadrature("midpoint", 0)


def test_bad_inputs():
    params, deltas, batches = _mlp_setup()
    with pytest.raises(ValueError):
        pqi(_mlp_loss, params, {}, batches, 2)
    with pytest.raises(ValueError):
        pqi(_mlp_loss, params, {"nope": deltas["w1"]}, batches, 2)
    with pytest.raises(ValueError):
        pqi(_mlp_loss, params, {"w1": deltas["w2"]}, batches, 2)
    with pytest.raises(DataError):
        pqi(_mlp_loss, params, deltas, [], 2)
    with pytest.raises(DataError):
        pqi(_mlp_loss, params, {"w1": deltas["w1"] * float("nan")}, batches, 2)
    with pytest.raises(DataError):
        pqi(lambda p, b: _mlp_loss(p, b) * float("inf"), params, deltas, batches, 2)
    with pytest.raises(ValueError):
        pqi(lambda p, b: p["w1"].sum(0), params, deltas, batches, 2)
    with pytest.raises(ValueError):
        taylor_second(_mlp_loss, params, deltas, batches, hessian_diag={"w1": deltas["w1"]})
