"""Multi-head self-attention with separate q, k, v and output projections.

Separate projections (rather than one fused ``c_attn``) let LoRA target q and v alone, as in
the LoRA paper, and give each weight the name readers know: ``attn.q_proj.weight`` etc.

``past`` is a pair (k, v) of keys and values to put in front of this call's own: the KV cache
during generation, or a learned prefix in prefix tuning. The causal mask treats the queries as
the last Tq of the Tk key positions, so past keys are always visible.
"""

from __future__ import annotations

from minipeft.autograd import concatenate
from minipeft.autograd import functional as F
from minipeft.nn.layers import Linear
from minipeft.nn.module import Module


class SelfAttention(Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool, causal: bool, rng,
                 out_std: float = 0.02):
        self.n_head, self.causal = n_head, causal
        self.q_proj = Linear(n_embd, n_embd, bias, rng)
        self.k_proj = Linear(n_embd, n_embd, bias, rng)
        self.v_proj = Linear(n_embd, n_embd, bias, rng)
        self.o_proj = Linear(n_embd, n_embd, bias, rng, std=out_std)

    def forward(self, x, past=None, mask=None):
        """x (B, T, C) -> (B, T, C); with ``past`` also returns the new (k, v) for a cache."""
        B, T, C = x.shape
        H = self.n_head
        D = C // H

        def heads(t):                                               # (B, T, C) -> (B, H, T, D)
            return t.reshape(B, T, H, D).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if past is not None:
            pk, pv = past                                           # (B, H, Tp, D) each
            k = concatenate([pk, k], axis=2)                        # (B, H, Tp + T, D)
            v = concatenate([pv, v], axis=2)
        y = F.attention(q, k, v, causal=self.causal, mask=mask)     # (B, H, T, D)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)                # (B, T, C)
        return self.o_proj(y), (k, v)
