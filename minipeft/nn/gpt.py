"""A minimal GPT: token + position embeddings, pre-LN blocks, final LayerNorm, LM head.

    ids (B, T) --tok_emb + pos_emb--> h (B, T, C)
    repeat n_layer times:   h = h + attn(ln_1(h));   h = h + mlp(ln_2(h))
    ln_f(h) --lm_head--> logits (B, T, V)

With ``causal=False`` the same blocks form a bidirectional encoder, and ``classify`` puts a
classification head on the pooled output.

Two inputs exist for PEFT methods that *add* rather than change, so that the base model still
knows nothing about PEFT:
  * ``prompt`` (P, C) or (B, P, C): vectors placed before the token embeddings. They get no
    position embedding, and the real tokens keep positions 0..T-1 as in pretraining.
  * ``past``: per layer, a (k, v) pair placed before each attention's own keys and values: the
    KV cache in generation, or learned prefixes in prefix tuning.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from numbers import Integral

from minipeft import backend as bk
from minipeft.autograd import Tensor, broadcast_to, concatenate, linear
from minipeft.autograd import functional as F
from minipeft.autograd.checkpoint import checkpoint
from minipeft.autograd.tensor import is_grad_enabled
from minipeft.nn.attention import SelfAttention
from minipeft.nn.layers import Dropout, Embedding, LayerNorm, Linear
from minipeft.nn.module import Module, ModuleList


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 64        # V: number of token ids
    block_size: int = 32        # context length: most positions attended in one sequence
    n_layer: int = 2            # transformer blocks
    n_head: int = 4             # attention heads; n_embd must divide evenly
    n_embd: int = 64            # C: width of the residual stream
    dropout: float = 0.0        # on embeddings and residual branches while training
    bias: bool = True           # biases in Linear and LayerNorm (BitFit needs them)
    tie_weights: bool = True    # lm_head shares tok_emb.weight (GPT-2 does)
    causal: bool = True         # False: bidirectional encoder
    n_classes: int = 0          # > 0 adds cls_head for classify() (encoder use)
    pool: str = "mean"          # classify() pooling: "mean" over tokens or "first" token
    checkpoint: bool = False    # training keeps each block's input only, recomputes the rest

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} must be divisible by "
                             f"n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.n_classes < 0:
            raise ValueError(f"GPTConfig.n_classes must be >= 0, got {self.n_classes}")
        if self.pool not in ("mean", "first"):
            raise ValueError(f"GPTConfig.pool must be 'mean' or 'first', got {self.pool!r}")
        if not isinstance(self.checkpoint, bool):
            raise TypeError(f"GPTConfig.checkpoint must be True or False, got "
                            f"{self.checkpoint!r}")
        if self.checkpoint and self.dropout:
            raise ValueError("GPTConfig: checkpoint=True needs dropout=0 (the recomputation "
                             "would draw a new dropout mask and the gradients would be wrong)")

    def to_dict(self) -> dict:
        return asdict(self)


class MLP(Module):
    """fc_in (C -> 4C), GELU, fc_out (4C -> C)."""

    def __init__(self, n_embd: int, bias: bool, rng, out_std: float):
        self.fc_in = Linear(n_embd, 4 * n_embd, bias, rng)
        self.fc_out = Linear(4 * n_embd, n_embd, bias, rng, std=out_std)

    def forward(self, x):
        return self.fc_out(F.gelu(self.fc_in(x)))


class Block(Module):
    """Pre-LN transformer block: normalise, transform, add back to the residual stream."""

    def __init__(self, cfg: GPTConfig, rng, layer: int):
        out_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2: scale residual projections
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = SelfAttention(cfg.n_embd, cfg.n_head, cfg.bias, cfg.causal, rng, out_std)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg.n_embd, cfg.bias, rng, out_std)
        self.drop = Dropout(cfg.dropout, seed=1000 + layer)

    def forward(self, x, past=None, mask=None):
        a, kv = self.attn(self.ln_1(x), past=past, mask=mask)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.ln_2(x)))
        return x, kv


class GPT(Module):
    def __init__(self, cfg: GPTConfig, seed: int = 0):
        if not isinstance(cfg, GPTConfig):
            raise TypeError(f"GPT needs a GPTConfig, got {type(cfg).__name__}")
        self.config = cfg
        rng = bk.host_rng(seed)
        self.tok_emb = Embedding(cfg.vocab_size, cfg.n_embd, rng)
        self.pos_emb = Embedding(cfg.block_size, cfg.n_embd, rng)
        self.drop = Dropout(cfg.dropout, seed=seed)
        self.blocks = ModuleList([Block(cfg, rng, i) for i in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias)
        if not cfg.tie_weights:
            self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False, rng=rng)
        if cfg.n_classes:
            self.cls_head = Linear(cfg.n_embd, cfg.n_classes, bias=True, rng=rng)

    # ---------------------------------------------------------------- pieces
    def _check_ids(self, ids):
        ids = ids.data if isinstance(ids, Tensor) else bk.asarray(ids)
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"GPT: ids must be a 2-D integer array (B, T), got shape "
                             f"{tuple(ids.shape)} and dtype {ids.dtype}")
        if ids.shape[1] == 0:
            raise ValueError(f"GPT: ids must hold at least one token per row, got shape "
                             f"{tuple(ids.shape)}")
        V = self.config.vocab_size
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise ValueError(f"GPT: token ids must lie in [0, {V}) (vocab_size), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return ids

    def _check_extras(self, B: int, T: int, Tp: int, prompt, start_pos, mask) -> None:
        """``start_pos``, ``prompt`` and ``mask`` must fit ids (B, T) and Tp past positions:
        an error that names them, rather than a broadcasting error from deep inside an op."""
        cfg = self.config
        if isinstance(start_pos, bool) or not isinstance(start_pos, Integral) or start_pos < 0:
            raise ValueError(f"GPT: start_pos must be an int >= 0, got {start_pos!r}")
        P = 0
        if prompt is not None:
            shape = tuple(prompt.shape)
            if len(shape) not in (2, 3) or shape[-1] != cfg.n_embd or \
                    (len(shape) == 3 and shape[0] != B):
                raise ValueError(f"GPT: prompt must have shape (P, {cfg.n_embd}) or ({B}, P, "
                                 f"{cfg.n_embd}) (P vectors of width n_embd), got {shape}")
            P = shape[-2]
        if mask is not None:
            m = mask.data if isinstance(mask, Tensor) else bk.asarray(mask)
            full = (B, cfg.n_head, P + T, Tp + P + T)                # (B, H, Tq, Tk)
            try:
                fits = bk.broadcast_shapes(m.shape, full) == full
            except ValueError:
                fits = False
            if m.dtype != bool or not fits:
                raise ValueError(f"GPT: mask must be a boolean array that broadcasts to "
                                 f"(B, H, Tq, Tk) = {full}, got shape {tuple(m.shape)} and "
                                 f"dtype {m.dtype}")

    def hidden(self, ids, prompt=None, past=None, start_pos: int = 0, mask=None):
        """The final hidden states (B, T, C) of the real tokens, and the per-layer (k, v)."""
        cfg = self.config
        ids = self._check_ids(ids)
        B, T = ids.shape
        Tp = 0 if past is None else past[0][0].shape[2]
        self._check_extras(B, T, Tp, prompt, start_pos, mask)
        P = 0 if prompt is None else prompt.shape[-2]
        if start_pos + T > cfg.block_size or Tp + P + T > cfg.block_size:
            raise ValueError(
                f"GPT: sequence too long for block_size={cfg.block_size}: {T} tokens at "
                f"position {start_pos}, plus {P} prompt vectors and {Tp} past positions")
        if past is not None and len(past) != cfg.n_layer:
            raise ValueError(f"GPT: past must hold one (k, v) per layer ({cfg.n_layer}), "
                             f"got {len(past)}")
        pos = bk.xp.arange(start_pos, start_pos + T)
        h = self.tok_emb(ids) + self.pos_emb(pos)                   # (B, T, C)
        if prompt is not None:
            if prompt.ndim == 2:                                    # (P, C) -> (B, P, C)
                prompt = broadcast_to(prompt, (B, P, cfg.n_embd))
            h = concatenate([prompt, h], axis=1)                    # (B, P + T, C)
        h = self.drop(h)
        present = []
        recompute = cfg.checkpoint and self.training and is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:                       # keep h only; the block reruns in backward
                kv_in = () if past is None else tuple(past[i])
                run = lambda h, *kv, block=block: block(h, past=kv or None, mask=mask)[0]
                h, kv = checkpoint(run, h, *kv_in, params=block.parameters()), None
            else:
                h, kv = block(h, past=None if past is None else past[i], mask=mask)
            present.append(kv)
        h = self.ln_f(h)
        if P:
            h = h[:, P:]                                            # drop the virtual tokens
        return h, present

    def logits(self, h):
        """LM head: (B, T, C) -> (B, T, V), sharing tok_emb.weight when tied."""
        if self.config.tie_weights:
            return linear(h, self.tok_emb.weight)
        return self.lm_head(h)

    # ---------------------------------------------------------------- entry points
    def forward(self, ids, prompt=None, past=None, start_pos: int = 0, use_cache: bool = False,
                mask=None):
        """ids (B, T) -> logits (B, T, V); with ``use_cache`` also the new per-layer (k, v)."""
        h, present = self.hidden(ids, prompt=prompt, past=past, start_pos=start_pos, mask=mask)
        logits = self.logits(h)
        return (logits, present) if use_cache else logits

    def loss(self, ids, targets, ignore_index: int = -100, **kwargs):
        """Mean next-token cross-entropy over the targets that are not ``ignore_index``."""
        return F.cross_entropy(self(ids, **kwargs), targets, ignore_index)

    def classify(self, ids, **kwargs):
        """Encoder use: pooled hidden state -> (B, n_classes) class logits."""
        if not self.config.n_classes:
            raise ValueError("GPT.classify needs GPTConfig.n_classes > 0")
        h, _ = self.hidden(ids, **kwargs)                           # (B, T, C)
        pooled = h.mean(axis=1) if self.config.pool == "mean" else h[:, 0]
        return self.cls_head(pooled)                                # (B, n_classes)
