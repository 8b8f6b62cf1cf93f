"""The verdict rules (minipeft.verdicts) against numbers worked out by hand."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.verdicts import compare_quality, differs, interpolate_at, spread

acc = st.floats(0.0, 1.0, allow_nan=False)
seeds = st.lists(acc, min_size=2, max_size=5)


def test_spread_is_mean_and_sample_sd():
    assert spread([0.2, 0.4, 0.9]) == pytest.approx((0.5, statistics.stdev([0.2, 0.4, 0.9])))
    assert spread([0.3]) == (0.3, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        spread([])


def test_comparable_cases_by_hand():
    # sd of (a, a + 0.02) is 0.02 / sqrt(2) = 0.01414; two of them: noise 0.02828
    c = compare_quality([0.80, 0.82], [0.81, 0.83])       # short 0.01: 0.01 + 0.028 <= 0.05
    assert c["verdict"] == "comparable"
    assert c["shortfall"] == pytest.approx(0.01) and c["noise"] == pytest.approx(0.02828, 1e-3)
    assert compare_quality([0.80, 0.82], [0.83, 0.85])["verdict"] == "undecided"  # 0.058 > .05
    assert compare_quality([0.50, 0.52], [0.83, 0.85])["verdict"] == "not comparable"  # 0.30
    assert compare_quality([0.95, 0.97], [0.50, 0.52])["verdict"] == "comparable"  # ahead
    # a huge spread decides nothing, whatever the means
    assert compare_quality([0.2, 0.9], [0.5, 0.6])["verdict"] == "undecided"
    # one seed measures no noise: never decided
    assert compare_quality([0.9], [0.9])["verdict"] == "undecided"
    with pytest.raises(ValueError, match="accuracies"):
        compare_quality([1.5, 0.2], [0.3, 0.4])


@settings(max_examples=200, deadline=None)
@given(seeds, seeds, st.floats(0.0, 0.3))
def test_comparable_matches_its_definition(peft, full, bump):
    c = compare_quality(peft, full)
    short = statistics.mean(full) - statistics.mean(peft)
    noise = statistics.stdev(peft) + statistics.stdev(full)
    want = ("comparable" if short + noise <= 0.05 else
            "not comparable" if short - noise > 0.05 else "undecided")
    assert c["verdict"] == want
    # raising every PEFT seed by the same amount can only improve the verdict
    order = ["not comparable", "undecided", "comparable"]
    better = compare_quality([min(1.0, p + bump) for p in peft], full)
    if all(p + bump <= 1.0 for p in peft):
        assert order.index(better["verdict"]) >= order.index(c["verdict"])


def test_differs_needs_the_gap_to_beat_the_spread_and_the_floor():
    assert differs([1.0, 1.0], [2.0, 2.0]) == "less"
    assert differs([3.0, 3.0], [2.0, 2.0]) == "more"
    assert differs([1.0, 1.0], [2.0, 2.0], floor=1.5) == "within noise"
    assert differs([0.0, 2.0], [2.0, 2.0]) == "within noise"       # sd 1.41 > gap 1


def test_interpolate_reads_the_path_at_the_level():
    # quality 0 -> 0.4 -> 0.8 while the old task goes 1.0 -> 0.6 -> 0.2: at 0.6, halfway: 0.4
    assert interpolate_at([0.0, 0.4, 0.8], [1.0, 0.6, 0.2], 0.6) == pytest.approx(0.4)
    assert interpolate_at([0.0, 0.4, 0.8], [1.0, 0.6, 0.2], 0.4) == pytest.approx(0.6)
    assert interpolate_at([0.0, 0.4], [1.0, 0.6], 0.5) is None      # never got there
    # the first crossing counts, not a later one after a dip
    assert interpolate_at([0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 5.0, 7.0], 0.5) == pytest.approx(0.5)
    assert interpolate_at([0.7, 0.9], [0.3, 0.1], 0.5) == pytest.approx(0.3)  # there at once
