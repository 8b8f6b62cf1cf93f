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
would destroy the weights it multiplies.
"""

from __future__ import annotations

from dataclasses import dataclass

from minipeft import backend as bk
from minipeft.nn.module import Module, Parameter
from minipeft.peft.adapters import check_layers, real_path
from minipeft.peft.core import PeftConfig, PeftLayer

# Module name -> where the vector acts. Attention projections and fc_in scale their output;
# fc_out scales its input (the MLP's hidden activation, as in the paper).
TARGETS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
           "fc_in": "mlp", "fc_out": "mlp"}
INPUT_SCALED = ("fc_out",)


@dataclass(frozen=True)
class IA3Config(PeftConfig):
    target_modules: tuple = ("k_proj", "v_proj", "fc_out")   # Linear layers that get a vector
    layers: tuple | None = None                               # blocks (None: every block)

    method = "ia3"
    mergeable = True

    def __post_init__(self):
        tm = self.target_modules                      # one name, as LoraConfig accepts
        object.__setattr__(self, "target_modules", (tm,) if isinstance(tm, str) else tuple(tm))
        bad = [t for t in self.target_modules if t not in TARGETS]
        if bad or not self.target_modules:
            raise ValueError(f"IA3Config.target_modules: unknown {bad or self.target_modules!r}; "
                             f"choose from {tuple(TARGETS)}")

    def apply(self, model, name: str, seed: int) -> list[str]:
        layers = check_layers(self.layers, model.config.n_layer, "IA3Config")
        paths = [real_path(model, f"blocks.{i}.{TARGETS[t]}.{t}")
                 for i in layers for t in self.target_modules]
        merged = [p for p in paths if getattr(model.get_submodule(p), "merged", False)]
        if merged:                                      # refuse before any surgery
            raise ValueError(f"{merged} hold a merged IA3 adapter: unmerge() first")
        for path in paths:
            layer = model.get_submodule(path)
            if not isinstance(layer, IA3Linear):        # first vector here: wrap the Linear
                layer = IA3Linear(layer, scale_input=path.endswith(INPUT_SCALED))
                model.set_submodule(path, layer)
            w = layer.base.weight                                   # (out, in)
            n = w.shape[1] if layer.scale_input else w.shape[0]
            setattr(layer.adapters, name, IA3Vector(bk.xp.ones((n,), dtype=w.dtype)))
        return paths


class IA3Vector(Module):
    """One adapter's vector ``l`` for one Linear: (in,) for fc_out, (out,) otherwise."""

    def __init__(self, values):
        self.l = Parameter(values)


class IA3Linear(PeftLayer):
    """A frozen Linear (``base``) whose output (or input) is scaled by the active vector."""

    def __init__(self, base, scale_input: bool):
        self.base = base                        # set first: its parameters are listed first
        super().__init__()
        self.scale_input = scale_input
        self.merged_adapter: str | None = None  # which vector the weights currently hold

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    def forward(self, x):
        if self.merged:                         # the weights already hold the scale
            if self.active != self.merged_adapter:
                raise RuntimeError(f"IA3 adapter {self.merged_adapter!r} is merged into the "
                                   f"weights but {self.active!r} is active: unmerge() first")
            return self.base(x)
        if self.active is None:
            return self.base(x)
        l = getattr(self.adapters, self.active).l
        if self.scale_input:
            return self.base(x * l)                                 # (B, T, in) * (in,)
        return self.base(x) * l                                     # (B, T, out) * (out,)

    # ---------------------------------------------------------------- merge
    def check_merge(self):
        """Raise ValueError if ``merge()`` would refuse: another adapter is merged, or the active
        vector has a zero or non-finite entry (PeftModel checks every layer before any merges).
        Returns the folded (W, b) it checked (None: nothing to merge), for ``apply_merge``."""
        if self.active is None or self.merged_adapter == self.active:
            return None
        if self.merged:
            raise ValueError(f"IA3 adapter {self.merged_adapter!r} is merged; unmerge() before "
                             f"merging {self.active!r}")
        l = getattr(self.adapters, self.active).l.data
        if not bool(bk.xp.isfinite(l).all()) or bool((l == 0).any()):
            raise ValueError(f"IA3 merge refused: adapter {self.active!r} has zero or non-finite "
                             f"entries in its scale vector of shape {l.shape}; merging would "
                             "destroy the base weights (they were left unchanged)")
        w, b = self._folded(l, divide=False)     # checked here, so no layer merges before it
        if not (bool(bk.xp.isfinite(w).all()) and (b is None or bool(bk.xp.isfinite(b).all()))):
            raise ValueError("IA3 merge: W * l overflows; the base weights were left unchanged")
        return w, b

    def merge(self) -> None:
        """W' = W * l[:, None], b' = l * b (output-scaled) or W' = W * l[None, :]. Idempotent."""
        self.apply_merge(self.check_merge())

    def apply_merge(self, folded) -> None:
        """Install the (W, b) ``check_merge`` returned (None: nothing to do)."""
        if folded is None:
            return
        self._set(*folded)
        self.merged_adapter = self.active

    def unmerge(self) -> None:
        """Divide the merged vector back out of the weights. Idempotent."""
        if not self.merged:
            return
        self._set(*self._folded(getattr(self.adapters, self.merged_adapter).l.data, divide=True))
        self.merged_adapter = None

    def _folded(self, l, divide: bool):
        """The weight and bias with ``l`` multiplied in (or divided out)."""
        w, b = self.base.weight.data, self.base.bias
        b = None if b is None else b.data
        op = bk.xp.divide if divide else bk.xp.multiply
        if self.scale_input:
            return op(w, l[None, :]), b                             # (out, in) * (1, in)
        return op(w, l[:, None]), (None if b is None else op(b, l))  # (out, in) * (out, 1)

    def _set(self, w, b) -> None:
        self.base.weight.data = w.astype(self.base.weight.dtype, copy=False)
        if b is not None:
            self.base.bias.data = b.astype(self.base.bias.dtype, copy=False)

    def delete(self, name: str) -> None:
        if name == self.merged_adapter:
            raise ValueError(f"IA3 adapter {name!r} is merged into the base weights; "
                             "unmerge() first")
        super().delete(name)

    def __repr__(self) -> str:
        where = "input" if self.scale_input else "output"
        return (f"IA3Linear(scales {where}, adapters={self.adapter_names()}, "
                f"active={self.active}, merged={self.merged_adapter})")
