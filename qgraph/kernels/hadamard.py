"""Hadamard matrices and the fast Walsh-Hadamard transform for orders n = K * 2^k.

Rotating weights and activations by an orthogonal matrix spreads outliers over all
channels, which makes them easier to quantize. A (randomized) Hadamard matrix is the
cheapest such rotation: it is applied in O(n log n) with additions only for the
power-of-two part. Hidden sizes of real models are rarely powers of two (576, 1536,
14336, ...), so we factor n = K * m with m a power of two and a small base order K
for which an explicit construction is known:

* Sylvester: orders 1 and 2 (and all powers of two by Kronecker products);
* Paley I: order q + 1 for a prime power q = 3 (mod 4);
* Paley II: order 2(q + 1) for a prime power q = 1 (mod 4);
* Goethals-Seidel: order 4t from four circulant +-1 matrices whose periodic
  autocorrelations cancel; sequences for t = 23, 29, 39, 43 (orders 92, 116, 156,
  172) were found for this module by an exhaustive search over unions of multiplier
  orbits and are verified whenever the matrix is built;
* Kronecker products of all of the above.

The full matrix is H_n = H_K (x) H_m (Kronecker product, H_m Sylvester), so the index
of row/column i is i = k * m + j with k < K, j < m.
"""

from __future__ import annotations

import functools
import math
import operator

import numpy as np
import torch

from qgraph.errors import NoHadamardError

__all__ = [
    "fast_hadamard_transform",
    "hadamard_by_gemms",
    "hadamard_factorization",
    "hadamard_matrix",
    "is_hadamard_size",
    "known_base_orders",
    "orthogonal_matrix",
    "random_hadamard_matrix",
    "random_orthogonal_matrix",
    "random_signs",
]

# Goethals-Seidel sequences: four +-1 sequences of length t whose periodic
# autocorrelations sum to zero at every nonzero shift ('+' = +1, '-' = -1).
_GS_SEQUENCES: dict[int, tuple[str, str, str, str]] = {
    23: (
        "++-+-++-+--++--+-++-+-+",
        "-+++-------++-------+++",
        "-++--+++-+-++-+-+++--++",
        "-+-----+++-++-+++-----+",
    ),
    29: (
        "+-+---+++++--+--+--+++++---+-",
        "-+++++---+--+-++-+--+---+++++",
        "+-+--++--++++-++-++++--++--+-",
        "+++++--+++-+-+--+-+-+++--++++",
    ),
    39: (
        "-+----+-----+++++-+--++-+-+--++--+-++--",
        "--++-+---+---+-----+-+--+-+++--+++-----",
        "-+----+++--+-++++-+-+++-+-+--+---+++-+-",
        "++--+-----+--++-++---++++++--+---+-+--+",
    ),
    43: (
        "+--+-++--++-++++-+-++--+++-----+-+--+++-+--",
        "--+---+++++--+++-++---+++++++++++-+-+-+++-+",
        "+-----++-++--+++-++----++++-++++--+-+-+-+--",
        "+-----++-++--+++-++----++++-++++--+-+-+-+--",
    ),
}


# --------------------------------------------------------------------------------------
# Number theory helpers
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e and p prime, or None. Trial division: q is at most ~1e6 here."""
    if q < 2:
        return None
    p = 2
    while p * p <= q:
        if q % p == 0:
            e = 0
            while q % p == 0:
                q //= p
                e += 1
            return (p, e) if q == 1 else None
        p += 1
    return (q, 1)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _direct_construction(k: int) -> str | None:
    """Name of a direct (non-product) construction of order k, or None."""
    if k == 1 or k == 2:
        return "sylvester"
    if k % 4:
        return None
    q = k - 1
    if q % 4 == 3 and _prime_power(q) is not None:
        return "paley1"
    q = k // 2 - 1
    if q % 4 == 1 and _prime_power(q) is not None:
        return "paley2"
    if k // 4 in _GS_SEQUENCES:
        return "goethals_seidel"
    return None


@functools.lru_cache(maxsize=8192)
def _split(k: int) -> tuple[int, int] | None:
    """Smallest a >= 2 with k = a * b and both a, b known Hadamard orders.

    Only divisors are enumerated and results are memoized, so this stays fast for k up to
    ~1e6 (a Hadamard order other than 1, 2 is a multiple of 4, which prunes most k at once).
    """
    a = 2
    while a * a <= k:
        if k % a == 0 and _is_known_order(a) and _is_known_order(k // a):
            return a, k // a
        a += 1
    return None


@functools.lru_cache(maxsize=8192)
def _is_known_order(k: int) -> bool:
    if k < 1 or (k > 2 and k % 4):
        return False
    if _is_power_of_two(k) or _direct_construction(k) is not None:
        return True
    return _split(k) is not None


def _as_order(n: object) -> int | None:
    """n as a Python int (numpy/torch integers accepted), or None for non-integers."""
    if isinstance(n, bool):
        return None
    try:
        return operator.index(n)
    except TypeError:
        return None


def hadamard_factorization(n: int) -> tuple[int, int] | None:
    """(K, m) with n = K * m, m a power of two and K a known order, K as small as possible.

    A small K keeps the dense K x K part of the fast transform cheap. Returns None when no
    such factorization exists (n < 1, n = 2 mod 4 with n > 2, or an unknown odd part).
    """
    n = _as_order(n)
    if n is None or n < 1:
        return None
    m = n & -n  # largest power of two dividing n
    odd = n // m
    k = odd
    while k <= n:
        if _is_known_order(k):
            return k, n // k
        k *= 2
    return None


def is_hadamard_size(n: int) -> bool:
    """True when hadamard_matrix(n) can be built."""
    return hadamard_factorization(n) is not None


def known_base_orders(limit: int, primitive: bool = False) -> list[int]:
    """Orders K <= limit for which this module can build a Hadamard matrix.

    With primitive=True only orders that are not twice another known order are listed,
    i.e. exactly the K values hadamard_factorization can return (1, 12, 20, 28, 36, ...).
    """
    orders = [k for k in range(1, limit + 1) if _is_known_order(k)]
    if primitive:
        known = set(orders)
        orders = [k for k in orders if k == 1 or k % 2 or k // 2 not in known]
    return orders


def _next_supported_size(n: int) -> int:
    k = max(n + 1, 1)
    while not is_hadamard_size(k):
        k += 1
    return k


def _describe_order(k: int) -> str:
    """Human-readable construction of base order k, for descriptions and errors."""
    kind = _direct_construction(k)
    if kind == "sylvester" or _is_power_of_two(k):
        return f"Sylvester {k}"
    if kind == "paley1":
        return f"Paley I q={k - 1}"
    if kind == "paley2":
        return f"Paley II q={k // 2 - 1}"
    if kind == "goethals_seidel":
        return f"Goethals-Seidel t={k // 4}"
    split = _split(k)
    assert split is not None
    return f"{_describe_order(split[0])} (x) {_describe_order(split[1])}"


# --------------------------------------------------------------------------------------
# Finite fields and base matrices
# --------------------------------------------------------------------------------------


def _primitive_polynomial(p: int, e: int) -> tuple[int, ...]:
    """Low coefficients (f_0..f_{e-1}) of a monic primitive polynomial of degree e over GF(p).

    Brute force: the first f for which x has multiplicative order p^e - 1 modulo f. Such an
    f is irreducible (all p^e - 1 powers of x are distinct units), so GF(p)[x]/f is a field.
    """
    q = p**e
    for code in range(p, q):  # f_0 != 0 (code % p != 0) else x is a zero divisor
        if code % p == 0:
            continue
        low = tuple((code // p**i) % p for i in range(e))
        c = [1] + [0] * (e - 1)  # x^0
        order = 0
        while True:
            top = c[-1]
            c = [0] + c[:-1]
            if top:
                c = [(ci - top * fi) % p for ci, fi in zip(c, low, strict=True)]
            order += 1
            if c[0] == 1 and not any(c[1:]):
                break
            if order >= q - 1:
                order = -1
                break
        if order == q - 1:
            return low
    raise RuntimeError(f"no primitive polynomial of degree {e} over GF({p})")  # unreachable


def _quadratic_character(p: int, e: int) -> np.ndarray:
    """chi(a) for every element a of GF(p^e), elements encoded as sum_i digit_i * p^i.

    chi(0) = 0, chi(a) = +1 for nonzero squares and -1 otherwise.
    """
    q = p**e
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    if e == 1:
        squares = (np.arange(1, q, dtype=np.int64) ** 2) % q
        chi[squares] = 1
        return chi
    low = _primitive_polynomial(p, e)
    c = [1] + [0] * (e - 1)
    weights = [p**i for i in range(e)]
    for power in range(q - 1):  # walk the powers of the generator x
        if power % 2 == 0:
            chi[sum(ci * w for ci, w in zip(c, weights, strict=True))] = 1
        top = c[-1]
        c = [0] + c[:-1]
        if top:
            c = [(ci - top * fi) % p for ci, fi in zip(c, low, strict=True)]
    return chi


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = chi(a - b) over GF(q): QQ^T = qI - J, Q symmetric iff q = 1 (mod 4)."""
    pp = _prime_power(q)
    assert pp is not None
    p, e = pp
    chi = _quadratic_character(p, e)
    idx = np.arange(q, dtype=np.int64)
    diff = np.zeros((q, q), dtype=np.int64)
    for i in range(e):  # digit-wise subtraction mod p
        digit = (idx // p**i) % p
        diff += ((digit[:, None] - digit[None, :]) % p) * p**i
    return chi[diff]


def _paley1(q: int) -> np.ndarray:
    """Order q + 1: H = I + S with S = [[0, 1^T], [-1, Q]] skew and SS^T = qI."""
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(q + 1, dtype=np.int64) + s


def _paley2(q: int) -> np.ndarray:
    """Order 2(q + 1) from the symmetric conference matrix C = [[0, 1^T], [1, Q]].

    Zeros of C become [[1, -1], [-1, -1]] and +-1 entries become +-[[1, 1], [1, -1]].
    """
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    h2 = np.array([[1, 1], [1, -1]], dtype=np.int64)
    zero_block = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    return np.kron(c, h2) + np.kron(np.eye(q + 1, dtype=np.int64), zero_block)


def _goethals_seidel(t: int) -> np.ndarray:
    """Order 4t from circulants A, B, C, D with AA^T + BB^T + CC^T + DD^T = 4tI."""
    seqs = [
        np.array([1 if ch == "+" else -1 for ch in s], dtype=np.int64) for s in _GS_SEQUENCES[t]
    ]
    shift = (np.arange(t)[None, :] - np.arange(t)[:, None]) % t
    a, b, c, d = (s[shift] for s in seqs)  # circulant: X[i, j] = x[(j - i) mod t]
    r = np.fliplr(np.eye(t, dtype=np.int64))  # back-diagonal, makes XR symmetric
    h = np.block(
        [
            [a, b @ r, c @ r, d @ r],
            [-b @ r, a, d.T @ r, -c.T @ r],
            [-c @ r, -d.T @ r, a, b.T @ r],
            [-d @ r, c.T @ r, -b.T @ r, a],
        ]
    )
    # The sequences are data, not math: check them (cheap, t <= 43) so a typo cannot
    # silently yield a non-orthogonal "rotation".
    hf = h.astype(np.float64)
    if not np.array_equal(hf @ hf.T, 4 * t * np.eye(4 * t)):
        raise RuntimeError(f"internal error: Goethals-Seidel matrix of order {4 * t} is wrong")
    return h


def _sylvester(m: int) -> torch.Tensor:
    """Sylvester matrix H_m = H_2 (x) H_{m/2} in float64 (natural order: (-1)^popcount(i & j)).

    Filled in place by doubling, which costs little more than writing the result once.
    """
    h = torch.empty(m, m, dtype=torch.float64)
    h[0, 0] = 1.0
    k = 1
    while k < m:
        top_left = h[:k, :k]
        h[:k, k : 2 * k] = top_left
        h[k : 2 * k, :k] = top_left
        torch.neg(top_left, out=h[k : 2 * k, k : 2 * k])
        k *= 2
    return h


# Base matrices up to this order are cached (at most 8 MiB each, 32 of them); larger ones
# are rebuilt on demand, which is cheap next to anything done with a matrix that size.
_CACHE_MAX_ORDER = 1024


def _build_base(k: int) -> torch.Tensor:
    """Hadamard matrix of known order k as a float64 tensor (uncached)."""
    if _is_power_of_two(k):
        return _sylvester(k)
    kind = _direct_construction(k)
    if kind == "paley1":
        h = _paley1(k - 1)
    elif kind == "paley2":
        h = _paley2(k // 2 - 1)
    elif kind == "goethals_seidel":
        h = _goethals_seidel(k // 4)
    else:
        split = _split(k)
        if split is None:
            raise NoHadamardError(f"no Hadamard matrix of order {k} is known")
        # Mixed-product property: (A (x) B)(A (x) B)^T = (AA^T) (x) (BB^T) = k I.
        return torch.kron(_base_matrix(split[0]), _base_matrix(split[1]))
    return torch.from_numpy(np.ascontiguousarray(h, dtype=np.float64))


@functools.lru_cache(maxsize=32)
def _cached_base(k: int) -> torch.Tensor:
    return _build_base(k)


def _base_matrix(k: int) -> torch.Tensor:
    """Hadamard matrix of known order k (float64). May be cached: callers must not mutate it."""
    return _cached_base(k) if k <= _CACHE_MAX_ORDER else _build_base(k)


def _no_hadamard(n: int) -> NoHadamardError:
    why = ""
    if n > 2 and n % 4:
        why = " (a Hadamard matrix of order n > 2 needs n divisible by 4)"
    return NoHadamardError(
        f"no Hadamard matrix of order {n} is known to qgraph{why}; supported orders are "
        f"K*2^k with K in {known_base_orders(64, primitive=True)}...; the nearest larger "
        f"supported size is {_next_supported_size(n)}"
    )


def hadamard_matrix(n: int) -> torch.Tensor:
    """float64 +-1 matrix H of order n with H @ H.T == n * I, built as H_K (x) H_m."""
    order = _as_order(n)
    if order is None or order < 1:
        raise ValueError(f"Hadamard order must be a positive integer, got {n!r}")
    n = order
    fact = hadamard_factorization(n)
    if fact is None:
        raise _no_hadamard(n)
    k, m = fact
    if k == 1:
        return _sylvester(m) if m > _CACHE_MAX_ORDER else _base_matrix(m).clone()
    return torch.kron(_base_matrix(k), _base_matrix(m))


# --------------------------------------------------------------------------------------
# Fast transform
# --------------------------------------------------------------------------------------


def fast_hadamard_transform(
    x: torch.Tensor,
    normalize: bool = True,
    signs: torch.Tensor | None = None,
    transpose: bool = False,
    *,
    _transposed: bool = False,
) -> torch.Tensor:
    """y = (x * signs) @ H_n over the last dim (divided by sqrt(n) if normalize).

    ``transpose=True`` computes ``(x @ H_nᵀ) * signs`` instead, the adjoint (and, normalized,
    the inverse): H_n is symmetric only when its order-K factor is, so autograd needs it.

    With H_n = H_K (x) H_m and x viewed as [..., K, m]: y[k', j'] = sum_{k, j}
    x[k, j] H_K[k, k'] H_m[j, j'], i.e. the butterflies act on the m axis and H_K^T
    multiplies the K axis from the left. Costs O(n log m + n K) instead of O(n^2).
    """
    if not x.is_floating_point():
        raise TypeError(f"fast_hadamard_transform needs a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("fast_hadamard_transform needs at least one dimension")
    n = x.shape[-1]
    fact = hadamard_factorization(n)
    if fact is None:
        raise _no_hadamard(n)
    k, m = fact
    if signs is not None and signs.shape != (n,):
        raise ValueError(f"signs must have shape ({n},), got {tuple(signs.shape)}")
    if transpose:
        y = fast_hadamard_transform(x, normalize, None, _transposed=True)
        return y * signs.to(dtype=y.dtype, device=y.device) if signs is not None else y
    if signs is not None:
        x = x * signs.to(dtype=x.dtype, device=x.device)
    shape = x.shape
    y = x.reshape(-1, k, m)
    rows = y.shape[0]
    if k > 1:  # y[r, k', j] = sum_k H_K[k, k'] y[r, k, j]: one GEMM over all rows
        hk = _base_matrix(k).to(dtype=x.dtype, device=x.device)
        if _transposed:
            hk = hk.T
        y = torch.matmul(y.transpose(1, 2), hk).transpose(1, 2)
    # Sylvester butterflies H_2h = H_2 (x) H_h on blocks of 2h entries, ping-ponging between
    # two buffers with out= so each stage is one read and one write of the data.
    # The caller's tensor is only ever read: when ``y`` still aliases it, the first stage
    # writes into a fresh buffer and the alias is dropped rather than reused.
    owned = y.data_ptr() != x.data_ptr()
    y = y.contiguous()
    if m > 1 and torch.is_grad_enabled() and y.requires_grad:  # out= is not differentiable
        h = 1
        while h < m:
            src = y.reshape(rows, k, m // (2 * h), 2, h)
            a, b = src[..., 0, :], src[..., 1, :]
            y = torch.stack((a + b, a - b), dim=-2)
            h *= 2
        y = y.reshape(rows, k, m)
    elif m > 1:
        buf = torch.empty_like(y)
        h = 1
        while h < m:
            src = y.view(rows, k, m // (2 * h), 2, h)
            dst = buf.view(rows, k, m // (2 * h), 2, h)
            torch.add(src[..., 0, :], src[..., 1, :], out=dst[..., 0, :])
            torch.sub(src[..., 0, :], src[..., 1, :], out=dst[..., 1, :])
            y, buf = buf, (y if owned else torch.empty_like(y))
            owned = True
            h *= 2
    if n == 1 and not normalize:
        y = y.clone()  # H_1 = [1]: never hand back an alias of the caller's tensor
    y = y.reshape(shape)
    if normalize:
        y = y * (1.0 / math.sqrt(n))
    return y


# --------------------------------------------------------------------------------------
# Random rotations
# --------------------------------------------------------------------------------------


GEMM_FACTOR_MAX = 128
"""Largest power-of-two factor :func:`hadamard_by_gemms` multiplies as one dense matrix."""


def _gemm_factors(n: int) -> list[int]:
    """``n = K · 2^a`` as ``[K, m_1, m_2, ...]`` with each ``m_i ≤ GEMM_FACTOR_MAX`` a power of
    two (Sylvester: ``H_{2^(a+b)} = H_{2^a} ⊗ H_{2^b}``)."""
    fact = hadamard_factorization(n)
    if fact is None:
        raise _no_hadamard(n)
    k, m = fact
    factors = [k]
    while m > 1:
        piece = min(m, GEMM_FACTOR_MAX)
        factors.append(piece)
        m //= piece
    return factors


def hadamard_by_gemms(
    x: torch.Tensor, normalize: bool = True, signs: torch.Tensor | None = None
) -> torch.Tensor:
    """``(x * signs) @ H_n`` over the last dim (``/ √n`` if normalize), in ``x``'s dtype, as one
    small dense GEMM per Kronecker factor of ``H_n = H_K ⊗ H_m1 ⊗ ...``.

    Why: rotating weights once, GEMMs run at the machine's float32 speed where the staged
    butterflies of :func:`fast_hadamard_transform` are memory-bound passes; in float32 the
    result differs from the correctly rounded one by a few ulp (``rotate`` verifies the model
    end to end). ``x`` is only read.
    """
    n = x.shape[-1]
    factors = _gemm_factors(n)
    if signs is not None:
        x = x * signs.to(dtype=x.dtype, device=x.device)
    shape = x.shape
    scale = 1.0 / math.sqrt(n) if normalize else 1.0
    y = x.reshape(-1, n)
    rows, after = y.shape[0], n
    for f in factors:
        after //= f
        if f == 1:
            continue
        h = (_base_matrix(f) * scale).to(dtype=x.dtype, device=x.device)
        scale = 1.0  # folded into the first matrix
        if after == 1:  # the last axis: one GEMM over every row
            y = (y.reshape(-1, f) @ h).reshape(rows, n)
        else:  # y[r, i, t] -> sum_i y[r, i, t] H[i, j]: move the axis last, multiply, move back
            view = y.reshape(-1, f, after).transpose(1, 2)
            y = (view @ h).transpose(1, 2).reshape(rows, n)
    if scale != 1.0:  # n = 1: no matrix to fold it into
        y = y * scale
    return y.reshape(shape)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """Seeded +-1 vector (float64) used to randomize a Hadamard matrix."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64)
    return (1 - 2 * bits).to(torch.float64)


def random_hadamard_matrix(n: int, seed: int) -> torch.Tensor:
    """Orthogonal Q = diag(s) @ H / sqrt(n), s = random_signs(n, seed) (float64).

    x @ Q == fast_hadamard_transform(x, True, random_signs(n, seed)).
    """
    s = random_signs(n, seed)
    return s[:, None] * hadamard_matrix(n) / math.sqrt(n)


def random_orthogonal_matrix(n: int, seed: int) -> torch.Tensor:
    """Haar-distributed orthogonal matrix (float64): QR of a seeded Gaussian.

    Multiplying the columns of Q by sign(diag(R)) makes the factorization unique, without
    which Q would not be Haar distributed.
    """
    if n < 1:
        raise ValueError(f"matrix order must be positive, got {n}")
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return q * d[None, :]


def orthogonal_matrix(n: int, seed: int, kind: str = "hadamard") -> tuple[torch.Tensor, str]:
    """(Q float64 orthogonal of order n, description of what was built).

    kind "hadamard" falls back to a random orthogonal matrix when no Hadamard matrix of
    order n is known (the description says so); "random" and "identity" are explicit.
    """
    if kind == "hadamard":
        fact = hadamard_factorization(n)
        if fact is None:
            return (
                random_orthogonal_matrix(n, seed),
                f"no Hadamard matrix of order {n} is known; using a random orthogonal "
                "matrix (QR of a Gaussian)",
            )
        k, m = fact
        if k == 1:
            parts = f"Sylvester {m}"
        elif m == 1:
            parts = _describe_order(k)
        else:
            parts = f"{_describe_order(k)} (x) Sylvester {m}"
        return random_hadamard_matrix(n, seed), (
            f"randomized Hadamard matrix of order {n} = {k}*{m} ({parts}), seed {seed}"
        )
    if kind == "random":
        return (
            random_orthogonal_matrix(n, seed),
            f"random orthogonal matrix of order {n} (QR of a Gaussian), seed {seed}",
        )
    if kind == "identity":
        return torch.eye(n, dtype=torch.float64), f"identity of order {n}"
    raise ValueError(
        f"unknown orthogonal matrix kind {kind!r}; use 'hadamard', 'random' or 'identity'"
    )
