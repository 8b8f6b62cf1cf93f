"""Host-side data: every task's answer checked against an independent computation, the held-out
split, the language and its tokenizer, and the text tokenizers' round trips."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.data import (
    CATEGORIES,
    CIPHER,
    EVAL_BUCKETS,
    FUNCTION_WORDS,
    STOI,
    TASKS,
    VOCAB,
    BPETokenizer,
    CharTokenizer,
    LanguageStream,
    TaskMixture,
    TextDataset,
    WordTokenizer,
    cluster_purity,
    decode,
    encode,
    exact_match,
    generate_corpus,
    make_examples,
    seq_len_for,
    swap_marker,
    to_xy,
)

fast = settings(max_examples=20, deadline=None)
seeds = st.integers(0, 2**31 - 1)
lengths = st.integers(1, 16)


def split_rows(task, n=64, seed=0, length=8):
    """Decode examples into (prompt, answer) strings, without using the answer mask."""
    d = make_examples(task, n, seed, length)
    out = []
    for row in d.tokens:
        text = decode(row)
        assert text.startswith(f"<{task}>")
        prompt, answer = text[len(task) + 2:].split("=")
        out.append((prompt, answer))
    return out


# --- each task's answer, computed independently --------------------------------------------


@fast
@given(seeds, lengths)
def test_copy_reverse_sort(seed, length):
    for p, a in split_rows("copy", 16, seed, length):
        assert a == p and len(p) == length and set(p) <= set("abcdefghij")
    for p, a in split_rows("reverse", 16, seed, length):
        assert a == p[::-1]
    for p, a in split_rows("sort", 16, seed, length):
        assert a == "".join(sorted(p))


@fast
@given(seeds)
def test_addition_matches_int_arithmetic(seed):
    for p, a in split_rows("add", 32, seed):
        x, y = p.split("+")
        assert len(x) == len(y) == 3 and len(a) == 4
        assert int(a[::-1]) == int(x) + int(y)  # answer is the 4-digit sum, reversed


def test_cipher_is_a_fixed_bijection():
    assert sorted(CIPHER.tolist()) == list(range(10))
    mapping = {}
    for p, a in split_rows("cipher", 200, seed=3, length=12):
        for c, e in zip(p, a):
            assert mapping.setdefault(c, e) == e  # the same letter always maps the same way
    assert sorted(mapping) == list("abcdefghij") == sorted(mapping.values())
    assert all(c != e for c, e in mapping.items())  # no letter left unchanged


def test_shift_moves_each_letter_three_places():
    letters = "abcdefghij"
    for p, a in split_rows("shift", 100, seed=5, length=8):
        assert a == "".join(letters[(letters.index(c) + 3) % 10] for c in p)


@fast
@given(seeds, st.integers(1, 30))
def test_count_of_a(seed, length):
    for p, a in split_rows("count", 16, seed, length):
        assert a == f"{p.count('a'):02d}"


def balanced(s):
    depth = 0
    for c in s:
        depth += 1 if c == "(" else -1
        if depth < 0:
            return False
    return depth == 0


@fast
@given(seeds, st.integers(1, 6).map(lambda k: 2 * k))
def test_brackets_label(seed, length):
    rows = split_rows("brackets", 64, seed, length)
    for p, a in rows:
        assert len(p) == length and a == ("y" if balanced(p) else "n")


def test_brackets_has_both_labels():
    labels = [a for _, a in split_rows("brackets", 400, 0, 10)]
    assert 0.35 < labels.count("y") / len(labels) < 0.75


def test_vocab_small_and_pad_is_zero():
    assert VOCAB[0] == "<pad>" and len(VOCAB) < 64 and len(set(VOCAB)) == len(VOCAB)
    assert all(f"<{t}>" in STOI for t in TASKS) and all(f"<new{i}>" in STOI for i in range(4))
    s = "<add>123+456=9750"
    assert decode(encode(s)) == s


# --- batching ------------------------------------------------------------------------------


def test_mixture_rows_share_one_length_and_mix_tasks():
    m = TaskMixture(list(TASKS), seed=0)
    assert m.seq_len == seq_len_for(None, 8) == max(
        make_examples(t, 1, 0).tokens.shape[1] for t in TASKS)
    x, y = m.sample(256)
    assert x.shape == y.shape == (256, m.seq_len - 1) and x.dtype == y.dtype == np.int64
    assert {VOCAB[i] for i in x[:, 0]} == {f"<{t}>" for t in TASKS}  # all tasks in one batch


@fast
@given(seeds, st.sampled_from(list(TASKS)))
def test_to_xy_scores_only_answer_tokens(seed, task):
    d = make_examples(task, 8, seed, seq_len=20)
    x, y = to_xy(d.tokens, d.answer_mask)
    assert (x == d.tokens[:, :-1]).all()
    for row, yr in zip(d.tokens, y):
        eq = list(row).index(STOI["="])
        n_answer = int(np.count_nonzero(row[eq + 1:]))  # answers never contain <pad>
        kept = np.flatnonzero(yr != -100)
        assert kept.tolist() == list(range(eq, eq + n_answer))  # y[t] is the token at t + 1
        assert (yr[kept] == row[eq + 1:eq + 1 + n_answer]).all()


def test_same_seed_same_data_different_seed_different():
    a, b, c = (make_examples("sort", 50, s).tokens for s in (1, 1, 2))
    assert (a == b).all() and not (a == c).all()
    m1, m2, m3 = TaskMixture(["add", "copy"], 5), TaskMixture(["add", "copy"], 5), \
        TaskMixture(["add", "copy"], 6)
    (x1, y1), (x2, y2), (x3, _) = m1.sample(32), m2.sample(32), m3.sample(32)
    assert (x1 == x2).all() and (y1 == y2).all() and not (x1 == x3).all()
    assert not (m1.sample(32)[0] == x1).all()  # the stream moves on


def test_eval_set_is_held_out_from_training():
    m = TaskMixture(["copy", "add", "brackets"], seed=0, length=4)
    ev_x, ev_y = m.eval_set("add", 300)
    assert (m.eval_set("add", 300)[0] == ev_x).all()  # a fixed set
    prompts = lambda x: {tuple(r[:8]) for r in x}  # marker + '123+456'
    eval_prompts = prompts(ev_x)
    seen = set()
    for _ in range(200):
        seen |= prompts(m.sample(256)[0])
    add_seen = {p for p in seen if p[0] == STOI["<add>"]}
    assert len(add_seen) > 10_000 and not add_seen & eval_prompts
    # the split is about 1 input in EVAL_BUCKETS: most random inputs are trainable
    all_copy = make_examples("copy", 5000, 1, 4).tokens
    train_copy = make_examples("copy", 5000, 1, 4, split="train").tokens
    frac_held = 1 - len({tuple(r) for r in all_copy} & {tuple(r) for r in train_copy}) / len(
        {tuple(r) for r in all_copy})
    assert abs(frac_held - 1 / EVAL_BUCKETS) < 0.04
    assert not {tuple(r[:9]) for r in m.eval_set("brackets", 100)[0]} & seen


def test_exact_match_by_hand():
    y = np.array([[-100, 3, 4], [-100, 5, -100], [7, -100, 8]])
    pred = np.array([[9, 3, 4], [1, 5, 1], [7, 0, 8]])  # ignored positions may be anything
    assert exact_match(pred, y) == 1.0
    pred[2, 2] = 0  # one wrong answer token makes its row wrong
    assert exact_match(pred, y) == pytest.approx(2 / 3)
    pred[0, 1] = 0
    assert exact_match(pred, y) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="shape"):
        exact_match(pred[:, :2], y)


def test_swap_marker_changes_only_the_marker():
    d = make_examples("reverse", 10, 0)
    x, y = to_xy(d.tokens, d.answer_mask)
    x2, y2 = swap_marker(x, y, "reverse", "<new0>")
    assert (x2[:, 0] == STOI["<new0>"]).all() and (x2[:, 1:] == x[:, 1:]).all()
    assert (y2 == y).all() and (x[:, 0] == STOI["<reverse>"]).all()  # inputs untouched
    with pytest.raises(ValueError, match="markers"):
        swap_marker(x, y, "reverse", "a")


def test_bad_task_inputs():
    with pytest.raises(ValueError, match="task must be one of.*'copy'"):
        make_examples("multiply", 4, 0)
    with pytest.raises(ValueError, match="task must be one of"):
        TaskMixture(["copy", "nope"], 0)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="length must be a positive int"):
            make_examples("copy", 4, 0, length=bad)
    with pytest.raises(ValueError, match="even"):
        make_examples("brackets", 4, 0, length=7)
    with pytest.raises(ValueError, match="seq_len must be >= 18"):
        make_examples("copy", 4, 0, seq_len=10)
    with pytest.raises(ValueError, match="VOCAB"):
        encode("<copy>xyz")


# --- the synthetic language ----------------------------------------------------------------


def test_category_words_are_single_tokens():
    tok = WordTokenizer()
    for cat, words in CATEGORIES.items():
        assert 6 <= len(words) <= 8
        for w in words:
            ids = tok.encode(w)
            assert len(ids) == 1 and tok.category_of(ids[0]) == cat and tok.decode(ids) == w
    assert all(tok.category_of(tok.encode(w)[0]) is None for w in FUNCTION_WORDS)
    assert tok.encode("zebra")[0] == tok.unk_id


def test_corpus_round_trips_and_is_reproducible():
    tok = WordTokenizer()
    corpus = generate_corpus(200, seed=4)
    assert corpus == generate_corpus(200, seed=4) != generate_corpus(200, seed=5)
    for s in corpus:
        ids = tok.encode(s, add_bos_eos=True)
        assert tok.unk_id not in ids and tok.decode(ids) == s


def test_language_stream_next_token():
    s = LanguageStream(seed=0, seq_len=32)
    x, y = s.sample(8)
    assert x.shape == y.shape == (8, 32)
    assert (x[:, 0] == s.tokenizer.bos_id).all()
    scored = y != -100
    assert (y[:, :-1][scored[:, :-1]] == x[:, 1:][scored[:, :-1]]).all()  # y is x shifted
    assert (y[~scored] == -100).all() and (x[:, 1:][~scored[:, :-1]] == 0).all()  # pad only
    assert (LanguageStream(0, 32).sample(8)[0] == x).all()
    with pytest.raises(ValueError, match="seq_len"):
        LanguageStream(0, 3)


def test_cluster_purity():
    tok = WordTokenizer()
    ids = lambda words: [tok.stoi[w] for w in words]
    assert cluster_purity([ids(["fox", "dog", "cat"]), ids(["red", "blue"])], tok) == 1.0
    # (fox, dog, red, the): 'the' has no category -> 2 of 3 are animals; (river, lake) -> 1
    q = [ids(["fox", "dog", "red", "the"]), ids(["river", "lake"])]
    assert cluster_purity(q, tok) == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="category"):
        cluster_purity([ids(["the", "a"])], tok)


# --- text files ----------------------------------------------------------------------------


@fast
@given(st.text(min_size=1))
def test_char_tokenizer_round_trip(text):
    tok = CharTokenizer.fit(text)
    ids = tok.encode(text)
    assert tok.decode(ids) == text and ids.max() < tok.vocab_size


def test_char_tokenizer_save_load(tmp_path):
    tok = CharTokenizer.fit("hello, world\n")
    tok2 = CharTokenizer.load(tok.save(tmp_path / "chars.json"))
    assert tok2.chars == tok.chars
    with pytest.raises(ValueError, match="unknown"):
        tok.encode("xyz")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    lines = generate_corpus(2000, seed=0) + ["naïve café ☕ 日本語  tabs\tand\r\n", "", "end"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bpe_round_trip_and_save_load(text_file, tmp_path):
    tok = BPETokenizer.train(text_file, vocab_size=300)
    assert tok.vocab_size == 300
    text = text_file.read_text(encoding="utf-8")
    ids = tok.encode_text(text)
    assert tok.decode(ids) == text and tok.decode(tok.encode(text)) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges compress
    batch = tok.encode_batch(["the red fox", "naïve ☕"])
    assert [tok.decode(b) for b in batch] == ["the red fox", "naïve ☕"]
    tok2 = BPETokenizer.load(tok.save(tmp_path / "bpe"))
    assert (tmp_path / "bpe" / "tokenizer.json").is_file()
    assert (tok2.encode_text(text) == ids).all()
    tok3 = BPETokenizer.train(iter(text.splitlines(keepends=True)), vocab_size=300)
    assert tok3.decode(tok3.encode("héllo wörld")) == "héllo wörld"
    with pytest.raises(ValueError, match="existing files"):
        BPETokenizer.train([tmp_path / "missing.txt"], vocab_size=300)
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(text_file, vocab_size=100)


def test_text_dataset_windows_are_contiguous():
    ids = np.random.default_rng(0).permutation(1000)  # distinct values: a window's start is known
    ds = TextDataset(ids, seq_len=16, seed=0)
    x, y = ds.sample(32)
    assert x.shape == y.shape == (32, 16)
    for xr, yr in zip(x, y):
        start = int(np.flatnonzero(ids == xr[0])[0])
        assert (xr == ids[start:start + 16]).all() and (yr == ids[start + 1:start + 17]).all()
    assert (TextDataset(ids, 16, seed=0).sample(32)[0] == x).all()
    tiny = TextDataset(np.arange(5), seq_len=4, seed=0)  # exactly one window fits
    assert (tiny.sample(3)[1] == np.arange(1, 5)).all()
    with pytest.raises(ValueError, match="at least seq_len \\+ 1"):
        TextDataset(np.arange(5), seq_len=5, seed=0)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        TextDataset(np.arange(5), seq_len=0, seed=0)
