"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, "VeRA: Vector-based
Random Matrix Adaptation", section 3).

LoRA trains a pair A, B per layer. VeRA freezes ONE random pair for the whole model and
trains only two vectors per layer that scale it::

    ΔW = diag(b) B diag(d) A          A: (r, in_max)   B: (out_max, r)   frozen, random, shared
    y  = W0 x + b ⊙ (B_l (d ⊙ (A_l x)))       d: (r,)   b: (out,)      trained, per layer

A layer of shape (out, in) uses the top-left slices A_l = A[:, :in] and B_l = B[:out, :], so
one pair sized for the largest targeted layer serves them all (as HF PEFT does). A layer
trains r + out numbers instead of LoRA's r (in + out): at r = 256 on LLaMA-2-7B's q and v
that is 278,528 against LoRA's 4.2 million at r = 8 (``minipeft.params.vera_parameter_count``).

**The shared pair is not saved.** It is regenerated from ``projection_seed`` (kaiming-uniform,
as the paper: A with bound 1/sqrt(in_max), B with bound 1/sqrt(r), A drawn first), so an
adapter file holds only the vectors d and b; loading rebuilds the same A and B from the seed
in the file's config. (HF PEFT can also save them: ``save_projection``.)

**Init, and why step 0 is the base** (paper sec. 3.1): b = 0, so ΔW = 0 exactly and y = W0 x
exactly; d starts at a small constant (``d_initial = 0.1``, the paper's and HF's default), so
that b's gradient, b-grad = g ⊙ (B_l (d ⊙ A_l x)), is not zero and training can start.

**Rank.** r is shared by every adapted layer, and B_l diag(d) A_l has rank at most
min(r, in, out): an r beyond a layer's smaller side would only add d entries that change
nothing that smaller ones could not, so it is refused, naming the layer.

Merge: W <- W + ΔW, and back, with LoRA's guarantees (refused when unmerging could not give W
back). Not mergeable per row: one adapter per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minipeft import backend as bk
from minipeft import checks
from minipeft.autograd import Tensor, linear
from minipeft.nn.layers import Linear
from minipeft.nn.module import Module, Parameter
from minipeft.peft import targets
from minipeft.peft.config import PeftConfig
from minipeft.peft.layer import DeltaLayer


@dataclass(frozen=True)
class VeraConfig(PeftConfig):
    r: int = 16                                   # rank of the shared random pair
    target_modules: tuple = ("q_proj", "v_proj")  # names, dotted suffixes or globs
    layers: tuple | None = None                   # block indices to adapt (None: every block)
    projection_seed: int = 0                      # regenerates the frozen A and B
    d_initial: float = 0.1                        # d's starting value (b starts at 0)

    method = "vera"
    mergeable = True

    def __post_init__(self):
        super().__post_init__()
        who = "VeraConfig"
        checks.check_int(f"{who}.r", self.r, low=1)
        checks.check_int(f"{who}.projection_seed", self.projection_seed, low=0)
        checks.check_float(f"{who}.d_initial", self.d_initial)
        if self.d_initial == 0:
            raise ValueError("VeraConfig.d_initial=0 would leave b's gradient zero forever "
                             "(b-grad is proportional to d): nothing would train")
        object.__setattr__(self, "target_modules", targets.check_targets(
            f"{who}.target_modules", self.target_modules))
        object.__setattr__(self, "layers", targets.check_layers(f"{who}.layers", self.layers))

    def apply(self, model, name: str, seed: int) -> list[str]:
        """Wrap each selected Linear; one random pair (from ``projection_seed``) for all."""
        found = targets.select(model, "VeraConfig", self.target_modules, (Linear,),
                               self.layers, owner=VeRALinear)
        shapes = {real: (m.base if isinstance(m, VeRALinear) else m).weight.shape
                  for _, real, m in found}
        for real, (out_f, in_f) in shapes.items():     # every layer checked before any change
            if self.r > min(out_f, in_f):
                raise ValueError(f"VeraConfig.r={self.r} exceeds the smaller side of {real}'s "
                                 f"weight {(out_f, in_f)}: B_l diag(d) A_l has rank at most "
                                 f"{min(out_f, in_f)} there")
        out_max = max(o for o, _ in shapes.values())
        in_max = max(i for _, i in shapes.values())
        dtype = found[0][2].weight.dtype if not isinstance(found[0][2], VeRALinear) \
            else found[0][2].base.weight.dtype
        A, B = shared_pair(self.r, in_max, out_max, self.projection_seed, dtype)
        for _, real, m in found:
            if not isinstance(m, VeRALinear):
                m = VeRALinear(m)
                model.set_submodule(real, m)
            m.add_adapter(name, A, B, self.d_initial)
        return [real for _, real, _ in found]


def shared_pair(r: int, in_max: int, out_max: int, seed: int, dtype):
    """The frozen A (r, in_max) and B (out_max, r), kaiming-uniform (bound 1/sqrt(fan_in),
    PyTorch's default for a Linear), drawn A first from ``host_rng(seed)``."""
    rng = bk.host_rng(seed)
    A = rng.uniform(-1 / math.sqrt(in_max), 1 / math.sqrt(in_max), (r, in_max))
    B = rng.uniform(-1 / math.sqrt(r), 1 / math.sqrt(r), (out_max, r))
    return bk.asarray(A, dtype=dtype), bk.asarray(B, dtype=dtype)


class VeraVectors(Module):
    """One adapter's trained vectors for one layer: d (r,) and b (out,)."""

    def __init__(self, d, b):
        self.d = Parameter(d)
        self.b = Parameter(b)


class VeRALinear(DeltaLayer):
    """y = base(x) + b ⊙ (B_l (d ⊙ (A_l x))), with the base Linear frozen."""

    mergeable = True

    def __init__(self, base):
        self.base = base                        # set first: its parameters are listed first
        super().__init__()
        self.projections: dict = {}             # adapter name -> the shared (A, B), not saved

    def add_adapter(self, name: str, A, B, d_initial: float) -> None:
        out_f, in_f = self.base.weight.shape
        dt = self.base.weight.dtype
        setattr(self.adapters, name, VeraVectors(bk.xp.full((A.shape[0],), d_initial, dtype=dt),
                                                 bk.xp.zeros((out_f,), dtype=dt)))
        # a new dict, never an edit in place: snapshot() keeps the old one for a rollback
        self.projections = {**self.projections, name: (A, B)}

    def delete(self, name: str) -> None:
        super().delete(name)
        self.projections = {k: v for k, v in self.projections.items() if k != name}

    def sliced(self, name: str):
        """A_l (r, in) and B_l (out, r): this layer's corner of the shared pair (views)."""
        out_f, in_f = self.base.weight.shape
        A, B = self.projections[name]
        return A[:, :in_f], B[:out_f, :]

    def forward(self, x):
        if self.active is None or self.active == self.merged_adapter:
            return self.base(x)
        v = getattr(self.adapters, self.active)
        A, B = self.sliced(self.active)
        h = linear(x, Tensor(A)) * v.d                              # (..., in) -> (..., r)
        return self.base(x) + linear(h, Tensor(B)) * v.b            # (..., r) -> (..., out)

    # ---------------------------------------------------------------- merge
    def delta_weight(self, name: str):
        """ΔW = diag(b) B_l diag(d) A_l, (out, in)."""
        v = getattr(self.adapters, name)
        A, B = self.sliced(name)
        return (v.b.data[:, None] * B) @ (v.d.data[:, None] * A)   # (out, r) @ (r, in)

    def __repr__(self) -> str:
        return f"VeRALinear({self.base!r}, adapters={self.adapter_names()})"
