"""The engine: how gradients flow through a graph, when a graph exists at all, and what it costs.

Fan-out (a tensor used twice must receive the SUM of both gradients), accumulation across
backward calls, freeing the graph, ``no_grad``, frozen inputs that cost no gradient work (the
source of PEFT's savings, counted with ``counters``), deep graphs, and clear errors for bad input.
"""

from __future__ import annotations

import numpy as np
import pytest

from minipeft import backend as bk
from minipeft.autograd import (
    Tensor,
    counters,
    cross_entropy,
    embedding,
    gradcheck,
    is_grad_enabled,
    linear,
    no_grad,
    ops,
)


def leaf(a, requires_grad: bool = True) -> Tensor:
    """A float64 tensor on the active backend."""
    return Tensor(bk.asarray(np.asarray(a, dtype=np.float64)), requires_grad=requires_grad)


def host(x) -> np.ndarray:
    return bk.to_numpy(x)


def graph_nodes(root: Tensor) -> list[Tensor]:
    """Every tensor reachable from ``root`` through ``_parents`` (walked here, not by engine)."""
    seen, stack, out = set(), [root], []
    while stack:
        t = stack.pop()
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
            stack.extend(t._parents)
    return out


# --------------------------------------------------------------------------- fan-out
def test_diamond_graph_sums_both_branches(backend):
    """x feeds two branches that rejoin: L = sum(tanh(x) * 3x + x)."""
    xs = np.array([-1.2, 0.3, 0.8, 2.0])
    x = leaf(xs)
    a = ops.tanh(x)             # branch 1
    b = x * 3.0                 # branch 2
    (a * b + x).sum().backward()
    th = np.tanh(xs)
    # product rule over the two branches, plus the direct path
    hand = 3 * xs * (1 - th ** 2) + 3 * th + 1
    np.testing.assert_allclose(host(x.grad), hand, rtol=1e-12)
    gradcheck(lambda x: ops.tanh(x) * (x * 3.0) + x, [leaf(xs)])


def test_intermediate_fan_out(backend):
    """An intermediate node y used twice: z = y*y + y with y = 2x, so dz/dx = (2y + 1) * 2."""
    xs = np.array([[0.5, -1.0], [2.0, 0.25]])
    x = leaf(xs)
    y = x * 2.0
    (y * y + y).sum().backward()
    np.testing.assert_allclose(host(x.grad), (4 * xs + 1) * 2, rtol=1e-12)
    gradcheck(lambda x: (x * 2.0) * (x * 2.0) + x * 2.0, [leaf(xs)])


def test_two_graphs_accumulate_into_grad(backend):
    xs = np.array([1.0, -2.0, 3.0])
    x = leaf(xs)
    for _ in range(2):  # two separately built graphs, each with dL/dx = x
        (x * x * 0.5).sum().backward()
    np.testing.assert_allclose(host(x.grad), 2 * xs, rtol=1e-12)
    x.zero_grad()
    assert x.grad is None


def test_leaf_grads_are_fresh_arrays(backend):
    """a + b hands the same upstream array to both inputs; their .grad must not alias it or each
    other, or an in-place update of one (gradient clipping) would change the other."""
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    seed = bk.asarray(np.array([1.0, 1.0]))
    (a + b).backward(seed)
    assert a.grad is not b.grad and a.grad is not seed
    a.grad *= 0.5
    np.testing.assert_array_equal(host(b.grad), [1.0, 1.0])
    np.testing.assert_array_equal(host(seed), [1.0, 1.0])


def test_zero_dim_tensors_stay_arrays(backend):
    """NumPy returns 0-d results as scalars; a Tensor's data must stay an array on its backend."""
    a, b = leaf(2.0), leaf(3.0)
    c = a * b
    assert bk.is_array(c.data) and c.shape == ()
    (c + a).backward()
    assert float(host(a.grad)) == 4.0 and float(host(b.grad)) == 2.0


# --------------------------------------------------------------------------- graph lifetime
def test_backward_twice_through_a_freed_graph_raises(backend):
    x = leaf([1.0, 2.0])
    loss = (x * x).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="already freed.*retain_graph=True"):
        loss.backward()


def test_a_second_loss_through_a_freed_shared_trunk_raises(backend):
    x = leaf([1.0, 2.0])
    trunk = x * 2.0
    trunk.sum().backward()
    with pytest.raises(RuntimeError, match="output of 'mul'.*already freed"):
        (trunk * 3.0).sum().backward()  # would otherwise silently skip x


def test_retain_graph_allows_a_second_backward(backend):
    xs = np.array([1.0, 2.0])
    x = leaf(xs)
    loss = (x * x).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    np.testing.assert_allclose(host(x.grad), 2 * (2 * xs))


def test_saved_tensors_are_freed_after_backward(backend):
    x = leaf(np.ones((2, 3)))
    w = leaf(np.ones((4, 3)))
    loss = ops.tanh(linear(x, w)).mean()
    nodes = [n for n in graph_nodes(loss) if n.op != "leaf"]
    assert len(nodes) == 3 and all(n._backward is not None for n in nodes)
    loss.backward()
    assert all(n._backward is None and n._parents == () for n in nodes)


def test_retain_graph_keeps_saved_tensors(backend):
    x = leaf(np.ones(3))
    loss = ops.exp(x).sum()
    loss.backward(retain_graph=True)
    assert all(n._backward is not None for n in graph_nodes(loss) if n.op != "leaf")


def test_deep_chain_has_no_recursion_limit(backend):
    x = leaf([0.5])
    y = x
    for _ in range(2500):            # 5000 ops, far past Python's recursion limit of 1000
        y = y * 1.0001 + 0.001
    y.sum().backward()
    assert host(x.grad)[0] == pytest.approx(1.0001 ** 2500, rel=1e-12)


# --------------------------------------------------------------------------- when there is no graph
def test_no_grad_builds_no_graph(backend):
    x = leaf([1.0, 2.0])
    with no_grad():
        assert not is_grad_enabled()
        out = ops.exp(x * 2.0).sum()
    assert is_grad_enabled()
    assert out.requires_grad is False and out._parents == () and out._backward is None


def test_no_grad_restores_on_error(backend):
    with pytest.raises(KeyError), no_grad():
        raise KeyError("inside no_grad")
    assert is_grad_enabled()


def test_inputs_without_grad_record_no_graph(backend):
    a, b = leaf([1.0, 2.0], requires_grad=False), leaf([3.0, 4.0], requires_grad=False)
    out = (a * b + 1.0).sum()
    assert out.requires_grad is False and out._parents == ()
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.backward()


def test_a_tensor_made_under_no_grad_can_become_a_leaf(backend):
    with no_grad():
        w = leaf([1.0, 2.0], requires_grad=False) * 3.0
    w.requires_grad_()
    (w * w).sum().backward()
    np.testing.assert_allclose(host(w.grad), [6.0, 12.0])


# --------------------------------------------------------------------------- frozen = free
@pytest.mark.parametrize("trainable", [False, True])
def test_frozen_weight_costs_no_weight_gradient_matmul(backend, trainable):
    rng = np.random.default_rng(0)
    x = leaf(rng.standard_normal((2, 5, 3)))
    W = leaf(rng.standard_normal((4, 3)), requires_grad=trainable)
    b = leaf(rng.standard_normal(4), requires_grad=trainable)
    counters.clear()
    linear(x, W, b).sum().backward()
    assert counters["weight_grad_matmul"] == (1 if trainable else 0)
    assert (W.grad is None) is (not trainable) and (b.grad is None) is (not trainable)
    assert x.grad is not None and x.grad.shape == x.shape


def test_frozen_matmul_operand_is_never_differentiated(backend):
    rng = np.random.default_rng(1)
    x, W = leaf(rng.standard_normal((3, 4))), leaf(rng.standard_normal((4, 2)), False)
    counters.clear()
    (x @ W).sum().backward()
    assert counters["matmul_grad"] == 1 and W.grad is None
    W.requires_grad_()
    counters.clear()
    (x @ W).sum().backward()
    assert counters["matmul_grad"] == 2 and W.grad is not None


# --------------------------------------------------------------------------- clear errors
def test_matmul_shape_mismatch_names_op_and_shapes(backend):
    with pytest.raises(ValueError, match=r"matmul: shapes \(2, 3\) and \(4, 5\) do not match"):
        leaf(np.ones((2, 3))) @ leaf(np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"matmul: batch dimensions of \(2, 3, 4\) and "
                                         r"\(5, 4, 2\) cannot be broadcast"):
        leaf(np.ones((2, 3, 4))) @ leaf(np.ones((5, 4, 2)))


def test_broadcast_mismatch_names_op_and_shapes(backend):
    with pytest.raises(ValueError, match=r"add: shapes \(2, 3\) and \(4,\) cannot be broadcast"):
        leaf(np.ones((2, 3))) + leaf(np.ones(4))
    with pytest.raises(ValueError, match=r"mul: shapes \(3, 1\) and \(2, 2\) cannot"):
        leaf(np.ones((3, 1))) * leaf(np.ones((2, 2)))


def test_backward_on_a_non_scalar_needs_a_seed(backend):
    y = leaf(np.ones((2, 3))) * 2.0
    with pytest.raises(RuntimeError, match=r"non-scalar tensor of shape \(2, 3\) needs a seed"):
        y.backward()
    with pytest.raises(ValueError, match=r"seed gradient has shape \(3,\), expected .*\(2, 3\)"):
        y.backward(bk.asarray(np.ones(3)))


def test_mixing_numpy_and_cupy_arrays_is_a_clear_error():
    if "cupy" not in bk.available():
        pytest.skip("CuPy with a GPU is not available here")
    with bk.using("numpy"):
        a = leaf([1.0, 2.0])
    with bk.using("cupy"):
        b = leaf([3.0, 4.0])
        with pytest.raises(TypeError, match="add: operands live on different backends"):
            a + b
        with pytest.raises(TypeError, match="matmul: operands live on different backends"):
            ops.matmul(leaf(np.ones((1, 2))), _numpy_tensor(np.ones((2, 1))))
        with pytest.raises(TypeError, match="linear: inputs live on different backends"):
            linear(b.reshape(1, 2), _numpy_tensor(np.ones((3, 2))))


def _numpy_tensor(a) -> Tensor:
    with bk.using("numpy"):
        return leaf(a)


def test_requires_grad_needs_a_float_dtype(backend):
    with pytest.raises(TypeError, match="requires_grad=True needs a floating dtype, got int"):
        Tensor(bk.asarray(np.array([1, 2, 3])), requires_grad=True)
    with pytest.raises(TypeError, match="requires_grad needs a floating dtype"):
        Tensor([1, 2, 3]).requires_grad_()


def test_cross_entropy_rejects_bad_targets(backend):
    z = leaf(np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 5\) or equal ignore_index"):
        cross_entropy(z, bk.asarray(np.array([0, 5, 1])))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 5\)"):
        cross_entropy(z, bk.asarray(np.array([0, -1, 1])))
    with pytest.raises(TypeError, match="targets must be integer class ids"):
        cross_entropy(z, bk.asarray(np.array([0.0, 1.0, 2.0])))
    with pytest.raises(ValueError, match=r"need targets of shape \(3,\), got \(2,\)"):
        cross_entropy(z, bk.asarray(np.array([0, 1])))


def test_embedding_rejects_bad_ids(backend):
    W = leaf(np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 4\), got values in \[0, 4\]"):
        embedding(W, bk.asarray(np.array([0, 4])))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 4\), got values in \[-1, 1\]"):
        embedding(W, bk.asarray(np.array([[1, -1]])))
    with pytest.raises(TypeError, match="token ids must be integers"):
        embedding(W, bk.asarray(np.array([0.0, 1.0])))


def test_the_engine_imports_no_op_so_autograd_has_no_import_circle():
    """tensor.py (the engine) must not import ops/functional: ops.py installs the operators
    onto Tensor, so imports inside autograd run one way. Read from the source with ast."""
    import ast
    import pathlib

    import minipeft.autograd as ag

    folder = pathlib.Path(ag.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                deps |= {n.split(".")[2] for n in names
                         if n.startswith("minipeft.autograd.") and len(n.split(".")) > 2}
        graph[path.stem] = deps - {path.stem}
    assert graph["tensor"] == set(), graph["tensor"]
    # no module reaches itself through its imports (package __init__ aside)
    for start in graph:
        if start == "__init__":
            continue
        seen, stack = set(), list(graph[start])
        while stack:
            m = stack.pop()
            assert m != start, f"import circle through {start}"
            if m not in seen and m != "__init__":
                seen.add(m)
                stack.extend(graph.get(m, ()))
    x = Tensor([1.0, 2.0], requires_grad=True)                     # operators still installed
    ((x * 3 - 1) / 2 + (-x) ** 2).sum().backward()
    np.testing.assert_allclose(bk.to_numpy(x.grad), [1.5 + 2 * 1.0, 1.5 + 2 * 2.0])
