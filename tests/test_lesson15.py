"""Lesson 15 (gradient checkpointing) in quick mode: what it measured, checked against what a
broken checkpoint would show."""

import importlib.util
from pathlib import Path

import pytest

LESSON = Path(__file__).resolve().parents[1] / "lessons" / "15_checkpointing.py"


@pytest.fixture(autouse=True)
def lesson_out(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPEFT_LESSON_OUT", str(tmp_path))
    return tmp_path


def test_15_checkpointing_quick(lesson_out):
    spec = importlib.util.spec_from_file_location("lesson_15", LESSON)
    lesson = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lesson)
    m = lesson.main(["--quick"])
    # a recomputation that differs from the forward (or a parameter's gradient dropped) shows
    # here: the gradients must be exactly the plain step's
    assert m["max_grad_diff"] == 0.0
    # GPTConfig.checkpoint ignored (blocks run plainly) would keep every activation: at 4 blocks
    # the kept activations must shrink several times, measured by the allocator, for both methods
    assert m["activation_shrink"]["full"] > 3 and m["activation_shrink"]["lora"] > 3
    # the graph walk's prediction tracks the allocator on the plain path (within 10%)
    for r in m["rows"]:
        pred, meas = r["act_pred"][False], r["act_meas"][False]
        assert abs(pred - meas) <= 0.10 * meas, r
    assert Path(m["figure"]).is_file()
