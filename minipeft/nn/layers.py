"""The basic layers: Linear, Embedding, LayerNorm, Dropout.

Initial weights are drawn from a seeded host generator (``backend.host_rng``) and then moved
to the device, so one seed gives one model on NumPy and on CuPy alike.
"""

from __future__ import annotations

from minipeft import backend as bk
from minipeft.autograd import functional as F
from minipeft.nn.module import Module, Parameter


def normal_init(rng, shape, std: float):
    """Gaussian weights on the device, in the default dtype."""
    return bk.asarray(rng.normal(0.0, std, size=shape), dtype=bk.default_dtype())


def zeros(shape):
    return bk.xp.zeros(shape, dtype=bk.default_dtype())


def ones(shape):
    return bk.xp.ones(shape, dtype=bk.default_dtype())


class Linear(Module):
    """y = x @ W^T + b, with W of shape (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 rng=None, std: float = 0.02):
        rng = rng if rng is not None else bk.host_rng(0)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(normal_init(rng, (out_features, in_features), std))
        self.bias = Parameter(zeros((out_features,))) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def __repr__(self) -> str:
        return f"Linear({self.in_features} -> {self.out_features}, bias={self.bias is not None})"


class Embedding(Module):
    """A table of vectors, one row per token id: (num_embeddings, dim)."""

    def __init__(self, num_embeddings: int, dim: int, rng=None, std: float = 0.02):
        rng = rng if rng is not None else bk.host_rng(0)
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight = Parameter(normal_init(rng, (num_embeddings, dim), std))

    def forward(self, ids):
        return F.embedding(self.weight, ids)


class LayerNorm(Module):
    """Normalise the last axis to mean 0, variance 1, then scale (weight) and shift (bias)."""

    def __init__(self, dim: int, bias: bool = True, eps: float = 1e-5):
        self.eps = eps
        self.weight = Parameter(ones((dim,)))
        self.bias = Parameter(zeros((dim,))) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)


class Dropout(Module):
    """Inverted dropout with its own seeded generator; the identity in eval mode."""

    def __init__(self, p: float = 0.0, seed: int = 0):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p
        self.seed = seed
        self._rng = None

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        if self._rng is None:
            self._rng = bk.device_rng(self.seed)
        return F.dropout(x, self.p, True, self._rng)
