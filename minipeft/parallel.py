"""Every core on one step: how minipeft splits its array work over CPU threads.

NumPy runs each call on one core. Only matrix products use more, through OpenBLAS's own worker
threads, and those workers *spin* for a while after each product, waiting for the next one. So
on a 2-core machine a training step ran its matmuls on two cores and everything else (the
attention's softmax over (B, H, T, T), GELU, cross-entropy) on one, and a second thread of ours
started right after a product found its core busy with a spinning BLAS worker. Measured on 2
cores, a (2048, 1024) float32 ``exp`` split in two halves on two threads:

    OpenBLAS at 2 threads (its workers spin):   1.24 ms -> 1.34 ms   (no gain)
    OpenBLAS at 1 thread:                       1.24 ms -> 0.62 ms   (2.0x)
    a (2048, 1024) @ (1024, 256) product:       6.0 ms on 2 BLAS threads, 6.2 ms as two halves

So on NumPy minipeft sets OpenBLAS to one thread (through ``threadpoolctl``) and splits the work
itself, like PyTorch's ``at::parallel_for``: an op cuts its leading axis into ``threads()``
consecutive ranges and runs them at once. NumPy releases the GIL inside its loops, so the
threads really run in parallel. Split this way: the linear layers' products (``matmul``),
attention (by heads), GELU, cross-entropy (by rows) and the residual stream's additions
(``add``). Not split, because splitting measured slower: layer norm (a few short passes) and
AdamW (each parameter's update is short; by parameters or by elements it lost 10-100%).

Each piece runs the op's readable one-call code on its rows, so an elementwise op gives exactly
the numbers of one whole-array call, and a product or a sum over pieces the same numbers up to
rounding; ``tests/test_parallel.py`` checks every split op against its one-call form.

    MINIPEFT_THREADS=1            # one core: every op is a single NumPy call (the readable form)
    parallel.set_threads(2)       # or in code

A split op waits for its slowest piece: on a machine busy with other work, a piece may wait for
a core (measured: a few ms now and then). On CuPy there is nothing to split: the GPU runs each
call on all its cores already.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from minipeft import backend as bk

__all__ = ["threads", "set_threads", "run", "rows", "elementwise", "matmul", "add", "MIN_ELEMENTS"]

# Below this many elements (or multiply-adds) an op runs as one call: handing a piece to the
# other thread costs ~20-50 microseconds, more than a small array's whole pass.
MIN_ELEMENTS = 1 << 15

_threads: int | None = None          # resolved on first use
_pool: ThreadPoolExecutor | None = None
_blas_limit = None                    # threadpoolctl's handle while OpenBLAS is held at 1 thread
_local = threading.local()            # .busy: this thread is already running a piece


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:             # macOS, Windows
        return os.cpu_count() or 1


def _from_environment() -> int:
    raw = os.environ.get("MINIPEFT_THREADS", "").strip()
    if not raw:
        return _cores()
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"MINIPEFT_THREADS must be a whole number >= 1, got {raw!r}")
    return n


def set_threads(n: int) -> int:
    """Use ``n`` threads for minipeft's array work (1 = single calls, BLAS left as it was).
    With ``n > 1`` OpenBLAS is held at one thread while minipeft splits the work itself."""
    global _threads, _pool, _blas_limit
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_threads: n must be an int >= 1, got {n!r}")
    if _pool is not None:
        _pool.shutdown(wait=True)
        _pool = None
    if _blas_limit is not None:
        _blas_limit.restore_original_limits()
        _blas_limit = None
    _threads = n
    if n > 1:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:            # without it BLAS workers would fight ours: stay serial
            _threads = 1
            return 1
        _blas_limit = threadpool_limits(limits=1, user_api="blas")
        _pool = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="minipeft")
    return _threads


def threads() -> int:
    """How many threads an op may use now (always 1 on CuPy)."""
    if bk.name != "numpy":
        return 1
    if _threads is None:
        set_threads(_from_environment())
    return _threads


def run(piece, n: int, work: int | None = None) -> list:
    """Call ``piece(lo, hi)`` on consecutive ranges covering ``range(n)``, one per thread, at
    once; return their results in order. ``work`` (elements or multiply-adds, default ``n``)
    below ``MIN_ELEMENTS`` runs one piece ``piece(0, n)``, as does a call from inside a piece.

    Each piece must write only its own rows: pieces run at the same time."""
    k = min(threads(), n)
    if k <= 1 or (n if work is None else work) < MIN_ELEMENTS or getattr(_local, "busy", False):
        return [piece(0, n)]
    bounds = [n * i // k for i in range(k + 1)]
    futures = [_pool.submit(_guarded, piece, bounds[i], bounds[i + 1]) for i in range(1, k)]
    first = _guarded(piece, bounds[0], bounds[1])
    return [first] + [f.result() for f in futures]


def _guarded(piece, lo: int, hi: int):
    _local.busy = True
    try:
        return piece(lo, hi)
    finally:
        _local.busy = False


def matmul(a, b, add=None, out=None):
    """``a @ b (+ add)`` for 2-D ``a`` (m, k) and ``b`` (k, n), the rows of ``a`` split over the
    threads; ``add`` (a bias (n,) or an (m, n) array) is added while each piece is in cache.
    Readable form: ``a @ b + add``."""
    xp = bk.xp
    m, n = a.shape[0], b.shape[1]
    if out is None:
        out = xp.empty((m, n), dtype=xp.result_type(a.dtype, b.dtype))

    def piece(lo, hi):
        xp.matmul(a[lo:hi], b, out=out[lo:hi])
        if add is not None:
            out[lo:hi] += add if add.ndim == 1 else add[lo:hi]
    run(piece, m, work=m * a.shape[1] * n // 64)
    return out


def rows(kernel, *arrays, work: int | None = None) -> list:
    """``kernel(*arrays)`` with the first axis of every array split over the threads: each
    piece calls ``kernel`` on the same rows of each array. For kernels that work row by row
    (reductions along the last axis included); returns the pieces' results in order."""
    n = arrays[0].shape[0]
    if work is None:
        work = arrays[0].size
    return run(lambda lo, hi: kernel(*(a[lo:hi] for a in arrays)), n, work)


def elementwise(kernel, *arrays) -> None:
    """``kernel(*arrays)`` for a kernel that treats every element on its own (outputs written
    in place): contiguous arrays of one shape are cut into flat ranges over the threads; any
    other layout runs as one call."""
    first = arrays[0]
    if all(a.shape == first.shape and a.flags.c_contiguous for a in arrays):
        rows(kernel, *(a.reshape(-1) for a in arrays))
    else:
        kernel(*arrays)


def add(a, b):
    """``a + b``, over the threads when both are contiguous arrays of one shape and dtype
    (the residual stream and summed gradients); NumPy's own broadcasting otherwise."""
    xp = bk.xp
    if a.shape != b.shape or a.dtype != b.dtype or a.size < MIN_ELEMENTS or threads() == 1:
        return a + b
    out = xp.empty_like(a)
    elementwise(lambda x, y, o: xp.add(x, y, out=o), a, b, out)
    return out
