"""Every op's gradient against finite differences, and every fused op's forward against NumPy.

The oracle is ``gradcheck``: central differences in float64 on the projection sum(f(x) * R) for a
random R. Hypothesis draws the shapes (size-1 and missing axes included, so broadcasting is
exercised) and the values, kept where each op is smooth (log and sqrt on positives, relu away from
its kink, max without ties). Forward values are checked against formulas written out here in
plain NumPy, never against the library's own output.

All inputs are float64 arrays put on the active backend (the ``backend`` fixture), so on a GPU
machine the same tests prove the CuPy path.
"""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft import backend as bk
from minipeft.autograd import Tensor, gradcheck, ops
from minipeft.autograd import functional as F

# --------------------------------------------------------------------------- helpers


def leaf(a, requires_grad: bool = True) -> Tensor:
    """A float64 tensor on the active backend."""
    t = Tensor(bk.asarray(np.asarray(a, dtype=np.float64)), requires_grad=requires_grad)
    assert bk.array_backend(t.data) == bk.name
    return t


def host(x) -> np.ndarray:
    return bk.to_numpy(x)


def check(fn, *arrays, frozen: tuple = ()):
    """gradcheck ``fn`` on float64 tensors made from ``arrays`` (indices in ``frozen`` get no
    gradient); returns the tensors so a test can look at their ``.grad`` too."""
    ts = [leaf(a, requires_grad=i not in frozen) for i, a in enumerate(arrays)]
    result = gradcheck(fn, ts)
    assert result.ok, result.report()
    return ts


def values(lo: float = -2.0, hi: float = 2.0):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def away_from_zero(lo: float = 0.2, hi: float = 2.0):
    return st.one_of(values(-hi, -lo), values(lo, hi))


def arrays(shape, elements=None):
    return hnp.arrays(np.float64, shape, elements=elements if elements is not None else values())


def distinct(shape):
    """Values at least 1/8 apart: no ties for max, no zero-variance rows for layer norm."""
    return hnp.arrays(np.float64, shape, elements=st.integers(-64, 64).map(lambda i: i / 8),
                      unique=True)


small_shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)


def np_softmax(a, axis=-1):
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_gelu(a):
    return 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))


# --------------------------------------------------------------------------- arithmetic
BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}


@pytest.mark.parametrize("name", list(BINARY))
@given(data=st.data())
def test_binary_op_gradients_with_broadcasting(backend, name, data):
    (sa, sb), _ = data.draw(hnp.mutually_broadcastable_shapes(
        num_shapes=2, min_dims=0, max_dims=3, max_side=3))
    a = data.draw(arrays(sa))
    b = data.draw(arrays(sb, away_from_zero(0.5) if name == "div" else None))
    fn = getattr(ops, name)
    check(fn, a, b)
    np.testing.assert_allclose(host(fn(leaf(a), leaf(b)).data), BINARY[name](a, b), rtol=1e-12)


# Size-1 axes and missing leading axes, on either side.
BROADCAST_CASES = [((3, 1, 4), (5, 1)), ((4,), (2, 3, 4)), ((2, 1), (1, 3)), ((1,), (2, 3)),
                   ((), (2, 3)), ((2, 3, 1), (3, 4)), ((1, 1), (3,))]


@pytest.mark.parametrize("name", list(BINARY))
@pytest.mark.parametrize("sa,sb", BROADCAST_CASES)
def test_binary_op_broadcast_cases(backend, name, sa, sb):
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 2, sa)
    b = rng.uniform(0.5, 2, sb)
    ta, tb = check(getattr(ops, name), a, b)
    assert ta.grad.shape == sa and tb.grad.shape == sb  # summed back over the broadcast axes


def test_operators_and_python_scalars(backend):
    x = np.array([[0.5, -1.5, 2.0], [1.25, -0.75, 0.3]])
    check(lambda t: 2.0 - t * 3 + t / 4 - 1, x)
    check(lambda t: 3.0 / t + (-t) ** 2 + 1 + t, x)
    # A Python number takes the tensor's dtype: no silent float64 upcast of float32 work.
    y = Tensor(bk.asarray(x.astype(np.float32)), requires_grad=True)
    assert (y * 2.5 + 1).dtype == np.float32
    assert (np.float64(2.0) * y).dtype == np.float32


@pytest.mark.parametrize("p", [2, 3, -1, 0.5, -1.5, 0])
@given(data=st.data())
def test_pow(backend, p, data):
    shape = data.draw(small_shapes)
    positive = not (isinstance(p, int) and p > 0)
    a = data.draw(arrays(shape, values(0.2, 2.0) if positive else None))
    check(lambda t: ops.pow(t, p), a)
    np.testing.assert_allclose(host((leaf(a) ** p).data), a ** p, rtol=1e-12)


def test_pow_needs_a_number_exponent(backend):
    x = leaf([1.0, 2.0])
    with pytest.raises(TypeError, match="pow: the exponent must be a Python number"):
        ops.pow(x, x)


# --------------------------------------------------------------------------- elementwise
UNARY = [
    ("neg", ops.neg, values(), np.negative),
    ("exp", ops.exp, values(), np.exp),
    ("log", ops.log, values(0.1, 3.0), np.log),
    ("sqrt", ops.sqrt, values(0.1, 3.0), np.sqrt),
    ("tanh", ops.tanh, values(), np.tanh),
    ("relu", ops.relu, away_from_zero(0.01), lambda a: np.maximum(a, 0)),
    ("gelu", F.gelu, values(-3.0, 3.0), np_gelu),
]


@pytest.mark.parametrize("name,fn,elements,ref", UNARY, ids=[u[0] for u in UNARY])
@given(data=st.data())
def test_unary_op(backend, name, fn, elements, ref, data):
    a = data.draw(arrays(data.draw(small_shapes), elements))
    check(fn, a)
    np.testing.assert_allclose(host(fn(leaf(a)).data), ref(a), rtol=1e-12, atol=1e-15)


def test_relu_gradient_is_the_step(backend):
    x = leaf([-2.0, -0.5, 0.5, 3.0])
    ops.relu(x).sum().backward()
    np.testing.assert_array_equal(host(x.grad), [0, 0, 1, 1])


def test_gelu_is_close_to_the_exact_erf_form(backend):
    a = np.linspace(-4, 4, 81)
    exact = 0.5 * a * (1 + np.vectorize(math.erf)(a / math.sqrt(2)))
    np.testing.assert_allclose(host(F.gelu(leaf(a)).data), exact, atol=1e-3)


# --------------------------------------------------------------------------- matmul
@given(data=st.data())
def test_matmul_batched_and_broadcast(backend, data):
    (sa, sb), _ = data.draw(hnp.mutually_broadcastable_shapes(
        signature="(m,k),(k,n)->(m,n)", max_dims=4, max_side=3))
    sa, sb = (2,) * (2 - len(sa)) + sa, sb  # the signature's core dims are always there
    a, b = data.draw(arrays(sa)), data.draw(arrays(sb))
    check(ops.matmul, a, b)
    np.testing.assert_allclose(host((leaf(a) @ leaf(b)).data), a @ b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sa,sb", [((2, 1, 3, 4), (5, 4, 2)), ((3, 4), (2, 4, 5)),
                                   ((2, 3, 4), (4, 5)), ((1, 3, 4), (2, 4, 1)), ((3, 4), (4, 2))])
def test_matmul_broadcast_cases(backend, sa, sb):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(sa), rng.standard_normal(sb)
    ta, tb = check(ops.matmul, a, b)
    assert ta.grad.shape == sa and tb.grad.shape == sb  # summed over broadcast batch axes


# --------------------------------------------------------------------------- reductions
@pytest.mark.parametrize("name", ["sum", "mean", "max"])
@given(data=st.data())
def test_reductions_over_any_axes(backend, name, data):
    shape = data.draw(small_shapes)
    ndim = len(shape)
    axis = data.draw(st.one_of(st.none(), st.integers(-ndim, ndim - 1),
                               hnp.valid_tuple_axes(ndim, min_size=1)))
    keepdims = data.draw(st.booleans())
    a = data.draw(distinct(shape))
    fn = getattr(ops, name)
    check(lambda t: fn(t, axis=axis, keepdims=keepdims), a)
    expected = getattr(np, name)(a, axis=axis, keepdims=keepdims)
    got = host(getattr(leaf(a), name)(axis=axis, keepdims=keepdims).data)
    assert got.shape == np.shape(expected)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_max_splits_the_gradient_between_ties(backend):
    x = leaf([[1.0, 3.0, 3.0], [5.0, 0.0, 5.0]])
    x.max(axis=1).sum().backward()
    np.testing.assert_allclose(host(x.grad), [[0, 0.5, 0.5], [0.5, 0, 0.5]])


# --------------------------------------------------------------------------- shape ops
@given(data=st.data())
def test_reshape(backend, data):
    shape = data.draw(small_shapes)
    target = list(data.draw(st.permutations(shape)))
    if data.draw(st.booleans()):
        target[data.draw(st.integers(0, len(target) - 1))] = -1
    a = data.draw(arrays(shape))
    check(lambda t: t.reshape(*target) * 1.0, a)
    np.testing.assert_array_equal(host(ops.reshape(leaf(a), target).data), a.reshape(target))


@given(data=st.data())
def test_transpose_permute_and_swapaxes(backend, data):
    shape = data.draw(small_shapes)
    ndim = len(shape)
    perm = data.draw(st.permutations(range(ndim)))
    neg = [ax - ndim if data.draw(st.booleans()) else ax for ax in perm]  # negative axes too
    i, j = data.draw(st.integers(-ndim, ndim - 1)), data.draw(st.integers(-ndim, ndim - 1))
    a = data.draw(arrays(shape))
    check(lambda t: ops.transpose(t, neg), a)
    check(lambda t: t.permute(*perm), a)
    check(lambda t: t.T, a)
    check(lambda t: ops.swapaxes(t, i, j), a)
    np.testing.assert_array_equal(host(leaf(a).permute(*neg).data), a.transpose(perm))
    np.testing.assert_array_equal(host(ops.swapaxes(leaf(a), i, j).data), np.swapaxes(a, i, j))


@pytest.mark.parametrize("perm", [(1, 2, 0), (2, 0, -2), (0, 3, 1, 2)])
def test_transpose_cycles(backend, perm):
    """A 3-cycle is not its own inverse: the backward must apply the inverse permutation."""
    a = np.random.default_rng(10).standard_normal((2, 3, 4, 5)[:len(perm)])
    (t,) = check(lambda t: t.permute(*perm), a)
    assert t.grad.shape == a.shape


@given(data=st.data())
def test_broadcast_to(backend, data):
    target = data.draw(small_shapes)
    keep = data.draw(st.integers(0, len(target)))  # missing leading axes
    shape = tuple(1 if data.draw(st.booleans()) else n for n in target[len(target) - keep:])
    a = data.draw(arrays(shape))
    (t,) = check(lambda t: ops.broadcast_to(t, target), a)
    assert t.grad.shape == shape


# --------------------------------------------------------------------------- indexing
@given(data=st.data())
def test_getitem_basic_indices(backend, data):
    shape = data.draw(small_shapes)
    idx = data.draw(hnp.basic_indices(shape, allow_newaxis=True))
    a = data.draw(arrays(shape))
    check(lambda t: t[idx], a)
    np.testing.assert_array_equal(host(leaf(a)[idx].data), a[idx])


@given(data=st.data())
def test_getitem_integer_arrays_with_repeats(backend, data):
    shape = data.draw(small_shapes)
    np_idx = data.draw(hnp.integer_array_indices(
        shape, result_shape=hnp.array_shapes(min_dims=1, max_dims=2, max_side=5)))
    idx = tuple(bk.asarray(i) for i in np_idx)
    a = data.draw(arrays(shape))
    (t,) = check(lambda t: t[idx], a)
    np.testing.assert_array_equal(host(leaf(a)[idx].data), a[np_idx])
    # the adjoint of a gather is a scatter-ADD: compare with NumPy's unbuffered add.at
    g = np.random.default_rng(0).standard_normal(a[np_idx].shape)
    t.grad = None
    t[idx].backward(g)
    expected = np.zeros(shape)
    np.add.at(expected, np_idx, g)
    np.testing.assert_allclose(host(t.grad), expected, rtol=1e-12)


def test_getitem_repeated_rows_accumulate(backend):
    x = leaf(np.arange(12.0).reshape(4, 3))
    x[[0, 0, 2, 0], 1:].sum().backward()
    np.testing.assert_array_equal(host(x.grad), [[0, 3, 3], [0, 0, 0], [0, 1, 1], [0, 0, 0]])


@given(data=st.data())
def test_getitem_boolean_mask(backend, data):
    shape = data.draw(small_shapes)
    np_mask = data.draw(hnp.arrays(bool, shape[:data.draw(st.integers(1, len(shape)))]))
    mask = bk.asarray(np_mask)
    a = data.draw(arrays(shape))
    (t,) = check(lambda t: t[mask], a)
    np.testing.assert_array_equal(host(leaf(a)[mask].data), a[np_mask])
    t.grad = None
    t[mask].sum().backward()
    expected = np.zeros(shape)
    expected[np_mask] = 1
    np.testing.assert_array_equal(host(t.grad), expected)


@given(data=st.data())
def test_concatenate_and_stack(backend, data):
    shape = data.draw(small_shapes)
    ndim = len(shape)
    axis = data.draw(st.integers(-ndim, ndim - 1))
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    parts = []
    for n in sizes:
        s = list(shape)
        s[axis] = n
        parts.append(data.draw(arrays(tuple(s))))
    check(lambda *ts: ops.concatenate(ts, axis=axis), *parts)
    got = host(ops.concatenate([leaf(p) for p in parts], axis=axis).data)
    np.testing.assert_array_equal(got, np.concatenate(parts, axis=axis))

    same = [data.draw(arrays(shape)) for _ in sizes]
    saxis = data.draw(st.integers(-ndim - 1, ndim))
    check(lambda *ts: ops.stack(ts, axis=saxis), *same)
    got = host(ops.stack([leaf(p) for p in same], axis=saxis).data)
    np.testing.assert_array_equal(got, np.stack(same, axis=saxis))


# --------------------------------------------------------------------------- selection
@given(data=st.data())
def test_where_with_broadcasting(backend, data):
    (sc, sa, sb), _ = data.draw(hnp.mutually_broadcastable_shapes(
        num_shapes=3, min_dims=0, max_dims=3, max_side=3))
    np_cond = data.draw(hnp.arrays(bool, sc))
    a, b = data.draw(arrays(sa)), data.draw(arrays(sb))
    cond = bk.asarray(np_cond)
    check(lambda x, y: ops.where(cond, x, y), a, b)
    np.testing.assert_array_equal(host(ops.where(cond, leaf(a), leaf(b)).data),
                                  np.where(np_cond, a, b))


@given(data=st.data())
def test_masked_fill(backend, data):
    shape = data.draw(small_shapes)
    keep = data.draw(st.integers(0, len(shape)))
    np_mask = data.draw(hnp.arrays(bool, shape[len(shape) - keep:]))  # broadcasts to shape
    a = data.draw(arrays(shape))
    mask = bk.asarray(np_mask)
    (t,) = check(lambda t: ops.masked_fill(t, mask, -5.0), a)
    np.testing.assert_array_equal(host(ops.masked_fill(leaf(a), mask, -5.0).data),
                                  np.where(np_mask, -5.0, a))
    t.grad = None
    ops.masked_fill(t, mask, -5.0).sum().backward()
    np.testing.assert_array_equal(host(t.grad), np.broadcast_to(~np_mask, shape).astype(float))


# --------------------------------------------------------------------------- softmax family
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@given(data=st.data())
def test_softmax_and_log_softmax_any_axis(backend, name, data):
    shape = data.draw(small_shapes)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    a = data.draw(arrays(shape, values(-4.0, 4.0)))
    fn = getattr(F, name)
    check(lambda t: fn(t, axis=axis), a)
    p = np_softmax(a, axis)
    got = host(fn(leaf(a), axis=axis).data)
    if name == "softmax":
        np.testing.assert_allclose(got.sum(axis=axis), 1.0, rtol=1e-12)
        np.testing.assert_allclose(got, p, rtol=1e-12)
    else:
        np.testing.assert_allclose(got, np.log(p), rtol=1e-10, atol=1e-12)


def test_softmax_is_stable_for_huge_logits(backend):
    a = np.array([[1000.0, 0.0, -1000.0], [5e3, 5e3, 0.0]])
    np.testing.assert_allclose(host(F.softmax(leaf(a)).data), [[1, 0, 0], [0.5, 0.5, 0]])
    log2 = math.log(2)
    np.testing.assert_allclose(host(F.log_softmax(leaf(a)).data),
                               [[0, -1000, -2000], [-log2, -log2, -5e3 - log2]])


# --------------------------------------------------------------------------- cross-entropy
def np_cross_entropy(z, t, ignore_index=-100):
    """mean over counted positions of -log p[target], with log p = z - logsumexp(z)."""
    z, t = z.reshape(-1, z.shape[-1]), t.reshape(-1)
    m = z.max(axis=-1, keepdims=True)
    logp = z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))
    rows = [i for i in range(len(t)) if t[i] != ignore_index]
    return -sum(logp[i, t[i]] for i in rows) / max(len(rows), 1)


@given(data=st.data())
def test_cross_entropy_with_ignored_positions(backend, data):
    lead = data.draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=4))
    V = data.draw(st.integers(2, 5))
    z = data.draw(arrays(lead + (V,), values(-4.0, 4.0)))
    np_t = data.draw(hnp.arrays(np.int64, lead, elements=st.integers(0, V - 1)))
    ignored = data.draw(hnp.arrays(bool, lead))
    ignored.flat[data.draw(st.integers(0, ignored.size - 1))] = False  # at least one counted
    np_t[ignored] = -100
    t = bk.asarray(np_t)
    check(lambda x: F.cross_entropy(x, t), z)
    loss = F.cross_entropy(leaf(z), t).item()
    assert loss == pytest.approx(np_cross_entropy(z, np_t), rel=1e-12)


def test_cross_entropy_all_but_one_ignored(backend):
    rng = np.random.default_rng(2)
    z = rng.standard_normal((2, 3, 4))
    t = np.full((2, 3), 7)
    t[1, 2] = 3
    x = leaf(z)
    loss = F.cross_entropy(x, bk.asarray(t), ignore_index=7)
    p = np_softmax(z[1, 2])
    assert loss.item() == pytest.approx(-math.log(p[3]), rel=1e-12)
    loss.backward()
    expected = np.zeros_like(z)
    expected[1, 2] = p - np.eye(4)[3]  # (p - onehot) / n with n = 1 counted position
    np.testing.assert_allclose(host(x.grad), expected, atol=1e-15)
    check(lambda x: F.cross_entropy(x, bk.asarray(t), ignore_index=7), z)


def test_cross_entropy_backward_is_p_minus_onehot_over_n(backend):
    rng = np.random.default_rng(3)
    z, t = rng.standard_normal((5, 6)), rng.integers(0, 6, 5)
    x = leaf(z)
    F.cross_entropy(x, bk.asarray(t)).backward()
    np.testing.assert_allclose(host(x.grad), (np_softmax(z) - np.eye(6)[t]) / 5, atol=1e-15)


def test_cross_entropy_is_stable_for_huge_logits(backend):
    z = np.array([[0.0, 1000.0], [1.0, 2.0]])
    loss = F.cross_entropy(leaf(z), bk.asarray(np.array([0, 1])))
    assert loss.item() == pytest.approx((1000 + math.log1p(math.exp(-1))) / 2, rel=1e-12)


# --------------------------------------------------------------------------- layer norm
@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both"])
@given(data=st.data())
def test_layer_norm(backend, affine, data):
    lead = data.draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3))
    C = data.draw(st.integers(2, 5))
    x = data.draw(distinct(lead + (C,)))
    w = data.draw(arrays((C,))) if affine in ("weight", "both") else None
    b = data.draw(arrays((C,))) if affine in ("bias", "both") else None
    given_ = [v for v in (x, w, b) if v is not None]

    def fn(*ts):
        it = iter(ts)
        x_ = next(it)
        return F.layer_norm(x_, next(it) if w is not None else None,
                            next(it) if b is not None else None)
    check(fn, *given_)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    expected = (x - mu) / np.sqrt(var + 1e-5) * (1 if w is None else w) + (0 if b is None else b)
    np.testing.assert_allclose(host(fn(*[leaf(v) for v in given_]).data), expected, rtol=1e-10,
                               atol=1e-12)


def test_layer_norm_normalises_before_the_affine_map(backend):
    x = np.random.default_rng(4).normal(3.0, 5.0, (4, 7))
    y = host(F.layer_norm(leaf(x), None, None, eps=0.0).data)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-12)


# --------------------------------------------------------------------------- embedding
@given(data=st.data())
def test_embedding_repeated_ids_accumulate(backend, data):
    V, C = data.draw(st.integers(2, 6)), data.draw(st.integers(1, 4))
    np_ids = data.draw(hnp.arrays(np.int64, hnp.array_shapes(min_dims=1, max_dims=2, max_side=5),
                                  elements=st.integers(0, V - 1)))
    W = data.draw(arrays((V, C)))
    ids = bk.asarray(np_ids)
    (w,) = check(lambda w: F.embedding(w, ids), W)
    np.testing.assert_array_equal(host(F.embedding(leaf(W), ids).data), W[np_ids])
    # independent computation: the lookup is onehot(ids) @ W, so dW = onehot(ids)^T @ g
    g = np.random.default_rng(5).standard_normal(np_ids.shape + (C,))
    w.grad = None
    F.embedding(w, ids).backward(g)
    onehot = np.eye(V)[np_ids.reshape(-1)]                          # (N, V)
    np.testing.assert_allclose(host(w.grad), onehot.T @ g.reshape(-1, C), rtol=1e-12)


# --------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("p", [0.0, 0.25, 0.6])
def test_dropout_gradient_is_the_scaled_mask(backend, p):
    x = np.random.default_rng(6).uniform(0.5, 2.0, (8, 16))
    t = leaf(x)
    out = F.dropout(t, p, training=True, rng=bk.device_rng(11))
    y = host(out.data)
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / (1 - p), rtol=1e-12)  # inverted dropout
    g = np.random.default_rng(7).standard_normal(x.shape)
    out.backward(g)
    np.testing.assert_allclose(host(t.grad), g * kept / (1 - p), rtol=1e-12)
    # the same seed gives the same mask, so finite differences see one fixed function
    check(lambda t: F.dropout(t, p, True, rng=bk.device_rng(11)), x)


def test_dropout_drops_about_p_of_the_elements(backend):
    out = F.dropout(leaf(np.ones((200, 200))), 0.3, training=True, rng=bk.device_rng(0))
    assert abs((host(out.data) == 0).mean() - 0.3) < 0.02


def test_dropout_is_identity_in_eval(backend):
    t = leaf([[1.0, 2.0]])
    assert F.dropout(t, 0.5, training=False) is t


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_rejects_p_outside_unit_interval(backend, p):
    with pytest.raises(ValueError, match=r"dropout: p must be in \[0, 1\)"):
        F.dropout(leaf([1.0]), p, training=True)


# --------------------------------------------------------------------------- attention
def np_attention(q, k, v, causal, mask):
    """Loop over every (batch, head, query): softmax over the keys that query may see."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    allowed = np.ones((B, H, Tq, Tk), bool)
    if mask is not None:
        allowed &= np.broadcast_to(mask, allowed.shape)
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                js = [j for j in range(Tk) if allowed[b, h, i, j]
                      and (not causal or j <= i + Tk - Tq)]  # query i sits at i + Tk - Tq
                s = np.array([q[b, h, i] @ k[b, h, j] / math.sqrt(D) for j in js])
                w = np.exp(s - s.max())
                out[b, h, i] = (w / w.sum()) @ v[b, h, js]
    return out


@pytest.mark.parametrize("mode", ["causal_kv_cache", "mask", "full"])
@given(data=st.data())
def test_attention(backend, mode, data):
    B, H, D = (data.draw(st.integers(1, 2)) for _ in range(3))
    Tq = data.draw(st.integers(1, 3))
    Tk = data.draw(st.integers(Tq + 1 if mode == "causal_kv_cache" else 1, 4))
    q = data.draw(arrays((B, H, Tq, D)))
    k, v = data.draw(arrays((B, H, Tk, D))), data.draw(arrays((B, H, Tk, D)))
    np_mask = None
    if mode == "mask":
        mshape = data.draw(st.sampled_from([(B, H, Tq, Tk), (B, 1, 1, Tk), (Tq, Tk)]))
        np_mask = data.draw(hnp.arrays(bool, mshape))
        np_mask[..., data.draw(st.integers(0, Tk - 1))] = True  # every query sees some key
    mask = None if np_mask is None else bk.asarray(np_mask)
    causal = mode == "causal_kv_cache"
    check(lambda a, b, c: F.attention(a, b, c, causal=causal, mask=mask), q, k, v)
    got = host(F.attention(leaf(q), leaf(k), leaf(v), causal=causal, mask=mask).data)
    np.testing.assert_allclose(got, np_attention(q, k, v, causal, np_mask), rtol=1e-10,
                               atol=1e-12)


def test_attention_frozen_inputs_get_no_gradient(backend):
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((1, 2, 3, 4)) for _ in range(3))
    tq, tk, tv = check(lambda a, b, c: F.attention(a, b, c), q, k, v, frozen=(1,))
    assert tk.grad is None and tq.grad is not None and tv.grad is not None


# --------------------------------------------------------------------------- linear
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("xshape", [(5, 3), (2, 4, 3), (3,)])
def test_linear(backend, bias, xshape):
    rng = np.random.default_rng(9)
    x, W, b = rng.standard_normal(xshape), rng.standard_normal((4, 3)), rng.standard_normal(4)
    ins = (x, W, b) if bias else (x, W)
    check(F.linear, *ins)
    expected = x @ W.T + (b if bias else 0)
    np.testing.assert_allclose(host(F.linear(*[leaf(a) for a in ins]).data), expected,
                               rtol=1e-12)


@given(data=st.data())
def test_linear_property(backend, data):
    lead = data.draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=3))
    n_in, n_out = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    x, W = data.draw(arrays(lead + (n_in,))), data.draw(arrays((n_out, n_in)))
    b = data.draw(arrays((n_out,)))
    check(F.linear, x, W, b)


def test_linear_rejects_wrong_feature_count(backend):
    with pytest.raises(ValueError, match=r"linear: input has 3 features .* expects 5"):
        F.linear(leaf(np.ones((2, 3))), leaf(np.ones((4, 5))))
