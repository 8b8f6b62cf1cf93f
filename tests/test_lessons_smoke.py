"""Each lesson runs with ``--quick`` and what it measured is checked, not just that it ran.

A lesson's ``main(argv)`` returns a dict of its measurements. ``run_lesson("01_autograd",
"--quick")`` loads ``lessons/01_autograd.py`` by path (lesson names start with a digit, so they are
not importable modules) and calls it. Figures go to a temporary folder through
``MINIPEFT_LESSON_OUT``, so tests never write into the repository.

To add a lesson: one test that calls ``run_lesson`` and asserts on the returned numbers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

LESSONS = Path(__file__).resolve().parents[1] / "lessons"


def load_lesson(name: str):
    """Import ``lessons/<name>.py`` as a fresh module."""
    path = LESSONS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"lesson_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_lesson(name: str, *args: str) -> dict:
    """Run a lesson's ``main`` with command-line ``args``; returns what it measured."""
    return load_lesson(name).main(list(args))


@pytest.fixture(autouse=True)
def lesson_out(tmp_path, monkeypatch) -> Path:
    """Lessons save their figures here instead of lessons/out/."""
    monkeypatch.setenv("MINIPEFT_LESSON_OUT", str(tmp_path))
    return tmp_path


def test_01_autograd(lesson_out):
    m = run_lesson("01_autograd", "--quick", "--seed", "0")
    # (a) the scalar graph's gradients equal the hand-derived chain rule
    assert m["scalar_max_abs_diff"] < 1e-12
    # (b) softmax + cross-entropy: (p - onehot)/N by hand == library == finite differences
    ce = m["softmax_ce"]
    assert ce["loss_diff"] < 1e-12 and ce["hand_vs_library"] < 1e-12
    assert ce["gradcheck_ok"] and ce["gradcheck_abs"] < 1e-7
    # (c) every op's backward agrees with finite differences
    ops = m["ops"]
    for required in ("add", "matmul", "getitem", "cross_entropy", "layer_norm", "embedding",
                     "attention", "dropout", "linear"):
        assert required in ops
    bad = {k: v["max_abs_err"] for k, v in ops.items() if not v["ok"] or v["max_abs_err"] > 1e-6}
    assert not bad, f"ops whose gradient disagrees with finite differences: {bad}"
    # (d) the step the library uses sits in the accurate part of the error curve
    assert min(m["eps_sweep"].values()) < 1e-8
    fig = Path(m["figure"])
    assert fig.parent == lesson_out and fig.is_file() and fig.stat().st_size > 10_000
