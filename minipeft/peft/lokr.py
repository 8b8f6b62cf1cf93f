"""LoKr: a Kronecker-product update (LyCORIS, KohakuBlueleaf et al., "Navigating Text-To-Image
Customization: From LyCORIS Fine-Tuning to Model Evaluation", 2023, sec. 3; in HF PEFT as
``LoKrConfig``).

LoRA writes the update as a thin product. LoKr writes it as a Kronecker product of a small
full matrix C and a low-rank one::

    ΔW = s · kron(C, B A)        C: (a, c)    B: (b, r)    A: (r, d)    s = alpha / r
    with out = a · b and in = c · d

    kron(C, M) is the (a b, c d) matrix of blocks C[i, k] · M: every (b, d) block of ΔW is
    the same pattern M = B A, weighted by one number of C.

It trains a c + r (b + d) numbers; for a 4096 x 4096 projection (a = c = 64, b = d = 64) at
r = 8 that is 4,096 + 1,024 = 5,120, against LoRA's 65,536 at the same r. Unlike LoRA's, the
update's rank is not bounded by r: rank(kron(C, M)) = rank(C) · rank(M), up to min(a, c) · r.

**The factorisation** (LyCORIS' ``factorization(dimension, factor)``, kept here as it is):
each side splits into m · n with m <= n. With ``decompose_factor = -1`` (the default) m is the
divisor that makes m + n smallest, i.e. the divisor of ``dimension`` closest to its square root
(128 -> (8, 16), 64 -> (8, 8), 96 -> (8, 12), a prime p -> (1, p)); with a positive factor f
that divides it, (f, dimension / f) ordered so that m <= n; a factor that does not divide falls
back to the largest divisor m <= f with m + n not increasing. Then a, b = factorization(out) and
c, d = factorization(in): C takes the small sides, B A the large ones.

**Init, and why step 0 is the base.** B = 0 (as LoRA), A and C kaiming-uniform, so ΔW = 0
exactly at step 0. (LyCORIS zeroes the other factor of the pair and HF PEFT zeroes C; one zero
factor is all it takes.) B's gradient s · kron-contracted with C and A x is not zero, so
training starts.

**Compute.** With x reshaped to X (c, d), kron(C, M) x = vec(C X Mᵀ): three thin products
per token, never forming the (out, in) update. But their inner sizes are tiny (r, c, d of 8-16
here), and such products run far below the machine's matmul speed: on the default base
(LoKr r = 16 on every linear layer, batch 64) a training step took about 3x LoRA's that way
(one side-by-side measurement on a shared machine; about 1.5x with the dense form). So, as
LyCORIS does, the forward forms ΔW = s kron(C, B A) densely (out · in numbers, the size of the
frozen weight) and applies it with one product of the layer's own shape; the gradient reaches
C, B and A through the broadcast product and reshape that build the Kronecker product.

**Rank.** ``r <= min(b, d)``: past that, B A is already a full-rank (b, d) matrix. A larger r
is refused, naming the layer.

Merge: W <- W + s kron(C, B A), and back, with LoRA's guarantees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minipeft import backend as bk
from minipeft import checks
from minipeft.autograd import linear, matmul
from minipeft.nn.layers import Linear
from minipeft.nn.module import Module, Parameter
from minipeft.peft import targets
from minipeft.peft.config import PeftConfig
from minipeft.peft.layer import DeltaLayer


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n: LyCORIS' rule (see the module docstring)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@dataclass(frozen=True)
class LoKrConfig(PeftConfig):
    r: int = 4                                    # rank of B A, the large Kronecker factor
    alpha: float = 4                              # scale s = alpha / r
    target_modules: tuple = ("q_proj", "v_proj")  # names, dotted suffixes or globs
    layers: tuple | None = None                   # block indices to adapt (None: every block)
    decompose_factor: int = -1                    # -1: the divisor closest to sqrt (LyCORIS)

    method = "lokr"
    mergeable = True

    def __post_init__(self):
        super().__post_init__()
        who = "LoKrConfig"
        checks.check_int(f"{who}.r", self.r, low=1)
        checks.check_float(f"{who}.alpha", self.alpha, low=0.0, low_open=True)
        checks.check_int(f"{who}.decompose_factor", self.decompose_factor, low=-1)
        if self.decompose_factor == 0:
            raise ValueError("LoKrConfig.decompose_factor must be -1 (automatic) or >= 1, got 0")
        object.__setattr__(self, "target_modules", targets.check_targets(
            f"{who}.target_modules", self.target_modules))
        object.__setattr__(self, "layers", targets.check_layers(f"{who}.layers", self.layers))

    def shapes(self, out_f: int, in_f: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((a, c), (b, d)): the shapes of C and of B A for an (out, in) weight."""
        a, b = factorization(out_f, self.decompose_factor)
        c, d = factorization(in_f, self.decompose_factor)
        return (a, c), (b, d)

    def apply(self, model, name: str, seed: int) -> list[str]:
        found = targets.select(model, "LoKrConfig", self.target_modules, (Linear,),
                               self.layers, owner=LoKrLinear)
        for _, real, m in found:                       # every layer checked before any change
            shape = (m.base if isinstance(m, LoKrLinear) else m).weight.shape
            _, (b, d) = self.shapes(*shape)
            if self.r > min(b, d):
                raise ValueError(f"LoKrConfig.r={self.r} exceeds min(b, d) = {min(b, d)} for "
                                 f"{real}'s weight {tuple(shape)} (B A is ({b}, {d}); at "
                                 f"r = {min(b, d)} it is already full rank)")
        rng = bk.host_rng(seed)
        for _, real, m in found:
            if not isinstance(m, LoKrLinear):
                m = LoKrLinear(m)
                model.set_submodule(real, m)
            m.add_adapter(name, self, rng)
        return [real for _, real, _ in found]


class KronFactors(Module):
    """One adapter's tensors: C (a, c), B (b, r), A (r, d), and its scale s."""

    def __init__(self, C, B, A, scale: float):
        self.C = Parameter(C)
        self.B = Parameter(B)
        self.A = Parameter(A)
        self.scale = scale


class LoKrLinear(DeltaLayer):
    """y = base(x) + s · kron(C, B A) x, with the base Linear frozen."""

    mergeable = True

    def __init__(self, base):
        self.base = base                        # set first: its parameters are listed first
        super().__init__()

    def add_adapter(self, name: str, cfg: LoKrConfig, rng) -> None:
        (a, c), (b, d) = cfg.shapes(*self.base.weight.shape)
        dt = self.base.weight.dtype

        def kaiming(shape):                     # uniform, bound 1 / sqrt(fan_in)
            bound = 1 / math.sqrt(shape[1])
            return bk.asarray(rng.uniform(-bound, bound, shape), dtype=dt)

        C, A = kaiming((a, c)), kaiming((cfg.r, d))
        B = bk.xp.zeros((b, cfg.r), dtype=dt)                       # zero: ΔW = 0 at step 0
        setattr(self.adapters, name, KronFactors(C, B, A, cfg.alpha / cfg.r))

    def forward(self, x):
        if self.active is None or self.active == self.merged_adapter:
            return self.base(x)
        f = getattr(self.adapters, self.active)
        (a, c), (b, d) = f.C.shape, (f.B.shape[0], f.A.shape[1])
        M = matmul(f.B, f.A)                                        # (b, d)
        # kron(C, M)[i b + j, k d + l] = C[i, k] M[j, l]: a broadcast product, then a reshape
        K = (f.C.reshape(a, 1, c, 1) * M.reshape(1, b, 1, d)).reshape(a * b, c * d)
        return self.base(x) + linear(x, K * f.scale)                # (..., in) -> (..., out)

    # ---------------------------------------------------------------- merge
    def delta_weight(self, name: str):
        """s · kron(C, B A), (out, in)."""
        f = getattr(self.adapters, name)
        return f.scale * bk.xp.kron(f.C.data, f.B.data @ f.A.data)

    def __repr__(self) -> str:
        return f"LoKrLinear({self.base!r}, adapters={self.adapter_names()})"
