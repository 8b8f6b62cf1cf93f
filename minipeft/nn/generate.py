"""Text generation: greedy or sampled, with or without a KV cache.

Without a cache, every new token reruns the model on the whole sequence: cost O(T^2) tokens
of work for T new tokens. With a cache, each layer keeps the keys and values it already
computed, and every step feeds only the newest token (``start_pos`` tells it where it sits).
Both paths give the same tokens; the tests check this token for token.
"""

from __future__ import annotations

from minipeft import backend as bk
from minipeft.autograd import no_grad
from minipeft.checks import check_bool, check_float, check_id_array, check_int


def sample_next(logits, temperature: float, top_k: int | None, rng):
    """Pick a token per row from last-position logits (B, V): argmax at temperature 0, else
    a draw from softmax(logits / temperature) restricted to the top_k largest."""
    xp = bk.xp
    if temperature == 0.0:
        return logits.argmax(axis=-1)
    # Subtract the row's max *before* dividing, in float64: then z <= 0 with z = 0 at the max
    # for any temperature > 0, so a tiny temperature (1e-45) sends the others to -inf (greedy)
    # instead of inf - inf = NaN.
    z = logits.astype(bk.np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    with bk.np.errstate(over="ignore"):          # -x / 1e-45 = -inf is the intended limit
        z /= temperature
    if top_k is not None:
        top_k = min(top_k, z.shape[-1])            # top_k >= V keeps every token
        kth = xp.sort(z, axis=-1)[:, -top_k][:, None]
        z = xp.where(z < kth, -xp.inf, z)
    # normalise in float64: float32 probabilities miss a sum of 1 by ~1e-7, more than
    # Generator.choice tolerates (~1e-8), so it would refuse most float32 rows
    p = bk.to_numpy(xp.exp(z))
    p /= p.sum(axis=-1, keepdims=True)
    choice = [rng.choice(p.shape[-1], p=row) for row in p]
    return bk.asarray(bk.np.asarray(choice, dtype=bk.np.int64))


def generate(model, ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             use_cache: bool = True, seed: int = 0, **kwargs):
    """Continue ``ids`` (B, T) by ``max_new_tokens`` tokens; returns (B, T + max_new_tokens).

    ``model`` is any callable with the GPT signature ``model(ids, past=, start_pos=,
    use_cache=, **kwargs)``: a GPT, or a PEFT model that adds its prompt on the first call.
    """
    # every argument checked before the model runs: a bad one names itself
    max_new_tokens = check_int("generate: max_new_tokens", max_new_tokens, low=0)
    temperature = check_float("generate: temperature", temperature, low=0.0)
    if top_k is not None:
        top_k = check_int("generate: top_k", top_k, low=1)
    use_cache = check_bool("generate: use_cache", use_cache)
    seed = check_int("generate: seed", seed, low=0)
    config = getattr(model, "config", None)
    if use_cache and config is not None and not config.causal:
        use_cache = False  # an encoder's earlier positions see later tokens: no valid cache
    rng = bk.host_rng(seed)
    out = check_id_array("generate: ids", ids)
    if out.ndim != 2 or out.dtype.kind not in "iu" or 0 in out.shape:
        raise ValueError(f"generate: ids must be a 2-D integer array (B, T), got shape "
                         f"{tuple(out.shape)} and dtype {out.dtype} (and neither B nor T 0)")
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
