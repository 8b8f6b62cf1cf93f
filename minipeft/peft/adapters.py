"""Bottleneck adapters: small trainable layers inside each frozen transformer block.

Houlsby et al. 2019 ("Parameter-Efficient Transfer Learning for NLP", sec. 2.1), Pfeiffer et
al. 2021 (AdapterFusion: one adapter after the MLP), He et al. 2022 (parallel adapters, sec. 3)::

    h (B, T, C) --W_down--> (B, T, m) --f--> --W_up--> (B, T, C) --(+ h)--> out
                   C -> m, with a bottleneck m << C;  f = ReLU or GELU

    sequential:  out = h + W_up f(W_down h + b_down) + b_up             h = a sublayer's output
    parallel:    out = mlp(x) + s (W_up f(W_down x + b_down) + b_up)    x = the MLP's input

Where the frozen block gets them (``placement``):

    houlsby   after the attention output projection AND after the MLP   (wraps attn.o_proj
              and mlp.fc_out; the adapter acts before the residual add)
    pfeiffer  after the MLP only                                         (wraps mlp.fc_out)
    parallel  beside the MLP, reading the MLP's input                    (wraps mlp)

Why step 0 equals the base model: W_up and b_up start at zero, so the branch adds exactly 0,
whatever W_down and f give. W_down starts random (std 1/sqrt(C)): were it zero too, f(0) = 0
and no gradient would ever reach either matrix. In the first step only W_up and b_up move
(dL/dW_up = g f(W_down h + b_down)^T, while dL/dW_down passes through W_up = 0); W_down follows.

Each adapter trains 2 C m + m + C numbers. It cannot be merged into the base weights: f sits
between the two projections, so the branch is no single matrix; inference pays for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from minipeft import backend as bk
from minipeft import checks
from minipeft.autograd import functional as F
from minipeft.autograd import relu
from minipeft.nn.layers import Linear
from minipeft.nn.module import Module
from minipeft.peft import targets
from minipeft.peft.config import PeftConfig
from minipeft.peft.layer import PeftLayer

PLACEMENTS = {  # placement -> (module paths inside a block, parallel?)
    "houlsby": (("attn.o_proj", "mlp.fc_out"), False),
    "pfeiffer": (("mlp.fc_out",), False),
    "parallel": (("mlp",), True),
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
        names, parallel = PLACEMENTS[self.placement]
        found = targets.select(model, "AdapterConfig", names, (Module,), self.layers,
                               owner=AdapterLayer, kind_name="block")
        found = [(real, m) for logical, real, m in found if targets.layer_of(logical) is not None]
        rng = bk.host_rng(seed)
        for path, layer in found:
            if not isinstance(layer, AdapterLayer) or layer.parallel != parallel:
                layer = AdapterLayer(layer, parallel)       # first adapter here: wrap the base
                model.set_submodule(path, layer)
            dtype = layer.base.parameters()[0].dtype
            setattr(layer.adapters, name, Bottleneck(
                cfg.n_embd, width, self.activation, self.scale if parallel else 1.0, rng, dtype))
        return [p for p, _ in found]


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

    sequential: y = base(x);  y + adapter(y).     parallel: base(x) + adapter(x).
    """

    def __init__(self, base: Module, parallel: bool):
        self.base = base                        # set first: its parameters are listed first
        super().__init__()
        self.parallel = parallel

    def forward(self, x):
        y = self.base(x)                                            # (B, T, C)
        if self.active is None:
            return y
        adapter = getattr(self.adapters, self.active)
        return y + adapter(x if self.parallel else y)

    def __repr__(self) -> str:
        kind = "parallel" if self.parallel else "sequential"
        return f"AdapterLayer({kind}, adapters={self.adapter_names()}, active={self.active})"
