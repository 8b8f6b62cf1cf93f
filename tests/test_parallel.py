"""Split over threads, every op gives the numbers of its one-call (readable) form.

``minipeft.parallel`` cuts an op's rows into pieces that run at once. Each test here runs an op
(forward and backward) twice: on one thread, where every op is a single NumPy call, and on
several threads with the size threshold at zero, so even small arrays are split. Elementwise and
row-wise work must agree exactly (each element is computed by the same arithmetic); matrix
products and the parameter-gradient sums that add the pieces' partial sums agree to rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

from minipeft import backend as bk
from minipeft import parallel as par
from minipeft.autograd import Tensor, concatenate, gradcheck
from minipeft.autograd import functional as F

pytestmark = pytest.mark.skipif(bk.name != "numpy", reason="CPU threads: NumPy backend only")


@pytest.fixture
def threads(monkeypatch):
    """Run a function on 1 and on 3 threads (3: pieces of unequal size), everything split."""
    monkeypatch.setattr(par, "MIN_ELEMENTS", 0)

    def on(n, fn):
        old = par.threads()
        par.set_threads(n)
        try:
            return fn()
        finally:
            par.set_threads(old)
    return on


def leaf(rng, *shape, grad=True, dtype=np.float32):
    return Tensor(rng.normal(size=shape).astype(dtype), requires_grad=grad)


def forward_backward(build, seed=0):
    """Output and input gradients of ``build(rng)`` -> (out, inputs), with a fixed seed grad."""
    rng = np.random.default_rng(seed)
    out, inputs = build(rng)
    g = rng.normal(size=out.shape).astype(out.data.dtype)
    out.backward(g)
    return [bk.to_numpy(out.data)] + [None if t.grad is None else bk.to_numpy(t.grad)
                                      for t in inputs]


OPS = {
    # name: (build, exact): exact = every number the same, else equal to float32 rounding
    "gelu": (lambda r: (lambda x: (F.gelu(x), [x]))(leaf(r, 5, 7, 33)), True),
    "cross_entropy": (lambda r: (lambda z: (F.cross_entropy(
        z, np.where(r.random((7, 9)) < 0.2, -100, r.integers(0, 40, (7, 9)))), [z]))(
        leaf(r, 7, 9, 40)), False),
    "attention": (lambda r: (lambda q, k, v: (F.attention(q, k, v), [q, k, v]))(
        leaf(r, 3, 5, 17, 8), leaf(r, 3, 5, 17, 8), leaf(r, 3, 5, 17, 8)), False),
    "attention, prefix keys and a mask": (lambda r: (lambda q, k, v: (F.attention(
        q, k, v, mask=r.random((3, 1, 6, 10)) < 0.8), [q, k, v]))(
        leaf(r, 3, 4, 6, 8), leaf(r, 3, 4, 10, 8), leaf(r, 3, 4, 10, 8)), False),
    "linear": (lambda r: (lambda x, w, b: (F.linear(x, w, b), [x, w, b]))(
        leaf(r, 4, 9, 16), leaf(r, 24, 16), leaf(r, 24)), False),
    "add (residual)": (lambda r: (lambda a, b: (a + b, [a, b]))(
        leaf(r, 4, 9, 16), leaf(r, 4, 9, 16)), True),
    "matmul of two matrices": (lambda r: (lambda a, b: (a @ b, [a, b]))(
        leaf(r, 37, 16), leaf(r, 16, 11)), False),
}


@pytest.mark.parametrize("name", list(OPS))
def test_split_op_equals_its_one_call_form(name, threads):
    build, exact = OPS[name]
    one = threads(1, lambda: forward_backward(build))
    many = threads(3, lambda: forward_backward(build))
    for a, b in zip(one, many):
        if a is None:
            assert b is None
        elif exact:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)


def test_attention_blocks_of_any_shape_change_nothing(threads, monkeypatch):
    """Whole sequences per block, a piece starting inside a sequence (2 threads over 3 x 5
    heads: pieces of 7 and 8), and one head per block, all against one block of everything."""
    build = OPS["attention"][0]
    whole = threads(1, lambda: forward_backward(build))
    ragged = threads(2, lambda: forward_backward(build))
    monkeypatch.setattr(F, "_BLOCK_BYTES", 1)
    single_heads = threads(2, lambda: forward_backward(build))
    for a, b, c in zip(whole, ragged, single_heads):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)
        np.testing.assert_allclose(a, c, rtol=2e-6, atol=2e-6)
    seen = [i for i in F._blocks(0, 15, 5, 10)]
    assert seen == [(slice(0, 2),), (slice(2, 3),)]
    assert list(F._blocks(7, 15, 5, 10)) == [(1, slice(2, 5)), (slice(2, 3),)]


def test_lora_linear_split_equals_one_call(threads):
    from minipeft.peft.lora import lora_linear

    def build(r):
        x, W, A, B = leaf(r, 4, 9, 16), leaf(r, 24, 16, grad=False), leaf(r, 8, 16), leaf(r, 24, 8)
        return lora_linear(x, W, None, A, B, 2.0), [x, A, B]
    one = threads(1, lambda: forward_backward(build))
    many = threads(2, lambda: forward_backward(build))
    for a, b in zip(one, many):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)


def test_split_gradients_pass_gradcheck_in_float64(threads):
    """The split path is differentiated correctly, not only equal to the other path."""
    rng = np.random.default_rng(1)

    def check():
        q, k, v = (leaf(rng, 2, 3, 5, 4, dtype=np.float64) for _ in range(3))
        x, w, b = leaf(rng, 2, 5, 6, dtype=np.float64), leaf(rng, 6, dtype=np.float64), \
            leaf(rng, 6, dtype=np.float64)
        assert gradcheck(lambda q, k, v: F.attention(q, k, v), [q, k, v]).ok
        assert gradcheck(lambda x, w, b: F.gelu(F.layer_norm(x, w, b)), [x, w, b]).ok
        h = leaf(rng, 3, 7, 6, dtype=np.float64)
        assert gradcheck(lambda h: concatenate([h, h], axis=0) + concatenate([h, h], 0), [h]).ok
    threads(2, check)


def test_run_covers_every_row_once_in_order(threads):
    seen = threads(3, lambda: par.run(lambda lo, hi: list(range(lo, hi)), 10))
    assert len(seen) == 3 and sum(seen, []) == list(range(10))
    assert threads(3, lambda: par.run(lambda lo, hi: (lo, hi), 2)) == [(0, 1), (1, 2)]


def test_a_piece_that_splits_again_runs_in_one_piece(threads):
    """No deadlock: a piece that calls run() itself does its work in one call."""
    inner = threads(2, lambda: par.run(lambda lo, hi: par.run(lambda a, b: (a, b), 8), 4))
    assert inner == [[(0, 8)], [(0, 8)]]


def test_an_error_in_a_piece_reaches_the_caller(threads):
    def piece(lo, hi):
        if lo > 0:
            raise ValueError("piece failed")
    with pytest.raises(ValueError, match="piece failed"):
        threads(2, lambda: par.run(piece, 4))


def test_thread_count_is_checked(monkeypatch):
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="set_threads"):
            par.set_threads(bad)
    monkeypatch.setattr(par, "_threads", None)
    monkeypatch.setenv("MINIPEFT_THREADS", "zero")
    with pytest.raises(ValueError, match="MINIPEFT_THREADS"):
        par.threads()
    monkeypatch.setenv("MINIPEFT_THREADS", "1")
    assert par.threads() == 1


def test_openblas_is_held_at_one_thread_only_while_we_split():
    from threadpoolctl import threadpool_info

    def blas_threads():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
    old = par.threads()
    try:
        par.set_threads(1)                       # BLAS back to its own setting
        original = blas_threads()
        par.set_threads(2)
        assert blas_threads() == {1}
        par.set_threads(1)
        assert blas_threads() == original
    finally:
        par.set_threads(old)
