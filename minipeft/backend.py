"""The one place that chooses the array library: NumPy on the CPU, CuPy on a GPU.

Every compute module asks this module for its array library instead of importing numpy or
cupy itself, so one switch moves the whole library::

    MINIPEFT_BACKEND=numpy|cupy|auto   # environment, read at import (default: numpy)
    minipeft.backend.use("cupy")       # or in code, at any time

Code reads the current module as ``backend.xp`` at call time (never ``from backend import xp``,
which would freeze the choice). The few things that differ between the two libraries live here
too: moving arrays to and from the host, seeded random numbers, and scatter-add (the embedding
backward, where repeated token ids must accumulate).
"""

from __future__ import annotations

import ctypes
import os
import sys
from contextlib import contextmanager
from typing import Any

import numpy

__all__ = [
    "xp", "np", "name", "use", "using", "available", "default_dtype", "set_default_dtype",
    "asarray", "to_numpy", "broadcast_shapes", "is_array", "array_backend", "scatter_add",
    "host_rng", "device_rng", "synchronize", "reuse_freed_memory", "BackendError",
]


class BackendError(RuntimeError):
    """The requested array backend cannot be used here."""


_CUPY_HINT = (
    "CuPy is not available: install the GPU extra with `pip install -e .[gpu]` "
    "(or the cupy wheel matching your CUDA, e.g. `pip install cupy-cuda12x`) "
    "on a machine with an NVIDIA GPU, or use MINIPEFT_BACKEND=numpy."
)

xp: Any = numpy  # the current array module: numpy or cupy
np = numpy  # the host array library: data generation, tokenizers and file I/O stay on the CPU
name: str = "numpy"
_default_dtype = numpy.float32


def _import_cupy():
    try:
        import cupy  # noqa: PLC0415  (only this module may import cupy)

        cupy.cuda.runtime.getDeviceCount()  # raises when no device or driver is visible
    except Exception as exc:  # ImportError, CUDARuntimeError, ...
        raise BackendError(f"{_CUPY_HINT} (reason: {type(exc).__name__}: {exc})") from None
    return cupy


def available() -> list[str]:
    """The backends usable on this machine: always ``numpy``, plus ``cupy`` with a GPU."""
    try:
        _import_cupy()
        return ["numpy", "cupy"]
    except BackendError:
        return ["numpy"]


def use(backend: str) -> str:
    """Switch the array backend to ``"numpy"``, ``"cupy"`` or ``"auto"``; returns the choice.

    ``auto`` picks CuPy when it imports and sees a GPU, else NumPy. Arrays made before a switch
    stay on their old device; mixing them with new ones raises a clear error in the ops.
    """
    global xp, name
    if not isinstance(backend, str) or backend.lower() not in ("numpy", "cupy", "auto"):
        raise ValueError(f"backend must be 'numpy', 'cupy' or 'auto', got {backend!r}")
    backend = backend.lower()
    if backend == "auto":
        backend = "cupy" if "cupy" in available() else "numpy"
    xp = _import_cupy() if backend == "cupy" else numpy
    name = backend
    return name


@contextmanager
def using(backend: str):
    """Temporarily switch backend: ``with using("cupy"): ...``."""
    old = name
    use(backend)
    try:
        yield xp
    finally:
        use(old)


def default_dtype():
    """The floating dtype new tensors and parameters get (float32 unless changed)."""
    return _default_dtype


def set_default_dtype(dtype) -> None:
    """Set the default float dtype: ``float32`` for training, ``float64`` for gradient checks."""
    global _default_dtype
    dt = numpy.dtype(dtype)
    if dt not in (numpy.float16, numpy.float32, numpy.float64):
        raise ValueError(f"default dtype must be float16, float32 or float64, got {dt}")
    _default_dtype = dt.type


def is_array(a) -> bool:
    """True for a numpy or cupy ndarray."""
    return isinstance(a, numpy.ndarray) or (name == "cupy" and isinstance(a, xp.ndarray))


def array_backend(a) -> str:
    """``"numpy"`` or ``"cupy"``: which library owns the array ``a``."""
    if isinstance(a, numpy.ndarray):
        return "numpy"
    mod = type(a).__module__
    return "cupy" if mod.startswith("cupy") else "numpy"


def asarray(a, dtype=None):
    """Put ``a`` (list, scalar, numpy or cupy array) on the current backend."""
    if name == "cupy":
        return xp.asarray(a, dtype=dtype)
    if array_backend(a) == "cupy":  # a cupy array while the backend is numpy
        a = a.get()
    return numpy.asarray(a, dtype=dtype)


def to_numpy(a) -> numpy.ndarray:
    """A host (NumPy) copy of an array from either backend, for printing, plotting and saving."""
    if hasattr(a, "data") and not is_array(a) and hasattr(a, "requires_grad"):
        a = a.data  # a Tensor
    if array_backend(a) == "cupy":
        return a.get()
    return numpy.asarray(a)


def broadcast_shapes(*shapes) -> tuple:
    """The shape NumPy broadcasting gives ``shapes`` (ValueError when they do not fit)."""
    return numpy.broadcast_shapes(*shapes)


def scatter_add(target, indices, values) -> None:
    """``target[indices] += values`` in place, where repeated indices *accumulate*.

    Plain fancy-index assignment keeps only the last write for a repeated index; the
    embedding backward needs the sum, so each library's unbuffered add is used.
    """
    if name == "cupy" and array_backend(target) == "cupy":
        xp.add.at(target, indices, values)  # CuPy's ufunc.at (cupyx.scatter_add is deprecated)
    else:
        numpy.add.at(target, indices, values)


def host_rng(seed: int | None) -> numpy.random.Generator:
    """A seeded NumPy generator. Initial weights are drawn here and copied to the device, so a
    seed gives the same initial model on both backends."""
    return numpy.random.default_rng(seed)


def device_rng(seed: int | None):
    """A seeded generator that draws directly on the current backend (dropout masks)."""
    return xp.random.default_rng(seed)


def reuse_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees hundreds of MB of activations and gradients. By default
    glibc serves each large block by a fresh ``mmap`` (and trims the heap's free top), so every
    step touches brand-new pages and the kernel zero-fills them. Measured on 2 cores, an M step
    (bench config): 49,000 page faults and 0.22 s of kernel time per step, 1110 ms; with every
    block served from the heap and the heap never trimmed, 59 faults, 0.02 s, 760 ms. The peak is
    unchanged (the heap grows to one step's peak and stays there, as PyTorch's caching allocator
    does on a GPU). Linux/glibc only; elsewhere, or with ``MINIPEFT_REUSE_MEMORY=0``, nothing
    changes. Returns whether the setting took effect."""
    if not sys.platform.startswith("linux") or os.environ.get("MINIPEFT_REUSE_MEMORY") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3                 # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and
                    libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):                              # not glibc
        return False


def synchronize() -> None:
    """Wait for queued GPU work (before reading a clock); a no-op on NumPy."""
    if name == "cupy":
        xp.cuda.Device().synchronize()


use(os.environ.get("MINIPEFT_BACKEND", "numpy"))
reuse_freed_memory()
