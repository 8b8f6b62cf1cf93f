"""Synthetic sequence tasks: small skills a tiny GPT learns in seconds, all in one vocabulary.

Every example is one row ``[marker] prompt = answer``, right-padded with ``<pad>``::

    <reverse> c b a d h g a a = a a g h d a b c
    <add>     1 2 3 + 4 5 6 = 9 7 5 0 <pad> <pad> <pad> <pad> <pad>      123+456 = 579

The marker names the skill, so one model can hold many skills: PEFT needs a base model with
skills to keep and a new one to add. The tasks (``length`` letters of a..j, default 8):

- copy ``cbad=cbad``; reverse ``cbad=dabc``; sort ``cbad=abcd``; shift ``cbad=fedg`` (each
  letter moved ``SHIFT`` = 3 places round the alphabet a..j).
- cipher ``cbad=heia``: each letter through one fixed substitution ``CIPHER`` (a permutation of
  a..j with no fixed point, drawn once from ``CIPHER_SEED``), applied to the plain, unreversed text.
- add ``123+456=9750``: two 3-digit numbers, the sum as 4 digits *reversed* (least significant
  first), so each answer digit depends only on digits already seen. Ignores ``length``.
- count ``abba=02``: how many ``a``, two digits. brackets ``(())=y``: ``y`` if balanced, else
  ``n`` (``length`` brackets; half the rows are balanced by construction, the rest shuffled or
  random, and every label is computed, never assumed).

``<new0>``..``<new3>`` are markers no task uses: a soft prompt can learn to make an unseen marker
trigger a skill the model already has. :func:`to_xy` turns rows into next-token pairs in which only
answer tokens are scored: the prompt is random, so predicting it would only teach noise.

Held-out evaluation: an input is in the *eval split* when a hash of its tokens (marker + prompt)
lands in bucket 0 of ``EVAL_BUCKETS``, else in the *train split*. The split is a property of the
input, not of a seed: :class:`TaskMixture` never trains on an eval input, for any seed, so eval
accuracy measures generalisation rather than memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from minipeft import backend as bk

np = bk.np  # host numpy: data is made on the CPU and moved to the device by the training loop

LETTERS = list("abcdefghij")
DIGITS = list("0123456789")
MARKERS = ["copy", "reverse", "cipher", "sort", "add", "count", "brackets",
           "new0", "new1", "new2", "new3", "shift"]
VOCAB: list[str] = (["<pad>", "="] + LETTERS + DIGITS + ["+", "(", ")", "y", "n"]
                    + [f"<{m}>" for m in MARKERS])
STOI: dict[str, int] = {s: i for i, s in enumerate(VOCAB)}
PAD = STOI["<pad>"]  # 0
_A, _D0 = STOI["a"], STOI["0"]  # first letter id, first digit id

CIPHER_SEED = 1  # drawn once; this seed gives a permutation with no fixed point
CIPHER = bk.host_rng(CIPHER_SEED).permutation(10)  # letter i -> letter CIPHER[i]
SHIFT = 3  # the shift task: a Caesar cipher, each letter moved 3 places (a -> d, ..., j -> c)
EVAL_BUCKETS = 10  # 1 input in 10 is held out for evaluation


def _on_letters(answer):
    """A task whose prompt is ``length`` random letters and whose answer is ``answer(prompt)``."""
    def generate(rng, n, length):
        s = _A + rng.integers(0, 10, size=(n, length))  # (n, L) letter ids
        return s, answer(s)
    return generate


def _add(rng, n, length):  # '123+456' -> '9750'; ignores length
    a, b = rng.integers(0, 1000, size=(2, n))
    place = 10 ** np.arange(2, -1, -1)  # (3,) hundreds, tens, units
    digits = lambda v, p: _D0 + (v[:, None] // p) % 10  # (n, len(p)) digit ids
    plus = np.full((n, 1), STOI["+"])
    prompt = np.concatenate([digits(a, place), plus, digits(b, place)], axis=1)  # (n, 7)
    return prompt, digits(a + b, 10 ** np.arange(4))  # (n, 4) units digit first


def _brackets(rng, n, length):  # '(())' -> 'y'; half balanced by construction
    half = length // 2
    steps = np.where(np.arange(length) < half, 1, -1)  # equal numbers of '(' (+1) and ')' (-1)
    shuffled = np.take_along_axis(np.broadcast_to(steps, (n, length)),
                                  rng.random((n, length)).argsort(axis=1), axis=1)
    # Cycle lemma: rotating a +-1 sequence that sums to 0 to start just after its (first)
    # lowest prefix sum makes every prefix sum >= 0: a balanced string.
    start = np.cumsum(shuffled, axis=1).argmin(axis=1) + 1
    balanced = np.take_along_axis(shuffled, (start[:, None] + np.arange(length)) % length, 1)
    coin = rng.random(n)[:, None]
    uniform = rng.choice([1, -1], size=(n, length))
    s = np.where(coin < 0.5, balanced, np.where(coin < 0.75, shuffled, uniform))  # (n, L)
    ok = (np.cumsum(s, axis=1).min(axis=1) >= 0) & (s.sum(axis=1) == 0)
    prompt = np.where(s == 1, STOI["("], STOI[")"])
    return prompt, np.where(ok, STOI["y"], STOI["n"])[:, None]  # (n, 1)


def _count_a(s):  # (n, L) letters -> (n, 2) digit ids of how many are 'a'
    c = (s == _A).sum(axis=1)
    return _D0 + np.stack([c // 10, c % 10], axis=1)


TASKS = {
    "copy": _on_letters(lambda s: s.copy()),
    "reverse": _on_letters(lambda s: s[:, ::-1].copy()),
    "cipher": _on_letters(lambda s: _A + CIPHER[s - _A]),
    "sort": _on_letters(lambda s: np.sort(s, axis=1)),
    "add": _add,
    "count": _on_letters(_count_a),
    "brackets": _brackets,
    "shift": _on_letters(lambda s: _A + (s - _A + SHIFT) % 10),
}
"""Task name -> generator ``fn(rng, n, length) -> (prompt ids (n, P), answer ids (n, A))``."""


def _check(task: str, length: int) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length <= 0:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if task == "count" and length > 99:
        raise ValueError(f"length for 'count' must be <= 99 (two-digit answer), got {length}")
    if task == "brackets" and length % 2:
        raise ValueError(f"length for 'brackets' must be even (odd never balances), got {length}")


def _example_len(task: str, length: int) -> int:
    """Tokens in one unpadded ``task`` example: marker + prompt + '=' + answer."""
    prompt, answer = {"add": (7, 4), "count": (length, 2), "brackets": (length, 1)}.get(
        task, (length, length))
    return 1 + prompt + 1 + answer


def seq_len_for(tasks: list[str] | None = None, length: int = 8) -> int:
    """Row length that fits every task in ``tasks`` (default: all of ``TASKS``) at ``length``."""
    tasks = list(TASKS) if tasks is None else tasks
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {t!r}")
    return max(_example_len(t, length) for t in tasks)


def eval_split_mask(prompts):
    """True for rows whose (marker + prompt) tokens hash into the eval bucket. (n, P) -> (n,)."""
    h = np.full(len(prompts), 0xCBF29CE484222325, dtype=np.uint64)  # FNV-1a, then a final mix
    for col in np.asarray(prompts, dtype=np.uint64).T:
        h = (h ^ col) * np.uint64(0x100000001B3)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    return h % np.uint64(EVAL_BUCKETS) == 0


@dataclass
class TaskData:
    """A batch of examples of one task: ``tokens`` (n, T) int64 and ``answer_mask`` (n, T) bool
    (True on answer tokens), right-padded with ``<pad>`` (id 0)."""

    tokens: np.ndarray
    answer_mask: np.ndarray
    task: str


def make_examples(task: str, n: int, seed, length: int = 8, seq_len: int | None = None,
                  split: str | None = None) -> TaskData:
    """``n`` examples of ``task``, reproducible from ``seed`` (an int or a numpy Generator).

    ``seq_len`` pads rows to that many tokens (default: just long enough for this task).
    ``split`` = ``"train"`` or ``"eval"`` keeps only inputs of that split (see the module
    docstring); ``None`` keeps all.
    """
    _check(task, length)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if split not in (None, "train", "eval"):
        raise ValueError(f"split must be None, 'train' or 'eval', got {split!r}")
    need = _example_len(task, length)
    seq_len = need if seq_len is None else seq_len
    if seq_len < need:
        raise ValueError(f"seq_len must be >= {need} for {task!r} at length {length}, "
                         f"got {seq_len}")
    rng = seed if isinstance(seed, np.random.Generator) else bk.host_rng(seed)
    marker, eq = STOI[f"<{task}>"], STOI["="]
    prompts, answers, have = [], [], 0
    for _ in range(1000):  # rejection sampling into the split; 1 round unless split is given
        draw = max(n - have, 1) * {None: 1, "train": 2, "eval": 2 * EVAL_BUCKETS}[split]
        p, a = TASKS[task](rng, draw, length)
        p = np.concatenate([np.full((len(p), 1), marker), p], axis=1)  # (m, 1 + P)
        if split is not None:
            keep = eval_split_mask(p) == (split == "eval")
            p, a = p[keep], a[keep]
        prompts.append(p)
        answers.append(a)
        have += len(p)
        if have >= n:
            break
    else:
        raise ValueError(f"could not draw {n} {split!r} inputs of {task!r} at length {length}: "
                         "its input space is too small for a held-out split")
    p, a = np.concatenate(prompts)[:n], np.concatenate(answers)[:n]
    tokens = np.full((n, seq_len), PAD, dtype=np.int64)  # (n, T)
    P, A = p.shape[1], a.shape[1]
    tokens[:, :P], tokens[:, P], tokens[:, P + 1:P + 1 + A] = p, eq, a
    mask = np.zeros((n, seq_len), dtype=bool)
    mask[:, P + 1:P + 1 + A] = True
    return TaskData(tokens, mask, task)


def to_xy(tokens, answer_mask, ignore_index: int = -100):
    """Next-token pairs scored on answers only: ``x = tokens[:, :-1]``, ``y = tokens[:, 1:]`` with
    ``y = ignore_index`` wherever the target is not an answer token. (n, T) -> 2 x (n, T-1)."""
    tokens, answer_mask = np.asarray(tokens), np.asarray(answer_mask, dtype=bool)
    if tokens.ndim != 2 or tokens.shape != answer_mask.shape:
        raise ValueError(f"tokens and answer_mask must be 2-D with one shape, got "
                         f"{tokens.shape} and {answer_mask.shape}")
    x = tokens[:, :-1].astype(np.int64)
    y = np.where(answer_mask[:, 1:], tokens[:, 1:], ignore_index).astype(np.int64)
    return x, y


class TaskMixture:
    """An endless training stream mixing ``tasks`` *within* each batch (each row a random task).

    Rows have ``seq_len`` tokens, so ``x`` and ``y`` have ``block_size = seq_len - 1`` columns.
    By default ``seq_len = seq_len_for(None, length)``, the same for every mixture at one
    ``length``, so a model pretrained on one mixture takes batches from any other.
    """

    def __init__(self, tasks: list[str], seed: int, length: int = 8,
                 seq_len: int | None = None):
        if isinstance(tasks, str) or not tasks:
            raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
        for t in tasks:
            _check(t, length)
        self.tasks, self.seed, self.length = list(tasks), seed, length
        self.seq_len = seq_len_for(None, length) if seq_len is None else seq_len
        if self.seq_len < seq_len_for(self.tasks, length):
            raise ValueError(f"seq_len must be >= {seq_len_for(self.tasks, length)} for "
                             f"{self.tasks} at length {length}, got {seq_len}")
        self.block_size = self.seq_len - 1
        self._rng = bk.host_rng([seed, 0])  # the training stream

    def sample(self, batch_size: int):
        """A training batch from the train split: ``(x, y)``, each (batch_size, block_size)."""
        which = self._rng.integers(0, len(self.tasks), size=batch_size)  # (B,) task per row
        tokens = np.zeros((batch_size, self.seq_len), dtype=np.int64)
        mask = np.zeros((batch_size, self.seq_len), dtype=bool)
        for i, t in enumerate(self.tasks):
            rows = np.flatnonzero(which == i)
            d = make_examples(t, len(rows), self._rng, self.length, self.seq_len, "train")
            tokens[rows], mask[rows] = d.tokens, d.answer_mask
        return to_xy(tokens, mask)

    def eval_set(self, task: str, n: int):
        """A fixed held-out set (the same on every call): ``n`` eval-split rows of ``task``."""
        _check(task, self.length)
        rng = bk.host_rng([self.seed, 1, list(TASKS).index(task)])
        d = make_examples(task, n, rng, self.length, self.seq_len, "eval")
        return to_xy(d.tokens, d.answer_mask)


def exact_match(pred_ids, y, ignore_index: int = -100) -> float:
    """Fraction of rows whose every scored target (``y != ignore_index``) equals ``pred_ids``.

    With ``pred_ids = logits.argmax(-1)`` under teacher forcing this equals greedy decoding: if
    all answer tokens are right, each was predicted from a correct prefix. A row with no scored
    target counts as right. Accepts host or device arrays.
    """
    pred, y = bk.to_numpy(pred_ids), bk.to_numpy(y)
    if pred.shape != y.shape or y.ndim != 2:
        raise ValueError(f"pred_ids and y must be 2-D with one shape, got {pred.shape} and "
                         f"{y.shape}")
    if len(y) == 0:
        raise ValueError("y must have at least one row, got 0")
    return float(((pred == y) | (y == ignore_index)).all(axis=1).mean())


def encode(text: str):
    """Ids of ``text`` such as ``"<add>123+456=9750"`` (markers in ``<>``, spaces ignored)."""
    ids, i = [], 0
    text = text.replace(" ", "")
    while i < len(text):
        j = (text.find(">", i) + 1 or len(text)) if text[i] == "<" else i + 1
        sym = text[i:j]
        if sym not in STOI:
            raise ValueError(f"text must use symbols of VOCAB {VOCAB}, got {sym!r} at {i}")
        ids.append(STOI[sym])
        i = j
    return np.array(ids, dtype=np.int64)


def decode(ids, skip_pad: bool = True) -> str:
    """Text of ``ids`` (one row); ``<pad>`` and negative ids (ignored targets) dropped."""
    return "".join(VOCAB[i] for i in bk.to_numpy(ids).tolist()
                   if i >= 0 and not (skip_pad and i == PAD))


def swap_marker(x, y, old: str, new: str):
    """Copies of ``(x, y)`` with marker ``old`` replaced by ``new`` (e.g. ``"reverse"`` ->
    ``"new0"``, with or without the ``<>``): teach an unseen marker to trigger a skill."""
    o, w = (STOI.get(m if m.startswith("<") else f"<{m}>") for m in (old, new))
    markers = [f"<{m}>" for m in MARKERS]
    if o is None or w is None or VOCAB[o] not in markers or VOCAB[w] not in markers:
        raise ValueError(f"old and new must be markers of {markers}, got {old!r} and {new!r}")
    x = np.array(x, copy=True)
    x[:, 0] = np.where(x[:, 0] == o, w, x[:, 0])  # the marker is always the first token
    return x, np.array(y, copy=True)
