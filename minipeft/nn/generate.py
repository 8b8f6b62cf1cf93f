"""Text generation: greedy or sampled, with or without a KV cache.

Without a cache, every new token reruns the model on the whole sequence: cost O(T^2) tokens
of work for T new tokens. With a cache, each layer keeps the keys and values it already
computed, and every step feeds only the newest token (``start_pos`` tells it where it sits).
Both paths give the same tokens; the tests check this token for token.
"""

from __future__ import annotations

from minipeft import backend as bk
from minipeft.autograd import no_grad


def sample_next(logits, temperature: float, top_k: int | None, rng):
    """Pick a token per row from last-position logits (B, V): argmax at temperature 0, else
    a draw from softmax(logits / temperature) restricted to the top_k largest."""
    xp = bk.xp
    if temperature == 0.0:
        return logits.argmax(axis=-1)
    z = logits / temperature
    if top_k is not None:
        top_k = min(top_k, z.shape[-1])            # top_k >= V keeps every token
        kth = xp.sort(z, axis=-1)[:, -top_k][:, None]
        z = xp.where(z < kth, -xp.inf, z)
    z = z - z.max(axis=-1, keepdims=True)
    # normalise in float64: float32 probabilities miss a sum of 1 by ~1e-7, more than
    # Generator.choice tolerates (~1e-8), so it would refuse most float32 rows
    p = bk.to_numpy(xp.exp(z)).astype(bk.np.float64)
    p /= p.sum(axis=-1, keepdims=True)
    choice = [rng.choice(p.shape[-1], p=row) for row in p]
    return bk.asarray(bk.np.asarray(choice, dtype=bk.np.int64))


def generate(model, ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             use_cache: bool = True, seed: int = 0, **kwargs):
    """Continue ``ids`` (B, T) by ``max_new_tokens`` tokens; returns (B, T + max_new_tokens).

    ``model`` is any callable with the GPT signature ``model(ids, past=, start_pos=,
    use_cache=, **kwargs)``: a GPT, or a PEFT model that adds its prompt on the first call.
    """
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:                      # also refuses NaN
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"generate: top_k must be positive, got {top_k}")
    config = getattr(model, "config", None)
    if use_cache and config is not None and not config.causal:
        use_cache = False  # an encoder's earlier positions see later tokens: no valid cache
    rng = bk.host_rng(seed)
    out = bk.asarray(ids)
    if out.ndim != 2 or out.dtype.kind not in "iu":
        raise ValueError(f"generate: ids must be a 2-D integer array (B, T), got shape "
                         f"{tuple(out.shape)} and dtype {out.dtype}")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with no_grad():
            past, fed = None, 0
            for _ in range(max_new_tokens):
                if use_cache:
                    logits, past = model(out[:, fed:], past=past, start_pos=fed,
                                         use_cache=True, **kwargs)
                    fed = out.shape[1]
                else:
                    logits = model(out, **kwargs)
                nxt = sample_next(logits.data[:, -1], temperature, top_k, rng)
                out = bk.xp.concatenate([out, nxt[:, None].astype(out.dtype)], axis=1)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return out
