"""Prefix tuning: trainable keys and values in front of every attention layer (Li & Liang 2021,
"Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Prompt tuning adds n vectors at the input only; prefix tuning gives every layer its own n keys
and n values, which each attention reads before the real tokens' own::

    table (n, L*2*C) --reshape--> (n, L, 2, H, D) --per layer--> k, v (B, H, n, D)
    attention in layer i:  softmax(q [K_i ; k]^T / sqrt(D)) [V_i ; v]      K_i, V_i: the prefix

The model already has this input: ``past``, the per-layer (k, v) pairs that the KV cache uses.
So a prefix is simply a KV cache that was learned instead of computed.

Reparameterisation (sec. 4.3 of the paper): training the table directly was unstable for them,
so they train a small table P' (n, hidden) through an MLP, P = Linear(tanh(Linear(P'))), and
keep only P afterwards. ``collapse_prefix`` does that last step: the MLP output becomes a plain
table, with identical outputs and far fewer numbers to save.

Step 0 is *not* the base model, and no finite init makes it so: softmax gives every prefix key
some weight exp(q.k / sqrt(D)) > 0, which dilutes the real tokens' attention. Even zero keys and
values are not a no-op (each gets the weight of a zero score and contributes a zero value). What
the init controls is how natural the prefix looks:
    "random"  small Gaussian entries (std 0.02): keys near 0, values near 0
    "vocab"   the base model's own keys and values for n sampled tokens, read as one sequence
    "text"    the same for given token ids (the paper's "initialise with real words")
("vocab"/"text" need ``reparameterize=False``: an MLP's output cannot start at a given table.)

Positions: real tokens keep positions 0..T-1; the prefix has none. n + T must fit in block_size,
which the model checks, as it counts every key position. With the KV cache the prefix is added
on the first call only (``past is None``); later calls carry it inside the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from minipeft import backend as bk
from minipeft import checks
from minipeft.autograd import broadcast_to, no_grad, tanh
from minipeft.nn.layers import Linear
from minipeft.nn.module import Module, Parameter
from minipeft.peft.config import PeftConfig
from minipeft.peft.layer import PeftLayer
from minipeft.peft.virtual_tokens import check_budget, check_init, check_room, text_ids


@dataclass(frozen=True)
class PrefixTuningConfig(PeftConfig):
    num_virtual_tokens: int = 8        # n: prefix positions in every layer
    reparameterize: bool = False       # train through an MLP (collapse_prefix() removes it)
    hidden: int = 64                   # width of the reparameterisation's table and MLP
    init: str = "random"               # "random", "vocab" or "text" (module docstring)
    init_token_ids: tuple = ()         # token ids for init="text"

    method = "prefix"
    mergeable = False

    def __post_init__(self):
        super().__post_init__()
        for field_name in ("num_virtual_tokens", "hidden"):
            checks.check_int(f"PrefixTuningConfig.{field_name}", getattr(self, field_name), low=1)
        checks.check_bool("PrefixTuningConfig.reparameterize", self.reparameterize)
        object.__setattr__(self, "init_token_ids", check_init(
            self.init, self.init_token_ids, "PrefixTuningConfig"))
        if self.reparameterize and self.init != "random":
            raise ValueError(f"PrefixTuningConfig(init={self.init!r}) needs reparameterize=False:"
                             " an MLP's output cannot start at a given table; use init='random'")

    def apply(self, model, name: str, seed: int) -> list[str]:
        cfg = model.config
        n, L, C = self.num_virtual_tokens, cfg.n_layer, cfg.n_embd
        check_room(n, cfg.block_size, "PrefixTuningConfig")
        if self.reparameterize and self.hidden > L * 2 * C:
            raise ValueError(f"PrefixTuningConfig.hidden={self.hidden} exceeds the prefix "
                             f"width n_layer * 2 * n_embd = {L * 2 * C}")
        dtype = model.tok_emb.weight.dtype
        rng = bk.host_rng(seed)
        if self.reparameterize:
            prefix = PrefixMLP(n, self.hidden, L * 2 * C, rng, dtype)
        elif self.init == "random":
            prefix = PrefixTable(bk.asarray(rng.normal(0.0, 0.02, (n, L * 2 * C)), dtype=dtype))
        else:
            V = cfg.vocab_size
            ids = (rng.choice(V, size=n, replace=n > V) if self.init == "vocab"
                   else text_ids(self.init_token_ids, n, V, "PrefixTuningConfig"))
            prefix = PrefixTable(base_keys_values(model, ids))
        encoder = vars(model).get("prefix_encoder")
        if encoder is None:                           # surgery: the base gains one attribute
            encoder = model.prefix_encoder = PrefixEncoder(cfg)
        setattr(encoder.adapters, name, prefix)
        return ["prefix_encoder"]


def base_keys_values(model, ids):
    """The frozen model's keys and values for ``ids`` read as one sequence, as a table
    (n, L*2*C): the layout PrefixEncoder reads."""
    was_training = model.training
    model.eval()                                                    # no dropout in the init
    try:
        with no_grad():
            _, present = model(bk.asarray(ids)[None, :], use_cache=True)  # L x (1, H, n, D)
    finally:
        model.train(was_training)
    kv = bk.xp.stack([bk.xp.stack([k.data[0], v.data[0]]) for k, v in present])  # (L,2,H,n,D)
    n = kv.shape[3]
    return kv.transpose(3, 0, 1, 2, 4).reshape(n, -1).copy()      # (n, L*2*C)


class PrefixTable(Module):
    """A plain prefix: ``table`` (n, L*2*C) trains directly."""

    def __init__(self, values, requires_grad: bool = True):
        self.table = Parameter(values, requires_grad=requires_grad)

    def forward(self):
        return self.table                                           # (n, L*2*C)


class PrefixMLP(Module):
    """A reparameterised prefix: ``embedding`` (n, hidden) -> Linear -> tanh -> Linear."""

    def __init__(self, n: int, hidden: int, out: int, rng, dtype):
        self.embedding = Parameter(bk.asarray(rng.normal(0.0, 1.0, (n, hidden)), dtype=dtype))
        self.mlp_in = Linear(hidden, hidden, True, rng)
        self.mlp_out = Linear(hidden, out, True, rng)
        for p in self.parameters():
            p.data = p.data.astype(dtype, copy=False)

    def forward(self):
        return self.mlp_out(tanh(self.mlp_in(self.embedding)))      # (n, L*2*C)


class PrefixEncoder(PeftLayer):
    """Attached to the base as ``model.prefix_encoder``; turns the active prefix into ``past``."""

    adds_inputs = True

    def __init__(self, cfg):
        super().__init__()
        self.n_layer, self.n_head = cfg.n_layer, cfg.n_head
        self.head_size, self.block_size = cfg.n_embd // cfg.n_head, cfg.block_size

    def forward(self, batch_size: int) -> list:
        """The active prefix as ``past``: one (k, v) per layer, each (B, H, n, D)."""
        values = getattr(self.adapters, self.active)()              # (n, L*2*C)
        n, L, H, D = values.shape[0], self.n_layer, self.n_head, self.head_size
        kv = values.reshape(n, L, 2, H, D).transpose(1, 2, 3, 0, 4)  # (L, 2, H, n, D)
        past = []
        for i in range(L):
            k, v = (broadcast_to(kv[i, j].reshape(1, H, n, D), (batch_size, H, n, D))
                    for j in (0, 1))
            past.append((k, v))
        return past

    def prepare_inputs(self, ids, kwargs: dict) -> dict:
        if kwargs.get("past") is not None:        # a KV cache: it already holds the prefix
            return kwargs
        n = self.num_virtual_tokens(self.active)
        check_budget(n, ids.shape[-1], self.block_size, "prefix tuning")
        return {**kwargs, "past": self(ids.shape[0])}

    def num_virtual_tokens(self, name: str) -> int:
        prefix = getattr(self.adapters, name)
        return (prefix.embedding if isinstance(prefix, PrefixMLP) else prefix.table).shape[0]

    def collapse(self, name: str) -> None:
        """Replace adapter ``name``'s MLP by the table it computes (outputs stay identical)."""
        prefix = getattr(self.adapters, name)
        if isinstance(prefix, PrefixMLP):
            with no_grad():
                table = prefix().data.copy()                        # (n, L*2*C)
            setattr(self.adapters, name, PrefixTable(table, prefix.embedding.requires_grad))

    def __repr__(self) -> str:
        return f"PrefixEncoder(adapters={self.adapter_names()}, active={self.active})"


def collapse_prefix(peft_model, name: str | None = None) -> None:
    """Collapse adapter ``name`` (default: the active one) of a prefix-tuned PeftModel into a
    plain table, and record it in its config so that save/load see a plain prefix."""
    name = name or peft_model.active_adapter
    cfg = peft_model.peft_configs.get(name)
    if not isinstance(cfg, PrefixTuningConfig):
        raise ValueError(f"collapse: {name!r} is not a prefix-tuning adapter of this model")
    peft_model.base_model.prefix_encoder.collapse(name)
    peft_model.peft_configs[name] = replace(cfg, reparameterize=False)
    peft_model.set_adapter(peft_model.active_adapter)  # refresh which tensors train
