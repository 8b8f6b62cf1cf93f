"""Lesson 15 (gradient checkpointing) in quick mode: what it measured, checked against what a
broken checkpoint would show."""

from pathlib import Path

import pytest
from conftest import load_lesson

pytestmark = pytest.mark.usefixtures("lesson_out")   # the lesson writes into tmp_path


def test_15_checkpointing_quick(lesson_out):
    lesson = load_lesson("15_checkpointing")
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
