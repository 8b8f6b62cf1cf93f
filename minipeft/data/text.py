"""Your own text: tokenizers that turn it into ids, and random training windows over the ids.

Two tokenizers, the two ends of a trade-off:

- :class:`CharTokenizer`: one token per character seen in the text. Tiny vocabulary, long
  sequences, nothing to train; cannot encode a character it never saw, unless it has an
  unknown id: :meth:`CharTokenizer.ascii` is a fixed vocabulary for *any* text (newline,
  printable ASCII, and one unknown id for every other character), the one the "text" base
  model of :mod:`minipeft.base` is pretrained with, so a user's file encodes onto it.
- :class:`BPETokenizer`: byte-level BPE (GPT-2's scheme) via the ``tokenizers`` package. It
  starts from the 256 byte values, so *any* text encodes and ``decode(encode(text)) == text``
  exactly, then learns merges of frequent pairs up to ``vocab_size``: at 512 about 2 characters
  per token on English, at 2048 about 3. Training is deterministic and takes about a second
  on a few MB.

:class:`TextDataset` cuts random windows ``x = ids[i : i+T]``, ``y = ids[i+1 : i+T+1]`` out
of one long id stream: every position is a next-token target, as in GPT pretraining.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from minipeft import backend as bk

np = bk.np  # host numpy


ASCII_CHARS = ["\n"] + [chr(i) for i in range(32, 127)]  # newline + printable ASCII (95)
UNKNOWN_CHAR = "\ufffd"  # the Unicode replacement character stands for every other character


class CharTokenizer:
    """One token per character of a fixed list, ``chars`` (id = position in the list).

    Without ``unk``, encoding a character outside ``chars`` is an error. With ``unk`` (one of
    ``chars``), every such character encodes to ``unk_id`` and decodes as ``unk``: lossy, but
    any text encodes.
    """

    def __init__(self, chars: list[str], unk: str | None = None):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError(f"chars must be distinct single characters, got {chars!r:.80}")
        if unk is not None and unk not in chars:
            raise ValueError(f"unk must be one of chars, got {unk!r}")
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.unk = unk
        self.unk_id = None if unk is None else self.stoi[unk]

    @classmethod
    def fit(cls, text: str) -> CharTokenizer:
        """A tokenizer whose vocabulary is the sorted set of characters in ``text``."""
        return cls(sorted(set(text)))

    @classmethod
    def ascii(cls) -> CharTokenizer:
        """The fixed vocabulary for any text: ``"\\n"`` (id 0), printable ASCII 32..126 (ids
        1..95) and the unknown id 96 (shown as ``"\ufffd"``) for every other character, tabs
        and accented letters included. 97 tokens."""
        return cls(ASCII_CHARS + [UNKNOWN_CHAR], unk=UNKNOWN_CHAR)

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.chars)

    def encode(self, text: str):
        """Ids (int64) of the characters of ``text``; characters outside the vocabulary get
        ``unk_id`` (count them with ``(ids == tok.unk_id).sum()``), or raise without ``unk``."""
        unknown = set(text) - self.stoi.keys()
        if unknown and self.unk_id is None:
            raise ValueError(f"text must use only fitted characters, got unknown "
                             f"{sorted(unknown)[:10]!r}")
        get, unk_id = self.stoi.get, self.unk_id
        return np.array([get(c, unk_id) for c in text], dtype=np.int64)

    def decode(self, ids) -> str:
        """The text of ``ids``."""
        return "".join(self.chars[i] for i in bk.to_numpy(ids).tolist())

    def save(self, path) -> Path:
        """Write ``{"type": "char", "chars": [...], "unk": ...}`` as JSON to ``path``; returns the
        path."""
        path = Path(path)
        data = {"type": "char", "chars": self.chars, "unk": self.unk}
        path.write_text(json.dumps(data), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path) -> CharTokenizer:
        """Read a tokenizer written by :meth:`save`."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("type") != "char":
            raise ValueError(f"path must hold a CharTokenizer JSON file, got type "
                             f"{data.get('type')!r} in {path}")
        return cls(data["chars"], unk=data.get("unk"))


def _is_path(p) -> bool:
    return isinstance(p, (str, os.PathLike))


class BPETokenizer:
    """Byte-level BPE, a thin wrapper around a ``tokenizers.Tokenizer``.

    Build one with :meth:`train` or :meth:`load`; ``encode`` / ``encode_batch`` / ``decode`` as
    usual, plus :meth:`encode_text` for a whole file's text at once (fast, exact round trip).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer

    @classmethod
    def train(cls, source, vocab_size: int = 512, min_frequency: int = 2) -> BPETokenizer:
        """Learn merges from ``source`` until the vocabulary has ``vocab_size`` tokens.

        ``source`` is a path (str or ``os.PathLike``) or a list/tuple of paths, read as files;
        any other iterable of strings (a generator, ``iter(lines)``) is used as the texts.
        ``vocab_size`` must be at least 256: the byte alphabet comes first. Deterministic: the
        same text gives the same merges, so no seed is needed.
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256:
            raise ValueError(f"vocab_size must be an int >= 256 (the byte alphabet), "
                             f"got {vocab_size!r}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # exact round trip
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes, seen or not
        if _is_path(source) or (isinstance(source, (list, tuple)) and all(map(_is_path, source))):
            files = [str(source)] if _is_path(source) else [str(p) for p in source]
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise ValueError(f"source must name existing files, got missing {missing[:3]} "
                                 "(to train on in-memory strings, pass iter(texts))")
            tok.train(files, trainer)
        else:
            tok.train_from_iterator(source, trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        """Number of tokens: 256 bytes plus the learned merges."""
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str):
        """Ids (int64) of one string."""
        return np.array(self.tokenizer.encode(text).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list:
        """Ids of many strings, encoded in parallel by the ``tokenizers`` package."""
        return [np.array(e.ids, dtype=np.int64) for e in self.tokenizer.encode_batch(list(texts))]

    def encode_text(self, text: str):
        """Ids of a long text as one stream: encoded line by line in parallel (several times
        faster than one ``encode``) and concatenated; ``decode`` restores ``text`` exactly."""
        parts = self.encode_batch(text.splitlines(keepends=True))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def decode(self, ids) -> str:
        """The text of ``ids`` (bytes joined first, so multi-byte characters come back whole)."""
        return self.tokenizer.decode(bk.to_numpy(ids).tolist())

    def save(self, path) -> Path:
        """Write ``tokenizer.json`` into directory ``path`` (or to ``path`` if it ends in
        ``.json``); returns the file written."""
        path = Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "tokenizer.json"
        self.tokenizer.save(str(path))
        return path

    @classmethod
    def load(cls, path) -> BPETokenizer:
        """Read a tokenizer saved by :meth:`save` (a ``.json`` file or a directory holding one)."""
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"path must be a tokenizer.json file or a directory with one, "
                             f"got {path}")
        return cls(Tokenizer.from_file(str(path)))


def train_val_split(ids, val_fraction: float = 0.1):
    """Split an id stream into (train, val): the last ``val_fraction`` of it is validation."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    ids = np.asarray(ids)
    cut = int(round(len(ids) * (1 - val_fraction)))
    return ids[:cut], ids[cut:]


class TextDataset:
    """Random windows of one id stream for next-token training.

    ``sample(B)`` picks ``B`` start positions ``i`` uniformly and returns ``x = ids[i:i+T]`` and
    ``y = ids[i+1:i+T+1]`` with ``T = seq_len`` (= ``block_size``), each (B, T) int64.
    """

    def __init__(self, ids, seq_len: int, seed: int):
        ids = np.asarray(bk.to_numpy(ids))
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be a 1-D integer array, got {ids.ndim}-D {ids.dtype}")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        if len(ids) < seq_len + 1:
            raise ValueError(f"ids must hold at least seq_len + 1 = {seq_len + 1} tokens for one "
                             f"window, got {len(ids)}: use more text or a smaller seq_len")
        self.ids = ids.astype(np.int64)
        self.seq_len = self.block_size = seq_len
        self._rng = bk.host_rng(seed)

    def sample(self, batch_size: int):
        """``(x, y)``: ``batch_size`` random windows and the same windows shifted by one."""
        starts = self._rng.integers(0, len(self.ids) - self.seq_len, size=batch_size)  # (B,)
        idx = starts[:, None] + np.arange(self.seq_len)  # (B, T)
        return self.ids[idx], self.ids[idx + 1]

    def windows(self):
        """``(x, y)``: the stream cut into consecutive windows ``ids[i:i+T]`` for ``i = 0, T,
        2T, ...``, each followed by its target ``ids[i+1:i+T+1]``; every token after the first
        is a target once (the last ``< T`` tokens are left out). A fixed evaluation set."""
        starts = np.arange(0, len(self.ids) - self.seq_len, self.seq_len)  # (N,)
        idx = starts[:, None] + np.arange(self.seq_len)  # (N, T)
        return self.ids[idx], self.ids[idx + 1]
