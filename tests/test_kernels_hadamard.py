"""Tests of qgraph.kernels.hadamard against independent references.

References used here: a separately written predicate for the known orders, the closed
form of Sylvester matrices H[j, l] = (-1)^popcount(j & l), exact integer Gram matrices
in numpy, and numpy float64 matrix products for the fast transform.
"""

from __future__ import annotations

import functools
import math
import time

import numpy as np
import pytest
import torch

from qgraph.errors import NoHadamardError
from qgraph.kernels import hadamard as had

# --------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------

_LIMIT = 4096
_GS_T = {23, 29, 39, 43}  # Goethals-Seidel base sequences stored in the module


def _is_prime_power(q: int) -> bool:
    if q < 2:
        return False
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)  # smallest prime factor
    while q % p == 0:
        q //= p
    return q == 1


@functools.cache
def _ref_known(k: int) -> bool:
    """Order buildable from Sylvester 1/2, Paley I/II, the GS table or a Kronecker product."""
    if k in (1, 2):
        return True
    if k < 1 or k % 4:
        return False
    if _is_prime_power(k - 1) and (k - 1) % 4 == 3:
        return True
    if _is_prime_power(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return True
    if k // 4 in _GS_T:
        return True
    return any(k % a == 0 and _ref_known(a) and _ref_known(k // a) for a in range(2, k // 2 + 1))


def _ref_factorization(n: int) -> tuple[int, int] | None:
    if n < 1:
        return None
    ok = [(n // 2**j, 2**j) for j in range(n.bit_length()) if n % 2**j == 0]
    ok = [(k, m) for k, m in ok if _ref_known(k)]
    return min(ok) if ok else None


def _sylvester_ref(m: int) -> np.ndarray:
    idx = np.arange(m)
    parity = np.bitwise_count(np.bitwise_and(idx[:, None], idx[None, :])) & 1
    return 1 - 2 * parity.astype(np.int64)


def _assert_hadamard(h: np.ndarray) -> None:
    n = h.shape[0]
    assert h.shape == (n, n)
    assert np.all(np.abs(h) == 1)
    hf = torch.from_numpy(h.astype(np.float32))  # integer sums <= 2^24: exact, BLAS-fast
    assert torch.equal(hf @ hf.T, n * torch.eye(n))


@pytest.fixture(autouse=True)
def _one_thread():
    """Run these memory-bound checks single-threaded: on a busy 2-core machine two
    intra-op threads mostly wait for each other, making the tests several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------
# Factorization
# --------------------------------------------------------------------------------------


def test_factorization_matches_reference_for_all_small_n():
    for n in range(1, _LIMIT + 1):
        assert had.hadamard_factorization(n) == _ref_factorization(n), n
        assert had.is_hadamard_size(n) == (_ref_factorization(n) is not None), n


def test_known_base_orders_matches_reference():
    assert had.known_base_orders(_LIMIT) == [k for k in range(1, _LIMIT + 1) if _ref_known(k)]
    primitive = had.known_base_orders(200, primitive=True)
    assert primitive == [
        1, 12, 20, 28, 36, 44, 52, 60, 68, 76, 84, 92, 100,
        108, 116, 124, 132, 140, 148, 156, 164, 172, 180, 196,
    ]  # fmt: skip
    for k in primitive:
        assert had.hadamard_factorization(k) == (k, 1)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, (1, 1)),
        (2, (1, 2)),
        (4096, (1, 4096)),
        (12, (12, 1)),
        (24, (12, 2)),
        (40, (20, 2)),
        (576, (36, 16)),
        (1536, (12, 128)),
        (5120, (20, 256)),
        (13824, (108, 128)),
        (14336, (28, 512)),
        (18432, (36, 512)),
    ],
)
def test_factorization_of_common_sizes(n, expected):
    assert had.hadamard_factorization(n) == expected


def test_factorization_accepts_integer_likes_only():
    assert had.hadamard_factorization(np.int64(576)) == (36, 16)
    assert had.hadamard_factorization(torch.tensor(12)) == (12, 1)
    assert had.hadamard_factorization(12.0) is None
    assert had.hadamard_factorization(True) is None
    assert had.hadamard_matrix(np.int64(12)).shape == (12, 12)


def test_required_orders_are_supported():
    for k in (12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172):
        assert had.is_hadamard_size(k)


def test_impossible_orders():
    # n = 2 (mod 4), n > 2, and odd n > 1 admit no Hadamard matrix at all.
    for n in list(range(6, 3000, 4)) + list(range(3, 3000, 2)) + [0, -4]:
        assert had.hadamard_factorization(n) is None, n
        assert not had.is_hadamard_size(n)


def test_factorization_is_fast_up_to_100000():
    start = time.perf_counter()
    for n in range(99_000, 100_001):
        had.hadamard_factorization(n)
    had.hadamard_factorization(2**20 * 3 * 7)
    assert time.perf_counter() - start < 5.0


# --------------------------------------------------------------------------------------
# Matrices
# --------------------------------------------------------------------------------------


def test_sylvester_matches_closed_form():
    for m in (1, 2, 4, 8, 64, 256):
        h = had.hadamard_matrix(m)
        assert h.dtype == torch.float64
        np.testing.assert_array_equal(h.numpy(), _sylvester_ref(m))


@functools.cache
def _checked_hadamard(key: bytes, n: int) -> bool:
    _assert_hadamard(np.frombuffer(key, dtype=np.float64).reshape(n, n))
    return True


def _check_order(n: int) -> None:
    """H is +-1 with HH^T = nI, proven as H == A (x) S_b with A Hadamard, S_b Sylvester.

    (A (x) S)(A (x) S)^T = (AA^T) (x) (SS^T) = nI, so only the small A needs a Gram
    matrix; H itself is compared block by block against the closed-form Sylvester S.
    """
    k, m = _ref_factorization(n)
    h = had.hadamard_matrix(n)
    assert h.dtype == torch.float64 and h.shape == (n, n)
    if m == 1:
        _assert_hadamard(h.numpy())
        return
    b = min(m, 512)
    a = h[::b, ::b].contiguous()  # top-left entry of every Sylvester block is +1
    s = torch.from_numpy(_sylvester_ref(b)).double()
    blocks = h.view(n // b, b, n // b, b)
    step = max(1, 2**22 // (n * b))  # compare ~32 MiB of blocks at a time
    for i in range(0, n // b, step):
        expected = a[i : i + step, None, :, None] * s[None, :, None, :]
        assert torch.equal(blocks[i : i + step], expected), (n, i)
    _checked_hadamard(a.numpy().tobytes(), n // b)


def test_all_small_orders_are_hadamard():
    """Every supported n <= 2048 whose base order K is at most 512. The sizes with a
    larger K (169; a Paley matrix of order n, or twice one) would take ~20 s of Gram
    matrices, so they are sampled below."""
    count = 0
    for n in range(1, 2049):
        fact = _ref_factorization(n)
        if fact is not None and fact[0] <= 512:
            _check_order(n)
            count += 1
    assert count == 211


@pytest.mark.parametrize(
    "n",
    [
        1020,  # Paley I, q = 1019
        1164,  # Paley I, q = 1163
        1260,  # Paley I, q = 1259
        1404,  # Paley II, q = 701
        1296,  # 2 * Paley I (q = 647)
        1448,  # 2 * Paley II (q = 361 = 19^2)
        1996,  # Paley II, q = 997
        2044,  # Paley II, q = 1021
    ],
)
def test_large_base_orders_are_hadamard(n):
    fact = _ref_factorization(n)
    assert fact is not None and fact[0] > 512
    _check_order(n)


def test_product_only_base_order_1904():
    """1904 = 28 * 68 has no direct construction: check H == H_28 (x) H_68 factor by factor."""
    assert had.hadamard_factorization(1904) == (1904, 1)
    h = had.hadamard_matrix(1904).numpy()
    a = h[::68, ::68]
    b = h[:68, :68] * a[0, 0]
    _assert_hadamard(a)
    _assert_hadamard(b)
    np.testing.assert_array_equal(h, np.kron(a, b))


@pytest.mark.parametrize("n", [576, 1536, 4096, 5120, 8192, 13824, 14336])
def test_model_sizes_are_hadamard(n):
    _check_order(n)


def test_full_gram_for_model_size_576():
    _assert_hadamard(had.hadamard_matrix(576).numpy())


def test_paley_base_matrices_directly():
    """Each Paley construction with q < 200, including all prime powers, checked directly."""
    seen = 0
    for q in range(3, 200, 2):
        if not _is_prime_power(q):
            continue
        h = had._paley1(q) if q % 4 == 3 else had._paley2(q)
        assert h.shape[0] == (q + 1 if q % 4 == 3 else 2 * (q + 1))
        _assert_hadamard(h)
        seen += 1
    assert seen > 40


@pytest.mark.parametrize("q", [9, 25, 27, 49, 81, 121, 125, 243, 343, 729])
def test_paley_over_extension_fields(q):
    chi = had._quadratic_character(*had._prime_power(q))
    assert chi[0] == 0 and np.sum(chi == 1) == (q - 1) // 2 and np.sum(chi == -1) == (q - 1) // 2
    _assert_hadamard(had._paley1(q) if q % 4 == 3 else had._paley2(q))


@pytest.mark.parametrize("t", sorted(_GS_T))
def test_goethals_seidel_sequences(t):
    seqs = [np.array([1 if c == "+" else -1 for c in s]) for s in had._GS_SEQUENCES[t]]
    assert all(len(s) == t for s in seqs)
    paf = sum(np.array([np.dot(s, np.roll(s, -shift)) for shift in range(1, t)]) for s in seqs)
    np.testing.assert_array_equal(paf, 0)
    _assert_hadamard(had.hadamard_matrix(4 * t).numpy())


def test_hadamard_matrix_returns_fresh_tensor():
    a = had.hadamard_matrix(12)
    a.zero_()
    b = had.hadamard_matrix(12)
    assert torch.all(b.abs() == 1)
    c = had.hadamard_matrix(16)
    c.zero_()
    assert torch.all(had.hadamard_matrix(16).abs() == 1)


@pytest.mark.parametrize(("n", "nearest"), [(6, 8), (9, 12), (578, 580), (13696, 13712), (10, 12)])
def test_unsupported_order_raises(n, nearest):
    assert nearest == next(k for k in range(n + 1, 2 * n + 8) if _ref_factorization(k))
    with pytest.raises(NoHadamardError) as info:
        had.hadamard_matrix(n)
    assert str(n) in str(info.value)
    assert f"nearest larger supported size is {nearest}" in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(NoHadamardError):
        had.fast_hadamard_transform(torch.zeros(2, n))


def test_hadamard_matrix_rejects_bad_order():
    with pytest.raises(ValueError):
        had.hadamard_matrix(0)


# --------------------------------------------------------------------------------------
# Fast transform
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _matrix(n: int) -> np.ndarray:
    return had.hadamard_matrix(n).numpy()


def _ref_transform(x: np.ndarray, n: int, normalize: bool, signs: np.ndarray | None):
    h = _matrix(n)
    x = x.astype(np.float64)
    if signs is not None:
        x = x * signs
    y = x @ h
    return y / math.sqrt(n) if normalize else y


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 28, 36, 40, 52, 92, 156, 172, 576])
@pytest.mark.parametrize("shape", [(), (3,), (2, 5)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_signs", [True, False])
def test_fast_transform_float64(n, shape, normalize, with_signs):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(*shape, n, generator=gen, dtype=torch.float64)
    signs = had.random_signs(n, 7) if with_signs else None
    y = had.fast_hadamard_transform(x, normalize, signs)
    ref = _ref_transform(x.numpy(), n, normalize, None if signs is None else signs.numpy())
    assert y.shape == x.shape and y.dtype == torch.float64
    np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=1e-12 * math.sqrt(n) * 4)


@pytest.mark.parametrize(
    ("n", "with_signs"), [(12, False), (64, True), (576, True), (1536, False), (5120, True)]
)
def test_fast_transform_float32(n, with_signs):
    gen = torch.Generator().manual_seed(n + 1)
    x = torch.randn(4, 3, n, generator=gen, dtype=torch.float32)
    signs = had.random_signs(n, 3).float() if with_signs else None
    y = had.fast_hadamard_transform(x, True, signs)
    assert y.dtype == torch.float32
    ref = _ref_transform(x.numpy(), n, True, None if signs is None else signs.numpy())
    err = np.linalg.norm(y.numpy().astype(np.float64) - ref) / np.linalg.norm(ref)
    assert err < 1e-5
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 12, 64, 256, 576, 1536, 2048, 3072, 14336])
@pytest.mark.parametrize("normalize, with_signs", [(True, True), (False, False)])
def test_hadamard_by_gemms_matches_dense(n, normalize, with_signs):
    """float64: the dense product to rounding; float32 (how ``rotate`` uses it): a few ulp of
    the correctly rounded result, elementwise relative to the row's scale."""
    gen = torch.Generator().manual_seed(n + 2)
    x = torch.randn(5, 2, n, generator=gen, dtype=torch.float64)
    signs = had.random_signs(n, 4) if with_signs else None
    ref = _ref_transform(x.numpy(), n, normalize, None if signs is None else signs.numpy())
    y64 = had.hadamard_by_gemms(x, normalize, signs)
    np.testing.assert_allclose(y64.numpy(), ref, rtol=0, atol=1e-13 * np.abs(ref).max())
    x32 = x.float()
    before = x32.clone()
    y32 = had.hadamard_by_gemms(x32, normalize, None if signs is None else signs.float())
    assert y32.dtype == torch.float32 and y32.shape == x32.shape and torch.equal(x32, before)
    ref32 = _ref_transform(x32.numpy(), n, normalize, None if signs is None else signs.numpy())
    ulp = np.spacing(np.abs(ref32).max(axis=-1, keepdims=True).astype(np.float32))
    assert (np.abs(y32.numpy() - ref32) <= 16 * ulp).all()


def test_gemm_factors_are_small_powers_of_two_after_the_base():
    assert had._gemm_factors(576) == [36, 16]
    assert had._gemm_factors(14336) == [28, 128, 4]
    assert had._gemm_factors(2048) == [1, 128, 16]


@pytest.mark.parametrize("n", [1, 2, 16, 24])
@pytest.mark.parametrize("with_signs", [True, False])
def test_fast_transform_never_modifies_input(n, with_signs):
    signs = had.random_signs(n, 0) if with_signs else None
    for x in (
        torch.randn(6, n, dtype=torch.float64),  # contiguous: may alias internal buffers
        torch.randn(n, 6, dtype=torch.float64).t(),  # non-contiguous
        torch.randn(3, 2 * n, dtype=torch.float64)[:, n:],  # view with a storage offset
    ):
        base = x.clone()
        s_before = None if signs is None else signs.clone()
        y = had.fast_hadamard_transform(x, False, signs)
        assert torch.equal(x, base)
        assert signs is None or torch.equal(signs, s_before)
        ref = _ref_transform(base.numpy(), n, False, None if signs is None else signs.numpy())
        np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=1e-12 * n)
        assert y.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("n", [16, 24, 576])
def test_fast_transform_with_autograd_matches_reference(n):
    """The autograd path must give the same values and the gradient H^T g (H^T = H^-1 * n)."""
    x = torch.randn(2, 3, n, dtype=torch.float64, requires_grad=True)
    signs = had.random_signs(n, 2)
    y = had.fast_hadamard_transform(x, True, signs)
    ref = _ref_transform(x.detach().numpy(), n, True, signs.numpy())
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=0, atol=1e-12 * n)
    g = torch.randn_like(y)
    y.backward(g)
    q = signs.numpy()[:, None] * _matrix(n) / math.sqrt(n)
    np.testing.assert_allclose(x.grad.numpy(), g.numpy() @ q.T, rtol=0, atol=1e-12 * n)


def test_fast_transform_keeps_input_and_layout():
    x = torch.randn(6, 24, dtype=torch.float64)
    before = x.clone()
    xt = x.t().contiguous().t()  # non-contiguous view with the same values
    y1 = had.fast_hadamard_transform(x)
    y2 = had.fast_hadamard_transform(xt)
    assert torch.equal(x, before)
    np.testing.assert_allclose(y1.numpy(), y2.numpy(), rtol=0, atol=1e-12)
    slice_ = torch.randn(5, 48, dtype=torch.float64)[:, ::2]
    np.testing.assert_allclose(
        had.fast_hadamard_transform(slice_, False).numpy(),
        slice_.numpy() @ had.hadamard_matrix(24).numpy(),
        atol=1e-12,
    )


def test_fast_transform_large_power_of_two_is_not_dense():
    """n = 2^18: a dense H would need 512 GiB; check columns via the closed form."""
    n = 2**18
    x = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = had.fast_hadamard_transform(x, normalize=True)
    np.testing.assert_allclose(y.norm(dim=-1).numpy(), x.norm(dim=-1).numpy(), rtol=1e-12)
    idx = np.arange(n)
    for col in (0, 1, 12345, n - 1):
        column = 1.0 - 2.0 * (np.bitwise_count(idx & col) & 1)
        np.testing.assert_allclose(y[:, col].numpy(), x.numpy() @ column / math.sqrt(n), atol=1e-9)
    back = had.fast_hadamard_transform(y, normalize=True)  # Sylvester H is symmetric
    np.testing.assert_allclose(back.numpy(), x.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [12, 24])
def test_fast_transform_gradcheck(n):
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    signs = had.random_signs(n, 1)
    assert torch.autograd.gradcheck(lambda t: had.fast_hadamard_transform(t, True, signs), (x,))
    assert torch.autograd.gradcheck(lambda t: had.fast_hadamard_transform(t, False), (x,))


def test_fast_transform_rejects_bad_input():
    with pytest.raises(TypeError):
        had.fast_hadamard_transform(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError):
        had.fast_hadamard_transform(torch.ones(4), signs=torch.ones(5))


# --------------------------------------------------------------------------------------
# Random rotations
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [8, 12, 36, 576])
def test_random_hadamard_is_orthogonal_and_seeded(n):
    q = had.random_hadamard_matrix(n, seed=5)
    assert q.dtype == torch.float64
    np.testing.assert_allclose((q @ q.T).numpy(), np.eye(n), atol=1e-12)
    np.testing.assert_allclose((q.T @ q).numpy(), np.eye(n), atol=1e-12)
    assert torch.equal(q, had.random_hadamard_matrix(n, seed=5))
    assert not torch.equal(q, had.random_hadamard_matrix(n, seed=6))
    s = had.random_signs(n, 5)
    assert s.dtype == torch.float64 and torch.all(s.abs() == 1)
    np.testing.assert_array_equal(
        q.numpy(), s.numpy()[:, None] * had.hadamard_matrix(n).numpy() / math.sqrt(n)
    )
    x = torch.randn(3, n, dtype=torch.float64)
    np.testing.assert_allclose(
        had.fast_hadamard_transform(x, True, s).numpy(), x.numpy() @ q.numpy(), atol=1e-12
    )


def test_random_signs_are_mixed():
    s = had.random_signs(4096, 0)
    assert 1800 < int((s > 0).sum()) < 2300
    assert not torch.equal(s, had.random_signs(4096, 1))


@pytest.mark.parametrize("n", [1, 7, 50, 130])
def test_random_orthogonal(n):
    q = had.random_orthogonal_matrix(n, seed=3)
    assert q.dtype == torch.float64 and q.shape == (n, n)
    np.testing.assert_allclose((q.T @ q).numpy(), np.eye(n), atol=1e-12)
    assert torch.equal(q, had.random_orthogonal_matrix(n, seed=3))
    # Sign convention: R = Q^T A is upper triangular with a positive diagonal.
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    r = (q.T @ a).numpy()
    np.testing.assert_allclose(np.tril(r, -1), 0, atol=1e-10)
    assert np.all(np.diag(r) > 0)
    if n > 1:
        assert not torch.equal(q, had.random_orthogonal_matrix(n, seed=4))


def test_orthogonal_matrix_kinds():
    q, desc = had.orthogonal_matrix(576, 0)
    assert torch.equal(q, had.random_hadamard_matrix(576, 0))
    assert "Hadamard" in desc and "36" in desc

    q, desc = had.orthogonal_matrix(100, 0)
    assert torch.equal(q, had.random_hadamard_matrix(100, 0))
    assert "Paley II q=49" in desc

    q, desc = had.orthogonal_matrix(90, 2)
    assert desc == (
        "no Hadamard matrix of order 90 is known; using a random orthogonal matrix "
        "(QR of a Gaussian)"
    )
    assert torch.equal(q, had.random_orthogonal_matrix(90, 2))

    q, desc = had.orthogonal_matrix(64, 1, kind="random")
    assert torch.equal(q, had.random_orthogonal_matrix(64, 1))
    assert "random orthogonal" in desc

    q, desc = had.orthogonal_matrix(5, 1, kind="identity")
    assert torch.equal(q, torch.eye(5, dtype=torch.float64))

    with pytest.raises(ValueError):
        had.orthogonal_matrix(8, 0, kind="householder")
