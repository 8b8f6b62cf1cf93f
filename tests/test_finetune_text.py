"""Proofs for ``minipeft finetune --text FILE``: any method trains on a user's own text file.

The command runs through the CLI entry point on small files written to ``tmp_path``, on a tiny
"text" base (the recipe cut to a few steps and a narrow model), pretrained into an empty cache
per test. What it prints is checked against a second code path: the saved adapter reloaded
with ``load_peft_model`` onto the cached base, the file encoded by a character table written
here, and the loss recomputed with NumPy.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest

import minipeft.base as base
from minipeft import backend as bk
from minipeft.autograd import no_grad
from minipeft.cli import main
from minipeft.data import CharTokenizer, language_text
from minipeft.peft import load_peft_model

REPETITIVE = "the cat sat on the mat. " * 40  # 960 characters, easy to learn
LOSS_LINE = re.compile(r"validation loss \(nats per character\): ([\d.]+) -> ([\d.]+)")


@pytest.fixture
def tiny_text_base(tmp_path, monkeypatch):
    """An empty cache and the "text" recipe cut to a 16-character context, width 32 and 200
    steps: about a second, and enough that LoRA has something to steer."""
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path / "cache"))
    tiny = replace(base.RECIPES["text"], length=16, n_embd=32, n_head=2, steps=200,
                   batch_size=16, lr=1e-2, warmup=5, eval_examples=40)
    monkeypatch.setitem(base.RECIPES, "text", tiny)
    return tiny


def no_pretraining(*args, **kwargs):
    raise AssertionError("pretrain() ran")


def ids_of(text: str) -> np.ndarray:
    """The ASCII vocabulary written out independently: newline 0, ' '..'~' 1..95, others 96."""
    return np.array([0 if c == "\n" else ord(c) - 31 if 32 <= ord(c) <= 126 else 96
                     for c in text])


def nll_per_char(model, ids: np.ndarray, T: int) -> float:
    """Mean next-character loss over consecutive T-windows of ``ids``, by NumPy log-softmax."""
    starts = range(0, len(ids) - T, T)
    x = np.stack([ids[i:i + T] for i in starts])          # (N, T)
    y = np.stack([ids[i + 1:i + T + 1] for i in starts])  # (N, T)
    with no_grad():
        logits = bk.to_numpy(model.eval()(bk.asarray(x)).data).astype(np.float64)  # (N, T, V)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, y[..., None], -1).mean())


def test_lora_on_a_text_file_saves_an_adapter_that_reloads_to_the_printed_loss(
        tiny_text_base, tmp_path, capsys, monkeypatch):
    path, out = tmp_path / "cats.txt", tmp_path / "adapter"
    path.write_text(REPETITIVE)
    rc = main(["finetune", "--method", "lora", "--text", str(path), "--out", str(out),
               "--steps", "60", "--seed", "1"])
    printed = capsys.readouterr().out
    assert rc == 0
    before, after = map(float, LOSS_LINE.search(printed).groups())
    assert after < before - 0.5                         # it learned the repetitive text
    assert {"adapter_model.safetensors", "adapter_config.json", "char_tokenizer.json",
            "finetune.json"} <= {p.name for p in out.iterdir()}
    assert str(out) in printed

    # second path: the cached base (no second pretraining), the adapter read from disk
    monkeypatch.setattr(base, "pretrain", no_pretraining)
    T = tiny_text_base.length
    ids = ids_of(REPETITIVE)
    val = ids[-max(round(0.1 * len(ids)), T + 1):]      # the documented split: the last 10%
    plain, _ = base.load_base("text", progress=False)
    assert nll_per_char(plain, val, T) == pytest.approx(before, abs=1e-4)  # LoRA starts at 0
    tuned = load_peft_model(base.load_base("text", progress=False)[0], out)
    assert nll_per_char(tuned, val, T) == pytest.approx(after, abs=1e-4)

    record = json.loads((out / "finetune.json").read_text())
    assert record["validation_characters"] == len(val) and record["unknown_characters"] == 0
    assert record["val_loss_after"] == pytest.approx(nll_per_char(tuned, val, T), abs=1e-5)
    tok = CharTokenizer.load(out / "char_tokenizer.json")
    assert np.array_equal(tok.encode(REPETITIVE), ids)


def test_characters_outside_the_vocabulary_are_counted_and_still_train(
        tiny_text_base, tmp_path, capsys):
    path, out = tmp_path / "accents.txt", tmp_path / "adapter"
    text = REPETITIVE[:300] + "café\tnaïve — ok\n"   # é, ï, tab and the dash: 4 unknown
    path.write_bytes(text.encode("utf-8") + b"\xff more\n")  # plus one byte that is not UTF-8
    assert main(["finetune", "--method", "ia3", "--text", str(path), "--out", str(out),
                 "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "5 outside the vocabulary" in printed
    assert json.loads((out / "finetune.json").read_text())["unknown_characters"] == 5


@pytest.mark.parametrize("argv, says", [
    (["--task", "sort", "--text", "notes.txt"], "argument --text: not allowed with argument "
                                                "--task"),
    ([], "one of the arguments --task --text is required"),
])
def test_exactly_one_of_task_and_text(argv, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--method", "lora", "--out", str(tmp_path / "a"), *argv])
    assert exc.value.code == 2 and says in capsys.readouterr().err


def test_bad_files_are_named_and_checked_before_any_pretraining(
        tiny_text_base, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(base, "pretrain", no_pretraining)
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("")
    short.write_text("hello there\n")
    cases = [(tmp_path / "missing.txt", "no such file"),
             (empty, "is empty; it needs at least 34 characters"),       # 2 x (16 + 1)
             (short, "holds only 12 characters; it needs at least 34"),
             (tmp_path, "is not a file")]
    for path, says in cases:
        rc = main(["finetune", "--method", "lora", "--text", str(path), "--out",
                   str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and str(path) in err and says in err, err
    rc = main(["finetune", "--method", "lora", "--text", str(short), "--base", "quick",
               "--out", str(tmp_path / "out")])
    assert rc == 2 and "--base quick: applies to --task only" in capsys.readouterr().err
    rc = main(["finetune", "--method", "lorra", "--text", str(short), "--out", "x"])
    assert rc == 2 and "unknown method 'lorra'; choose from full," in capsys.readouterr().err


def test_ascii_tokenizer_encodes_any_text_and_the_base_corpus_fits_it(tmp_path):
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
    corpus = language_text(300, seed=0)
    assert (tok.encode(corpus) != tok.unk_id).all()       # the base's text is all in-vocabulary
    assert all(line[0].isupper() and line.endswith(".") for line in corpus.splitlines())
