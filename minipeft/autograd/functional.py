"""Fused neural-network ops: one node in the graph each, with a hand-derived backward.

Built from primitives, softmax or layer norm would each leave a dozen nodes and a dozen saved
arrays behind. Written as one op, each saves only what its backward needs, runs a few array
calls, and is numerically careful (max-subtraction in softmax, log-sum-exp in cross-entropy).
Every op here has its own finite-difference test in ``tests/test_autograd_ops.py``.

Shapes: B batch, T time (Tq queries, Tk keys), C channels, H heads, D head size, V vocab.
"""

from __future__ import annotations

import math

from minipeft import backend as bk
from minipeft import parallel as par
from minipeft.autograd.tensor import Tensor, as_tensor, counters


def _check_same_backend(op: str, *tensors: Tensor) -> None:
    kinds = {type(t.data) for t in tensors}
    if len(kinds) > 1:
        names = sorted({bk.array_backend(t.data) for t in tensors})
        raise TypeError(f"{op}: inputs live on different backends ({', '.join(names)}); "
                        "move them to one with minipeft.backend.asarray")


# --------------------------------------------------------------------------- linear
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ W^T + b, with W of shape (out, in) as in every major library.

    x is flattened to 2-D so each product is a single BLAS call (its rows split over the CPU
    cores by ``parallel.matmul``; readable form in the comments)::

        dx = g @ W            (N, out) @ (out, in)
        dW = g^T @ x          (out, N) @ (N, in)     -- skipped when W is frozen
        db = sum_N g
    """
    parents = (x, weight) if bias is None else (x, weight, bias)
    _check_same_backend("linear", *parents)
    n_out, n_in = weight.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"linear: input has {x.shape[-1]} features (shape {x.shape}) but the "
                         f"weight of shape {weight.shape} expects {n_in}")
    lead = x.shape[:-1]
    x2 = x.data.reshape(-1, n_in)                                   # (N, in)
    b = None if bias is None else bias.data
    y = par.matmul(x2, weight.data.T, add=b)                        # x2 @ W.T + b  (N, out)
    flops = 2 * x2.shape[0] * n_in * n_out                          # one product's FLOPs
    counters["matmul_flops"] += flops

    def backward(g):
        g2 = g.reshape(-1, n_out)                                   # (N, out)
        dx = dw = db = None
        if x.requires_grad:
            counters["matmul_flops"] += flops
            dx = par.matmul(g2, weight.data).reshape(*lead, n_in)  # g2 @ W
        if weight.requires_grad:
            counters["weight_grad_matmul"] += 1
            counters["matmul_flops"] += flops
            dw = par.matmul(g2.T, x2)                               # g2.T @ x2  (out, in)
        if bias is not None and bias.requires_grad:
            db = g2.sum(axis=0)
        return (dx, dw) if bias is None else (dx, dw, db)
    # saves x2 (a view of x unless x was not contiguous); allocates only the gradients
    grads = sum(t.data.nbytes for t in parents if t.requires_grad)
    return Tensor._make(y.reshape(*lead, n_out), parents, backward, "linear", saved=(x2,),
                        workspace=grads)


# --------------------------------------------------------------------------- activations
_GELU_C = math.sqrt(2.0 / math.pi)


def gelu(x: Tensor) -> Tensor:
    """GELU, tanh form (GPT-2):  y = x/2 (1 + tanh(u)),  u = c (x + 0.044715 x^3).

    dy/dx = (1 + tanh u)/2 + x/2 (1 - tanh^2 u) c (1 + 3 * 0.044715 x^2)

    Elementwise work on the MLP's widest activation (N, 4C) is memory-bound, so both passes
    reuse their temporaries in place instead of allocating one array per term, and run as
    ``parallel.elementwise`` pieces over the CPU threads (each piece is the code below).
    """
    xp = bk.xp
    x = as_tensor(x)
    a = x.data
    t = xp.empty_like(a)                                            # tanh(u), saved
    y = xp.empty_like(a)

    def forward(a, t, y):
        xp.multiply(a, a, out=t)                                    # x^2
        t *= 0.044715
        t += 1.0
        t *= a
        t *= _GELU_C                                                # u = c x (1 + 0.044715 x^2)
        xp.tanh(t, out=t)                                           # t = tanh(u)
        xp.add(t, 1.0, out=y)
        y *= a
        y *= 0.5
    par.elementwise(forward, a, t, y)

    def backward(g):
        d = xp.empty_like(t)

        def piece(t, a, g, d):
            xp.multiply(t, t, out=d)
            xp.subtract(1.0, d, out=d)                              # 1 - tanh^2
            d *= a
            d *= 0.5 * _GELU_C
            w = a * a
            w *= 3 * 0.044715
            w += 1.0
            d *= w                                                  # x/2 (1 - t^2) c (1 + ...)
            d += 0.5
            xp.multiply(t, 0.5, out=w)
            d += w                                                  # + (1 + t)/2
            d *= g
        par.elementwise(piece, t, a, g, d)
        return (d,)
    # saves tanh(u); backward holds d (which becomes dx) and one temporary w: 2 x the output
    return Tensor._make(y, (x,), backward, "gelu", saved=(t,), workspace=2 * y.nbytes)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """p = exp(x - max) / sum(exp(x - max)).   dx = p * (g - sum(g * p)) along ``axis``."""
    x = as_tensor(x)
    p = _softmax(x.data, axis)

    def backward(g):
        return (p * (g - (g * p).sum(axis=axis, keepdims=True)),)
    # g * p, then p * (g - ...): NumPy reuses the temporary in place (temporary elision)
    return Tensor._make(p, (x,), backward, "softmax", workspace=p.nbytes)


def _softmax(a, axis):
    e = bk.xp.exp(a - a.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """y = x - logsumexp(x).   dx = g - softmax(x) * sum(g) along ``axis``."""
    xp = bk.xp
    x = as_tensor(x)
    a = x.data
    shifted = a - a.max(axis=axis, keepdims=True)
    lse = xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
    y = shifted - lse

    def backward(g):
        return (g - xp.exp(y) * g.sum(axis=axis, keepdims=True),)
    return Tensor._make(y, (x,), backward, "log_softmax", workspace=2 * y.nbytes)


# --------------------------------------------------------------------------- loss
def cross_entropy(logits: Tensor, targets, ignore_index: int = -100) -> Tensor:
    """Mean of -log softmax(logits)[target] over the positions whose target != ignore_index.

    logits (..., V), targets (...) integer. With p = softmax(logits) and n counted positions:
        dlogits = (p - onehot(target)) / n  on counted rows, 0 on ignored rows.
    Fusing log-softmax and the pick saves the (N, V) log-probabilities and is stable.
    """
    xp = bk.xp
    t = targets.data if isinstance(targets, Tensor) else bk.asarray(targets)
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integer class ids, got {t.dtype}")
    if logits.shape[:-1] != t.shape:
        raise ValueError(f"cross_entropy: logits of shape {logits.shape} need targets of shape "
                         f"{logits.shape[:-1]}, got {t.shape}")
    V = logits.shape[-1]
    z = logits.data.reshape(-1, V)                                  # (N, V)
    t = t.reshape(-1)                                               # (N,)
    valid = t != ignore_index
    safe_t = xp.where(valid, t, 0)
    if bool(((safe_t < 0) | (safe_t >= V)).any()):
        raise ValueError(f"cross_entropy: targets must lie in [0, {V}) or equal "
                         f"ignore_index={ignore_index}")
    n = max(int(valid.sum()), 1)
    rows = xp.arange(z.shape[0])
    p = xp.empty_like(z)                                            # (N, V) softmax, saved

    def forward(z, t, valid, p):                                    # a piece of rows
        xp.subtract(z, z.max(axis=-1, keepdims=True), out=p)        # shifted logits
        picked = p[xp.arange(p.shape[0]), t]                        # (n,)
        xp.exp(p, out=p)                                            # in place
        se = p.sum(axis=-1)                                         # (n,)
        p /= se[:, None]                                            # softmax
        logp = picked - xp.log(se)                                  # log p[target], no underflow
        return (logp * valid).sum()
    loss = -sum(par.rows(forward, z, safe_t, valid, p)) / n

    def backward(g):
        d = xp.empty_like(p)

        def piece(p, t, valid, d):                                  # a piece of rows
            xp.multiply(p, g / n, out=d)
            d[xp.arange(d.shape[0]), t] -= g / n
            d *= valid[:, None]
        par.rows(piece, p, safe_t, valid, d)
        return (d.reshape(logits.shape),)
    # saves the softmax p (N, V) and three (N,) index arrays; backward makes d, logits-sized
    return Tensor._make(xp.asarray(loss, dtype=logits.dtype), (logits,), backward,
                        "cross_entropy", saved=(p, rows, safe_t, valid), workspace=p.nbytes)


# --------------------------------------------------------------------------- layer norm
def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None,
               eps: float = 1e-5) -> Tensor:
    """y = xhat * w + b,  xhat = (x - mean) / sqrt(var + eps), over the last axis (C).

    With gh = g * w:   dx = rstd * (gh - mean(gh) - xhat * mean(gh * xhat))
                       dw = sum(g * xhat),   db = sum(g)   (summed over all but C)
    """
    xp = bk.xp
    parents = tuple(t for t in (x, weight, bias) if t is not None)
    _check_same_backend("layer_norm", *parents)
    C = x.shape[-1]
    for p_ in (weight, bias):
        if p_ is not None and p_.shape != (C,):
            raise ValueError(f"layer_norm: parameter of shape {p_.shape} does not match the "
                             f"normalised size {C} of input {x.shape}")
    # Row means and row dot products are matrix products here (BLAS), and the parameter sums
    # an einsum and a vector-matrix product: measured on (2048, 128) rows, forward + backward
    # 1.0 ms against 1.8 ms with NumPy's own reductions. One call: split over the threads it
    # was slower (each pass is short; handing pieces over costs more than it saves).
    a = x.data.reshape(-1, C)                                       # (N, C) rows
    inv_c = xp.full(C, 1.0 / C, dtype=a.dtype)                      # mean = rows @ (1/C, ...)
    xhat = a - (a @ inv_c)[:, None]                                 # x - mean, then in place:
    var = _row_dots(xhat, xhat) / C                                 # (N, 1), no (N, C) temp
    rstd = 1.0 / xp.sqrt(var + eps)
    xhat *= rstd                                                    # xhat (N, C)
    y = xhat * weight.data if weight is not None else xhat.copy()
    if bias is not None:
        y += bias.data
    y = y.reshape(x.shape)

    def backward(g):
        g2 = g.reshape(-1, C)                                       # (N, C)
        grads = [None]
        if x.requires_grad:
            gh = g2 * weight.data if weight is not None else g2
            dx = xhat * (_row_dots(gh, xhat) / C)                   # xhat * mean(gh * xhat)
            xp.subtract(gh, dx, out=dx)
            dx -= (gh @ inv_c)[:, None]                             # - mean(gh)
            dx *= rstd
            grads[0] = dx.reshape(x.shape)
        if weight is not None:                                      # dw = sum(g * xhat)
            grads.append(xp.einsum("nc,nc->c", g2, xhat) if weight.requires_grad else None)
        if bias is not None:                                        # db = sum(g)
            grads.append(xp.ones(len(g2), dtype=g2.dtype) @ g2 if bias.requires_grad else None)
        return tuple(grads)
    # saves xhat and rstd. Backward holds, each the size of the output, g * w and dx (if x
    # needs a gradient; g * w only with a weight); the parameter sums make no such temporary
    n_big = x.requires_grad * (1 + (weight is not None))
    small = sum(t.data.nbytes for t in (weight, bias) if t is not None and t.requires_grad)
    return Tensor._make(y, parents, backward, "layer_norm",
                        saved=(xhat.reshape(x.shape), rstd.reshape(*x.shape[:-1], 1)),
                        workspace=n_big * y.nbytes + small)


def _row_dots(a, b):
    """(n, 1) dot products of matching rows of a and b (n, C): a batch of n (1, C) @ (C, 1)
    products, faster in NumPy than ``(a * b).sum(-1)`` (no (n, C) temporary) or einsum."""
    return bk.xp.matmul(a[:, None, :], b[:, :, None])[:, 0]


# --------------------------------------------------------------------------- embedding
def embedding(weight: Tensor, ids) -> Tensor:
    """out[...] = W[ids[...]]: a row lookup.  dW[v] = sum of g at every position where ids == v
    (a scatter-*add*: a token that appears twice gets both gradients)."""
    ids = ids.data if isinstance(ids, Tensor) else bk.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: token ids must be integers, got {ids.dtype}")
    V, C = weight.shape
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"embedding: token ids must lie in [0, {V}), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    out = weight.data[ids]                                          # (..., C)

    def backward(g):
        dw = bk.xp.zeros_like(weight.data)
        bk.scatter_add(dw, ids.reshape(-1), g.reshape(-1, C))
        return (dw,)
    return Tensor._make(out, (weight,), backward, "embedding", saved=(ids,),
                        workspace=weight.data.nbytes)                # dW, the table's size


# --------------------------------------------------------------------------- dropout
def dropout(x: Tensor, p: float, training: bool, rng=None) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p) (inverted dropout),
    so evaluation needs no rescaling.  dx = g * mask / (1-p).  Identity when not training."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    rng = rng if rng is not None else bk.device_rng(None)
    mask = (rng.random(x.shape, dtype=bk.np.float32) >= p).astype(x.dtype) / (1.0 - p)
    out = x.data * mask
    return Tensor._make(out, (x,), lambda g: (g * mask,), "dropout", saved=(mask,),
                        workspace=out.nbytes)


# --------------------------------------------------------------------------- attention
_causal_cache: dict = {}


def causal_bias(Tq: int, Tk: int, dtype):
    """(Tq, Tk) additive mask: 0 where query i may see key j, -inf elsewhere.

    Queries are the *last* Tq of Tk positions (a KV cache or a key prefix fills the front),
    so query i sits at absolute position i + (Tk - Tq) and sees keys j <= i + (Tk - Tq).
    """
    key = (Tq, Tk, bk.name, bk.np.dtype(dtype).str)
    bias = _causal_cache.get(key)
    if bias is None:
        xp = bk.xp
        allowed = xp.arange(Tk)[None, :] <= (xp.arange(Tq)[:, None] + (Tk - Tq))
        bias = xp.where(allowed, 0.0, -xp.inf).astype(dtype)
        _causal_cache[key] = bias
    return bias


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, mask=None,
              scale: float | None = None) -> Tensor:
    """Scaled dot-product attention, fused:  out = softmax(q k^T * scale + bias) v.

    q (B, H, Tq, D), k and v (B, H, Tk, D); mask, if given, is boolean and broadcasts to
    (B, H, Tq, Tk) with True = may attend. Only the probabilities P (B, H, Tq, Tk) are saved.
    With S the scaled scores and g = dL/dout:
        dV = P^T g,   dP = g V^T,   dS = P * (dP - rowsum(dP * P)),
        dQ = dS K * scale,   dK = dS^T Q * scale.
    Two savings on the (Tq, Tk) arrays, which dominate the cost: the scale multiplies q (D
    columns, not Tk) and dQ, dK; and rowsum(dP * P) = rowsum(g * out), since
    sum_k (g . v_k) P_qk = g . (sum_k P_qk v_k) = g . out_q (FlashAttention's "D" term).

    The work runs a few heads at a time (``_blocks``): one block's (h, Tq, Tk) scores stay
    in cache through all six passes (product, mask, max, exp, sum, divide) instead of streaming
    the whole (B, H, Tq, Tk) array through memory six times, and blocks are shared out over the
    CPU threads (``parallel.run``). Each block runs exactly the whole-array code below
    on its slice, so the numbers do not depend on the blocking. dS lives one block at a time.
    """
    xp = bk.xp
    _check_same_backend("attention", q, k, v)
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] + q.shape[3:] != k.shape[:2] + k.shape[3:]:
        raise ValueError(f"attention: expected q (B, H, Tq, D) and k, v (B, H, Tk, D), got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dtype = xp.result_type(q.dtype, k.dtype, v.dtype)
    bias = causal_bias(Tq, Tk, dtype) if causal else None
    if mask is not None:
        mask = mask.data if isinstance(mask, Tensor) else bk.asarray(mask)
        mask = xp.broadcast_to(mask, (B, H, Tq, Tk))
    hc = _heads_per_block(Tq, Tk, bk.np.dtype(dtype).itemsize)
    p = xp.empty((B, H, Tq, Tk), dtype=dtype)                       # P, filled block by block
    # out is laid out (B, Tq, H, D) in memory and viewed as (B, H, Tq, D): the caller's
    # transpose back to (B, Tq, H, D) and merge of the heads then needs no copy
    out = xp.empty((B, Tq, H, D), dtype=dtype).transpose(0, 2, 1, 3)

    def forward_piece(lo, hi):
        for i in _blocks(lo, hi, H, hc):                            # i indexes (B, H, ...)
            s = p[i]                                                # (..., Tq, Tk), a view of P
            xp.matmul(q.data[i] * scale, k.data[i].swapaxes(-1, -2), out=s)
            if bias is not None:
                s += bias
            if mask is not None:
                xp.copyto(s, -xp.inf, where=~mask[i])
            s -= s.max(axis=-1, keepdims=True)
            xp.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)                      # P, in place of S
            xp.matmul(s, v.data[i], out=out[i])                     # (..., Tq, D)
    par.run(forward_piece, B * H, work=B * H * Tq * Tk)
    flops = 2 * p.size * D                                          # one product's FLOPs
    counters["matmul_flops"] += 2 * flops                           # q k^T and P v

    def backward(g):
        products = (v.requires_grad + (q.requires_grad or k.requires_grad)  # dV, dP
                    + q.requires_grad + k.requires_grad)                     # dQ, dK
        counters["matmul_flops"] += flops * products
        # each gradient takes its input's memory layout (empty_like keeps strides), so the
        # transposes that made q, k, v from (B, T, H, D) undo into contiguous arrays
        dq = xp.empty_like(q.data, dtype=dtype) if q.requires_grad else None
        dk = xp.empty_like(k.data, dtype=dtype) if k.requires_grad else None
        dv = xp.empty_like(v.data, dtype=dtype) if v.requires_grad else None

        def backward_piece(lo, hi):
            for i in _blocks(lo, hi, H, hc):
                pb, gb = p[i], g[i]                                 # (..., Tq, Tk), (..., Tq, D)
                if dv is not None:
                    xp.matmul(pb.swapaxes(-1, -2), gb, out=dv[i])
                if dq is None and dk is None:
                    continue
                ds = gb @ v.data[i].swapaxes(-1, -2)                # dP (..., Tq, Tk)
                ds -= (gb * out[i]).sum(axis=-1, keepdims=True)     # rowsum(dP * P)
                ds *= pb                                            # dS
                if dq is not None:
                    xp.matmul(ds, k.data[i], out=dq[i])
                    dq[i] *= scale
                if dk is not None:
                    xp.matmul(ds.swapaxes(-1, -2), q.data[i], out=dk[i])
                    dk[i] *= scale
                del ds                                  # before the next block makes its own
        par.run(backward_piece, B * H, work=B * H * Tq * Tk)
        return dq, dk, dv
    # saves P (B, H, Tq, Tk). Backward allocates the gradients, and each thread one block's dS
    # and g * out at a time (at most hc heads; all the threads' blocks: at most B H heads)
    grads = sum(t.data.nbytes for t in (q, k, v) if t.requires_grad)
    ws = grads
    if q.requires_grad or k.requires_grad:
        heads = min(min(par.threads(), B * H) * hc, B * H)
        ws += heads * Tq * (Tk + D) * bk.np.dtype(dtype).itemsize
    return Tensor._make(out, (q, k, v), backward, "attention", saved=(p,), workspace=ws)


# Heads per block: about 2 MB of scores. Measured on 2 cores, M's attention (B8 H8 T256 D32)
# forward + backward took 31 ms in 256 KB blocks (one head: many small NumPy calls, each taking
# the GIL), 23 ms in 2 MB blocks and 25 ms in one block per thread (streamed from memory).
_BLOCK_BYTES = 1 << 21


def _heads_per_block(Tq: int, Tk: int, itemsize: int) -> int:
    if bk.name != "numpy":              # a GPU wants few, large kernels: everything at once
        return 1 << 30
    return max(1, _BLOCK_BYTES // max(1, Tq * Tk * itemsize))


def _blocks(lo: int, hi: int, H: int, hc: int):
    """Index tuples into (B, H, ...) arrays covering the flat (batch * head) items lo..hi-1 in
    blocks of at most ``hc`` heads: whole sequences ``(slice(b0, b1),)`` where a block holds
    all H heads of one or more sequences, else heads of one sequence ``(b, slice(h0, h1))``."""
    i = lo
    while i < hi:
        b, h0 = divmod(i, H)
        if h0 == 0 and hc >= H and hi - i >= H:
            nb = min(hc // H, (hi - i) // H)
            yield (slice(b, b + nb),)
            i += nb * H
        else:
            h1 = min(H, h0 + hc, h0 + hi - i)
            yield (b, slice(h0, h1))
            i += h1 - h0
