"""A tiny synthetic language whose words fall into known categories.

Natural text is too rich to check what a small model learned. Here every content word belongs to
one category (colours, animals, numbers, places, foods, two kinds of verbs, times), and sentences
come from templates whose slots each take one category::

    the red fox runs to the river
    two green bird eats bread in the garden          (the language has no plurals)

So a word's *contexts* reveal its category: colours sit before animals and foods, places after
"to the" / "in the". A language model trained on this text should place words of one category
near each other in embedding space, and :func:`cluster_purity` measures how close it came.
"""

from __future__ import annotations

from collections import Counter

from minipeft import backend as bk

np = bk.np  # host numpy

CATEGORIES: dict[str, list[str]] = {
    "colour": ["red", "green", "blue", "yellow", "white", "black", "brown"],
    "animal": ["fox", "bird", "dog", "cat", "horse", "fish", "bear", "mouse"],
    "number": ["two", "three", "four", "five", "six", "seven", "eight"],
    "place": ["river", "garden", "forest", "house", "field", "hill", "lake", "town"],
    "food": ["bread", "apple", "cheese", "rice", "fruit", "honey", "corn", "soup"],
    "move": ["runs", "walks", "flies", "swims", "jumps", "goes", "climbs"],  # verbs of motion
    "eat": ["eats", "likes", "wants", "finds", "cooks", "brings"],  # verbs taking a food
    "time": ["morning", "evening", "night", "winter", "summer", "spring"],
}
FUNCTION_WORDS = ["the", "a", "to", "in", "and", "at", "with", "on"]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0, 1, 2, 3

# Each {slot} takes a random word of that category; other words are literal.
TEMPLATES = [
    "the {colour} {animal} {move} to the {place}",
    "{number} {colour} {animal} {eat} {food} in the {place}",
    "the {animal} {eat} {food} in the {time}",
    "a {animal} and a {animal} {move} in the {place}",
    "the {animal} {move} to the {place} in the {time}",
    "{number} {animal} {eat} {colour} {food}",
    "in the {place} the {colour} {animal} {eat} {food}",
    "at {time} the {animal} {move} with a {colour} {animal}",
    "the {animal} {eat} {food} on the {place}",
]


class WordTokenizer:
    """One token per word of the language: specials, then function words, then category words.

    ``encode(text)`` -> int64 ids (unknown words -> ``<unk>``); ``decode(ids)`` -> text;
    ``category_of(id)`` -> the word's category, or ``None`` for function words and specials.
    """

    def __init__(self):
        words = [w for ws in CATEGORIES.values() for w in ws]
        self.itos: list[str] = SPECIALS + FUNCTION_WORDS + words
        if len(set(self.itos)) != len(self.itos):
            raise ValueError("CATEGORIES and FUNCTION_WORDS must not share a word")
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self._category = {self.stoi[w]: c for c, ws in CATEGORIES.items() for w in ws}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(4)

    @property
    def vocab_size(self) -> int:
        """Number of tokens (specials included)."""
        return len(self.itos)

    def encode(self, text: str, add_bos_eos: bool = False):
        """Ids (int64) of the space-separated words of ``text``, optionally in <bos> ... <eos>."""
        ids = [self.stoi.get(w, self.unk_id) for w in text.split()]
        if add_bos_eos:
            ids = [self.bos_id] + ids + [self.eos_id]
        return np.array(ids, dtype=np.int64)

    def decode(self, ids, skip_special: bool = True) -> str:
        """The words of ``ids`` joined by spaces (specials dropped if ``skip_special``)."""
        out = []
        for i in bk.to_numpy(ids).tolist():
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids must be in [0, {self.vocab_size}), got {i}")
            if not (skip_special and i < len(SPECIALS)):
                out.append(self.itos[i])
        return " ".join(out)

    def category_of(self, token_id: int) -> str | None:
        """The category of ``token_id``'s word, ``None`` for function words and specials."""
        return self._category.get(int(token_id))

    def ids_of(self, category: str) -> list[int]:
        """Token ids of every word in ``category``."""
        if category not in CATEGORIES:
            raise ValueError(f"category must be one of {list(CATEGORIES)}, got {category!r}")
        return [self.stoi[w] for w in CATEGORIES[category]]


def _sentence(rng) -> str:
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    words = []
    for part in template.split():
        if part.startswith("{"):
            choices = CATEGORIES[part[1:-1]]
            part = choices[rng.integers(len(choices))]
        words.append(part)
    return " ".join(words)


def generate_corpus(n_sentences: int, seed: int) -> list[str]:
    """``n_sentences`` random sentences of the language (template and slot words uniform)."""
    if isinstance(n_sentences, bool) or not isinstance(n_sentences, int) or n_sentences < 0:
        raise ValueError(f"n_sentences must be a non-negative int, got {n_sentences!r}")
    rng = bk.host_rng(seed)
    return [_sentence(rng) for _ in range(n_sentences)]


def language_text(n_sentences: int, seed: int) -> str:
    """``n_sentences`` of the language as plain text, the corpus of the "text" base model::

        The red fox runs to the river. Two green bird eats bread in the garden.
        At night the cat walks with a black dog.

    Each sentence starts with a capital and ends with a full stop; lines hold 1 to 4
    sentences, chosen at random. Only ``generate_corpus`` sentences: no third-party text.
    """
    sentences = generate_corpus(n_sentences, seed)
    rng = bk.host_rng(seed + 1)
    lines, i = [], 0
    while i < len(sentences):
        k = int(rng.integers(1, 5))  # sentences on this line
        lines.append(" ".join(s[0].upper() + s[1:] + "." for s in sentences[i:i + k]))
        i += k
    return "\n".join(lines) + "\n" if lines else ""


MAX_SENTENCE_TOKENS = 2 + max(len(t.split()) for t in TEMPLATES)  # with <bos> and <eos>


class LanguageStream:
    """Endless next-token batches of the language for LM pretraining.

    Each row packs whole sentences ``<bos> words <eos> <bos> ...`` while they fit in
    ``seq_len + 1`` tokens and pads the rest; then ``x = row[:-1]``, ``y = row[1:]`` with
    ``y = -100`` on padding. Rows start at a sentence start, so positions mean the same in every
    row. ``seq_len`` (= ``block_size``) is the width of ``x`` and must hold one whole sentence.
    """

    def __init__(self, seed: int, seq_len: int, ignore_index: int = -100):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or \
                seq_len + 1 < MAX_SENTENCE_TOKENS:
            raise ValueError(f"seq_len must be an int >= {MAX_SENTENCE_TOKENS - 1} (the longest "
                             f"sentence with <bos>/<eos>, minus one), got {seq_len!r}")
        self.tokenizer = WordTokenizer()
        self.seq_len = self.block_size = seq_len
        self.ignore_index = ignore_index
        self._rng = bk.host_rng(seed)

    def sample(self, batch_size: int):
        """``(x, y)``, each (batch_size, seq_len) int64."""
        rows = np.full((batch_size, self.seq_len + 1), self.tokenizer.pad_id, dtype=np.int64)
        for r in range(batch_size):
            t = 0
            while True:
                ids = self.tokenizer.encode(_sentence(self._rng), add_bos_eos=True)
                if t + len(ids) > self.seq_len + 1:
                    break  # this sentence is dropped; the row is full enough
                rows[r, t:t + len(ids)] = ids
                t += len(ids)
        x, y = rows[:, :-1], rows[:, 1:].copy()  # (B, T) each
        y[y == self.tokenizer.pad_id] = self.ignore_index
        return x, y


def cluster_purity(neighbour_ids: list[list[int]], tokenizer: WordTokenizer) -> float:
    """How category-pure are nearest-neighbour lists? 1.0 = every list from one category.

    For each query, take the categories of its neighbour tokens, dropping tokens with no category
    (function words, specials); its purity is the count of the most common category divided by
    the number of categorised neighbours. The result is the mean over queries that have at least
    one categorised neighbour. Exclude each query token from its own list before calling.
    Example: neighbours (fox, dog, red, the) -> animal, animal, colour -> purity 2/3.
    """
    scores = []
    for nbrs in neighbour_ids:
        cats = [c for c in (tokenizer.category_of(i) for i in nbrs) if c is not None]
        if cats:
            scores.append(Counter(cats).most_common(1)[0][1] / len(cats))
    if not scores:
        raise ValueError("neighbour_ids must contain at least one token with a category, got "
                         f"{len(neighbour_ids)} lists with none")
    return float(np.mean(scores))
