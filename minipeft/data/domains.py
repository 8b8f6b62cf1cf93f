"""Two real domains as token ids: Shakespeare (A, what the base knows) and Python code (B, new).

The tokenizer is byte-level BPE (:class:`~minipeft.data.text.BPETokenizer`) trained on the
*Shakespeare training plays alone*, with :data:`BPE_VOCAB` tokens. Both choices were measured
(``tokenizers`` 0.x, 4.5 M training characters; chars/token on held-out text):

    vocab   trained on     Shakespeare  code    code tokens never seen in Shakespeare training
    512     Shakespeare    1.91         1.32     7.4%
    1024    Shakespeare    2.34         1.43     8.0%
    2048    Shakespeare    2.67         1.51     8.5%
    2048    both domains   2.58         2.61    26.8%   (163 distinct tokens)

Training on both domains would encode code in 40% fewer tokens, but a quarter of the code
tokens would be merges the base never saw in pretraining: their embedding rows are untrained,
and every method that freezes the embeddings (all PEFT methods here) could not learn them: the
study would measure the tokenizer, not the method (the same trap as an untrained task marker).
With a Shakespeare-only tokenizer, code is spelled out of Shakespeare's own merges and bytes;
8% of its tokens (brackets, ``_``, ``=``, digits: 20 distinct byte-level tokens) are still new,
which is what a new domain looks like. Among vocabulary sizes, the base model (C128 L4 H4, T64
B12, lr 2e-3, warm-up and cosine) trained for the same CPU time (45 s of one core, measured with
``time.process_time`` while other jobs shared the machine) reached on held-out plays:

    vocab 512: 1.966 nats/char    1024: 1.895    2048: 1.786

The larger vocabulary puts 40% more characters in each token for little extra compute at this
width (the head is C x V; the steps were equally fast), so 2048 it is (the top of the range).

Losses are reported per token *and* in bits per character, so that tokenizers compare:
``bits/char = nats/token * tokens / characters / ln 2``, with the characters counted on the
decoded targets themselves (:attr:`EvalSet.chars`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from minipeft import backend as bk
from minipeft.data.corpus import code_split, shakespeare_split
from minipeft.data.text import BPETokenizer, TextDataset

np = bk.np  # host numpy

BPE_VOCAB = 2048
CORPUS_VERSION = 1      # bump when the cleaning or the split changes what the tokenizer sees


def corpus_tokenizer(vocab_size: int, folder) -> BPETokenizer:
    """The byte-level BPE of the Shakespeare training plays, cached as
    ``folder/bpe-shakespeare-v{vocab_size}-c{CORPUS_VERSION}.json`` (trained on first use, in a
    few seconds; written through a temporary file, so an interrupted save leaves nothing)."""
    from minipeft.io import atomic_write_bytes

    path = Path(folder) / f"bpe-shakespeare-v{vocab_size}-c{CORPUS_VERSION}.json"
    if path.is_file():
        return BPETokenizer.load(path)
    train, _ = shakespeare_split()
    tok = BPETokenizer.train(iter([train]), vocab_size=vocab_size)
    atomic_write_bytes(path, tok.tokenizer.to_str().encode("utf-8"))
    return tok


@dataclass
class EvalSet:
    """Consecutive windows of held-out text: ``x``, ``y`` (N, T) ids and the number of
    characters the targets ``y`` spell (for bits per character)."""
    x: object
    y: object
    chars: int

    @property
    def tokens(self) -> int:
        return int(self.y.size)

    def bits_per_char(self, nats_per_token: float) -> float:
        """``nats/token * tokens / chars / ln 2``."""
        return nats_per_token * self.tokens / self.chars / math.log(2)


class Domain:
    """One domain's training ids and held-out ids under one tokenizer.

    ``sample(B)`` (via :meth:`sampler`) draws random training windows; :meth:`eval_set` cuts
    the first ``n`` consecutive held-out windows (a fixed set: the same for every method)."""

    def __init__(self, name: str, tok: BPETokenizer, train_text: str, held_text: str):
        self.name, self.tok = name, tok
        self.train_ids = tok.encode_text(train_text)   # (N_train,)
        self.held_ids = tok.encode_text(held_text)     # (N_held,)
        self.chars_per_token = len(held_text) / len(self.held_ids)

    def sampler(self, seq_len: int, seed: int):
        return TextDataset(self.train_ids, seq_len, seed).sample

    def eval_set(self, n_windows: int | None, seq_len: int) -> EvalSet:
        x, y = TextDataset(self.held_ids, seq_len, 0).windows()   # (N, T) each
        if n_windows is not None:
            x, y = x[:n_windows], y[:n_windows]
        chars = sum(len(self.tok.decode(row)) for row in y)
        return EvalSet(x, y, chars)


def shakespeare_domain(tok: BPETokenizer) -> Domain:
    return Domain("shakespeare", tok, *shakespeare_split())


def code_domain(tok: BPETokenizer) -> Domain:
    return Domain("code", tok, *code_split())
