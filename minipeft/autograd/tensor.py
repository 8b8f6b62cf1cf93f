"""The Tensor and the reverse-mode engine.

A ``Tensor`` wraps an array (``data``) and, when it was made by an op on inputs that need
gradients, remembers those inputs (``_parents``) and a closure (``_backward``) that maps the
gradient of the output to the gradients of the inputs. ``backward()`` visits the graph once in
reverse topological order (an explicit stack, so deep graphs cannot hit Python's recursion
limit), sums gradients where a tensor fans out to several consumers, and stores the result in
``.grad`` of the leaves. After a node has passed its gradient on, its closure is dropped, which
frees the activations it saved for backward.

Two rules give PEFT its savings, and both live here:

* an op whose inputs need no gradient records no graph (``_make`` below), and
* each op's backward computes only the input gradients that are needed (the ops check
  ``requires_grad`` before each product), so a frozen weight never costs a weight-gradient matmul.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

from minipeft import backend as bk
from minipeft import parallel as par

# What the matmul-heavy ops actually executed: ``weight_grad_matmul`` counts weight-gradient
# products (tests use it to prove a frozen weight costs nothing), ``matmul_grad`` the primitive
# matmul's input-gradient products, ``matmul_flops`` the FLOPs of every product run in linear
# and attention, forward and backward (the bench's FLOP/s). Reset by hand: counters.clear().
counters: Counter = Counter()

_grad_enabled = True


def is_grad_enabled() -> bool:
    return _grad_enabled


@contextmanager
def no_grad():
    """Inside this block ops build no graph and keep no activations (evaluation, generation)."""
    global _grad_enabled
    old, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = old


class Tensor:
    """An array plus what reverse mode needs: ``grad``, ``requires_grad`` and its maker."""

    __slots__ = ("data", "grad", "requires_grad", "_parents", "_backward", "_saved",
                 "_workspace", "op", "name", "__weakref__")
    __array_priority__ = 1000  # `ndarray + Tensor` defers to Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False, dtype=None, name: str | None = None):
        if isinstance(data, Tensor):
            data = data.data
        if dtype is None and not bk.is_array(data):
            probe = bk.asarray(data)
            dtype = bk.default_dtype() if probe.dtype.kind in "fc" else probe.dtype
            data = probe
        self.data = bk.asarray(data, dtype=dtype)
        if requires_grad and self.data.dtype.kind != "f":
            raise TypeError(
                f"requires_grad=True needs a floating dtype, got {self.data.dtype}: gradients "
                "are only defined for float tensors (use .astype or dtype=float32)")
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._parents: tuple = ()
        self._backward = None
        self._saved: tuple = ()
        self._workspace = None
        self.op = "leaf"
        self.name = name

    # ------------------------------------------------------------------ graph building
    @staticmethod
    def _make(data, parents: tuple, backward, op: str, saved: tuple = (),
              workspace: int | None = None) -> Tensor:
        """Wrap an op's output; record the graph only if some input needs a gradient.

        Each op declares what its backward keeps and needs (as PyTorch's
        ``ctx.save_for_backward``), so the memory module reads declarations, not closures:

        * ``saved``: the arrays ``backward`` keeps beyond the inputs and the output (layer
          norm's xhat and rstd, attention's probabilities, a dropout mask, ...);
        * ``workspace``: the bytes ``backward`` allocates at its busiest moment, the
          gradients it returns included (measured per op in tests/test_memory.py).
        """
        out = Tensor.__new__(Tensor)
        # NumPy turns 0-d results into scalars (np.float64): keep every Tensor's data an array
        out.data = data if bk.is_array(data) else bk.xp.asarray(data)
        out.grad = None
        out.op = op
        out.name = None
        if _grad_enabled and any(p.requires_grad for p in parents):
            out.requires_grad = True
            out._parents = parents
            out._backward = backward
            out._saved = saved
            out._workspace = workspace
        else:
            out.requires_grad = False
            out._parents = ()
            out._backward = None
            out._saved = ()
            out._workspace = None
        return out

    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad.

        ``grad`` is the seed (dL/dself); it may be omitted only for a one-element tensor.
        The graph is freed as it is walked unless ``retain_graph`` is set.
        """
        if not self.requires_grad:
            raise RuntimeError(
                "backward() on a tensor that does not require grad: no input of the "
                "computation had requires_grad=True (or it ran under no_grad())")
        if self._backward is None and self._parents == () and self.op != "leaf":
            raise RuntimeError("backward() through a graph that was already freed; "
                               "pass retain_graph=True to the first backward() to reuse it")
        xp = bk.xp
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() on a non-scalar tensor of shape {self.shape} needs a seed "
                    "gradient of the same shape: call .backward(grad) or reduce it "
                    "(e.g. .sum()) first")
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else bk.asarray(grad, self.data.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward(): seed gradient has shape {grad.shape}, "
                                 f"expected the tensor's shape {self.shape}")

        grads = {id(self): grad}
        order = _topological_order(self)
        while order:  # popping (not iterating) lets each processed node be freed at once
            node = order.pop()
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._backward is None:  # a leaf: accumulate
                if node.op != "leaf":  # an op's output whose graph an earlier backward freed
                    raise RuntimeError(
                        f"backward() reached the output of '{node.op}' (shape {node.shape}) "
                        "whose graph was already freed by an earlier backward(); pass "
                        "retain_graph=True to the first backward() to reuse it")
                g = g.astype(node.data.dtype, copy=False)
                # a fresh array: g may be the caller's seed or shared with another leaf
                node.grad = (xp.array(g, order="C") if node.grad is None
                             else par.add(node.grad, g))
                continue
            for parent, pg in zip(node._parents, node._backward(g)):
                if pg is None or not parent.requires_grad:
                    continue
                key = id(parent)
                grads[key] = pg if key not in grads else par.add(grads[key], pg)
            if not retain_graph:  # free the saved activations as soon as they are used
                node._backward, node._parents, node._saved = None, (), ()

    # ------------------------------------------------------------------ conveniences
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self) -> int:
        return self.data.size

    def __len__(self) -> int:
        return len(self.data)

    def numpy(self):
        """A host NumPy copy of the data."""
        return bk.to_numpy(self.data)

    def item(self) -> float:
        return float(bk.to_numpy(self.data).reshape(-1)[0]) if self.size == 1 else _not_scalar(self)

    def detach(self) -> Tensor:
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def requires_grad_(self, flag: bool = True) -> Tensor:
        if flag and self.data.dtype.kind != "f":
            raise TypeError(f"requires_grad needs a floating dtype, got {self.data.dtype}")
        self.requires_grad = bool(flag)
        if flag and self._backward is None:
            self.op = "leaf"  # e.g. made under no_grad(), now a parameter of its own
        return self

    def zero_grad(self) -> None:
        self.grad = None

    def __repr__(self) -> str:
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{flag}, op={self.op})"

    # The operators (+, -, *, /, @, indexing) and methods (sum, reshape, ...) are installed by
    # ops.py, in one place: this file knows no op, so imports run one way (ops -> tensor).


def _not_scalar(t: Tensor):
    raise ValueError(f"item() needs a one-element tensor, got shape {t.shape}")


def _topological_order(root: Tensor) -> list[Tensor]:
    """Nodes that need a gradient, each after all of its parents (iterative post-order DFS)."""
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        node, parents_done = stack.pop()
        if parents_done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for p in node._parents:
            if p.requires_grad and id(p) not in seen:
                stack.append((p, False))
    return order


def as_tensor(x, like: Tensor | None = None) -> Tensor:
    """``x`` as a Tensor; Python numbers take ``like``'s dtype (no silent float64 upcast)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (int, float)) and like is not None:
        return Tensor(bk.xp.asarray(x, dtype=like.dtype))
    return Tensor(x)

