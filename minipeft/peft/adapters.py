"""Bottleneck adapters: small trainable layers inside each frozen transformer block.

Houlsby et al. 2019 ("Parameter-Efficient Transfer Learning for NLP", sec. 2.1), Pfeiffer et
al. 2021 (AdapterFusion, sec. 3: one adapter per block, after the feed-forward sublayer), He et
al. 2022 (parallel adapters, sec. 3)::

    h (B, T, C) --W_down--> (B, T, m) --f--> --W_up--> (B, T, C) --(+ h)--> out
                   C -> m, with a bottleneck m << C;  f = ReLU or GELU;  A(h) = W_up f(W_down h)

Where the frozen block gets them (``placement``). A pre-LN block computes
``x1 = x + attn(ln_1(x))`` and ``x2 = x1 + mlp(ln_2(x1))``::

    houlsby   A on each sublayer's output, before its residual add:
              x1 = x + a + A1(a),  a = attn(..)       x2 = x1 + f + A2(f),  f = mlp(..)
              (wraps attn.o_proj and mlp.fc_out), and the block's layer norms train too
              (``layer_norms``, on by default for houlsby: Houlsby et al. train them)
    pfeiffer  one A reading the stream *after* the feed-forward residual add:
              out = x2 + A(x2) = x1 + f + A(x1 + f)   (wraps the block; as AdapterHub's
              SeqBnConfig: original_ln_before=True, residual_before_ln=True, with no
              post-sublayer norm in a pre-LN block)
    parallel  beside the MLP, reading the MLP's input: x2 = x1 + f + s A(ln_2(x1))  (wraps mlp)

Why step 0 equals the base model: W_up and b_up start at zero, so the branch adds exactly 0,
whatever W_down and f give, and trained layer norms start as copies of the base's. W_down starts
random (std 1/sqrt(C)): were it zero too, f(0) = 0 and no gradient would ever reach either
matrix. In the first step only W_up and b_up move (dL/dW_up = g f(W_down h + b_down)^T, while
dL/dW_down passes through W_up = 0); W_down follows.

Each adapter trains 2 C m + m + C numbers (plus 4 C per block for Houlsby's two layer norms).
It cannot be merged into the base weights: f sits between the two projections, so the branch
is no single matrix; inference pays for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from minipeft import backend as bk
from minipeft import checks
from minipeft.autograd import functional as F
from minipeft.autograd import relu
from minipeft.nn.gpt import Block
from minipeft.nn.layers import LayerNorm, Linear
from minipeft.nn.module import Module, Parameter
from minipeft.peft import targets
from minipeft.peft.config import PeftConfig
from minipeft.peft.layer import PeftLayer

PLACEMENTS = {  # placement -> (module paths to wrap, what the adapter reads)
    "houlsby": (("attn.o_proj", "mlp.fc_out"), "output"),
    "pfeiffer": (("blocks.*",), "block"),
    "parallel": (("mlp",), "input"),
}
ACTIVATIONS = ("relu", "gelu")


@dataclass(frozen=True)
class AdapterConfig(PeftConfig):
    bottleneck: int | None = None      # m, the bottleneck width (wins over reduction_factor)
    reduction_factor: int = 16         # m = n_embd // reduction_factor when bottleneck is None
    activation: str = "relu"           # f between the projections: "relu" or "gelu"
    placement: str = "houlsby"         # "houlsby", "pfeiffer" or "parallel" (module docstring)
    scale: float = 1.0                 # s, the weight of a parallel branch (parallel only)
    layers: tuple | None = None        # block indices that get adapters (None: every block)
    layer_norms: bool | None = None    # train the blocks' layer norms too (None: houlsby only)

    method = "adapter"
    mergeable = False

    def __post_init__(self):
        super().__post_init__()
        who = "AdapterConfig"
        if self.bottleneck is not None:
            checks.check_int(f"{who}.bottleneck", self.bottleneck, low=1)
        checks.check_int(f"{who}.reduction_factor", self.reduction_factor, low=1)
        checks.check_choice(f"{who}.activation", self.activation, ACTIVATIONS)
        checks.check_choice(f"{who}.placement", self.placement, tuple(PLACEMENTS))
        checks.check_float(f"{who}.scale", self.scale)
        object.__setattr__(self, "layers", targets.check_layers(f"{who}.layers", self.layers))
        if self.layer_norms is not None:
            checks.check_bool(f"{who}.layer_norms", self.layer_norms)

    @property
    def trains_norms(self) -> bool:
        return self.placement == "houlsby" if self.layer_norms is None else self.layer_norms

    def width(self, n_embd: int) -> int:
        """The bottleneck width m for a model of width ``n_embd``."""
        m = self.bottleneck if self.bottleneck is not None else n_embd // self.reduction_factor
        if m > n_embd:
            raise ValueError(f"AdapterConfig.bottleneck={m} is wider than the model "
                             f"(n_embd={n_embd}): a bottleneck must be at most n_embd")
        if m <= 0:
            raise ValueError(f"AdapterConfig: reduction_factor={self.reduction_factor} gives a "
                             f"zero-width bottleneck for n_embd={n_embd} (n_embd // "
                             f"reduction_factor = 0); use a factor <= {n_embd} or set bottleneck")
        return m

    def apply(self, model, name: str, seed: int) -> list[str]:
        cfg = model.config
        width = self.width(cfg.n_embd)                  # validate everything before surgery
        names, reads = PLACEMENTS[self.placement]
        kinds, label = ((Block,), "block") if reads == "block" else ((Module,), "module")
        found = targets.select(model, "AdapterConfig", names, kinds, self.layers,
                               owner=AdapterLayer, kind_name=label)
        found = [(real, m) for logical, real, m in found if targets.layer_of(logical) is not None]
        norms = []
        if self.trains_norms:
            norms = targets.select(model, "AdapterConfig", ("ln_1", "ln_2"), (LayerNorm,),
                                   self.layers, owner=NormLayer, kind_name="LayerNorm")
            norms = [(real, m) for logical, real, m in norms
                     if targets.layer_of(logical) is not None]
        rng = bk.host_rng(seed)
        for path, layer in found:
            if not isinstance(layer, AdapterLayer) or layer.reads != reads:
                layer = AdapterLayer(layer, reads)          # first adapter here: wrap the base
                model.set_submodule(path, layer)
            dtype = layer.base.parameters()[0].dtype
            setattr(layer.adapters, name, Bottleneck(
                cfg.n_embd, width, self.activation, self.scale if reads == "input" else 1.0,
                rng, dtype))
        for path, layer in norms:
            if not isinstance(layer, NormLayer):
                layer = NormLayer(layer)
                model.set_submodule(path, layer)
            setattr(layer.adapters, name, NormCopy(layer.base))
        return [p for p, _ in found + norms]


class Bottleneck(Module):
    """One adapter: down-projection, nonlinearity, zero-initialised up-projection (times s)."""

    def __init__(self, n_embd: int, width: int, activation: str, scale: float, rng, dtype):
        self.down = Linear(n_embd, width, True, rng, std=n_embd ** -0.5)   # W_down (m, C)
        self.up = Linear(width, n_embd, True, rng)                         # W_up (C, m)
        self.up.weight.data = bk.xp.zeros((n_embd, width), dtype=dtype)    # zero: step 0 = base
        for p in self.parameters():
            p.data = p.data.astype(dtype, copy=False)
        self.activation, self.scale = activation, scale

    def forward(self, h):
        z = self.down(h)                                            # (B, T, m)
        z = relu(z) if self.activation == "relu" else F.gelu(z)
        out = self.up(z)                                            # (B, T, C)
        return out * self.scale if self.scale != 1.0 else out


class AdapterLayer(PeftLayer):
    """Holds a frozen module (``base``) and one ``Bottleneck`` per adapter name.

    reads "output": y = base(x); y + A(y).    "input": base(x) + A(x).
    reads "block":  (h, kv) = base(x, ...); (h + A(h), kv)   (a whole block, its output stream)
    """

    def __init__(self, base: Module, reads: str):
        self.base = base                        # set first: its parameters are listed first
        super().__init__()
        self.reads = reads

    @property
    def parallel(self) -> bool:
        return self.reads == "input"

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        if self.active is None:
            return out
        adapter = getattr(self.adapters, self.active)
        if self.reads == "block":
            h, kv = out                                             # (B, T, C), the cache
            return h + adapter(h), kv
        return out + adapter(x if self.reads == "input" else out)  # (B, T, C)

    def __repr__(self) -> str:
        return f"AdapterLayer(reads {self.reads}, adapters={self.adapter_names()}, " \
               f"active={self.active})"


class NormCopy(Module):
    """One adapter's own layer-norm scale and shift, starting as copies of the base's."""

    def __init__(self, norm: LayerNorm):
        self.weight = Parameter(norm.weight.data.copy())                    # (C,)
        self.bias = None if norm.bias is None else Parameter(norm.bias.data.copy())


class NormLayer(PeftLayer):
    """A frozen LayerNorm whose scale and shift the active adapter replaces (Houlsby)."""

    def __init__(self, base: LayerNorm):
        self.base = base
        super().__init__()

    def forward(self, x):
        if self.active is None:
            return self.base(x)
        a = getattr(self.adapters, self.active)
        return F.layer_norm(x, a.weight, a.bias, self.base.eps)

    def __repr__(self) -> str:
        return f"NormLayer(adapters={self.adapter_names()}, active={self.active})"
