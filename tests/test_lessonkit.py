"""The lesson plumbing: output folder, figures, fresh copies, interleaved step timing."""

from __future__ import annotations

import numpy as np
import pytest

from minipeft import lessonkit
from minipeft.nn import GPT, GPTConfig

TINY = dict(vocab_size=16, n_embd=8, n_layer=1, n_head=2, block_size=8)


def test_out_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPEFT_LESSON_OUT", str(tmp_path / "figs"))
    assert lessonkit.out_dir() == tmp_path / "figs" and (tmp_path / "figs").is_dir()


def test_save_figure_writes_and_returns_the_path(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    monkeypatch.setenv("MINIPEFT_LESSON_OUT", str(tmp_path))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = lessonkit.save_figure(fig, "x.png")
    assert path == tmp_path / "x.png" and path.stat().st_size > 1000
    assert not plt.get_fignums()                       # closed


def test_fresh_copy_is_independent_of_the_base():
    base = GPT(GPTConfig(**TINY), seed=0)
    copy = lessonkit.fresh_copy(base)
    w0 = base.state_dict()["tok_emb.weight"].copy()
    copy.state_dict()["tok_emb.weight"][...] += 1.0    # training the copy ...
    assert np.array_equal(base.state_dict()["tok_emb.weight"], w0)   # ... leaves the base alone
    other = GPT(GPTConfig(**TINY), seed=1).state_dict()
    assert np.array_equal(lessonkit.fresh_copy(base, other).state_dict()["tok_emb.weight"],
                          other["tok_emb.weight"])


def test_step_ms_times_every_run_and_clears_gradients():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 16, (2, 8))
    models = {"a": GPT(GPTConfig(**TINY), seed=0), "b": GPT(GPTConfig(**TINY), seed=1)}
    ms = lessonkit.step_ms({k: (m, (x, x)) for k, m in models.items()}, reps=2)
    assert set(ms) == {"a", "b"} and all(v > 0 for v in ms.values())
    assert all(p.grad is None for m in models.values() for p in m.parameters())
    with pytest.raises(ValueError, match="reps"):
        lessonkit.step_ms({}, reps=0)


def test_arguments_parse_quick_and_seed():
    args = lessonkit.arguments("Title line.\n\nMore.", seed=3).parse_args(["--quick"])
    assert args.quick and args.seed == 3


def test_step_times_drops_the_warm_up_and_step_ms_is_their_median(monkeypatch):
    # a fake clock: each step lasts the given ms, in round-robin order a, b, a, b, ... (fault
    # caught: the warm-up round kept, runs timed one after the other, or a mean for a median)
    ms = {"a": [100.0, 3.0, 1.0, 8.0], "b": [50.0, 5.0, 9.0, 6.0]}    # round 0 is the warm-up
    reads, t = [], 0.0
    for k in range(4):
        for name in ("a", "b"):
            reads += [t, t + ms[name][k] / 1e3]
            t += ms[name][k] / 1e3 + 1.0
    clock = iter(reads * 2)                                           # step_ms reads it again
    monkeypatch.setattr(lessonkit.time, "perf_counter", lambda: next(clock))
    x = np.random.default_rng(0).integers(0, 16, (2, 8))
    runs = {k: (GPT(GPTConfig(**TINY), seed=i), (x, x)) for i, k in enumerate("ab")}
    got = lessonkit.step_times(runs, reps=3)
    assert got["a"] == pytest.approx([3.0, 1.0, 8.0]) and got["b"] == pytest.approx([5.0, 9.0, 6.0])
    assert lessonkit.step_ms(runs, reps=3) == pytest.approx({"a": 3.0, "b": 6.0})
