"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA: Weight-Decomposed
Low-Rank Adaptation", sections 3-4).

Section 3 splits a weight into a *magnitude* and a *direction*, W = m · V / ||V||, and finds
that full fine-tuning moves the two in a way LoRA cannot imitate. DoRA trains both: the
direction through LoRA, the magnitude as a vector of its own::

    V  = W0 + s B A                  (out, in)   LoRA's update, B = 0 at init
    W' = m ⊙ V / ||V||_row           m: (out,)   one magnitude per output unit
    y  = x W'ᵀ + b  =  (m / ||V||) ⊙ (x W0ᵀ + s (x Aᵀ) Bᵀ) + b

**Which norm.** The paper writes W as (d, k) with y = x W, and normalises each *column*:
column j holds the weights feeding output j. In our (out, in) layout (y = x Wᵀ, as PyTorch and
Hugging Face PEFT), that is the norm of each *row*, over the input dimension:
``||V||_row[i] = sqrt(sum_j V[i, j]²)``. HF PEFT's ``get_weight_norm`` takes
``torch.linalg.norm(W0 + s B A, dim=1)`` on the (out, in) weight: the same numbers.

**Init, and why step 0 is the base.** m starts as ||W0||_row and B = 0, so V = W0 exactly,
m / ||V|| = 1 exactly (the same float operations on the same numbers), and the layer computes
x W0ᵀ + b bit for bit (a test checks the logits are *equal*).

**The norm in backward** (section 4.3). Differentiating through ||V|| costs memory (the dense
(out, in) V enters the graph), so the paper treats ``||V||`` as a constant: gradients flow to m
directly and to A, B through ``x W0ᵀ + s x Aᵀ Bᵀ`` only, scaled by m / ||V||. This is
``detach_norm=True`` (the default, as the paper and HF PEFT); the gradient is then *not* the
exact derivative of the forward value, and a test pins both: the value against the formula and
the gradient against finite differences of the same formula with ||V|| frozen.
``detach_norm=False`` gives the exact gradient (checked against plain finite differences).

**Merge.** W' = (m / ||V||) ⊙ (W0 + s B A), row by row. Unmerging needs ||V|| of the moment of
merging (W0 cannot be read back from W' without it), so the layer keeps that vector (out,) while
merged: W0 = W' ⊙ ||V|| / m - s B A. As with LoRA, a merge that could not be undone (m with a
zero, non-finite numbers, overflow) is refused before any weight changes.

Not built here (refused by name): dropout on the LoRA branch, PiSSA init, the embedding, a 4-bit
base (QDoRA).
"""

from __future__ import annotations

from dataclasses import dataclass

from minipeft import backend as bk
from minipeft import checks
from minipeft.autograd import Tensor, matmul, sqrt
from minipeft.autograd import sum as tsum
from minipeft.nn.layers import Linear
from minipeft.nn.module import Parameter
from minipeft.peft.layer import restores
from minipeft.peft.lora import LoraConfig, LoRALinear, lora_linear
from minipeft.quant import QuantLinear


@dataclass(frozen=True)
class DoraConfig(LoraConfig):
    """LoraConfig's fields, plus whether ||W0 + s B A|| is a constant in backward."""

    detach_norm: bool = True     # the paper's sec. 4.3 and HF PEFT: ||V|| gets no gradient

    method = "dora"
    mergeable = True

    _kind_hint = "DoRA on a 4-bit base (QDoRA) is not built here; use a float base"

    def __post_init__(self):
        super().__post_init__()
        checks.check_bool("DoraConfig.detach_norm", self.detach_norm)
        for bad, why in ((self.dropout, "dropout"), (self.init == "pissa", "init='pissa'"),
                         (self.target_embedding, "target_embedding")):
            if bad:
                raise ValueError(f"DoraConfig.{why} is not supported by DoRA here (linear "
                                 "layers, no dropout, kaiming or gaussian init)")

    def _kinds(self):
        return Linear, DoRALinear, QuantLinear


def row_norm(W):
    """||W||_row: the norm of each output unit's weights, over the input dimension. (out,)"""
    return bk.xp.sqrt((W * W).sum(axis=1))


class DoRALinear(LoRALinear):
    """y = (m / ||W0 + s B A||_row) ⊙ (x W0ᵀ + s (x Aᵀ) Bᵀ) + b, with the base Linear frozen."""

    supports_mixed_batch = False

    def add_adapter(self, name: str, cfg: DoraConfig, rng) -> None:
        """LoRA's A (random) and B (zero), plus m = ||W0||_row."""
        super().add_adapter(name, cfg, rng)
        f = self.factors(name)
        f.m = Parameter(row_norm(self.base.weight.data))            # (out,)
        f.detach_norm = cfg.detach_norm

    def norm(self, name: str, graph: bool = False):
        """||W0 + s B A||_row (out,): an array, or a Tensor in the graph when ``graph``."""
        f = self.factors(name)
        if not graph:
            V = self.base.weight.data + f.scale * (f.B.data @ f.A.data)   # (out, in)
            return row_norm(V)
        V = self.base.weight + matmul(f.B, f.A) * f.scale           # (out, in), in the graph
        return sqrt(tsum(V * V, axis=1))

    def forward(self, x):
        if self.merged or self.active is None:                      # W already holds W'
            return self.base(x)
        f = self.factors(self.active)
        n = self.norm(self.active, graph=not f.detach_norm)
        n = Tensor(n) if f.detach_norm else n                       # a constant, or not
        h = lora_linear(x, self.base.weight, None, f.A, f.B, f.scale)   # (..., out)
        y = h * (f.m / n)                                           # scale each output unit
        return y if self.base.bias is None else y + self.base.bias

    # ---------------------------------------------------------------- merge
    def _merge_plan(self, name: str):
        """(W', ||V||): the merged weight and the norm that unmerging will need, after
        checking that unmerging gives W0 back."""
        f = self.factors(name)
        for label, t in (("A", f.A), ("B", f.B), ("m", f.m)):
            if not bool(bk.xp.isfinite(t.data).all()):
                raise ValueError(f"merge: adapter {name!r} has non-finite values in {label}; "
                                 "the base weights were left unchanged")
        W0 = self.base.weight.data
        delta = self.delta_weight(name)                             # s B A (out, in)
        n = row_norm(W0 + delta)                                    # (out,)
        W = ((f.m.data / n)[:, None] * (W0 + delta)).astype(W0.dtype)
        back = self._unfold(W, n, f.m.data, delta)
        restores(W0, back, f"DoRA adapter {name!r}")
        return W, n

    @staticmethod
    def _unfold(W, n, m, delta):
        """W0 = W' ⊙ ||V|| / m - s B A (NaN or inf where m has zeros: refused by restores)."""
        with bk.np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return ((n / m)[:, None] * W - delta).astype(W.dtype)

    def _install(self, plan) -> None:
        self.base.weight.data, self.merged_norm = plan

    def _take_out(self, name: str) -> None:
        f = self.factors(name)
        W = self.base.weight.data
        self.base.weight.data = self._unfold(W, self.merged_norm, f.m.data,
                                             self.delta_weight(name))
        del self.merged_norm

    def __repr__(self) -> str:
        return f"DoRALinear({self.base!r}, adapters={self.adapter_names()})"
