"""The value validators: each refuses the wrong kind with TypeError and the wrong range with
ValueError, and its message names the field."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft.checks import (
    check_bool,
    check_choice,
    check_float,
    check_identifier,
    check_int,
    check_int_tuple,
    check_str_tuple,
)


@given(st.integers(-10**6, 10**6))
def test_check_int_accepts_integers_in_range(v):
    assert check_int("x", v) == v
    assert check_int("x", np.int64(v)) == v
    if v < 0:
        with pytest.raises(ValueError, match="x must be >= 0"):
            check_int("x", v, low=0)


@pytest.mark.parametrize("bad", [True, 2.0, "3", None, [1]])
def test_check_int_refuses_other_kinds(bad):
    with pytest.raises(TypeError, match="field"):
        check_int("field", bad)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_float_refuses_non_finite(bad):
    with pytest.raises(ValueError, match="lr must be finite"):
        check_float("lr", bad)


def test_check_float_bounds_open_and_closed():
    assert check_float("lr", 0.0, low=0.0) == 0.0
    with pytest.raises(ValueError, match="lr must be > 0"):
        check_float("lr", 0.0, low=0.0, low_open=True)
    with pytest.raises(ValueError, match="p must be < 1"):
        check_float("p", 1.0, high=1.0, high_open=True)
    with pytest.raises(TypeError, match="alpha"):
        check_float("alpha", "16")
    with pytest.raises(TypeError, match="alpha"):
        check_float("alpha", False)


def test_check_bool_and_choice():
    assert check_bool("b", False) is False
    with pytest.raises(TypeError, match="b must be True or False"):
        check_bool("b", "no")
    assert check_choice("bias", "none", ("none", "all")) == "none"
    with pytest.raises(ValueError, match="bias must be one of"):
        check_choice("bias", "no", ("none", "all"))


@pytest.mark.parametrize("bad, err", [
    (1, TypeError), ("01", TypeError), ([[0]], TypeError), (["0", "1"], TypeError),
    ([0.9, 1.2], TypeError), ((1.7,), TypeError), ([0, 0], ValueError), ([0, 9], ValueError),
])
def test_check_int_tuple_refuses(bad, err):
    with pytest.raises(err, match="layers"):
        check_int_tuple("layers", bad, low=0, high=3)


def test_check_int_tuple_and_str_tuple_accept():
    assert check_int_tuple("layers", [0, 3], low=0, high=3) == (0, 3)
    assert check_str_tuple("targets", ["q_proj", "v_proj"]) == ("q_proj", "v_proj")
    with pytest.raises(TypeError, match="targets"):
        check_str_tuple("targets", "q_proj")
    with pytest.raises(TypeError, match=r"targets\[1\]"):
        check_str_tuple("targets", ["q_proj", 3])


@pytest.mark.parametrize("bad", ["", "1a", "a-b", "class", "_x", "training", "ü", 3, None])
def test_check_identifier_refuses(bad):
    with pytest.raises((TypeError, ValueError), match="name"):
        check_identifier("name", bad, reserved={"training"})
    assert check_identifier("name", "task_b", reserved={"training"}) == "task_b"
