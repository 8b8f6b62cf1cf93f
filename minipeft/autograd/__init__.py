"""Reverse-mode automatic differentiation on NumPy/CuPy arrays.

``Tensor`` and the engine live in ``tensor.py``; primitive ops in ``ops.py``; fused
neural-network ops in ``functional.py``; the finite-difference checker in ``gradcheck.py``.
"""

from minipeft.autograd import functional, ops
from minipeft.autograd.functional import (
    attention,
    cross_entropy,
    dropout,
    embedding,
    gelu,
    layer_norm,
    linear,
    log_softmax,
    softmax,
)
from minipeft.autograd.gradcheck import GradcheckError, GradcheckResult, gradcheck
from minipeft.autograd.ops import (
    add,
    broadcast_to,
    concatenate,
    div,
    exp,
    getitem,
    log,
    masked_fill,
    matmul,
    max,
    mean,
    mul,
    neg,
    pow,
    relu,
    reshape,
    sqrt,
    stack,
    sub,
    sum,
    swapaxes,
    tanh,
    transpose,
    unbroadcast,
    where,
)
from minipeft.autograd.tensor import Tensor, as_tensor, counters, is_grad_enabled, no_grad

__all__ = [
    "Tensor", "as_tensor", "counters", "is_grad_enabled", "no_grad", "functional", "ops",
    "gradcheck", "GradcheckError", "GradcheckResult", "unbroadcast",
    "add", "sub", "mul", "div", "neg", "pow", "matmul", "exp", "log", "sqrt", "tanh", "relu",
    "where", "masked_fill", "sum", "mean", "max", "reshape", "transpose", "swapaxes", "getitem",
    "concatenate", "stack", "broadcast_to",
    "linear", "gelu", "softmax", "log_softmax", "cross_entropy", "layer_norm", "embedding",
    "dropout", "attention",
]
