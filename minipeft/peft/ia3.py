"""IA3: learned vectors that rescale activations (Liu et al. 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning", sec. 3.3).

Three vectors per block, one number per channel, multiply what the frozen model computes::

    k = l_k * (x W_k^T + b_k)            l_k (C,)    scales every key channel
    v = l_v * (x W_v^T + b_v)            l_v (C,)    scales every value channel
    y = (l_ff * gelu(x W_in^T + b_in)) W_out^T + b_out      l_ff (4C,)  the MLP's hidden units

so a block trains 2 C + 4 C = 6 C numbers: about 0.01% of GPT-2. Here l_ff is applied to the
*input* of ``fc_out``, which is exactly the MLP's hidden activation.

Why step 0 equals the base model: every vector starts at ones, and 1 * a = a exactly.

Merging is free because a diagonal scale folds into the neighbouring matrix:
    output-scaled (k_proj, v_proj):  l * (x W^T + b) = x (diag(l) W)^T + l * b
                                     W' = W * l[:, None],  b' = l * b
    input-scaled (fc_out):           (l * x) W^T + b = x (W * l[None, :])^T + b
and unmerging divides by l again, which is why a zero (or NaN/inf) entry refuses to merge: it
would destroy the weights it multiplies. So does a tiny one (1e-44 underflows W * l to zero)
and a huge one (W * l overflows): every merge first checks that dividing gives W back.
"""

from __future__ import annotations

from dataclasses import dataclass

from minipeft import backend as bk
from minipeft.nn.layers import Linear
from minipeft.nn.module import Module, Parameter
from minipeft.peft import targets
from minipeft.peft.config import PeftConfig
from minipeft.peft.layer import PeftLayer, restores

# Module name -> where the vector acts. Attention projections and fc_in scale their output;
# fc_out scales its input (the MLP's hidden activation, as in the paper).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out")
INPUT_SCALED = ("fc_out",)


@dataclass(frozen=True)
class IA3Config(PeftConfig):
    target_modules: tuple = ("k_proj", "v_proj", "fc_out")   # Linear layers that get a vector
    layers: tuple | None = None                               # blocks (None: every block)

    method = "ia3"
    mergeable = True

    def __post_init__(self):
        super().__post_init__()
        tm = targets.check_targets("IA3Config.target_modules", self.target_modules)
        bad = [t for t in tm if t not in TARGETS]
        if bad:
            raise ValueError(f"IA3Config.target_modules: unknown {bad!r}; choose from {TARGETS}")
        object.__setattr__(self, "target_modules", tm)
        object.__setattr__(self, "layers", targets.check_layers("IA3Config.layers", self.layers))

    def apply(self, model, name: str, seed: int) -> list[str]:
        found = targets.select(model, "IA3Config", self.target_modules, (Linear,),
                               tuple(range(model.config.n_layer)) if self.layers is None
                               else self.layers, owner=IA3Linear)
        found = [(real, m) for logical, real, m in found if targets.layer_of(logical) is not None]
        for path, layer in found:
            if not isinstance(layer, IA3Linear):        # first vector here: wrap the Linear
                layer = IA3Linear(layer, scale_input=path.endswith(INPUT_SCALED))
                model.set_submodule(path, layer)
            w = layer.base.weight                                   # (out, in)
            n = w.shape[1] if layer.scale_input else w.shape[0]
            setattr(layer.adapters, name, IA3Vector(bk.xp.ones((n,), dtype=w.dtype)))
        return [p for p, _ in found]


class IA3Vector(Module):
    """One adapter's vector ``l`` for one Linear: (in,) for fc_out, (out,) otherwise."""

    def __init__(self, values):
        self.l = Parameter(values)


class IA3Linear(PeftLayer):
    """A frozen Linear (``base``) whose output (or input) is scaled by the active vector."""

    mergeable = True

    def __init__(self, base, scale_input: bool):
        self.base = base                        # set first: its parameters are listed first
        super().__init__()
        self.scale_input = scale_input

    def forward(self, x):
        if self.active is None or self.active == self.merged_adapter:
            return self.base(x)                 # merged: the weights already hold the scale
        l = getattr(self.adapters, self.active).l
        if self.scale_input:
            return self.base(x * l)                                 # (B, T, in) * (in,)
        return self.base(x) * l                                     # (B, T, out) * (out,)

    # ---------------------------------------------------------------- merge
    def _merge_plan(self, name: str):
        """The folded (W, b), after checking that the vector is finite and non-zero and that
        dividing it out again gives W and b back (PeftModel checks every layer first)."""
        l = getattr(self.adapters, name).l.data
        if not bool(bk.xp.isfinite(l).all()) or bool((l == 0).any()):
            raise ValueError(f"IA3 merge refused: adapter {name!r} has zero or non-finite "
                             f"entries in its scale vector of shape {l.shape}; merging would "
                             "destroy the base weights (they were left unchanged)")
        w, b = self._folded(l, divide=False)
        if not (bool(bk.xp.isfinite(w).all()) and (b is None or bool(bk.xp.isfinite(b).all()))):
            raise ValueError("IA3 merge: W * l overflows; the base weights were left unchanged")
        w_back, b_back = self._folded(l, divide=True, w=w, b=b)
        restores(self.base.weight.data, w_back, f"IA3 adapter {name!r}")
        if b is not None:
            restores(self.base.bias.data, b_back, f"IA3 adapter {name!r} (bias)")
        return w, b

    def merge(self) -> None:
        """W' = W * l[:, None], b' = l * b (output-scaled) or W' = W * l[None, :]. Idempotent."""
        self.apply_merge(self.check_merge())

    def _install(self, folded) -> None:
        self._set(*folded)

    def _take_out(self, name: str) -> None:
        """Divide the merged vector back out of the weights."""
        self._set(*self._folded(getattr(self.adapters, name).l.data, divide=True))

    def _folded(self, l, divide: bool, w=None, b=None):
        """The weight and bias (default: the layer's) with ``l`` multiplied in or divided out,
        in the weights' dtype."""
        if w is None:
            w, b = self.base.weight.data, self.base.bias
            b = None if b is None else b.data
        op = bk.xp.divide if divide else bk.xp.multiply
        dt = w.dtype
        if self.scale_input:
            return op(w, l[None, :]).astype(dt), b                  # (out, in) * (1, in)
        return op(w, l[:, None]).astype(dt), (None if b is None else op(b, l).astype(dt))

    def _set(self, w, b) -> None:
        self.base.weight.data = w.astype(self.base.weight.dtype, copy=False)
        if b is not None:
            self.base.bias.data = b.astype(self.base.bias.dtype, copy=False)

    def __repr__(self) -> str:
        where = "input" if self.scale_input else "output"
        return (f"IA3Linear(scales {where}, adapters={self.adapter_names()}, "
                f"active={self.active}, merged={self.merged_adapter})")
