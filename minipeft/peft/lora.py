"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Fine-tuning changes a weight matrix ``W0: (out, in)`` by some ``ΔW``. LoRA bets that ``ΔW`` is
low rank (section 4.1 of the paper), writes it as a product of two thin matrices and trains only
those, leaving ``W0`` frozen::

    y = W0 x + s · B A x        A: (r, in)  random     B: (out, r)  zero     s = alpha / r

           x (…, in)
           │
     ┌─────┴──────────────┐
     │                    │ dropout
     │ W0 (out, in)       │
     │ frozen             A (r, in)      down-projection: in -> r, random at init
     │                    │ (…, r)
     │                    B (out, r)     up-projection:   r -> out, ZERO at init
     │                    │ × s
     └──────── + ─────────┘
               │
           y (…, out)

It trains ``r (in + out)`` numbers instead of ``in · out``: for a 4096 x 4096 projection at r = 8
that is 65,536 instead of 16.8 million.

Why B = 0 and A random. At step 0 the product ``B A`` is zero, so the adapted model computes
exactly the base model: fine-tuning starts from what pretraining learnt (a test checks the
logits are equal). Not *both* zero: with ``A = B = 0`` the gradients ``dB = s g (A x)ᵀ`` and
``dA = s Bᵀ g xᵀ`` are both zero and nothing ever moves. With A random, ``dB`` is not zero, so B
moves first and then A follows.

The scale s. ``alpha / r`` (the paper) makes the initial learning dynamics roughly independent of
r, so alpha need not be re-tuned when r changes. rsLoRA (Kalajdzievski 2023) shows the update then
*shrinks* as r grows, so large ranks learn slowly, and uses ``alpha / sqrt(r)`` instead
(``use_rslora=True``).

Merging (section 4.1, "no additional inference latency"). ``W0 + s B A`` is an ordinary matrix:
``merge()`` folds it in, ``W <- W + s B A`` (one matmul), after which the layer costs exactly
what the base layer costs; ``unmerge()`` subtracts it again. The forward pass never forms the
dense ``B A``: ``(x Aᵀ) Bᵀ`` costs ``r (in + out)`` per token instead of ``in · out``.

PiSSA (Meng et al. 2024; ``init="pissa"``) starts B A on W0's top-r singular directions instead
of at zero, and *replaces the frozen weight by the residual* ``W_res = W0 - s B A``, so step 0
still equals the base model. After that, the frozen base of the layer IS the residual:
``disable_adapter()`` and ``unmerge()`` give ``W_res``, not ``W0``, and so does deleting the
adapter. Because it rewrites the frozen weight, a PiSSA adapter cannot join a layer that already
holds adapters. Loading a saved PiSSA adapter into a fresh base recomputes the same residual
(the SVD of the same W0), so it reproduces the trained model.

Targets. ``target_modules`` names the Linear layers to adapt, by the shared rule of
``targets.py``: a module path (``blocks.0.attn.q_proj``), a dotted suffix of it ("q_proj",
"attn.q_proj"), or a glob (``"blocks.0.*"``, ``"*_proj"``). ``layers`` then keeps only modules
inside the listed blocks. ``target_embedding=True`` also adapts the token embedding ``tok_emb``
(see ``LoRAEmbedding``). The rank is bounded by the layer it adapts: ``r <= in + out`` (at
``r = in out / (in + out)`` the factors already hold as many numbers as the dense matrix).

Memory. Written as three ops (base linear, LoRA term, sum), the graph would keep two extra
``(…, out)`` arrays per adapted layer alive until backward, so a LoRA step could need *more*
activation memory than full fine-tuning. ``lora_linear`` computes the sum in one op that saves
only ``x`` (already saved for others) and the thin ``h = s x Aᵀ``: LoRA's activations then match
the base model's, plus ``r`` numbers per token per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minipeft import backend as bk
from minipeft import checks
from minipeft import parallel as par
from minipeft.autograd import Tensor, concatenate, counters, embedding, linear, matmul, transpose
from minipeft.lowrank import pissa_init
from minipeft.nn.layers import Dropout, Embedding, Linear
from minipeft.nn.module import Module, Parameter
from minipeft.peft import targets
from minipeft.peft.config import PeftConfig
from minipeft.peft.layer import DeltaLayer, row_adapters
from minipeft.quant import QuantLinear

INITS = ("kaiming", "gaussian", "pissa")


class BaseKindError(ValueError):
    """A LoRA adapter aimed at a 4-bit base module (or a QLoRA adapter at a float one): the
    adapter would compute with weights it was not trained on."""


@dataclass(frozen=True)
class LoraConfig(PeftConfig):
    r: int = 8                                   # rank of B A
    alpha: float = 16                            # scale s = alpha / r (alpha / sqrt(r) with rsLoRA)
    dropout: float = 0.0                         # on the LoRA branch's input, while training
    target_modules: tuple = ("q_proj", "v_proj")  # names, dotted suffixes or regexes (see above)
    layers: tuple | None = None                  # block indices to adapt (None: every block)
    init: str = "kaiming"                        # A's init: "kaiming", "gaussian", or "pissa"
    use_rslora: bool = False                     # s = alpha / sqrt(r) (rank-stabilised)
    target_embedding: bool = False               # also adapt tok_emb

    method = "lora"
    mergeable = True

    def __post_init__(self):
        super().__post_init__()
        who = "LoraConfig"
        checks.check_int(f"{who}.r", self.r, low=1)
        checks.check_float(f"{who}.alpha", self.alpha, low=0.0, low_open=True)
        checks.check_float(f"{who}.dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        checks.check_choice(f"{who}.init", self.init, INITS)
        checks.check_bool(f"{who}.use_rslora", self.use_rslora)
        checks.check_bool(f"{who}.target_embedding", self.target_embedding)
        object.__setattr__(self, "target_modules", targets.check_targets(
            f"{who}.target_modules", self.target_modules, allow_empty=True))
        object.__setattr__(self, "layers", targets.check_layers(f"{who}.layers", self.layers))
        if not self.target_modules and not self.target_embedding:
            raise ValueError("LoraConfig.target_modules is empty and target_embedding is False: "
                             "nothing to adapt")

    @property
    def scale(self) -> float:
        """s: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    # ---------------------------------------------------------------- which modules
    _kind_hint = "a 4-bit base takes QLoraConfig (minipeft.peft.qlora)"

    def _kinds(self):
        """(the module kind adapted, the layer class wrapping it, the kind refused by name)."""
        return Linear, LoRALinear, QuantLinear

    def select(self, model) -> list[tuple[str, Module]]:
        """(real path, module) of the modules this config adapts, in model order. Raises
        ValueError when a target matches nothing or the choice is empty; changes nothing."""
        chosen = []
        if self.target_modules:
            kind, layer_class, other = self._kinds()
            wrong = [lg for lg, _, m in targets.walk(model) if isinstance(m, other)
                     and any(targets.matches(t, lg) for t in self.target_modules)]
            if wrong:
                raise BaseKindError(f"{type(self).__name__}: {wrong[0]} is a "
                                    f"{other.__name__}, not a {kind.__name__}: "
                                    f"{self._kind_hint}; the model was left unchanged")
            chosen += targets.select(model, type(self).__name__, self.target_modules, (kind,),
                                     self.layers, owner=layer_class, kind_name=kind.__name__)
        if self.target_embedding:
            chosen += targets.select(model, "LoraConfig", ("tok_emb",), (Embedding,),
                                     owner=LoRAEmbedding, kind_name="Embedding")
        return [(real, m) for _, real, m in chosen]

    def apply(self, model, name: str, seed: int) -> list[str]:
        """Wrap each selected module in a LoRA layer (or add ``name`` to an existing one)."""
        mods = self.select(model)
        for p, m in mods:                     # check every layer before any module changes
            shape = (m.base if isinstance(m, _LoRALayer) else m).weight.shape
            if self.r > sum(shape):
                raise ValueError(f"LoraConfig.r={self.r} exceeds in + out = {sum(shape)} of "
                                 f"{p}'s weight {shape}")
            if self.init == "pissa" and self.r > min(shape):
                raise ValueError(f"LoraConfig(init='pissa'): r={self.r} exceeds the "
                                 f"smaller side of {p}'s weight {shape}")
            if self.init == "pissa" and isinstance(m, _LoRALayer) and m.adapter_names():
                raise ValueError(f"LoraConfig(init='pissa') rewrites the frozen weight of "
                                 f"{p}, which its adapters {m.adapter_names()} rely on; "
                                 "give a PiSSA adapter a model of its own")
        rng = bk.host_rng(seed)
        for p, m in mods:
            if not isinstance(m, _LoRALayer):
                m = LoRAEmbedding(m) if isinstance(m, Embedding) else self._kinds()[1](m)
                model.set_submodule(p, m)
            m.add_adapter(name, self, rng)
        return [p for p, _ in mods]


# ============================================================================ the fused op
def lora_linear(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor,
                s: float) -> Tensor:
    """y = x Wᵀ + b + s (x Aᵀ) Bᵀ in one op (no dropout). With N tokens, g = dL/dy (N, out),
    h = s x Aᵀ (N, r) and gB = g B (N, r)::

        dx = g W + s gB A        dW = gᵀ x  (only if W trains)      db = sum_N g
        dB = gᵀ h                dA = s gBᵀ x

    Saves x and h; the frozen W's gradient product is skipped, as in ``linear``.
    """
    parents = (x, W, A, B) if b is None else (x, W, A, B, b)
    n_out, n_in = W.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"lora_linear: input has {x.shape[-1]} features (shape {x.shape}) but "
                         f"the weight of shape {W.shape} expects {n_in}")
    lead, r = x.shape[:-1], A.shape[0]
    xp = bk.xp
    x2 = x.data.reshape(-1, n_in)                                   # (N, in)
    N = x2.shape[0]
    dtype = xp.result_type(x2.dtype, W.dtype, A.dtype, B.dtype)
    h = xp.empty((N, r), dtype=dtype)
    y = xp.empty((N, n_out), dtype=dtype)

    # the rows are split over the CPU threads (parallel.rows; the readable form is one call
    # on all rows); the thin rank-r products in backward are too small to be worth splitting
    def forward(x2, h, y):                                          # a piece of the rows
        xp.matmul(x2, A.data.T, out=h)                              # (n, r)
        h *= s
        xp.matmul(x2, W.data.T, out=y)                              # (n, out)
        y += h @ B.data.T
        if b is not None:
            y += b.data
    par.rows(forward, x2, h, y, work=N * n_in * n_out // 64)
    flops = {"W": 2 * N * n_in * n_out, "A": 2 * N * n_in * r, "B": 2 * N * r * n_out}
    counters["matmul_flops"] += sum(flops.values())

    def backward(g):
        g2 = g.reshape(-1, n_out)                                   # (N, out)
        dx = dW = db = None
        dx_factors, dA, dB = factor_grads(g2, x2, h, A, B, s, x.requires_grad, flops)
        if x.requires_grad:
            counters["matmul_flops"] += flops["W"]
            dx = par.matmul(g2, W.data)                             # g2 @ W  (N, in)
            dx += dx_factors                                        # + s gB A
            dx = dx.reshape(*lead, n_in)
        if W.requires_grad:
            counters["weight_grad_matmul"] += 1
            counters["matmul_flops"] += flops["W"]
            dW = par.matmul(g2.T, x2)                               # g2.T @ x2  (out, in)
        if b is not None and b.requires_grad:
            db = g2.sum(axis=0)
        return (dx, dW, dA, dB) if b is None else (dx, dW, dA, dB, db)
    # saves x2 (a view of x) and the thin h (N, r); backward allocates the gradients, gB and
    # s * gB (N, r), and one x-sized temporary for dx's second product
    ws = sum(t.data.nbytes for t in parents if t.requires_grad) + 2 * h.nbytes \
        + (x.data.nbytes if x.requires_grad else 0)
    return Tensor._make(y.reshape(*lead, n_out), parents, backward, "lora_linear",
                        saved=(x2, h), workspace=ws)


def factor_grads(g2, x2, h, A: Tensor, B: Tensor, s: float, need_x: bool, flops: dict):
    """The factors' part of a LoRA backward, shared by ``lora_linear`` and QLoRA's op. With
    g2 = dL/dy (N, out), x2 the input (N, in), h = s x Aᵀ (N, r) and gB = g B (N, r):
    dx's adapter term s gB A (if ``need_x``), dA = s gBᵀ x, dB = gᵀ h; None where not needed.
    The thin rank-r products are too small to be worth splitting over the cores."""
    dx = dA = dB = None
    if need_x or A.requires_grad:
        gB = g2 @ B.data                                            # (N, r)
        counters["matmul_flops"] += flops["B"]
    if need_x:
        counters["matmul_flops"] += flops["A"]
        dx = (s * gB) @ A.data                                      # (N, in)
    if A.requires_grad:
        counters["weight_grad_matmul"] += 1
        counters["matmul_flops"] += flops["A"]
        dA = (s * gB).T @ x2                                        # (r, in)
    if B.requires_grad:
        counters["weight_grad_matmul"] += 1
        counters["matmul_flops"] += flops["B"]
        dB = g2.T @ h                                               # (out, r)
    return dx, dA, dB


# ============================================================================ the layers
class LoRAFactors(Module):
    """One adapter's tensors: A (r, in), B (out, r), its scale s and its dropout."""

    def __init__(self, A, B, scale: float, dropout: float, seed: int):
        self.A = Parameter(A)                                       # (r, in)
        self.B = Parameter(B)                                       # (out, r)
        self.r, self.scale = A.shape[0], scale
        self.drop = Dropout(dropout, seed=seed)

    def __repr__(self) -> str:
        return f"LoRAFactors(r={self.r}, scale={self.scale:g})"


class _LoRALayer(DeltaLayer):
    """What LoRALinear and LoRAEmbedding share: adapters, merge, unmerge, mixed batches.

    Subclasses say how one adapter changes the output (``_delta``) and what the update is as
    a dense matrix in the base weight's layout (``delta_weight``)."""

    supports_mixed_batch = True

    mergeable = True

    def __init__(self, base):
        self.base = base                        # set first: its parameters are listed first
        super().__init__()

    def factors(self, name: str) -> LoRAFactors:
        return getattr(self.adapters, name)

    def add_adapter(self, name: str, cfg: LoraConfig, rng) -> None:
        """Create adapter ``name``: A from ``cfg.init`` (drawn from ``rng``), B = 0."""
        if name in self.adapter_names():
            raise ValueError(f"adapter {name!r} already exists in this layer")
        W = self.base.weight.data
        out_f, in_f = self._shape()
        if cfg.init == "pissa":  # B A := the best rank-r part of W; W := the residual
            A, B, W_res = pissa_init(self._to_layout(W), cfg.r)   # (r, in), (out, r)
            root = math.sqrt(cfg.scale)                            # so that s B A = B_p A_p
            A, B = A / root, (B / root).astype(W.dtype)
            self.base.weight.data = self._to_layout(W_res).astype(W.dtype)
        else:
            A = bk.asarray(self._init_A(rng, cfg, in_f))           # (r, in)
            B = bk.xp.zeros((out_f, cfg.r), dtype=W.dtype)         # (out, r): zero
        seed = int(rng.integers(2**31))                            # this layer's dropout masks
        factors = LoRAFactors(A.astype(W.dtype), B, cfg.scale, cfg.dropout, seed)
        setattr(self.adapters, name, factors)

    def _init_A(self, rng, cfg, in_f):
        if cfg.init == "gaussian":                 # HF PEFT's "gaussian": std 1/r
            return rng.normal(0.0, 1.0 / cfg.r, size=(cfg.r, in_f))
        bound = 1.0 / math.sqrt(in_f)              # kaiming_uniform(a=sqrt(5)), as loralib
        return rng.uniform(-bound, bound, size=(cfg.r, in_f))

    # ---------------------------------------------------------------- forward helpers
    def _mixed(self, x, lead):
        """Row i gets adapter ``row_adapters[i]`` (None: no update). Rows are grouped by
        adapter, each group runs its own adapter once, and the pieces are put back in order."""
        names = row_adapters()
        if len(names) != lead[0]:
            raise ValueError(f"row_adapters has {len(names)} names for a batch of {lead[0]}")
        groups: dict = {}
        for i, n in enumerate(names):
            groups.setdefault(n if n in self.adapter_names() else None, []).append(i)
        pieces, order = [], []
        for n, rows in groups.items():
            idx = bk.xp.asarray(rows)
            if n is None:
                out_f = self._shape()[0]
                pieces.append(Tensor(bk.xp.zeros((len(rows),) + lead[1:] + (out_f,),
                                                 dtype=self.base.weight.dtype)))
            else:
                pieces.append(self._delta(n, x[idx]))               # (rows, ..., out)
            order += rows
        delta = concatenate(pieces, axis=0)                         # (B, ..., out), grouped
        inverse = bk.xp.argsort(bk.xp.asarray(order))               # grouped row -> batch row
        return delta[inverse]

    def _update(self, x, lead):
        """The LoRA term to add to the base output, or None."""
        if row_adapters() is not None:
            return self._mixed(x, lead)
        if self.merged or self.active is None:  # merged: W already holds s B A
            return None
        return self._delta(self.active, x)

    # ---------------------------------------------------------------- merge
    def delta_weight(self, name: str):
        """The dense update s B A, in the layout of ``base.weight``."""
        f = self.factors(name)
        return self._to_layout(f.scale * (f.B.data @ f.A.data))    # (out, r) @ (r, in)

    def merge(self) -> None:
        """W <- W + s B A for the active adapter. Idempotent. Refuses (ValueError, W unchanged)
        when the adapter holds NaN or inf, the sum overflows, or unmerging could not give W
        back."""
        self.apply_merge(self.check_merge())

class LoRALinear(_LoRALayer):
    """y = base(x) + s · B A dropout(x), with the base Linear frozen (it *has* the Linear)."""

    def _shape(self):
        return self.base.out_features, self.base.in_features

    @staticmethod
    def _to_layout(M):
        return M  # B A is already (out, in), like Linear.weight

    def _delta(self, name: str, x):
        f = self.factors(name)
        h = linear(f.drop(x), f.A) * f.scale                        # (..., in) -> (..., r)
        return linear(h, f.B)                                       # (..., r) -> (..., out)

    def forward(self, x):
        if row_adapters() is None:
            if self.merged or self.active is None:                  # W already holds s B A
                return self.base(x)
            f = self.factors(self.active)
            if f.drop.p == 0.0 or not self.training:                # the common case: one op
                return lora_linear(x, self.base.weight, self.base.bias, f.A, f.B, f.scale)
        y = self.base(x)                                            # (..., out)
        d = self._update(x, x.shape[:-1])
        return y if d is None else y + d

    def __repr__(self) -> str:
        return f"LoRALinear({self.base!r}, adapters={self.adapter_names()})"


class LoRAEmbedding(_LoRALayer):
    """LoRA on a token table W0: (V, C). ``A: (r, V)``, ``B: (C, r)``, ``ΔW = s (B A)ᵀ: (V, C)``.

    A lookup is a one-hot input times the table, so the LoRA term of token t is
    ``s · B A[:, t]``: look up column t of A (an r-vector), then up-project with B. No dropout
    (zeroing a one-hot input would drop the whole token). A's init: N(0, 1), since a one-hot
    input has norm 1. A *tied* LM head reads ``.weight``, which is the adapted table
    ``W0 + s (B A)ᵀ`` (formed densely: the head's own matmul is as large), so the head and the
    lookup agree, merged or not. A mixed batch must then use one adapter for every row.
    """

    def _shape(self):
        return self.base.dim, self.base.num_embeddings                # (C, V): B A's layout

    @staticmethod
    def _to_layout(M):
        return M.T  # (C, V) <-> (V, C)

    def _init_A(self, rng, cfg, in_f):
        return rng.normal(0.0, 1.0, size=(cfg.r, in_f))

    def _delta(self, name: str, ids):
        f = self.factors(name)
        h = embedding(transpose(f.A), ids) * f.scale                # (V, r) lookup -> (..., r)
        return linear(h, f.B)                                       # (..., r) -> (..., C)

    def forward(self, ids):
        ids = ids.data if isinstance(ids, Tensor) else bk.asarray(ids)
        y = self.base(ids)                                          # (..., C)
        d = self._update(ids, ids.shape)
        return y if d is None else y + d

    @property
    def weight(self):
        """The table as a tied head must see it: W0, plus s (B A)ᵀ when an adapter is active."""
        name = self.active
        if row_adapters() is not None:
            used = {n if n in self.adapter_names() else None for n in row_adapters()}
            if len(used) > 1:
                raise ValueError("mixed-batch inference cannot give a tied LM head a different "
                                 "embedding table per row; untie the head or use one adapter")
            name = used.pop()
        if name is None or self.merged:
            return self.base.weight
        f = self.factors(name)
        return self.base.weight + matmul(transpose(f.A), transpose(f.B)) * f.scale  # (V, C)

    def __repr__(self) -> str:
        return f"LoRAEmbedding({self.base.num_embeddings} x {self.base.dim}, " \
               f"adapters={self.adapter_names()})"
