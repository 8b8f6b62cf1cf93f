"""Optimizers, gradient clipping and the learning-rate schedule.

An optimizer is built from the parameters that train (``module.trainable_parameters()``) and
keeps state for those alone, so a frozen weight costs no optimizer memory and is never touched,
not even by weight decay. This is half of PEFT's memory saving (the other half: no gradient).

A parameter with an element ``mask`` (selective fine-tuning) is updated only where the mask is
True; its other elements stay bit-identical.

AdamW (Loshchilov & Hutter), for each trainable parameter p with gradient g at step t:
    m = b1 m + (1 - b1) g              v = b2 v + (1 - b2) g^2
    p = p - lr * wd * p                (decoupled weight decay, not part of the gradient)
    p = p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

Weight decay applies to matrices only (tensors with ``ndim >= 2``: linear weights, embeddings,
LoRA factors, soft prompts), as in nanoGPT and GPT-2's recipe: biases, layer-norm gains and IA3
scales are offsets and scales, not weights whose size needs pulling towards 0 (decaying a
layer-norm gain towards 0 silences the layer). So BitFit, which trains only biases, is not
shrunk by a weight decay meant for matrices. ``decay_vectors=True`` decays every tensor.
"""

from __future__ import annotations

import math

from minipeft import backend as bk


def _check_params(params, who: str) -> list:
    params = list(params)
    if not params:
        raise ValueError(f"{who}: no trainable parameters (every parameter has "
                         "requires_grad=False); nothing would change")
    for p in params:
        if not p.requires_grad:
            raise ValueError(f"{who}: got a frozen parameter {p!r}; pass "
                             "module.trainable_parameters()")
    return params


class Optimizer:
    def __init__(self, params, lr: float, who: str, weight_decay: float = 0.0,
                 decay_vectors: bool = False):
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"{who}: lr must be > 0 and finite, got {lr}")
        if not (weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"{who}: weight_decay must be >= 0 and finite, got {weight_decay}")
        self.params = _check_params(params, who)
        self.lr = lr
        self.weight_decay = weight_decay
        # the decay each tensor gets: matrices only, unless decay_vectors (module docstring)
        self.decay = [weight_decay if (p.ndim >= 2 or decay_vectors) else 0.0
                      for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_bytes(self) -> int:
        """Bytes held in optimizer state (moments, momentum buffers)."""
        return sum(a.nbytes for st in self.state for a in st.values())

    @staticmethod
    def _apply(p, update) -> None:
        """p -= update, only where p.mask allows (bit-identical elsewhere)."""
        if p.mask is None:
            p.data -= update
        else:
            p.data -= bk.xp.where(p.mask, update, 0).astype(p.dtype, copy=False)


class SGD(Optimizer):
    """p -= lr * (g + wd p), with optional momentum buffer b = mu b + g."""

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0, weight_decay: float = 0.0,
                 decay_vectors: bool = False):
        super().__init__(params, lr, "SGD", weight_decay, decay_vectors)
        self.momentum = momentum
        self.state = [{} for _ in self.params]

    def step(self) -> None:
        for p, st, wd in zip(self.params, self.state, self.decay):
            if p.grad is None:
                continue
            g = p.grad + wd * p.data if wd else p.grad
            if self.momentum:
                buf = st.get("momentum")
                st["momentum"] = g.copy() if buf is None else buf * self.momentum + g
                g = st["momentum"]
            self._apply(p, self.lr * g)


class AdamW(Optimizer):
    """Adam with decoupled weight decay and bias correction (see the module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decay_vectors: bool = False):
        super().__init__(params, lr, "AdamW", weight_decay, decay_vectors)
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"AdamW: betas must lie in [0, 1), got {betas}")
        if not eps > 0:                 # eps = 0: a zero gradient gives m / sqrt(v) = 0 / 0
            raise ValueError(f"AdamW: eps must be > 0, got {eps}")
        self.betas, self.eps = betas, eps
        self.t = 0
        xp = bk.xp
        self.state = [{"m": xp.zeros_like(p.data), "v": xp.zeros_like(p.data)}
                      for p in self.params]

    def step(self) -> None:
        xp = bk.xp
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, st, wd in zip(self.params, self.state, self.decay):
            g = p.grad
            if g is None:
                continue
            m, v = st["m"], st["v"]
            m *= b1
            m += (1 - b1) * g                                       # in place: no new buffers
            v *= b2
            v += (1 - b2) * (g * g)
            update = xp.sqrt(v / c2)
            update += self.eps
            xp.divide(m / c1, update, out=update)
            if wd:
                update += wd * p.data
            update *= self.lr
            self._apply(p, update)


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale all gradients together so their global L2 norm is at most ``max_norm``.
    Returns the norm before clipping (inf or nan if a gradient is not finite)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))  # in each gradient's dtype
    if max_norm > 0 and total > max_norm and math.isfinite(total):
        scale = max_norm / (total + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad = p.grad * scale
    return total


def cosine_schedule(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0,
                    min_lr_ratio: float = 0.1) -> float:
    """Linear warmup to ``base_lr``, then cosine decay to ``min_lr_ratio * base_lr``."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
