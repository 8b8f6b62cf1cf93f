"""4-bit NormalFloat (NF4) quantisation, block-wise, with double quantisation: QLoRA's frozen base.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", section 3.

**The code book.** Pretrained weights are close to normally distributed, so the 16 levels of a
4-bit code should sit where a normal distribution puts equal probability mass: at its quantiles.
To keep an exact zero and still use all 16 codes, NF4 is asymmetric: 8 positive levels from the
quantiles of [0.5, δ] and 7 negative ones from [δ, 0.5] (δ = 0.9677, the mean of 1 - 1/(2·15) and
1 - 1/(2·16), so the outermost quantile is finite), plus 0, all divided by the largest, so the
levels run from -1 to 1::

    q_i = Φ⁻¹(p_i) / Φ⁻¹(δ)        16 levels, q_0 = -1, q_7 = 0, q_15 = 1

**Block-wise absmax.** A weight matrix is cut into blocks of 64 consecutive values along each row;
each block keeps one float constant c = max|w| and every value becomes the index of the level
nearest to w / c. Two 4-bit indices share one byte::

    code(w) = argmin_i |w / c - q_i|        w ≈ q[code] · c

**Double quantisation.** 32 bits for c per 64 weights is 0.5 bit per parameter. QLoRA quantises
the constants themselves: subtract their mean, then 8 bits each with one float constant per 256
of them: 8/64 + 32/(64·256) = 0.127 bit per parameter, so about 4.127 bits in all (the paper's
figure). The paper's second-level code is an 8-bit float; ours is a symmetric 8-bit integer
(the same bits; the constants, once centred, are small and evenly spread, which suits integers).

**Compute.** Nothing is trained in the base, so the 4-bit codes are never updated. A
``QuantLinear`` dequantises its weight on the fly in forward and again in backward (to pass the
gradient on to the input, dx = g W) and keeps no float copy in between: only the codes and the
constants live in memory. LoRA's factors, in float32, train on top (QLoRA = this base + LoRA).
"""

from __future__ import annotations

from statistics import NormalDist

from minipeft import backend as bk
from minipeft import parallel as par
from minipeft.autograd.tensor import Tensor, counters
from minipeft.nn.module import Module

BLOCK = 64            # weights per absmax constant (the paper's block size)
BLOCK2 = 256          # constants per second-level constant (double quantisation)
DELTA = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))   # 0.9677: outermost quantile


class QuantError(ValueError):
    """A weight or a setting that cannot be quantised (NaN/inf, a block that does not fit)."""


def nf4_levels() -> list[float]:
    """The 16 NF4 levels, sorted, from the normal distribution's quantiles (see above)."""
    ppf = NormalDist().inv_cdf

    def spaced(lo, hi, n):                       # n evenly spaced points, both ends included
        return [lo + (hi - lo) * i / (n - 1) for i in range(n)]

    positive = [ppf(p) for p in spaced(DELTA, 0.5, 9)[:-1]]       # 8 levels > 0
    negative = [-ppf(p) for p in spaced(DELTA, 0.5, 8)[:-1]]      # 7 levels < 0
    levels = sorted(positive + negative + [0.0])
    top = max(abs(v) for v in levels)
    return [v / top for v in levels]


def int4_levels() -> list[float]:
    """Uniform symmetric 4-bit levels (-7..7)/7 with an exact zero: the baseline NF4 beats."""
    return [i / 7 for i in range(-7, 8)]


def _nearest(u, levels):
    """Index of the nearest level for each value of u (levels sorted ascending)."""
    xp = bk.xp
    q = bk.asarray(levels, dtype=bk.xp.float32)
    mid = (q[1:] + q[:-1]) / 2                                       # decision boundaries
    return xp.searchsorted(mid, u).astype(xp.uint8)


def _check_weight(W, block: int, who: str):
    xp = bk.xp
    if W.ndim != 2:
        raise QuantError(f"{who}: needs a 2-D weight (out, in), got shape {W.shape}")
    if block < 2 or W.shape[1] % block:
        raise QuantError(f"{who}: block size {block} does not divide the row length "
                         f"{W.shape[1]} of the weight {W.shape}")
    if not bool(xp.isfinite(W).all()):
        raise QuantError(f"{who}: the weight holds NaN or inf; refusing to quantise it")


def quantize_blockwise(W, levels, block: int = BLOCK):
    """W (out, in) -> (codes (out, in) uint8, absmax (out, in // block) float32)."""
    _check_weight(W, block, "quantize_blockwise")
    out_f, in_f = W.shape
    Wb = W.astype(bk.xp.float32).reshape(out_f, in_f // block, block)   # (out, nb, block)
    c = bk.xp.abs(Wb).max(axis=-1)                                       # (out, nb)
    safe = bk.xp.where(c > 0, c, 1.0)
    codes = _nearest(Wb / safe[..., None], levels)
    return codes.reshape(out_f, in_f), c


def dequantize_blockwise(codes, absmax, levels, block: int = BLOCK):
    """The inverse map: level[code] * c for every weight; (out, in) float32."""
    out_f, in_f = codes.shape
    q = bk.asarray(levels, dtype=bk.xp.float32)
    W = q[codes].reshape(out_f, in_f // block, block) * absmax[..., None]
    return W.reshape(out_f, in_f)


def pack(codes):
    """Two 4-bit codes per byte: (out, in) uint8 with values < 16 -> (out, in // 2) uint8."""
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def unpack(packed):
    out_f, half = packed.shape
    codes = bk.xp.empty((out_f, 2 * half), dtype=bk.xp.uint8)
    codes[:, 0::2] = packed >> 4
    codes[:, 1::2] = packed & 0x0F
    return codes


def quantize_constants(c, block: int = BLOCK2):
    """Double quantisation: float constants -> (int8 codes, float32 scale per block, mean)."""
    xp = bk.xp
    flat = c.reshape(-1).astype(xp.float32)
    mean = float(flat.mean())
    centred = flat - mean
    n = flat.size
    padded = xp.zeros(-(-n // block) * block, dtype=xp.float32)
    padded[:n] = centred
    blocks = padded.reshape(-1, block)                                   # (n2, 256)
    scale = xp.abs(blocks).max(axis=1)                                   # (n2,)
    safe = xp.where(scale > 0, scale, 1.0)
    c8 = xp.rint(blocks / safe[:, None] * 127).astype(xp.int8)
    return c8, scale, mean


def dequantize_constants(c8, scale, mean: float, shape):
    n = 1
    for s in shape:
        n *= s
    c = c8.astype(bk.xp.float32) / 127 * scale[:, None] + mean
    return c.reshape(-1)[:n].reshape(shape)


class NF4Weight:
    """A frozen weight stored as packed NF4 codes plus double-quantised block constants."""

    def __init__(self, W, block: int = BLOCK, double: bool = True):
        self.shape, self.block, self.double = tuple(W.shape), block, double
        self.levels = nf4_levels()
        codes, c = quantize_blockwise(W, self.levels, block)
        self.packed = pack(codes)                                        # (out, in / 2) uint8
        if double:
            self.c8, self.c_scale, self.c_mean = quantize_constants(c)
            self.c_shape = tuple(c.shape)
        else:
            self.absmax = c

    def constants(self):
        if self.double:
            return dequantize_constants(self.c8, self.c_scale, self.c_mean, self.c_shape)
        return self.absmax

    def dequantize(self):
        """(out, in) float32, rebuilt from the codes (the float weight is never kept)."""
        return dequantize_blockwise(unpack(self.packed), self.constants(), self.levels,
                                    self.block)

    def nbytes(self) -> int:
        """Bytes held: the codes and every constant."""
        if self.double:
            return int(self.packed.nbytes + self.c8.nbytes + self.c_scale.nbytes + 4)
        return int(self.packed.nbytes + self.absmax.nbytes)

    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes() / (self.shape[0] * self.shape[1])


def quant_linear(x: Tensor, qw: NF4Weight, bias: Tensor | None = None) -> Tensor:
    """y = x Wᵀ + b with W dequantised from 4 bits on the fly. Backward: dx = g W, W
    dequantised again; the codes are frozen, so there is no dW. Saves only x's shape."""
    n_out, n_in = qw.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"quant_linear: input has {x.shape[-1]} features (shape {x.shape}) "
                         f"but the weight of shape {qw.shape} expects {n_in}")
    lead = x.shape[:-1]
    W = qw.dequantize()                                              # (out, in), dropped after
    y = par.matmul(x.data.reshape(-1, n_in), W.T)                    # x @ W.T  (N, out)
    flops = 2 * y.shape[0] * n_in * n_out
    counters["matmul_flops"] += flops
    if bias is not None:
        y += bias.data
    parents = (x,) if bias is None else (x, bias)

    def backward(g):
        g2 = g.reshape(-1, n_out)                                    # (N, out)
        dx = db = None
        if x.requires_grad:
            counters["matmul_flops"] += flops
            dx = par.matmul(g2, qw.dequantize()).reshape(*lead, n_in)  # W rebuilt, not saved
        if bias is not None and bias.requires_grad:
            db = g2.sum(axis=0)
        return (dx,) if bias is None else (dx, db)
    return Tensor._make(y.reshape(*lead, n_out), parents, backward, "quant_linear")


class QuantLinear(Module):
    """A frozen Linear whose weight is stored in NF4; the bias (if any) stays float."""

    def __init__(self, linear, block: int = BLOCK, double: bool = True):
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.qweight = NF4Weight(linear.weight.data, block, double)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad = False

    def stored_weights(self) -> int:
        """How many weights the codes stand for (counted by ``Module.num_parameters``)."""
        return self.in_features * self.out_features

    @property
    def weight(self) -> Tensor:
        """The dequantised weight, as a frozen tensor (for inspection and merging)."""
        return Tensor(self.qweight.dequantize())

    def forward(self, x):
        return quant_linear(x, self.qweight, self.bias)

    def __repr__(self) -> str:
        return (f"QuantLinear({self.in_features} -> {self.out_features}, NF4, "
                f"{self.qweight.bits_per_parameter():.3f} bits/param)")


def quantize_model(model, block: int = BLOCK, double: bool = True) -> list[str]:
    """Replace every Linear inside the model's blocks by a QuantLinear; return the paths.
    Every weight is checked first, so a refusal leaves the model as it was."""
    from minipeft.nn.layers import Linear

    paths = [p for p, m in model.named_modules()
             if isinstance(m, Linear) and p.startswith("blocks.")]       # heads stay float
    if not paths:
        raise QuantError("quantize_model: the model has no Linear layers in blocks.* to "
                         "quantise")
    for p in paths:
        _check_weight(model.get_submodule(p).weight.data, block, f"quantize_model({p})")
    for p in paths:
        model.set_submodule(p, QuantLinear(model.get_submodule(p), block, double))
    return paths
