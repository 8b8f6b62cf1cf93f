"""Proofs for minipeft.lowrank: every claim of its docstring checked against an independent path.

The independent path is NumPy on the host (``np.linalg.svd``, ``np.linalg.norm``, hand-built
matrices with a known spectrum); the code under test runs on the current backend and its
results come back through ``bk.to_numpy``. All in float64.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minipeft import backend as bk
from minipeft import lowrank as lr

PROPERTY = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # the backend fixture is reusable
)


@pytest.fixture(params=bk.available())
def backend(request):
    with bk.using(request.param):
        yield request.param


def dev(a):
    """A float64 array on the current backend."""
    return bk.asarray(np.asarray(a, dtype=np.float64))


host = bk.to_numpy
seeds = st.integers(0, 2**32 - 1)


@st.composite
def gaussian_and_rank(draw, max_side=12):
    """A Gaussian matrix ``(m, n)`` (generic: distinct, non-zero singular values) and a rank r."""
    m, n = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    W = np.random.default_rng(draw(seeds)).standard_normal((m, n))
    return W, draw(st.integers(1, min(m, n)))


def orthonormal(rng, d, k):
    """Independent of lr.random_orthonormal: ``(d, k)`` with orthonormal columns."""
    return np.linalg.qr(rng.standard_normal((d, k)))[0]


def with_spectrum(rng, m, n, s):
    """``U diag(s) Vᵀ`` with random orthonormal U, V: a matrix whose SVD we know. Also U, V."""
    U, V = orthonormal(rng, m, len(s)), orthonormal(rng, n, len(s))
    return (U * s) @ V.T, U, V


# ----------------------------------------------------------------------------- Eckart-Young


any_matrix = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=10),
    elements=st.floats(-10, 10, allow_nan=False, allow_subnormal=False),
)


@PROPERTY
@given(W=any_matrix, data=st.data())
def test_truncation_error_is_the_tail_energy(backend, W, data):
    r = data.draw(st.integers(1, min(W.shape)))
    S = np.linalg.svd(W, compute_uv=False)  # independent path: NumPy on the host
    tail = np.sqrt(np.sum(S[r:] ** 2))
    tol = 1e-9 * (1 + np.linalg.norm(W))
    assert abs(lr.truncation_error(dev(W), r) - tail) <= tol
    assert abs(lr.tail_energy(dev(S), r) - tail) <= tol
    assert host(lr.truncate(dev(W), r)).shape == W.shape


@PROPERTY
@given(Wr=gaussian_and_rank(), seed=seeds)
def test_no_rank_r_matrix_beats_the_truncation(backend, Wr, seed):
    W, r = Wr
    m, n = W.shape
    rng = np.random.default_rng(seed)
    best = lr.truncation_error(dev(W), r)
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    candidates = []
    for _ in range(3):
        XY = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))  # random rank r ...
        candidates.append(XY * np.sum(W * XY) / np.sum(XY * XY))  # ... at its best scale
        P, Q = orthonormal(rng, m, r), orthonormal(rng, n, r)
        candidates.append(P @ (P.T @ W @ Q) @ Q.T)  # best fit inside random subspaces
        for eps in (1e-4, 1e-2, 1.0):  # the truncation, nudged (still rank r)
            Ue = U[:, :r] + eps * rng.standard_normal((m, r))
            Ve = Vt[:r] + eps * rng.standard_normal((r, n))
            candidates.append((Ue * S[:r]) @ Ve)
        s_wrong = S[:r] * (1 + 0.1 * rng.standard_normal(r))  # right directions, wrong sizes
        candidates.append((U[:, :r] * s_wrong) @ Vt[:r])
    tol = 1e-9 * (1 + np.linalg.norm(W))
    for X in candidates:
        assert np.linalg.matrix_rank(X) <= r
        assert np.linalg.norm(W - X) >= best - tol


@PROPERTY
@given(Wr=gaussian_and_rank())
def test_truncation_has_rank_r(backend, Wr):
    W, r = Wr
    T = lr.truncate(dev(W), r)
    assert np.linalg.matrix_rank(host(T)) == r  # independent rank test
    assert lr.numerical_rank(T) == r
    assert lr.numerical_rank(dev(W)) == min(W.shape)


def test_full_rank_truncation_is_the_matrix(backend):
    W = np.random.default_rng(0).standard_normal((5, 7))
    np.testing.assert_allclose(host(lr.truncate(dev(W), 5)), W, atol=1e-12)
    assert lr.truncation_error(dev(W), 5) < 1e-12


def test_svd_reconstructs(backend):
    W = np.random.default_rng(1).standard_normal((6, 4))
    U, S, Vt = (host(a) for a in lr.svd(dev(W)))
    assert U.shape == (6, 4) and S.shape == (4,) and Vt.shape == (4, 4)
    np.testing.assert_allclose((U * S) @ Vt, W, atol=1e-12)
    assert np.all(np.diff(S) <= 0)


def test_work_in_the_input_dtype(backend):
    W = bk.asarray(np.random.default_rng(2).standard_normal((6, 5)).astype(np.float32))
    assert lr.truncate(W, 2).dtype == np.float32
    assert all(a.dtype == np.float32 for a in lr.pissa_init(W, 2))


# ----------------------------------------------------------------------------- energy, ranks


@PROPERTY
@given(Wr=gaussian_and_rank())
def test_energy_curve_is_monotone_and_ends_at_one(backend, Wr):
    W, k = Wr
    S = np.linalg.svd(W, compute_uv=False)
    curve = host(lr.energy_curve(dev(S)))
    assert np.all(np.diff(curve) >= 0) and curve[-1] == 1.0
    # energy captured + (tail energy)² / ||W||_F² = 1, with ||W||_F from the matrix itself
    frob2 = np.sum(W**2)
    assert abs(lr.energy_captured(dev(S), k) - (1 - np.sum(S[k:] ** 2) / frob2)) < 1e-9
    assert lr.energy_captured(dev(S), k) == pytest.approx(curve[k - 1])
    assert lr.energy_captured(dev(S), 0) == 0.0


@pytest.mark.parametrize("m, n, r", [(8, 8, 1), (10, 6, 3), (5, 12, 5)])
def test_equal_singular_values_give_rank_r_on_every_measure(backend, m, n, r):
    W, _, _ = with_spectrum(np.random.default_rng(r), m, n, np.full(r, 3.0))
    assert lr.stable_rank(dev(W)) == pytest.approx(r)
    assert lr.effective_rank(dev(W)) == pytest.approx(r)
    assert lr.numerical_rank(dev(W)) == r


@pytest.mark.parametrize("n", [1, 4, 17])
def test_effective_rank_of_identity_is_n(backend, n):
    assert lr.effective_rank(dev(np.eye(n))) == pytest.approx(n)
    assert lr.stable_rank(dev(np.eye(n))) == pytest.approx(n)


@PROPERTY
@given(Wr=gaussian_and_rank())
def test_ranks_against_their_definitions(backend, Wr):
    W, _ = Wr
    fro, spec = np.linalg.norm(W, "fro"), np.linalg.norm(W, 2)
    assert lr.stable_rank(dev(W)) == pytest.approx(fro**2 / spec**2)
    S = np.linalg.svd(W, compute_uv=False)
    p = S / S.sum()
    assert lr.effective_rank(dev(W)) == pytest.approx(np.exp(-np.sum(p * np.log(p))))
    # both smooth ranks lie between 1 and the true rank
    for value in (lr.stable_rank(dev(W)), lr.effective_rank(dev(W))):
        assert 1 - 1e-9 <= value <= min(W.shape) + 1e-9


def test_numerical_rank_respects_tol(backend):
    W, _, _ = with_spectrum(np.random.default_rng(3), 9, 7, np.array([5.0, 1.0, 1e-3, 1e-9]))
    assert lr.numerical_rank(dev(W)) == 4
    assert lr.numerical_rank(dev(W), tol=1e-6) == 3
    assert lr.numerical_rank(dev(W), tol=2.0) == 1
    assert lr.numerical_rank(dev(np.zeros((3, 4)))) == 0


# ----------------------------------------------------------------------------- subspace similarity


@st.composite
def two_adapters(draw, max_r=6, max_d=16):
    """Two LoRA A matrices ``(r1, d)`` and ``(r2, d)`` sharing d, with r <= d."""
    d = draw(st.integers(1, max_d))
    r1, r2 = draw(st.integers(1, min(max_r, d))), draw(st.integers(1, min(max_r, d)))
    rng = np.random.default_rng(draw(seeds))
    return rng.standard_normal((r1, d)), rng.standard_normal((r2, d))


def phi_by_hand(A1, A2, i, j):
    """φ straight from its definition, with NumPy's SVD on the host."""
    U1 = np.linalg.svd(A1, full_matrices=False)[2][:i].T  # (d, i) top right singular vectors
    U2 = np.linalg.svd(A2, full_matrices=False)[2][:j].T  # (d, j)
    return np.linalg.norm(U1.T @ U2) ** 2 / min(i, j)


@PROPERTY
@given(A=two_adapters())
def test_phi_is_in_unit_interval_and_matches_its_definition(backend, A):
    A1, A2 = A
    grid = host(lr.subspace_similarity_grid(dev(A1), dev(A2)))
    assert grid.shape == (A1.shape[0], A2.shape[0])
    assert np.all(grid >= -1e-12) and np.all(grid <= 1 + 1e-12)
    for i in range(1, A1.shape[0] + 1):
        for j in range(1, A2.shape[0] + 1):
            expected = phi_by_hand(A1, A2, i, j)
            assert grid[i - 1, j - 1] == pytest.approx(expected, abs=1e-9)
            phi = lr.subspace_similarity(dev(A1), dev(A2), i, j)
            assert phi == pytest.approx(grid[i - 1, j - 1])


@PROPERTY
@given(A=two_adapters(), seed=seeds)
def test_phi_of_a_matrix_with_itself_is_one_and_basis_free(backend, A, seed):
    A1, A2 = A
    r1 = A1.shape[0]
    np.testing.assert_allclose(np.diag(host(lr.subspace_similarity_grid(dev(A1), dev(A1)))), 1.0)
    # A -> Q A (Q orthogonal r x r) changes A's basis of the rank space, not its singular
    # directions, so φ must not move.
    rng = np.random.default_rng(seed)
    Q1, Q2 = orthonormal(rng, r1, r1), orthonormal(rng, A2.shape[0], A2.shape[0])
    before = host(lr.subspace_similarity_grid(dev(A1), dev(A2)))
    after = host(lr.subspace_similarity_grid(dev(Q1 @ A1), dev(Q2 @ A2)))
    np.testing.assert_allclose(after, before, atol=1e-8)


# Two random subspaces of R^d of dims i and j: E ||U1ᵀ U2||_F² = i j / d (each of the i j cosines
# has variance 1/d), so E φ = max(i, j) / d, and ||U1ᵀ U2||_F² ≈ χ²_{ij} / d gives φ a standard
# deviation of about sqrt(2 i j) / (d min(i, j)). The tolerances below are 6 such deviations.
D, R = 512, 8
I, J = np.arange(1, R + 1)[:, None], np.arange(1, R + 1)[None, :]
PHI_MEAN = np.maximum(I, J) / D
PHI_SD = np.sqrt(2 * I * J) / (D * np.minimum(I, J))


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=seeds)
def test_phi_of_random_subspaces_in_high_dimension_is_small(backend, seed):
    rng = np.random.default_rng(seed)
    A1, A2 = rng.standard_normal((R, D)), rng.standard_normal((R, D))
    grid = host(lr.subspace_similarity_grid(dev(A1), dev(A2)))
    assert grid.max() < 0.1  # versus 1 for shared directions
    assert abs(grid[-1, -1] - PHI_MEAN[-1, -1]) < 6 * PHI_SD[-1, -1]


def test_phi_of_random_subspaces_averages_to_max_i_j_over_d(backend):
    n = 100
    rng = np.random.default_rng(0)
    pairs = [(rng.standard_normal((R, D)), rng.standard_normal((R, D))) for _ in range(n)]
    grids = [host(lr.subspace_similarity_grid(dev(A1), dev(A2))) for A1, A2 in pairs]
    assert np.all(np.abs(np.mean(grids, axis=0) - PHI_MEAN) < 6 * PHI_SD / np.sqrt(n))


# ----------------------------------------------------------------------------- amplification


@PROPERTY
@given(m=st.integers(12, 24), n=st.integers(12, 24), r=st.integers(1, 3), seed=seeds)
def test_amplification_small_on_top_directions_large_on_bottom(backend, m, n, r, seed):
    rng = np.random.default_rng(seed)
    k = min(m, n)
    s = 10.0 * 0.7 ** np.arange(k)  # W's spectrum: known, falling fast
    W, U, V = with_spectrum(rng, m, n, s)
    C = rng.standard_normal((r, r))  # the update's own r x r mixing: generic singular directions
    top = U[:, :r] @ C @ V[:, :r].T  # lies in W's top-r singular directions
    bottom = U[:, k - r :] @ C @ V[:, k - r :].T  # orthogonal to them: W's bottom directions
    a_top = lr.amplification(dev(top), dev(W), r, seed=seed)
    a_bot = lr.amplification(dev(bottom), dev(W), r, seed=seed)
    # ΔW's singular directions span W's chosen ones, so Uᵀ W V has the norm of that slice of s.
    norm_C, s_top, s_bot = np.linalg.norm(C), np.linalg.norm(s[:r]), np.linalg.norm(s[k - r :])
    for a, s_slice in ((a_top, s_top), (a_bot, s_bot)):
        assert a.delta_norm == pytest.approx(norm_C)
        assert a.proj_norm == pytest.approx(s_slice)
        assert a.factor == pytest.approx(norm_C / s_slice)
        assert a.w_own_norm == pytest.approx(s_top)
    assert a_bot.factor / a_top.factor == pytest.approx(s_top / s_bot)
    assert a_bot.factor > 10 * a_top.factor  # 0.7^(k-r) decay: at least 0.7^-9 ≈ 25


@PROPERTY
@given(m=st.integers(2, 12), n=st.integers(2, 12), seed=seeds, data=st.data())
def test_no_directions_project_w_more_than_its_own(backend, m, n, seed, data):
    """Ky Fan: max over orthonormal U, V (r columns) of ||Uᵀ W V||_F is ||S_r||."""
    r = data.draw(st.integers(1, min(m, n)))
    rng = np.random.default_rng(seed)
    W, dW = rng.standard_normal((m, n)), rng.standard_normal((m, n))
    a = lr.amplification(dev(dW), dev(W), r, seed=seed)
    assert a.w_own_norm == pytest.approx(np.linalg.norm(np.linalg.svd(W, compute_uv=False)[:r]))
    assert a.proj_norm <= a.w_own_norm + 1e-9
    assert a.random_norm <= a.w_own_norm + 1e-9
    assert a.rank == r
    assert lr.amplification(dev(dW), dev(W), r, seed=seed).random_norm == a.random_norm


def test_random_orthonormal(backend):
    Q = host(lr.random_orthonormal(20, 4, seed=7, dtype=np.float64))
    assert Q.shape == (20, 4)
    np.testing.assert_allclose(Q.T @ Q, np.eye(4), atol=1e-12)
    np.testing.assert_array_equal(Q, host(lr.random_orthonormal(20, 4, seed=7, dtype=np.float64)))
    assert not np.allclose(Q, host(lr.random_orthonormal(20, 4, seed=8, dtype=np.float64)))


# ----------------------------------------------------------------------------- PiSSA


@PROPERTY
@given(Wr=gaussian_and_rank())
def test_pissa_init_reproduces_w_and_holds_the_truncation(backend, Wr):
    W, r = Wr
    m, n = W.shape
    A, B, W_res = (host(a) for a in lr.pissa_init(dev(W), r))
    assert A.shape == (r, n) and B.shape == (m, r) and W_res.shape == (m, n)
    np.testing.assert_allclose(W_res + B @ A, W, atol=1e-12 * (1 + np.abs(W).max()))
    U, S, Vt = np.linalg.svd(W, full_matrices=False)  # independent truncation
    np.testing.assert_allclose(B @ A, (U[:, :r] * S[:r]) @ Vt[:r], atol=1e-10)
    np.testing.assert_allclose(B @ A, host(lr.truncate(dev(W), r)), atol=1e-10)
    # the residual keeps exactly W's tail of the spectrum; the factors are balanced
    tail = np.linalg.svd(W_res, compute_uv=False)[: len(S) - r]
    np.testing.assert_allclose(tail, S[r:], atol=1e-10)
    np.testing.assert_allclose(B.T @ B, np.diag(S[:r]), atol=1e-10)
    np.testing.assert_allclose(A @ A.T, np.diag(S[:r]), atol=1e-10)


# ----------------------------------------------------------------------------- bad input


W43 = np.ones((4, 3))
A_BAD = [
    ("r", lambda: lr.truncate(dev(W43), 0)),
    ("r", lambda: lr.truncate(dev(W43), 4)),
    ("r", lambda: lr.truncate(dev(W43), 1.5)),
    ("r", lambda: lr.truncate(dev(W43), True)),
    ("W", lambda: lr.truncate(dev(np.ones(3)), 1)),
    ("W", lambda: lr.truncation_error(dev(np.ones((2, 2, 2))), 1)),
    ("W", lambda: lr.stable_rank([[1.0, 2.0]])),
    ("W", lambda: lr.numerical_rank(dev(np.ones(4)))),
    ("r", lambda: lr.pissa_init(dev(W43), -1)),
    ("S", lambda: lr.tail_energy(dev(W43), 1)),
    ("r", lambda: lr.tail_energy(dev(np.ones(3)), 4)),
    ("k", lambda: lr.energy_captured(dev(np.ones(3)), -1)),
    ("A2", lambda: lr.subspace_similarity(dev(np.ones((2, 5))), dev(np.ones((2, 6))), 1, 1)),
    ("A2", lambda: lr.subspace_similarity_grid(dev(np.ones((2, 5))), dev(np.ones(5)))),
    ("i", lambda: lr.subspace_similarity(dev(np.ones((2, 5))), dev(np.ones((3, 5))), 0, 1)),
    ("j", lambda: lr.subspace_similarity(dev(np.ones((2, 5))), dev(np.ones((3, 5))), 1, 4)),
    ("delta_W", lambda: lr.amplification(dev(np.ones((3, 4))), dev(W43), 1)),
    ("r", lambda: lr.amplification(dev(W43), dev(W43), 4)),
    ("r", lambda: lr.random_orthonormal(3, 4, seed=0)),
]


@pytest.mark.parametrize("arg, call", A_BAD, ids=[f"{a}-{k}" for k, (a, _) in enumerate(A_BAD)])
def test_bad_input_names_the_argument(backend, arg, call):
    with pytest.raises(ValueError, match=rf"^{arg} must .*got"):
        call()
