"""Prompt tuning: n trainable vectors read before the input, model frozen (Lester et al. 2021,
"The Power of Scale for Parameter-Efficient Prompt Tuning").

    ids (B, T) --tok_emb + pos_emb--> e (B, T, C)
    h0 = [P ; e]   (B, n + T, C)       P (n, C): the "virtual tokens", the only thing that trains
    ... frozen blocks ... -> drop the n virtual positions -> logits (B, T, V)

The vectors live in the embedding space but need not be any token's embedding: gradient descent
moves them anywhere in R^C (``softprompt_analysis`` measures how far).

Positions: the virtual tokens get no position embedding, and the real tokens keep positions
0..T-1, the ones they had in pretraining (shifting them to n..n+T-1 breaks a small model; see
the project's experiment notes). The budget still counts: n + T must fit in ``block_size``.

Step 0 is *not* the base model, and cannot be: the real tokens attend to n extra vectors. What
the init chooses is how natural those vectors look to the model:
    "random"  uniform between the smallest and largest value of each embedding dimension
    "vocab"   copies of n sampled token embeddings (Lester et al.: better than random)
    "text"    the embeddings of given token ids (e.g. a task description), repeated/truncated

With the KV cache the prompt is read once: the first call (``past is None``) prepends it, and its
keys and values stay in the cache for every later step, so cached and uncached generation agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from minipeft import backend as bk
from minipeft import checks
from minipeft.nn.module import Module, Parameter
from minipeft.peft.config import PeftConfig
from minipeft.peft.layer import PeftLayer
from minipeft.peft.virtual_tokens import check_budget, check_init, check_room, text_ids


@dataclass(frozen=True)
class PromptTuningConfig(PeftConfig):
    num_virtual_tokens: int = 8        # n: trainable vectors read before the input
    init: str = "vocab"                # "random", "vocab" or "text" (module docstring)
    init_token_ids: tuple = ()         # token ids for init="text"

    method = "prompt"
    mergeable = False

    def __post_init__(self):
        super().__post_init__()
        checks.check_int("PromptTuningConfig.num_virtual_tokens", self.num_virtual_tokens, low=1)
        object.__setattr__(self, "init_token_ids", check_init(
            self.init, self.init_token_ids, "PromptTuningConfig"))

    def apply(self, model, name: str, seed: int) -> list[str]:
        cfg = model.config
        n, C = self.num_virtual_tokens, cfg.n_embd
        check_room(n, cfg.block_size, "PromptTuningConfig")
        W = model.tok_emb.weight                                    # (V, C)
        host = bk.to_numpy(W.data)
        rng = bk.host_rng(seed)
        if self.init == "random":
            lo, hi = host.min(axis=0), host.max(axis=0)             # (C,) each
            vectors = rng.uniform(lo, hi, size=(n, C))
        elif self.init == "vocab":
            vectors = host[rng.choice(len(host), size=n, replace=n > len(host))]
        else:
            vectors = host[text_ids(self.init_token_ids, n, len(host), "PromptTuningConfig")]
        encoder = vars(model).get("prompt_encoder")
        if encoder is None:                           # surgery: the base gains one attribute
            encoder = model.prompt_encoder = PromptEncoder(cfg.block_size)
        setattr(encoder.adapters, name, SoftPrompt(bk.asarray(vectors, dtype=W.dtype)))
        return ["prompt_encoder"]


class SoftPrompt(Module):
    """One adapter's virtual tokens: ``embedding`` (n, C)."""

    def __init__(self, vectors):
        self.embedding = Parameter(vectors)


class PromptEncoder(PeftLayer):
    """Attached to the base as ``model.prompt_encoder``; hands the active prompt to the model."""

    adds_inputs = True

    def __init__(self, block_size: int):
        super().__init__()
        self.block_size = block_size

    def forward(self):
        """The active adapter's vectors (n, C)."""
        return getattr(self.adapters, self.active).embedding

    def prepare_inputs(self, ids, kwargs: dict) -> dict:
        if kwargs.get("past") is not None:        # a KV cache: it already holds the prompt
            return kwargs
        if kwargs.get("prompt") is not None:
            raise ValueError("prompt tuning supplies prompt= itself; do not pass one as well")
        prompt = self()                                             # (n, C)
        check_budget(prompt.shape[0], ids.shape[-1], self.block_size, "prompt tuning")
        return {**kwargs, "prompt": prompt}

    def __repr__(self) -> str:
        return f"PromptEncoder(adapters={self.adapter_names()}, active={self.active})"
