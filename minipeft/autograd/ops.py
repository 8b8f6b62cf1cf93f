"""Primitive ops: each a forward and, directly beneath it, its backward.

Every op has the same shape (micrograd's, on arrays)::

    def op(a, b):
        out = <forward on arrays>
        def backward(g):                      # g = dL/d(out), same shape as out
            return dL/da or None, dL/db or None   # None where that input needs no gradient
        return Tensor._make(out, (a, b), backward, "op")

The engine in ``tensor.py`` does the rest: it calls ``backward`` only if some input needs a
gradient, and adds up gradients where a tensor is used more than once.

Broadcasting: NumPy stretches size-1 and missing axes forward, so the adjoint *sums* the
gradient over those axes backward (``unbroadcast``: "the adjoint of broadcast is sum").
"""

from __future__ import annotations

import builtins

from minipeft import backend as bk
from minipeft import parallel as par
from minipeft.autograd.tensor import Tensor, as_tensor, counters


# --------------------------------------------------------------------------- helpers
def unbroadcast(g, shape: tuple):
    """Sum ``g`` down to ``shape``: undo NumPy broadcasting in the backward pass."""
    if g.shape == shape:
        return g
    extra = g.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        i + extra for i, n in enumerate(shape) if n == 1 and g.shape[i + extra] != 1)
    g = g.sum(axis=axes, keepdims=True) if axes else g
    return g.reshape(shape)


def _summed_bytes(shape: tuple, *inputs) -> int:
    """Bytes of the gradients ``unbroadcast`` must sum (inputs that need a gradient and were
    broadcast to ``shape``); where nothing was broadcast the gradient is ``g`` itself."""
    return builtins.sum(t.data.nbytes for t in inputs if t.requires_grad and t.shape != shape)


def _matmul_grad_bytes(t, out) -> int:
    """Bytes of a matmul input's gradient: the product over every batch of ``out`` and, where
    that was broadcast, the sum ``unbroadcast`` makes of it."""
    n = 1
    for d in out.shape[:-2]:
        n *= d
    full = n * t.shape[-2] * t.shape[-1] * t.data.itemsize
    return full if full == t.data.nbytes else full + t.data.nbytes


def _pair(op: str, a, b) -> tuple[Tensor, Tensor]:
    """Both operands as tensors on one backend, with broadcast-compatible shapes."""
    a = as_tensor(a, like=b if isinstance(b, Tensor) else None)
    b = as_tensor(b, like=a)
    if type(a.data) is not type(b.data):
        raise TypeError(f"{op}: operands live on different backends "
                        f"({bk.array_backend(a.data)} and {bk.array_backend(b.data)}); "
                        "move both with minipeft.backend.asarray first")
    try:
        bk.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} cannot be broadcast together "
                         "(trailing dimensions must be equal or 1)") from None
    return a, b


def _axes(axis, ndim: int) -> tuple[int, ...]:
    """Normalise an axis argument (None, int or tuple, negatives allowed) to a sorted tuple."""
    if axis is None:
        return tuple(range(ndim))
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for ax in axis:
        if not -ndim <= ax < builtins.max(ndim, 1):
            raise ValueError(f"axis {ax} is out of range for a tensor with {ndim} dimensions")
        out.append(ax % builtins.max(ndim, 1))
    return tuple(sorted(set(out)))


def _expand_reduced(g, in_shape: tuple, axes: tuple, keepdims: bool):
    """Broadcast a reduced gradient back over the reduced axes."""
    if not keepdims:
        g = g.reshape(tuple(1 if i in axes else n for i, n in enumerate(in_shape)))
    return bk.xp.broadcast_to(g, in_shape)


# --------------------------------------------------------------------------- arithmetic
def add(a, b) -> Tensor:
    """a + b.  d/da = 1, d/db = 1 (summed over broadcast axes)."""
    a, b = _pair("add", a, b)

    def backward(g):
        return (unbroadcast(g, a.shape) if a.requires_grad else None,
                unbroadcast(g, b.shape) if b.requires_grad else None)
    out = par.add(a.data, b.data)                                   # a.data + b.data
    # g itself is passed on where no axis was broadcast: new bytes only for the summed ones
    return Tensor._make(out, (a, b), backward, "add",
                        workspace=_summed_bytes(out.shape, a, b))


def sub(a, b) -> Tensor:
    """a - b.  d/da = 1, d/db = -1."""
    a, b = _pair("sub", a, b)

    def backward(g):
        return (unbroadcast(g, a.shape) if a.requires_grad else None,
                unbroadcast(-g, b.shape) if b.requires_grad else None)
    out = a.data - b.data
    return Tensor._make(out, (a, b), backward, "sub", workspace=_summed_bytes(out.shape, a, b)
                        + (out.nbytes if b.requires_grad else 0))                 # -g


def mul(a, b) -> Tensor:
    """a * b.  d/da = b, d/db = a."""
    a, b = _pair("mul", a, b)

    def backward(g):
        return (unbroadcast(g * b.data, a.shape) if a.requires_grad else None,
                unbroadcast(g * a.data, b.shape) if b.requires_grad else None)
    out = a.data * b.data
    return Tensor._make(out, (a, b), backward, "mul",                     # one g * x each
                        workspace=out.nbytes * (a.requires_grad + b.requires_grad))


def div(a, b) -> Tensor:
    """a / b.  d/da = 1/b, d/db = -a/b^2."""
    a, b = _pair("div", a, b)
    out = a.data / b.data

    def backward(g):
        return (unbroadcast(g / b.data, a.shape) if a.requires_grad else None,
                unbroadcast(-g * out / b.data, b.shape) if b.requires_grad else None)
    # g / b; -g, then * out and / b reuse -g's buffer in place (NumPy's temporary elision)
    return Tensor._make(out, (a, b), backward, "div",
                        workspace=out.nbytes * (a.requires_grad + b.requires_grad))


def neg(a) -> Tensor:
    """-a.  d/da = -1."""
    a = as_tensor(a)
    return Tensor._make(-a.data, (a,), lambda g: (-g,), "neg", workspace=a.data.nbytes)


def pow(a, p: float) -> Tensor:  # noqa: A001  (mirrors the ** operator)
    """a ** p for a constant exponent p.  d/da = p a^(p-1)."""
    if isinstance(p, Tensor) or not isinstance(p, (int, float)):
        raise TypeError(f"pow: the exponent must be a Python number, got {type(p).__name__}")
    a = as_tensor(a)

    def backward(g):
        return (g * p * a.data ** (p - 1),)
    return Tensor._make(a.data ** p, (a,), backward, "pow", workspace=2 * a.data.nbytes)


def matmul(a, b) -> Tensor:
    """a @ b with NumPy's batching and broadcasting rules (both operands at least 2-D).

    d/da = g @ b^T,  d/db = a^T @ g  (transposes over the last two axes, summed over
    broadcast batch axes).
    """
    a, b = as_tensor(a), as_tensor(b)
    if type(a.data) is not type(b.data):
        raise TypeError("matmul: operands live on different backends "
                        f"({bk.array_backend(a.data)} and {bk.array_backend(b.data)})")
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not match "
                         "(need ... x (m, k) @ ... x (k, n), both at least 2-D)")
    try:
        bk.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ValueError(f"matmul: batch dimensions of {a.shape} and {b.shape} "
                         "cannot be broadcast together") from None

    def backward(g):
        ga = gb = None
        if a.requires_grad:
            counters["matmul_grad"] += 1
            ga = unbroadcast(_mm(g, b.data.swapaxes(-1, -2)), a.shape)
        if b.requires_grad:
            counters["matmul_grad"] += 1
            gb = unbroadcast(_mm(a.data.swapaxes(-1, -2), g), b.shape)
        return ga, gb
    out = _mm(a.data, b.data)
    ws = builtins.sum(_matmul_grad_bytes(t, out) for t in (a, b) if t.requires_grad)
    return Tensor._make(out, (a, b), backward, "matmul", workspace=ws)


def _mm(x, y):
    """x @ y; two matrices' product has its rows split over the CPU threads."""
    return par.matmul(x, y) if x.ndim == 2 and y.ndim == 2 else x @ y


# --------------------------------------------------------------------------- elementwise
def exp(a) -> Tensor:
    """exp(a).  d/da = exp(a)."""
    a = as_tensor(a)
    out = bk.xp.exp(a.data)
    return Tensor._make(out, (a,), lambda g: (g * out,), "exp", workspace=out.nbytes)


def log(a) -> Tensor:
    """log(a).  d/da = 1/a."""
    a = as_tensor(a)
    return Tensor._make(bk.xp.log(a.data), (a,), lambda g: (g / a.data,), "log",
                        workspace=a.data.nbytes)


def sqrt(a) -> Tensor:
    """sqrt(a).  d/da = 1 / (2 sqrt(a))."""
    a = as_tensor(a)
    out = bk.xp.sqrt(a.data)
    return Tensor._make(out, (a,), lambda g: (g / (2 * out),), "sqrt", workspace=2 * out.nbytes)


def tanh(a) -> Tensor:
    """tanh(a).  d/da = 1 - tanh(a)^2."""
    a = as_tensor(a)
    out = bk.xp.tanh(a.data)
    return Tensor._make(out, (a,), lambda g: (g * (1 - out * out),), "tanh",
                        workspace=2 * out.nbytes)


def relu(a) -> Tensor:
    """max(a, 0).  d/da = 1 where a > 0, else 0."""
    a = as_tensor(a)
    out = bk.xp.maximum(a.data, 0)
    return Tensor._make(out, (a,), lambda g: (g * (a.data > 0),), "relu",    # the mask, g * it
                        workspace=out.nbytes + out.size)


def where(cond, a, b) -> Tensor:
    """cond ? a : b elementwise.  d/da = g where cond, d/db = g where not cond."""
    cond = cond.data if isinstance(cond, Tensor) else bk.asarray(cond)
    if cond.dtype != bool:
        raise TypeError(f"where: the condition must be a boolean array, got {cond.dtype}")
    a, b = _pair("where", a, b)
    try:
        bk.broadcast_shapes(cond.shape, a.shape, b.shape)
    except ValueError:
        raise ValueError(f"where: condition {cond.shape} does not broadcast with "
                         f"{a.shape} and {b.shape}") from None
    out = bk.xp.where(cond, a.data, b.data)

    def backward(g):
        zero = bk.xp.zeros((), dtype=g.dtype)
        return (unbroadcast(bk.xp.where(cond, g, zero), a.shape) if a.requires_grad else None,
                unbroadcast(bk.xp.where(cond, zero, g), b.shape) if b.requires_grad else None)
    return Tensor._make(out, (a, b), backward, "where", saved=(cond,),
                        workspace=out.nbytes * (a.requires_grad + b.requires_grad))


def masked_fill(a, mask, value: float) -> Tensor:
    """``a`` with ``value`` wherever ``mask`` is True (no gradient flows there)."""
    a = as_tensor(a)
    return where(mask, Tensor(bk.xp.asarray(value, dtype=a.dtype)), a)


# --------------------------------------------------------------------------- reductions
def sum(a, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001
    """Sum over ``axis``.  d/da = 1 broadcast over the summed axes."""
    a = as_tensor(a)
    axes = _axes(axis, a.ndim)
    out = bk.xp.asarray(a.data.sum(axis=axes, keepdims=keepdims))
    return Tensor._make(out, (a,), lambda g: (_expand_reduced(g, a.shape, axes, keepdims),),
                        "sum", workspace=0)                     # a broadcast view of g


def mean(a, axis=None, keepdims: bool = False) -> Tensor:
    """Mean over ``axis``.  d/da = 1/n broadcast over the averaged axes."""
    a = as_tensor(a)
    axes = _axes(axis, a.ndim)
    n = 1
    for ax in axes:
        n *= a.shape[ax]
    out = bk.xp.asarray(a.data.mean(axis=axes, keepdims=keepdims))

    def backward(g):
        return (_expand_reduced(g / n, a.shape, axes, keepdims),)
    return Tensor._make(out, (a,), backward, "mean", workspace=out.nbytes)      # g / n


def max(a, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001
    """Max over ``axis``.  d/da = 1 at the maximum (split evenly between ties), else 0."""
    a = as_tensor(a)
    axes = _axes(axis, a.ndim)
    kept = a.data.max(axis=axes, keepdims=True)
    out = bk.xp.asarray(kept if keepdims else kept.reshape(
        tuple(n for i, n in enumerate(a.shape) if i not in axes)))

    def backward(g):
        hit = (a.data == kept).astype(g.dtype)
        hit /= hit.sum(axis=axes, keepdims=True)
        return (_expand_reduced(g, a.shape, axes, keepdims) * hit,)
    return Tensor._make(out, (a,), backward, "max", saved=(kept,),      # hit and the gradient
                        workspace=2 * a.data.nbytes)


# --------------------------------------------------------------------------- shape ops
def reshape(a, shape) -> Tensor:
    """View with a new shape.  The gradient is reshaped back."""
    a = as_tensor(a)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    try:
        out = a.data.reshape(shape)
    except ValueError:
        raise ValueError(f"reshape: cannot reshape a tensor of shape {a.shape} "
                         f"({a.size} elements) into {shape}") from None
    # g.reshape copies when g is not contiguous (the gradient of a transpose): count that copy
    return Tensor._make(out, (a,), lambda g: (g.reshape(a.shape),), "reshape",
                        workspace=a.data.nbytes)


def transpose(a, axes=None) -> Tensor:
    """Permute axes (reverse them when ``axes`` is None).  The gradient is permuted back."""
    a = as_tensor(a)
    if axes is not None and len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    axes = tuple(reversed(range(a.ndim))) if axes is None else tuple(ax % a.ndim for ax in axes)
    if sorted(axes) != list(range(a.ndim)):
        raise ValueError(f"transpose: {axes} is not a permutation of the {a.ndim} axes")
    inverse = tuple(sorted(range(a.ndim), key=lambda i: axes[i]))
    return Tensor._make(a.data.transpose(axes), (a,),
                        lambda g: (g.transpose(inverse),), "transpose", workspace=0)  # a view


def swapaxes(a, ax1: int, ax2: int) -> Tensor:
    """Exchange two axes (a transpose)."""
    a = as_tensor(a)
    axes = list(range(a.ndim))
    axes[ax1], axes[ax2] = axes[ax2], axes[ax1]
    return transpose(a, tuple(axes))


def getitem(a, idx) -> Tensor:
    """a[idx] for slices, integers and integer/boolean arrays.

    d/da scatters g back into a zero array; with integer arrays an index may repeat, so the
    scatter *adds* (``backend.scatter_add``) instead of assigning.
    """
    a = as_tensor(a)
    idx = _unwrap_index(idx)
    try:
        out = a.data[idx]
    except IndexError as exc:
        raise IndexError(f"getitem: index {idx!r} is invalid for shape {a.shape}: {exc}") from None
    fancy = any(bk.is_array(i) for i in (idx if isinstance(idx, tuple) else (idx,)))

    def backward(g):
        grad = bk.xp.zeros_like(a.data)
        if fancy:
            bk.scatter_add(grad, idx, g)
        else:
            grad[idx] = g
        return (grad,)
    saved = tuple(i for i in (idx if isinstance(idx, tuple) else (idx,)) if bk.is_array(i))
    return Tensor._make(out, (a,), backward, "getitem", saved=saved, workspace=a.data.nbytes)


def _unwrap_index(idx):
    if isinstance(idx, Tensor):
        return idx.data
    if isinstance(idx, list):
        return bk.asarray(idx)
    if isinstance(idx, tuple):
        return tuple(_unwrap_index(i) for i in idx)
    return idx


def concatenate(tensors, axis: int = 0) -> Tensor:
    """Join along an existing axis.  The gradient is split back at the same boundaries."""
    tensors = [as_tensor(t) for t in tensors]
    if not tensors:
        raise ValueError("concatenate: need at least one tensor")
    ndim = tensors[0].ndim
    ax = axis % ndim
    for t in tensors:
        if t.ndim != ndim or t.shape[:ax] + t.shape[ax + 1:] != \
                tensors[0].shape[:ax] + tensors[0].shape[ax + 1:]:
            raise ValueError(f"concatenate: shapes {[t.shape for t in tensors]} differ "
                             f"outside axis {axis}")
    out = bk.xp.concatenate([t.data for t in tensors], axis=ax)
    bounds = []
    start = 0
    for t in tensors:
        bounds.append((start, start + t.shape[ax]))
        start += t.shape[ax]

    def backward(g):
        sl = [slice(None)] * ndim
        grads = []
        for t, (lo, hi) in zip(tensors, bounds):
            sl[ax] = slice(lo, hi)
            grads.append(g[tuple(sl)] if t.requires_grad else None)
        return tuple(grads)
    return Tensor._make(out, tuple(tensors), backward, "concatenate", workspace=0)  # g's slices


def stack(tensors, axis: int = 0) -> Tensor:
    """Join along a new axis: expand each input, then concatenate."""
    tensors = [as_tensor(t) for t in tensors]
    if not tensors:
        raise ValueError("stack: need at least one tensor")
    if len({t.shape for t in tensors}) != 1:
        raise ValueError(f"stack: all shapes must be equal, got {[t.shape for t in tensors]}")
    ax = axis % (tensors[0].ndim + 1)
    new_shape = tensors[0].shape[:ax] + (1,) + tensors[0].shape[ax:]
    return concatenate([reshape(t, new_shape) for t in tensors], axis=ax)


def broadcast_to(a, shape) -> Tensor:
    """Repeat ``a`` along size-1 or missing leading axes to ``shape``.  d/da = unbroadcast(g)."""
    a = as_tensor(a)
    shape = tuple(shape)
    try:
        out = bk.xp.broadcast_to(a.data, shape)
    except ValueError:
        raise ValueError(f"broadcast_to: cannot broadcast shape {a.shape} to {shape}") from None
    return Tensor._make(out, (a,), lambda g: (unbroadcast(g, a.shape),), "broadcast_to",
                        workspace=a.data.nbytes)                 # the sum over the new axes


# --------------------------------------------------------------------------- operators
def _reshape_method(self, *shape):
    return reshape(self, shape[0] if len(shape) == 1 else shape)


def _transpose_method(self, *axes):
    return transpose(self, axes or None)


def _install_operators() -> None:
    """Give ``Tensor`` its operators and methods, all here: ``tensor.py`` holds the engine and
    imports no op, so the import runs one way (ops -> tensor) and there is no circle. Each entry
    is the op itself (``a + b`` calls ``add(a, b)``), so an operator costs no extra call."""
    T = Tensor
    T.__add__, T.__radd__ = add, lambda self, o: add(o, self)
    T.__sub__, T.__rsub__ = sub, lambda self, o: sub(o, self)
    T.__mul__, T.__rmul__ = mul, lambda self, o: mul(o, self)
    T.__truediv__, T.__rtruediv__ = div, lambda self, o: div(o, self)
    T.__neg__, T.__pow__ = neg, pow
    T.__matmul__, T.__rmatmul__ = matmul, lambda self, o: matmul(o, self)
    T.__getitem__ = getitem
    T.sum, T.mean, T.max = sum, mean, max
    T.exp, T.log, T.sqrt, T.tanh, T.relu = exp, log, sqrt, tanh, relu
    T.reshape, T.transpose = _reshape_method, _transpose_method
    T.permute = _transpose_method
    T.T = property(lambda self: transpose(self, None))


_install_operators()
