"""Combining trained LoRA adapters into a new one: ``add_weighted_adapter``.

Given adapters i = 1..n with updates ``ΔW_i = s_i B_i A_i`` and weights ``w_i``, the natural goal
is the weighted sum ``ΔW = Σ_i w_i ΔW_i`` in every adapted layer. Three ways to build one new
adapter (scale s = 1, so it *is* ``B A``) from them:

``"cat"``: exact. Stack the factors, folding each weight and scale into B::

    A = [A_1; A_2; ...]              (Σ r_i, in)     rows of every A
    B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]  (out, Σ r_i)  columns of every B
    B A = Σ_i w_i s_i B_i A_i        (block product: the cross terms never appear)

  The price is rank: ``r = Σ r_i``.

``"linear"``: rank-preserving, NOT the weighted sum. Combine the factors themselves (all ranks
  must be equal), as HF PEFT does, splitting each weight as a square root between A and B::

    A = Σ_i sign(w_i) sqrt(|w_i|) s_i A_i        B = Σ_i sqrt(|w_i|) B_i
    B A = Σ_i w_i s_i B_i A_i  +  Σ_{i≠j} (cross terms B_i A_j)

  With one adapter it is exact; with several, the cross terms mix adapter i's output directions
  with adapter j's input directions. It is cheap and often works when the adapters were trained
  from one init, but it is a heuristic.

``"svd"``: the best rank-r adapter. Form the dense ``ΔW = Σ_i w_i s_i B_i A_i`` and keep its top
  r singular directions, ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_rᵀ``. By Eckart-Young no rank-r
  matrix is closer to ``ΔW``: the error ``||B A - ΔW||_F`` is the tail energy
  ``sqrt(Σ_{k>r} σ_k²)`` (``lowrank`` proves it; a test checks it here). Default r: the largest
  input rank.

A layer that some input adapter does not touch counts that adapter's update as zero there.
"""

from __future__ import annotations

import math

from minipeft import backend as bk
from minipeft import checks
from minipeft.lowrank import svd
from minipeft.peft.core import peft_layers
from minipeft.peft.lora import LoraConfig, _LoRALayer

HOWS = ("linear", "cat", "svd")


def add_weighted_adapter(peft_model, names, weights, new_name: str, how: str = "linear",
                         r: int | None = None, seed: int = 0) -> LoraConfig:
    """Add adapter ``new_name`` combining LoRA adapters ``names`` with ``weights`` (see above).

    The active adapter stays as it was; returns the new adapter's config. Everything is
    checked before the model changes.
    """
    names = list(checks.check_str_tuple("add_weighted_adapter: names", names))
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"add_weighted_adapter: weights must be a list or tuple of numbers, "
                        f"got {type(weights).__name__}")
    weights = [checks.check_float(f"add_weighted_adapter: weights[{i}]", w)
               for i, w in enumerate(weights)]
    cfgs = peft_model.peft_configs
    if peft_model.method != "lora":
        raise ValueError(f"add_weighted_adapter needs LoRA adapters, this model holds "
                         f"{peft_model.method}")
    checks.check_choice("add_weighted_adapter: how", how, HOWS)
    if not names or len(names) != len(weights):
        raise ValueError(f"add_weighted_adapter: need one weight per adapter, got "
                         f"{len(names)} names and {len(weights)} weights")
    unknown = [n for n in names if n not in cfgs]
    if unknown:
        raise ValueError(f"add_weighted_adapter: unknown adapters {unknown}; have {sorted(cfgs)}")
    if new_name in cfgs:
        raise ValueError(f"add_weighted_adapter: an adapter named {new_name!r} already exists")
    layers = [(p, m) for p, m in peft_layers(peft_model.base_model) if isinstance(m, _LoRALayer)]
    if any(m.merged for _, m in layers):
        raise RuntimeError("add_weighted_adapter on a merged model: call unmerge() first")
    ranks = [cfgs[n].r for n in names]
    if how == "linear" and len(set(ranks)) > 1:
        raise ValueError(f"add_weighted_adapter(how='linear') needs equal ranks, got {ranks}; "
                         "use how='cat' or how='svd'")
    if how == "svd":
        r = max(ranks) if r is None else r
        smallest = min(min(m._shape()) for p, m in layers
                       if any(n in m.adapter_names() for n in names))
        checks.check_int("add_weighted_adapter(how='svd'): r", r, low=1, high=smallest)
    else:
        r = sum(ranks) if how == "cat" else ranks[0]

    first = [cfgs[n] for n in names]
    targets = tuple(dict.fromkeys(t for c in first for t in c.target_modules))
    block_sets = [c.layers for c in first]
    new_layers = None if None in block_sets else tuple(sorted({i for b in block_sets for i in b}))
    cfg = LoraConfig(r=r, alpha=r, dropout=first[0].dropout, target_modules=targets,
                     layers=new_layers, init="kaiming",
                     target_embedding=any(c.target_embedding for c in first))
    # alpha = r and no rsLoRA: s = 1, so the new adapter's update is exactly B @ A.
    active = peft_model.active_adapter
    with peft_model._transaction():                 # all or nothing, as every PeftModel call
        peft_model.add_adapter(new_name, cfg, seed)
        for _, layer in layers:
            if new_name not in layer.adapter_names():
                continue
            A, B = _combine(layer, names, weights, how, r)
            f = layer.factors(new_name)
            f.A.data = A.astype(f.A.dtype)                           # (r, in)
            f.B.data = B.astype(f.B.dtype)                           # (out, r)
        peft_model.set_adapter(active)
    return cfg


def _combine(layer, names, weights, how: str, r: int):
    """The new (A, B) of one layer; an adapter absent here contributes zeros."""
    xp = bk.xp
    out_f, in_f = layer._shape()
    dtype = layer.base.weight.dtype
    parts = []  # (w, s, A (r_i, in), B (out, r_i)) of the adapters present in this layer
    for n, w in zip(names, weights):
        if n in layer.adapter_names():
            f = layer.factors(n)
            parts.append((w, f.scale, f.A.data, f.B.data))
    if how == "cat":  # stack; the rows of adapters absent here stay zero
        A = xp.zeros((r, in_f), dtype=dtype)
        B = xp.zeros((out_f, r), dtype=dtype)
        row = 0
        for w, s, Ai, Bi in parts:
            ri = Ai.shape[0]
            A[row:row + ri] = Ai                                     # rows of A_i
            B[:, row:row + ri] = (w * s) * Bi                        # columns of w_i s_i B_i
            row += ri
        return A, B
    if how == "linear":
        A = xp.zeros((r, in_f), dtype=dtype)
        B = xp.zeros((out_f, r), dtype=dtype)
        for w, s, Ai, Bi in parts:
            root = math.sqrt(abs(w))
            A += (math.copysign(root, w) * s) * Ai                   # (r, in)
            B += root * Bi                                           # (out, r)
        return A, B
    dense = xp.zeros((out_f, in_f), dtype=xp.float64)               # Σ w_i s_i B_i A_i
    for w, s, Ai, Bi in parts:
        dense += (w * s) * (Bi.astype(xp.float64) @ Ai.astype(xp.float64))
    U, S, Vt = svd(dense)                                            # (out,k) (k,) (k,in)
    root = xp.sqrt(S[:r])
    return root[:, None] * Vt[:r], U[:, :r] * root                   # A (r, in), B (out, r)
