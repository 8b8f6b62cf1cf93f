"""Shared test set-up: one suite for every array backend, float64 when gradients are checked.

* ``backend``: every test that takes it runs once per backend this machine has (NumPy always,
  CuPy when a GPU is visible), with ``minipeft.backend`` switched for the test's duration. Tests
  build their arrays through ``bk.asarray`` / ``Tensor(...)``, so on a GPU machine the very same
  assertions prove the CuPy path.
* ``float64``: sets the default dtype to float64 for one test (finite differences need it) and
  puts the old default back afterwards.
* ``interrupt_save``: makes the next save through ``minipeft.io`` fail part-way (with
  ``Interrupted`` or Ctrl-C), for the tests that prove an interrupted save keeps the old file.
* Lessons: ``load_lesson(name)`` imports ``lessons/<name>.py`` by path (lesson names start with a
  digit, so they are not importable modules), ``run_lesson(name, *args)`` calls its ``main``
  and returns what it measured, and the ``lesson_out`` fixture points ``MINIPEFT_LESSON_OUT``
  at the test's temporary folder, so lessons never write into the repository.
* Hypothesis profiles: ``ci`` (the default: few examples, no deadline, so the suite stays fast on
  2 cores) and ``thorough`` (many more examples); pick one with ``HYPOTHESIS_PROFILE=thorough``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from minipeft import backend as bk

# Function-scoped fixtures (backend, float64) set global state that every example of a
# hypothesis test shares on purpose, so that health check is switched off.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                     HealthCheck.too_slow])
settings.register_profile("ci", max_examples=20, **_COMMON)
settings.register_profile("thorough", max_examples=200, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = bk.available()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The name of the active backend; the test body runs with it switched on."""
    with bk.using(request.param):
        yield request.param


@pytest.fixture
def float64():
    """Default dtype float64 inside the test (for tensors built from lists and scalars)."""
    old = bk.default_dtype()
    bk.set_default_dtype(np.float64)
    try:
        yield np.float64
    finally:
        bk.set_default_dtype(old)


@pytest.fixture(autouse=True)
def _restore_backend_state():
    """Whatever a test does, the next one starts with the same backend and default dtype."""
    name, dtype = bk.name, bk.default_dtype()
    yield
    if bk.name != name:
        bk.use(name)
    if bk.default_dtype() is not dtype:
        bk.set_default_dtype(dtype)


class Interrupted(Exception):
    """A simulated power cut or full disk in the middle of a save."""


def leftovers(folder) -> list[str]:
    """Temporary files an interrupted save left behind (``minipeft.io`` promises none)."""
    return sorted(f for f in os.listdir(folder) if f.endswith(".tmp"))


@pytest.fixture
def interrupt_save(monkeypatch):
    """``interrupt_save(where)`` makes the next save through ``minipeft.io`` fail at one point:
    "serialise" (building the bytes), "write" (half the bytes written, then a full disk),
    "fsync" (Ctrl-C while flushing to disk) or "rename" (a power cut before the atomic rename).
    It raises ``Interrupted`` or ``KeyboardInterrupt``; ``monkeypatch.undo()`` ends it."""
    import minipeft.io as io_mod

    real_fdopen = os.fdopen

    class HalfWriter:                                   # writes half the bytes, then fails
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            raise Interrupted("disk full")

    def power_cut(*a, **k):
        raise Interrupted("power cut")

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    points = {
        "serialise": lambda: monkeypatch.setattr(io_mod, "st_save", power_cut),
        "write": lambda: monkeypatch.setattr(io_mod.os, "fdopen",
                                             lambda *a, **k: HalfWriter(real_fdopen(*a, **k))),
        "fsync": lambda: monkeypatch.setattr(io_mod.os, "fsync", ctrl_c),
        "rename": lambda: monkeypatch.setattr(io_mod.os, "replace", power_cut),
    }
    return lambda where: points[where]()


@pytest.fixture(scope="session")
def shared_quick_cache(tmp_path_factory):
    """One clean base-model cache for the whole session (every lesson smoke test, in any
    file): the quick base pretrains once."""
    return tmp_path_factory.mktemp("minipeft_cache")


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


@pytest.fixture
def lesson_out(tmp_path, monkeypatch) -> Path:
    """Lessons save their figures here instead of lessons/out/."""
    monkeypatch.setenv("MINIPEFT_LESSON_OUT", str(tmp_path))
    return tmp_path
