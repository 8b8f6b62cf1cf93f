"""Smoke test of lesson 14 (LoRA's descendants): ``--quick`` runs every method, and what it
measured is checked, so a broken method fails here:

* step 0 equals the base for every run (difference exactly 0): catches an init that is not a
  no-op (B or b not zero, a gate that starts open, m not the row norms);
* the task-B loss fell (by 3% at least, in 25 steps) in every run: catches a method whose
  gradients do not reach its tensors;
* merged and unmerged outputs agree for the mergeable methods: catches a wrong merge;
* the matched budget: each knob landed within 15% of LoRA's count (VeRA below it, by design);
* every verdict word is the one its numbers give (recomputed here from the rows).
"""

from __future__ import annotations

from pathlib import Path

from conftest import load_lesson


def test_14_lora_descendants(lesson_out, monkeypatch, shared_quick_cache):
    monkeypatch.setenv("MINIPEFT_CACHE", str(shared_quick_cache))  # clean, shared by the session
    lesson = load_lesson("14_lora_descendants")
    m = lesson.main(["--quick", "--seed", "0"])

    methods = {"lora", "qlora", "dora", "vera", "lokr", "llama_adapter"}
    assert {r["method"] for r in m["records"]} == methods
    for r in m["records"]:
        assert r["step0_max_abs_diff"] == 0.0, r["method"]
        assert r["loss_after"] < 0.97 * r["loss_before"], r["method"]
        if r["method"] in ("dora", "vera", "lokr", "lora"):
            assert r["merged_vs_unmerged"] < 1e-3, r["method"]
        else:
            assert r["merge_ms"] is None, r["method"]
    budget = m["budget"]
    for method, (_, _, n) in m["chosen"].items():
        if method == "vera":
            assert n < budget
        else:
            assert abs(n - budget) <= 0.15 * budget, (method, n, budget)

    rows = {r["method"]: r for r in m["rows"]}
    lora = rows["lora"]
    for line in m["verdicts"]:
        row = rows[line.split()[0]]
        diff = row["em"] - lora["em"]
        margin = max(lesson.MIN_MARGIN, row["em_spread"], lora["em_spread"])
        word = "better than" if diff > margin else "worse than" if diff < -margin \
            else "not distinguishable from"
        assert f"{word} LoRA on task B" in line, line
        ratio = row["step_ms"] / lora["step_ms"]
        slack = max(0.10, (row["step_spread"] + lora["step_spread"]) / lora["step_ms"])
        word = "slower than" if ratio > 1 + slack else "faster than" if ratio < 1 - slack \
            else "not distinguishable from"
        assert f"{word} LoRA per step" in line, line
    assert Path(m["figure"]).is_file()
