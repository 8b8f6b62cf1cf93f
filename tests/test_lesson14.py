"""Smoke test of lesson 14 (LoRA's descendants): ``--quick`` runs every method, and what it
measured is checked, so a broken method fails here:

* step 0 equals the base for every run (difference exactly 0): catches an init that is not a
  no-op (B or b not zero, a gate that starts open, m not the row norms);
* held-out code bits/char fell in every run, by QUICK_GAIN at least, and every trained tensor
  moved: catches a method whose gradients do not reach its tensors (seen: LLaMA-Adapter's
  prompts cut from the graph, which the loss alone missed: the gates still learned; a DoRA
  whose A, B and m are all cut off, where training itself raises);
* every run starts from the base's own held-out bits/char (QLoRA's 4-bit copy within 0.02):
  catches scoring something other than the adapted model;
* merged and unmerged outputs agree for the mergeable methods (unless the merge was refused as
  irreversible in float32, which the lesson reports): catches a wrong merge;
* QLoRA's training step holds less memory than LoRA's: catches a QLoRA whose base was not
  quantised;
* the matched budget: each knob landed within 15% of LoRA's count, or at its largest value the
  layer shapes accept (VeRA, LoKr on this narrow base), checked by asking for one more;
* every verdict word is the one its numbers give, recomputed here from the per-seed values
  with statistics directly (not through minipeft.verdicts).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from conftest import load_lesson

QUICK_GAIN = 0.01       # bits/char every method must gain in the quick run


def word(a, b, floor, less, more):
    """The verdict, from scratch: mean(a) vs mean(b), margin max(floor, sd(a) + sd(b))."""
    m = max(floor, statistics.stdev(a) + statistics.stdev(b))
    gap = statistics.mean(a) - statistics.mean(b)
    return less if gap < -m else more if gap > m else "not distinguishable from"


def test_14_lora_descendants(lesson_out, monkeypatch, shared_quick_cache):
    monkeypatch.setenv("MINIPEFT_CACHE", str(shared_quick_cache))  # clean, shared by the session
    lesson = load_lesson("14_lora_descendants")
    m = lesson.main(["--quick", "--seed", "0"])

    methods = {"lora", "qlora", "dora", "vera", "lokr", "llama_adapter"}
    assert {r["method"] for r in m["records"]} == methods
    for r in m["records"]:
        assert r["step0_max_abs_diff"] == 0.0, r["method"]
        assert abs(r["bits_before"] - m["start_bits"]) < 0.02, r["method"]
        assert r["bits_after"] < r["bits_before"] - QUICK_GAIN, (r["method"], r["bits_after"])
        assert r["unmoved"] == [], (r["method"], r["unmoved"])
        if r["method"] in ("dora", "vera", "lokr", "lora"):
            assert r["mergeable"], r["method"]
            if r["merge_refused"] is None:           # a refused merge left the weights as they were
                assert r["merged_vs_unmerged"] < 1e-3, r["method"]
        else:
            assert not r["mergeable"] and r["merge_ms"] is None, r["method"]

    rows = {r["method"]: r for r in m["rows"]}
    assert rows["qlora"]["memory_mib_mean"] < rows["lora"]["memory_mib_mean"]

    from minipeft.base import load_base

    base, _ = load_base(lesson.BASE, progress=False)
    budget, knobs = m["budget"], lesson.knobs(base.config)
    for method, (_, value, n) in m["chosen"].items():
        assert n <= 1.15 * budget, (method, n, budget)
        if abs(n - budget) > 0.15 * budget:       # short of the budget: the knob is at its end
            assert lesson.trainable_count(base, method, knobs[method][2](value + 1)) is None, \
                (method, value, n, budget)

    lora = rows["lora"]
    for line in m["verdicts"]:
        row = rows[line.split()[0]]
        q = word(row["bits_after"], lora["bits_after"], lesson.QUALITY_FLOOR, "better than",
                 "worse than")
        assert f"{q} LoRA in quality" in line, line
        s = word(row["step_ms"], lora["step_ms"], lesson.TIME_FLOOR * lora["step_ms_mean"],
                 "cheaper than", "costlier than")
        assert f"{s} LoRA per step" in line, line
        mem = word(row["memory_mib"], lora["memory_mib"],
                   lesson.MEMORY_FLOOR * lora["memory_mib_mean"], "cheaper than",
                   "costlier than")
        assert f"{mem} LoRA in memory" in line, line
    assert Path(m["figure"]).is_file()
