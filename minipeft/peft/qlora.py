"""QLoRA: LoRA on a frozen 4-bit base (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of
Quantized LLMs", sections 3 and 4).

QLoRA changes nothing in LoRA's maths; it changes what the frozen weight *is*. The base's
matrices are stored in 4-bit NormalFloat (``minipeft/quant.py``: NF4 codes, block-wise absmax,
double-quantised constants, about 4.127 bits per weight) and LoRA's factors train on top in
float32::

    y = dequant(W_nf4) x + b + s · B A x          A: (r, in)  random     B: (out, r)  zero

Section 3 of the paper: "QLoRA has one low-precision storage data type ... and one computation
data type": the weight is dequantised to the compute type for every matmul, forward *and*
backward (dx = g · dequant(W)), and never kept in float. Only the gradient with respect to the
LoRA factors (and to x, for the layers below) is computed; the 4-bit codes get none.

How to use it (two steps, as with bitsandbytes + PEFT)::

    quantize_model(model)                                # every Linear in blocks.* -> NF4
    peft_model = get_peft_model(model, QLoraConfig(r=8, target_modules=("q_proj", "v_proj")))

Choices, each pinned by a test in ``tests/test_qlora.py``:

* **A method of its own** ("qlora"), not a switch on ``LoraConfig``: the saved file then says
  which base it belongs to. A QLoRA adapter was trained against the *quantised* weights (whose
  rounding error its update partly absorbs), so loading it onto a float base, or a LoRA adapter
  onto a 4-bit base, raises ``BaseKindError`` by name and leaves the model unchanged.
* **Merging is refused.** Folding s B A into the base would mean W' = quant(dequant(W) + s B A):
  the sum is rounded to the 16 NF4 levels of each block (and the block's absmax moves), so the
  merged model does not compute what the adapter computes, and ``unmerge`` cannot give the
  original codes back (``dequant(W') - s B A`` is not ``dequant(W)``). Neither of the house's
  merge guarantees (exact outputs, reversible) can hold, so ``merge()`` raises ValueError. To
  deploy merged, dequantise the base to float and merge there (what the paper's authors do).
* ``init="pissa"`` (rewrites the frozen weight) and ``target_embedding`` (the embedding is
  not quantised) are refused by name.

Memory: the fused ``qlora_linear`` saves only x and the thin h = s x Aᵀ, as ``lora_linear``
does; the dequantised W lives only inside each matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

from minipeft import parallel as par
from minipeft.autograd import Tensor, counters
from minipeft.nn.layers import Linear
from minipeft.peft.layer import row_adapters
from minipeft.peft.lora import LoraConfig, LoRALinear, factor_grads
from minipeft.quant import NF4Weight, QuantLinear


@dataclass(frozen=True)
class QLoraConfig(LoraConfig):
    """LoraConfig's fields, for a base whose targeted Linears are 4-bit ``QuantLinear``s."""

    method = "qlora"
    mergeable = False  # see the module docstring: requantising is neither exact nor reversible

    _kind_hint = "quantize_model(model) first (a QLoRA adapter belongs to the 4-bit base)"

    def __post_init__(self):
        super().__post_init__()
        if self.init == "pissa":
            raise ValueError("QLoraConfig.init='pissa' would rewrite the frozen 4-bit weight; "
                             "choose 'kaiming' or 'gaussian'")
        if self.target_embedding:
            raise ValueError("QLoraConfig.target_embedding=True: the embedding is not quantised; "
                             "adapt it with LoraConfig on a float base")

    def _kinds(self):
        return QuantLinear, QLoRALinear, Linear


def qlora_linear(x: Tensor, qw: NF4Weight, b: Tensor | None, A: Tensor, B: Tensor,
                 s: float) -> Tensor:
    """y = x Wᵀ + b + s (x Aᵀ) Bᵀ with W = dequant(qw) rebuilt for each product. With N tokens,
    g = dL/dy (N, out), h = s x Aᵀ (N, r), gB = g B (N, r)::

        dx = g W + s gB A        dB = gᵀ h        dA = s gBᵀ x        db = sum_N g

    The 4-bit W is frozen (no dW ever). Saves x and h, never the float W.
    """
    parents = (x, A, B) if b is None else (x, A, B, b)
    n_out, n_in = qw.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"qlora_linear: input has {x.shape[-1]} features (shape {x.shape}) "
                         f"but the weight of shape {qw.shape} expects {n_in}")
    lead, r = x.shape[:-1], A.shape[0]
    x2 = x.data.reshape(-1, n_in)                                   # (N, in)
    h = x2 @ A.data.T                                               # (N, r)
    h *= s
    y = par.matmul(x2, qw.dequantize().T)                           # (N, out); W dropped after
    # the frozen W's products are split over the cores (parallel.matmul); the thin rank-r ones
    # are too small to be worth it
    y += h @ B.data.T
    if b is not None:
        y += b.data
    N = x2.shape[0]
    flops = {"W": 2 * N * n_in * n_out, "A": 2 * N * n_in * r, "B": 2 * N * r * n_out}
    counters["matmul_flops"] += sum(flops.values())

    def backward(g):
        g2 = g.reshape(-1, n_out)                                   # (N, out)
        dx = db = None
        dx_factors, dA, dB = factor_grads(g2, x2, h, A, B, s, x.requires_grad, flops)
        if x.requires_grad:
            counters["matmul_flops"] += flops["W"]
            dx = par.matmul(g2, qw.dequantize())                    # (N, in): W rebuilt
            dx += dx_factors                                        # + s gB A
            dx = dx.reshape(*lead, n_in)
        if b is not None and b.requires_grad:
            db = g2.sum(axis=0)
        return (dx, dA, dB) if b is None else (dx, dA, dB, db)
    return Tensor._make(y.reshape(*lead, n_out), parents, backward, "qlora_linear")


class QLoRALinear(LoRALinear):
    """y = dequant(W_nf4) x + b + s · B A dropout(x); it *has* the frozen ``QuantLinear``."""

    mergeable = False

    def forward(self, x):
        if row_adapters() is None:
            if self.active is None:
                return self.base(x)
            f = self.factors(self.active)
            if f.drop.p == 0.0 or not self.training:                # the common case: one op
                return qlora_linear(x, self.base.qweight, self.base.bias, f.A, f.B, f.scale)
        y = self.base(x)                                            # (..., out)
        d = self._update(x, x.shape[:-1])
        return y if d is None else y + d

    def __repr__(self) -> str:
        return f"QLoRALinear({self.base!r}, adapters={self.adapter_names()})"
