"""LLaMA-Adapter: learned adaption prompts behind a zero-initialised gate (Zhang et al. 2023,
"LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention", sec. 3).

Prefix tuning (``prefix.py``) gives every layer learned keys and values, and step 0 is not the
base model: softmax hands the prefix some attention whatever its values. LLaMA-Adapter keeps the
idea and removes that flaw. In each of the top L layers it learns n prompt vectors P (n, C),
turns them into keys and values with the layer's own frozen projections, attends to them with
a softmax of their own, and scales what they return by a gate that starts at zero::

    q = x Wqᵀ,  K_p = P Wkᵀ,  V_p = P Wvᵀ                     (per head: (T, D), (n, D), (n, D))
    a      = softmax(q Kᵀ/√D + causal) V                     the frozen attention, unchanged
    a_p    = softmax(q K_pᵀ/√D) V_p                          every query sees every prompt
    out    = o_proj(a + tanh(g_h) · a_p)                     g: (H,), one gate per head, g = 0

The paper (eq. 8) computes the two softmaxes separately and multiplies the prompts' by a
learnable gating factor g_l, "initialised by zero", with independent factors per head; its
released code applies ``tanh`` to the gate (``self.gate.tanh()``, a (1, H, 1, 1) parameter).
**We follow the released code: a per-head gate through tanh.** (Lit-GPT's adapter uses the raw
per-head factor; HF PEFT's ``adaption_prompt`` one scalar per layer, no tanh.) tanh keeps each
head's prompt share within [-1, 1].

**Why step 0 is the base exactly.** tanh(0) = 0, so the prompt term is 0 · a_p = 0 (a_p is
finite), o_proj's weight maps it to 0, and out + 0 = out bit for bit: the logits are *equal*,
not close (a test checks). The gate's
gradient, (1 - tanh² g) · Σ (dL/da) · a_p, is not zero, so the gates open first; the prompts'
gradient is zero until they do (it is multiplied by tanh(g) = 0).

Prompts start as N(0, 1) (as the paper's code and HF PEFT): they enter k_proj and v_proj where
the real tokens enter after LayerNorm, at unit scale. They have no position (the model's
positions are added to the token embeddings only).

How it is wired: the layer wraps ``blocks.{i}.attn`` for the top ``adapter_layers`` blocks,
calls the frozen attention unchanged, and adds ``o_proj``'s weight times the gated prompt
attention (o_proj is linear: o_proj(a + t) = o_proj(a) + t W_oᵀ). That recomputes q once per
adapted layer (as HF PEFT does) and never touches the base's own code path. The KV cache and
gradient checkpointing work unchanged (the prompts are not part of the cache).

Trainable: L · (n · C + H) numbers. Not mergeable: a softmax over extra keys is not a weight.
"""

from __future__ import annotations

from dataclasses import dataclass

from minipeft import backend as bk
from minipeft import checks
from minipeft.autograd import broadcast_to, linear, tanh
from minipeft.autograd import functional as F
from minipeft.nn.attention import SelfAttention
from minipeft.nn.module import Module, Parameter
from minipeft.peft.config import PeftConfig
from minipeft.peft.layer import PeftLayer


@dataclass(frozen=True)
class LlamaAdapterConfig(PeftConfig):
    adapter_len: int = 10        # n: prompt vectors per adapted layer
    adapter_layers: int = 1      # L: how many of the top blocks get prompts

    method = "llama_adapter"
    mergeable = False

    def __post_init__(self):
        super().__post_init__()
        checks.check_int("LlamaAdapterConfig.adapter_len", self.adapter_len, low=1, high=4096)
        checks.check_int("LlamaAdapterConfig.adapter_layers", self.adapter_layers, low=1)

    def apply(self, model, name: str, seed: int) -> list[str]:
        L, n_layer = self.adapter_layers, model.config.n_layer
        if L > n_layer:
            raise ValueError(f"LlamaAdapterConfig.adapter_layers={L} exceeds the model's "
                             f"n_layer={n_layer}")
        paths = [f"blocks.{i}.attn" for i in range(n_layer - L, n_layer)]   # the top L
        rng = bk.host_rng(seed)
        for p in paths:
            layer = model.get_submodule(p)
            if not isinstance(layer, (SelfAttention, AdaptedAttention)):
                raise ValueError(f"LlamaAdapterConfig: {p} is a {type(layer).__name__}, not "
                                 "the model's SelfAttention")
        for p in paths:
            layer = model.get_submodule(p)
            if not isinstance(layer, AdaptedAttention):
                layer = AdaptedAttention(layer)
                model.set_submodule(p, layer)
            layer.add_adapter(name, self.adapter_len, rng)
        return paths


class AdaptionPrompt(Module):
    """One adapter's tensors in one layer: the prompts (n, C) and the per-head gate (H,)."""

    def __init__(self, prompt, gate):
        self.prompt = Parameter(prompt)
        self.gate = Parameter(gate)


class AdaptedAttention(PeftLayer):
    """The frozen SelfAttention plus tanh(gate)-scaled attention to learned prompts."""

    def __init__(self, base: SelfAttention):
        self.base = base                        # set first: its parameters are listed first
        super().__init__()

    def add_adapter(self, name: str, n: int, rng) -> None:
        C, H = self.base.q_proj.weight.shape[1], self.base.n_head
        dt = self.base.q_proj.weight.dtype
        prompt = bk.asarray(rng.normal(0.0, 1.0, (n, C)), dtype=dt)    # (n, C)
        setattr(self.adapters, name, AdaptionPrompt(prompt, bk.xp.zeros((H,), dtype=dt)))

    def gated_prompt_attention(self, x, name: str):
        """tanh(g) · softmax(q K_pᵀ/√D) V_p, heads merged back: (B, T, C)."""
        att, a = self.base, getattr(self.adapters, name)
        B, T, C = x.shape
        H = att.n_head
        D, n = C // H, a.prompt.shape[0]
        q = att.q_proj(x).reshape(B, T, H, D).transpose(0, 2, 1, 3)            # (B, H, T, D)

        def heads(t):                                              # (n, C) -> (B, H, n, D)
            return broadcast_to(t.reshape(1, n, H, D).transpose(0, 2, 1, 3), (B, H, n, D))
        kp, vp = heads(att.k_proj(a.prompt)), heads(att.v_proj(a.prompt))
        ap = F.attention(q, kp, vp, causal=False)                   # (B, H, T, D)
        ap = ap * tanh(a.gate).reshape(1, H, 1, 1)                  # one gate per head
        return ap.transpose(0, 2, 1, 3).reshape(B, T, C)            # (B, T, C)

    def forward(self, x, past=None, mask=None):
        out, kv = self.base(x, past=past, mask=mask)                # the frozen attention
        if self.active is None:
            return out, kv
        t = self.gated_prompt_attention(x, self.active)             # (B, T, C)
        return out + linear(t, self.base.o_proj.weight), kv         # o_proj is linear

    def __repr__(self) -> str:
        return f"AdaptedAttention(adapters={self.adapter_names()}, active={self.active})"
