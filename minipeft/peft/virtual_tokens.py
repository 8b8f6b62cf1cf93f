"""What prompt tuning and prefix tuning share: virtual tokens in front of the real ones.

Both put n learned positions before the T real tokens, so both must fit n + T in the model's
``block_size``, and both can start their vectors from token embeddings ("vocab", "text").

Positions, a choice both make (and ``tests/test_prompts.py`` pins): the real tokens keep
positions 0..T-1, the positions they had in pretraining, and the virtual tokens get none.
Hugging Face PEFT on GPT-2 shifts the real tokens to n..n+T-1 instead (its prompt is simply
longer input). On a small model pretrained on short sequences that shift moves every real
token onto a position embedding it rarely or never saw, which the experiment notes measured
to break the model; with our choice the frozen model reads its input exactly as in
pretraining, and only the attention to the n extra vectors is new.
"""

from __future__ import annotations

from minipeft import backend as bk
from minipeft import checks

INITS = ("random", "vocab", "text")


def check_init(init: str, token_ids, who: str) -> tuple:
    """The init choice, and the token ids it needs (returned as a tuple)."""
    checks.check_choice(f"{who}.init", init, INITS)
    token_ids = checks.check_int_tuple(f"{who}.init_token_ids", token_ids, low=0, unique=False)
    if init == "text" and not token_ids:
        raise ValueError(f"{who}(init='text') needs init_token_ids: a non-empty sequence of "
                         f"token ids >= 0, got {token_ids!r}")
    return token_ids


def check_room(n: int, block_size: int, who: str) -> None:
    if n >= block_size:
        raise ValueError(f"{who}: num_virtual_tokens={n} leaves no room for real tokens in "
                         f"block_size={block_size}; use fewer than {block_size}")


def check_budget(n: int, T: int, block_size: int, who: str) -> None:
    """The context budget: n virtual tokens + T real tokens must fit in block_size."""
    if n + T > block_size:
        raise ValueError(f"{who}: {n} virtual tokens + {T} input tokens = {n + T} exceed the "
                         f"model's block_size={block_size}; give at most {block_size - n} "
                         "input tokens or use fewer virtual tokens")


def text_ids(token_ids, n: int, vocab_size: int, who: str):
    """``token_ids`` repeated or truncated to length n, checked against the vocabulary."""
    bad = [i for i in token_ids if i >= vocab_size]
    if bad:
        raise ValueError(f"{who}.init_token_ids must lie in [0, {vocab_size}), got {bad}")
    return bk.np.resize(bk.np.asarray(token_ids, dtype=bk.np.int64), n)    # (n,)
