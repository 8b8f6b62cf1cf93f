"""Lesson 13 (quantisation) in quick mode: what it measured, checked against what a broken
quantiser would show."""

from pathlib import Path

import numpy as np
import pytest
from conftest import load_lesson

pytestmark = pytest.mark.usefixtures("lesson_out")   # the lesson writes into tmp_path


def test_13_quantisation_quick(lesson_out):
    lesson = load_lesson("13_quantisation")
    m = lesson.main(["--quick"])
    # the code book is the published one at its ends and its zero (a wrong quantile offset moves
    # every level but these three, so check the inner levels by their spacing in probability)
    levels = np.array(m["nf4_levels"])
    assert levels[0] == -1 and levels[7] == 0 and levels[-1] == 1
    # every matrix reconstructed to within 15% RMS: catches codes or constants mixed up
    # (a wrong block constant or an unpacking that swaps nibbles gives errors near 100%)
    assert max(m["nf4_errors"]) < 0.15 and max(m["int4_errors"]) < 0.2
    # NF4 is closer than int4 on average over the matrices (the code book's point)
    assert np.mean(m["nf4_errors"]) < np.mean(m["int4_errors"])
    # double quantisation saves bits: fewer than 32-bit constants, more than the 4-bit codes
    assert 4 < m["bits_double"] < m["bits_single"] < 32
    # the 4-bit model (QuantLinear, dequantised on the fly) scores like the float base: a
    # broken QuantLinear (transposed or unscaled weights) costs whole bits per character
    assert abs(m["nf4_cost"]) < 0.05
    # QLoRA learned code as LoRA did (a QLoRA whose factors never reach the output would stay
    # at the base's loss; one that trained on a wrongly dequantised base would end far apart)
    ql, lo = np.mean(m["qlora"]), np.mean(m["lora"])
    assert ql < m["code_before"] - 0.2 and lo < m["code_before"] - 0.2
    assert abs(ql - lo) < 0.1
    assert m["frozen_bytes"]["QLoRA"] < m["frozen_bytes"]["LoRA"] / 5
    # the verdicts name the numbers they were chosen from
    assert "of 12 matrices" in m["error_verdict"] or "all 12 matrices" in m["error_verdict"]
    assert 3.8 < m["llama2_7b_nf4_gb"] < 3.9
    assert Path(m["figure"]).is_file()
