"""Low-rank linear algebra behind LoRA: SVD, best rank-r approximation, ranks, subspaces.

LoRA (Hu et al. 2021) bets that the update a fine-tune makes to a weight matrix is *low rank*:
``ΔW = B A`` with ``B: (d_out, r)``, ``A: (r, d_in)`` and ``r ≪ min(d_out, d_in)``. This file holds
the tools to check that bet on real matrices. Everything takes and returns arrays of the current
backend (NumPy or CuPy); results that are one number come back as Python ``float``/``int``.

1. The singular value decomposition (SVD). Every matrix ``W: (m, n)`` factors as::

       W = U diag(S) Vᵀ = Σ_i σ_i u_i v_iᵀ        U: (m, k), S: (k,), Vᵀ: (k, n), k = min(m, n)

   with orthonormal columns ``u_i`` (left singular vectors), orthonormal rows ``v_iᵀ`` (right
   singular vectors) and ``σ_1 ≥ σ_2 ≥ ... ≥ σ_k ≥ 0``. It writes ``W`` as a sum of rank-1 layers,
   loudest first. Norms read straight off the spectrum: ``||W||_F² = Σ σ_i²`` and ``||W||_2 = σ_1``.

2. Eckart-Young-Mirsky. Keep the first ``r`` layers, ``W_r = U_r diag(S_r) V_rᵀ``. Among *all*
   matrices of rank at most ``r`` this one is closest to ``W``::

       min_{rank X ≤ r} ||W - X||_F = ||W - W_r||_F = sqrt(σ_{r+1}² + ... + σ_k²)

   So the error of the best rank-r fit is the "tail energy" of the spectrum, and the fraction
   ``Σ_{i≤r} σ_i² / Σ_i σ_i²`` (the *energy captured*) says how much of ``W`` rank ``r`` can hold.
   If the full fine-tune's ``ΔW`` has a fast-falling spectrum, a rank-r LoRA loses little.

3. How many dimensions does a matrix "really" use? The *numerical rank* counts σ_i above a
   round-off threshold: exact, but blind to size (a σ of 1e-6 counts as much as one of 1e3).
   Two smooth measures weigh the spectrum instead:

   - stable rank ``||W||_F² / ||W||_2² = Σ σ_i² / σ_1²``: between 1 and rank(W), and equal to ``r``
     when ``W`` has ``r`` equal non-zero singular values;
   - effective rank (Roy & Vetterli 2007) ``exp(H(p))`` with ``p_i = σ_i / Σ_j σ_j`` and
     ``H(p) = -Σ p_i log p_i``: the exponential of the spectrum's entropy, again ``r`` for ``r``
     equal singular values and 1 for a rank-1 matrix.

4. Subspace similarity (LoRA paper, section 7.2). Train LoRA twice, with ranks r1 and r2, and ask
   whether the two ``A`` matrices ``(r, d_in)`` learnt the same input directions. Take the right
   singular vectors of each (the orthonormal basis of its row space, ordered by singular value),
   keep the top ``i`` of the first and the top ``j`` of the second (``U1_i: (d_in, i)``,
   ``U2_j: (d_in, j)``), and measure::

       φ(A1, A2, i, j) = ||U1_iᵀ U2_j||_F² / min(i, j)      in [0, 1]

   ``||U1_iᵀ U2_j||_F²`` is the sum of the squared cosines of the principal angles between the two
   subspaces, so φ = 1 when one subspace contains the other and φ = 0 when they are orthogonal.
   It ignores which basis each ``A`` uses: ``A -> Q A`` with ``Q`` orthogonal leaves it unchanged.
   For two *random* subspaces of ``R^d`` its expectation is ``max(i, j) / d`` — tiny in high
   dimension — so a large φ is evidence of shared structure. The paper finds the top direction of
   the r = 8 and r = 64 adapters overlap strongly, the rest look like noise: a small r suffices.

5. Amplification (LoRA paper, section 7.3). Does ``ΔW`` point where ``W`` is already large? Take
   ``ΔW``'s own top-r singular directions ``U: (d_out, r)``, ``Vᵀ: (r, d_in)`` and project ``W``
   onto them, ``Uᵀ W V: (r, r)``. Compare ``||Uᵀ W V||_F`` with the same projection onto ``W``'s
   own top-r directions (the largest possible value, ``||S_r||``) and onto random directions. The
   paper (GPT-3, W_q, r = 4) sees ``ΔW`` project weakly (0.32) — far below ``W``'s own directions
   (21.67) yet above random (0.02) — and the *amplification factor*
   ``||ΔW||_F / ||Uᵀ W V||_F ≈ 6.91 / 0.32 ≈ 21.5``: the update boosts directions ``W`` holds but
   does not emphasise.

6. PiSSA (Meng et al. 2024). LoRA starts from ``B = 0`` so that step 0 is the base model. PiSSA
   instead starts the adapter on ``W``'s principal directions and freezes the rest::

       B = U_r sqrt(S_r)   (d_out, r)      A = sqrt(S_r) V_rᵀ   (r, d_in)      W_res = W - B A

   Step 0 is still the base model, because ``W_res + B A = W`` exactly; and ``B A`` is the best
   rank-r approximation of ``W`` (point 2), so training moves the loudest directions first.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from minipeft import backend as bk

__all__ = [
    "svd", "truncate", "truncation_error", "tail_energy", "energy_captured", "energy_curve",
    "stable_rank", "effective_rank", "numerical_rank", "subspace_similarity",
    "subspace_similarity_grid", "Amplification", "amplification", "pissa_init",
    "random_orthonormal",
]


# ----------------------------------------------------------------------------- input checks


def _matrix(W, arg: str):
    """``W`` as a floating 2-D array of the current backend, or a ValueError naming ``arg``."""
    shape = getattr(W, "shape", None)
    if shape is None or len(shape) != 2:
        got = f"shape {tuple(shape)}" if shape is not None else f"{type(W).__name__}"
        raise ValueError(f"{arg} must be a 2-D matrix (rows, cols), got {got}")
    W = bk.asarray(W)
    if W.dtype.kind not in "fc":  # integer or bool input: the SVD needs floats
        W = W.astype(bk.default_dtype())
    return W


def _spectrum(S, arg: str = "S"):
    """``S`` as a 1-D array of the current backend, or a ValueError naming ``arg``."""
    shape = getattr(S, "shape", None)
    if shape is None or len(shape) != 1:
        got = f"shape {tuple(shape)}" if shape is not None else f"{type(S).__name__}"
        raise ValueError(f"{arg} must be a 1-D array of singular values, got {got}")
    return bk.asarray(S)


def _rank(r, low: int, high: int, arg: str = "r", what: str = "") -> int:
    """``r`` as an int in ``[low, high]``, or a ValueError naming ``arg``."""
    try:
        if isinstance(r, bool):
            raise TypeError
        r = operator.index(r)
    except TypeError:
        raise ValueError(f"{arg} must be an integer in [{low}, {high}]{what}, got {r!r}") from None
    if not low <= r <= high:
        raise ValueError(f"{arg} must be an integer in [{low}, {high}]{what}, got {r}")
    return r


# ----------------------------------------------------------------------------- SVD, best rank r


def svd(W):
    """Thin SVD ``W = U diag(S) Vt``, singular values in decreasing order.

    ``W: (m, n)`` -> ``U: (m, k)``, ``S: (k,)``, ``Vt: (k, n)`` with ``k = min(m, n)``.
    """
    W = _matrix(W, "W")
    return bk.xp.linalg.svd(W, full_matrices=False)


def truncate(W, r: int):
    """The best rank-r approximation ``U_r diag(S_r) Vt_r`` of ``W: (m, n)`` (Eckart-Young)."""
    W = _matrix(W, "W")
    r = _rank(r, 1, min(W.shape), what=" (1 <= r <= min(W.shape))")
    U, S, Vt = bk.xp.linalg.svd(W, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vt[:r]  # (m, r) * (r,) scales columns; (m, r) @ (r, n) -> (m, n)


def truncation_error(W, r: int) -> float:
    """``||W - truncate(W, r)||_F``, computed from the residual matrix itself.

    Eckart-Young says it equals ``tail_energy(S, r)``; the tests check that, so this function
    deliberately does not take the shortcut.
    """
    W = _matrix(W, "W")
    return float(bk.xp.linalg.norm(W - truncate(W, r)))


def tail_energy(S, r: int) -> float:
    """``sqrt(Σ_{i>r} σ_i²)``: what a rank-r fit throws away (``S: (k,)``, ``0 <= r <= k``)."""
    S = _spectrum(S)
    r = _rank(r, 0, S.shape[0], what=" (0 <= r <= len(S))")
    return float(bk.xp.sqrt(bk.xp.sum(S[r:] ** 2)))


def energy_curve(S):
    """Fraction of ``||W||_F² = Σ σ_i²`` held by the top k singular values, for k = 1..len(S).

    ``S: (k,)`` -> ``(k,)``, non-decreasing and ending at exactly 1 (all ones for ``S = 0``,
    where there is nothing to capture).
    """
    S = _spectrum(S)
    cum = bk.xp.cumsum(S**2)  # (k,) running Σ σ_i²
    total = cum[-1]
    if float(total) == 0.0:
        return bk.xp.ones_like(cum)
    return cum / total  # dividing by the last entry makes the curve end at exactly 1


def energy_captured(S, k: int) -> float:
    """Fraction of ``Σ σ_i²`` in the top ``k`` singular values (``0 <= k <= len(S)``)."""
    S = _spectrum(S)
    k = _rank(k, 0, S.shape[0], arg="k", what=" (0 <= k <= len(S))")
    if k == 0:
        return 0.0
    return float(energy_curve(S)[k - 1])


# ----------------------------------------------------------------------------- how many dimensions


def _singular_values(W):
    return bk.xp.linalg.svd(W, compute_uv=False)  # (k,), decreasing


def stable_rank(W) -> float:
    """``||W||_F² / ||W||_2² = Σ σ_i² / σ_1²`` (0 for the zero matrix)."""
    S = _singular_values(_matrix(W, "W"))
    top = float(S[0])
    return 0.0 if top == 0.0 else float(bk.xp.sum((S / top) ** 2))  # scaled first: no overflow


def effective_rank(W) -> float:
    """Roy & Vetterli's ``exp(-Σ p_i log p_i)`` with ``p_i = σ_i / Σ_j σ_j`` (0 for ``W = 0``)."""
    S = _singular_values(_matrix(W, "W"))
    total = float(bk.xp.sum(S))
    if total == 0.0:
        return 0.0
    p = S / total
    p = p[p > 0]  # 0 log 0 = 0: zero singular values add no entropy
    return math.exp(float(-bk.xp.sum(p * bk.xp.log(p))))


def numerical_rank(W, tol: float | None = None) -> int:
    """How many singular values exceed ``tol``.

    Default ``tol = σ_1 · max(m, n) · eps(dtype)``, the round-off level of the SVD itself (the
    same rule as ``numpy.linalg.matrix_rank``).
    """
    W = _matrix(W, "W")
    S = _singular_values(W)
    if tol is None:
        tol = float(S[0]) * max(W.shape) * float(bk.xp.finfo(W.dtype).eps)
    return int(bk.xp.sum(S > tol))


# ----------------------------------------------------------------------------- LoRA paper, 7.2


def _row_space(A1, A2):
    """Right singular vectors of both LoRA ``A`` matrices: ``Vt1: (k1, d)``, ``Vt2: (k2, d)``."""
    A1, A2 = _matrix(A1, "A1"), _matrix(A2, "A2")
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(
            f"A2 must have as many columns (d_in) as A1 {tuple(A1.shape)}, "
            f"got A2 {tuple(A2.shape)}"
        )
    _, _, Vt1 = bk.xp.linalg.svd(A1, full_matrices=False)
    _, _, Vt2 = bk.xp.linalg.svd(A2, full_matrices=False)
    return Vt1, Vt2


def subspace_similarity(A1, A2, i: int, j: int) -> float:
    """The LoRA paper's ``φ(A1, A2, i, j) = ||U1_iᵀ U2_j||_F² / min(i, j)``, in [0, 1].

    ``A1: (r1, d)``, ``A2: (r2, d)``; ``U1_i`` is the top ``i`` right singular vectors of ``A1``
    as columns ``(d, i)``, likewise ``U2_j: (d, j)``. ``1 <= i <= min(A1.shape)``, same for ``j``.
    """
    Vt1, Vt2 = _row_space(A1, A2)
    i = _rank(i, 1, Vt1.shape[0], arg="i", what=" (1 <= i <= min(A1.shape))")
    j = _rank(j, 1, Vt2.shape[0], arg="j", what=" (1 <= j <= min(A2.shape))")
    M = Vt1[:i] @ Vt2[:j].T  # (i, d) @ (d, j) -> (i, j): cosines between the basis vectors
    return float(bk.xp.sum(M**2)) / min(i, j)


def subspace_similarity_grid(A1, A2):
    """``φ(A1, A2, i, j)`` for every ``i = 1..k1`` and ``j = 1..k2`` at once: shape ``(k1, k2)``.

    Entry ``[i-1, j-1]`` is φ for the top ``i`` and top ``j`` directions. One product ``M = V1ᵀ V2``
    holds every cosine; ``||U1_iᵀ U2_j||_F²`` is the sum of ``M²`` over its top-left ``i × j``
    block, which two running sums give for all blocks together.
    """
    Vt1, Vt2 = _row_space(A1, A2)
    xp = bk.xp
    M2 = (Vt1 @ Vt2.T) ** 2  # (k1, d) @ (d, k2) -> (k1, k2) squared cosines
    block = xp.cumsum(xp.cumsum(M2, axis=0), axis=1)  # (k1, k2) sums over top-left blocks
    i = xp.arange(1, M2.shape[0] + 1)[:, None]  # (k1, 1)
    j = xp.arange(1, M2.shape[1] + 1)[None, :]  # (1, k2)
    return block / xp.minimum(i, j).astype(M2.dtype)


# ----------------------------------------------------------------------------- LoRA paper, 7.3


@dataclass(frozen=True)
class Amplification:
    """The columns of the LoRA paper's Table 7 for one weight matrix and rank."""

    rank: int  # r: how many singular directions of ΔW were used
    delta_norm: float  # ||ΔW||_F
    proj_norm: float  # ||Uᵀ W V||_F, U, V the top-r singular directions of ΔW
    factor: float  # delta_norm / proj_norm: the amplification factor (inf if proj_norm = 0)
    w_own_norm: float  # ||Uᵀ W V||_F on W's own top-r directions = ||S_r||, the largest possible
    random_norm: float  # ||Uᵀ W V||_F on random orthonormal directions (seeded)


def amplification(delta_W, W, r: int, seed: int = 0) -> Amplification:
    """How strongly ``W`` already points along ``ΔW``'s top-r directions (LoRA paper, section 7.3).

    ``delta_W, W: (d_out, d_in)``. The projection ``Uᵀ W Vtᵀ: (r, r)`` uses ``U: (d_out, r)`` and
    ``Vt: (r, d_in)`` from the SVD of ``delta_W``; the same projection onto ``W``'s own directions
    and onto random orthonormal directions (drawn from ``seed``) give the reference columns.
    """
    delta_W, W = _matrix(delta_W, "delta_W"), _matrix(W, "W")
    if delta_W.shape != W.shape:
        raise ValueError(
            f"delta_W must have the shape of W {tuple(W.shape)}, got {tuple(delta_W.shape)}"
        )
    d_out, d_in = W.shape
    r = _rank(r, 1, min(W.shape), what=" (1 <= r <= min(W.shape))")
    xp = bk.xp

    def proj(U, Vt):  # U: (d_out, r), Vt: (r, d_in)
        return float(xp.linalg.norm(U.T @ W @ Vt.T))  # (r, d_out) @ (d_out, d_in) @ (d_in, r)

    U_d, _, Vt_d = xp.linalg.svd(delta_W, full_matrices=False)
    U_w, _, Vt_w = xp.linalg.svd(W, full_matrices=False)
    U_rand = random_orthonormal(d_out, r, seed, dtype=W.dtype)  # (d_out, r)
    V_rand = random_orthonormal(d_in, r, seed + 1, dtype=W.dtype)  # (d_in, r)

    delta_norm = float(xp.linalg.norm(delta_W))
    proj_norm = proj(U_d[:, :r], Vt_d[:r])
    factor = delta_norm / proj_norm if proj_norm > 0 else math.inf
    return Amplification(
        rank=r,
        delta_norm=delta_norm,
        proj_norm=proj_norm,
        factor=factor,
        w_own_norm=proj(U_w[:, :r], Vt_w[:r]),
        random_norm=proj(U_rand, V_rand.T),
    )


# ----------------------------------------------------------------------------- PiSSA, helpers


def pissa_init(W, r: int):
    """PiSSA's adapter init: ``(A, B, W_residual)`` with ``W_residual + B @ A == W``.

    ``W: (d_out, d_in)`` -> ``A = sqrt(S_r) Vt_r: (r, d_in)``, ``B = U_r sqrt(S_r): (d_out, r)``,
    ``W_residual = W - B @ A: (d_out, d_in)``. ``B @ A`` is ``truncate(W, r)``. The factors are
    unscaled: a LoRA layer that multiplies ``B A`` by ``s = alpha / r`` should start from
    ``A / sqrt(s)`` and ``B / sqrt(s)`` to keep step 0 equal to the base model.
    """
    W = _matrix(W, "W")
    r = _rank(r, 1, min(W.shape), what=" (1 <= r <= min(W.shape))")
    U, S, Vt = bk.xp.linalg.svd(W, full_matrices=False)
    root = bk.xp.sqrt(S[:r])  # (r,) split each singular value evenly between B and A
    B = U[:, :r] * root  # (d_out, r): scale column i by sqrt(σ_i)
    A = root[:, None] * Vt[:r]  # (r, d_in): scale row i by sqrt(σ_i)
    return A, B, W - B @ A


def random_orthonormal(d: int, r: int, seed: int | None, dtype=None):
    """A ``(d, r)`` matrix with orthonormal columns spanning a uniformly random r-dim subspace.

    QR of a Gaussian matrix, drawn on the host so a seed gives the same directions on every
    backend; flipping each column by the sign of ``R``'s diagonal makes the draw exactly uniform
    (Haar). ``dtype`` defaults to the backend's default float dtype.
    """
    d = _rank(d, 1, 2**31, arg="d", what=" (d >= 1)")
    r = _rank(r, 1, d, what=" (1 <= r <= d)")
    G = bk.host_rng(seed).standard_normal((d, r))  # (d, r) on the host, float64
    Q, R = bk.np.linalg.qr(G)  # Q: (d, r), R: (r, r) upper triangular
    signs = bk.np.sign(bk.np.diag(R))
    signs[signs == 0] = 1.0
    return bk.asarray(Q * signs, dtype=dtype or bk.default_dtype())
