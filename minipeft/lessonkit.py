"""The plumbing every lesson shares, so that a lesson's file holds only its story.

A lesson is read top to bottom by a learner; the lines that pick an output folder, parse
``--quick``/``--seed``, copy a base model or read a clock teach nothing about fine-tuning, so
they live here, once:

    args = lessonkit.arguments(__doc__, quick="tiny base, one seed").parse_args(argv)
    clock = lessonkit.Stopwatch()
    model = lessonkit.fresh_copy(base)                   # a new GPT with the base's weights
    ms = lessonkit.step_ms({"full": (m1, batch), "lora": (m2, batch)}, reps=5)
    path = lessonkit.save_figure(fig, "05_lora.png")     # into lessons/out/
    print(f"figure saved to {path}  ({clock.seconds():.0f} s in all)")

Nothing here knows about any PEFT method.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from . import backend as bk
from .nn import GPT
from .optim import AdamW

LESSONS = Path(__file__).resolve().parents[1] / "lessons"


def arguments(doc: str | None, quick: str = "a few seconds: tiny sizes",
              seed: int = 0) -> argparse.ArgumentParser:
    """The parser every lesson starts from: ``--quick`` (with what it shrinks) and ``--seed``.
    The description is the first paragraph of the lesson's docstring. A lesson adds its own
    options to the returned parser."""
    description = (doc or "").strip().split("\n\n")[0]
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--seed", type=int, default=seed, help=f"random seed (default {seed})")
    return parser


def out_dir() -> Path:
    """Where lessons write figures and files: ``$MINIPEFT_LESSON_OUT`` if set (the tests point it
    at a temporary folder), else ``lessons/out/`` (git-ignored). Created if missing."""
    folder = Path(os.environ.get("MINIPEFT_LESSON_OUT") or LESSONS / "out")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_figure(fig, name: str, dpi: int = 100) -> Path:
    """Save a matplotlib figure as ``out_dir() / name``, close it, and return the path."""
    import matplotlib.pyplot as plt

    path = out_dir() / name
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def fresh_copy(base: GPT, state: dict | None = None) -> GPT:
    """A new GPT of ``base``'s config holding ``state`` (default: ``base``'s own weights).
    Every run of a lesson starts from its own copy, so no run sees another run's training."""
    model = GPT(base.config)
    model.load_state_dict(base.state_dict() if state is None else state)
    return model


class Stopwatch:
    """Wall time since construction: ``Stopwatch().seconds()``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def step_ms(runs: dict, reps: int = 5) -> dict:
    """Median milliseconds of one training step (zero_grad, forward, backward, AdamW step) for
    each ``name -> (model, (x, y))``, timed round-robin: rep k of every run, then rep k + 1, so a
    change in machine load hits all runs alike. One warm-up round is dropped. The optimizer's lr is
    tiny, so timing leaves the weights (almost) unchanged; gradients are cleared afterwards.
    ``step_times`` gives every rep, for a spread."""
    return {name: statistics.median(ms) for name, ms in step_times(runs, reps).items()}


def step_times(runs: dict, reps: int = 5) -> dict:
    """``name -> [ms of each timed rep]``: what ``step_ms`` takes the median of (same round-robin
    order, warm-up round dropped), for a lesson that also reports the repeats' spread."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    opts = {name: AdamW(model.trainable_parameters(), lr=1e-12)
            for name, (model, _) in runs.items()}
    times = {name: [] for name in runs}
    for _ in range(reps + 1):
        for name, (model, (x, y)) in runs.items():
            bk.synchronize()
            t = time.perf_counter()
            opts[name].zero_grad()
            model.loss(x, y).backward()
            opts[name].step()
            bk.synchronize()
            times[name].append(time.perf_counter() - t)
    for model, _ in runs.values():
        model.zero_grad()
    return {name: [1e3 * t for t in ts[1:]] for name, ts in times.items()}
