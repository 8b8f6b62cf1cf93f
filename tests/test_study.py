"""The study and the tour: the report's numbers are the run's measurements, and the tour writes
a complete report folder."""

from __future__ import annotations

import csv

import pytest

from minipeft.data import TaskMixture
from minipeft.train import evaluate_lm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tour_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MINIPEFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    from minipeft.tour import tour

    out = tmp_path_factory.mktemp("tour")
    lines = []
    result = tour(out_dir=out, quick=True, seed=0, log=lines.append)
    yield out, result, lines
    mp.undo()


def test_tour_writes_every_output(tour_run):
    out, result, lines = tour_run
    for name in ("table.md", "results.csv", "report.html", "learned_vs_forgotten.png",
                 "memory.png", "step_time.png", "trainable_percent.png", "learning_curves.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6   # 5 synthetic + the real-text paths
    methods = [r.method for r in result["records"]]
    for m in methods:
        assert m in page and m in (out / "table.md").read_text()
    assert any("tour finished" in line for line in lines)


def test_csv_holds_the_measured_records(tour_run):
    out, result, _ = tour_run
    rows = list(csv.DictReader(open(out / "results.csv")))
    records = result["records"]
    assert [r["method"] for r in rows] == [r.method for r in records]
    for row, rec in zip(rows, records):
        # the memory column is the memory module's measurement, unchanged
        assert float(row["peak step MB"]) == pytest.approx(
            rec.memory["measured"]["peak_step"] / 2**20)
        # forgetting is before minus after, on the held-out set
        assert float(row["forgetting (pts)"]) == pytest.approx(
            100 * (rec.a_em_before - rec.a_em_after))
        assert float(row["trainable"]) == rec.trainable
        assert float(row["task B EM"]) == pytest.approx(100 * rec.b_em)


def test_task_a_before_is_the_base_on_held_out_examples(tour_run):
    """An independent evaluation of the cached base gives the study's 'before' number."""
    from minipeft.base import load_base

    _, result, _ = tour_run
    base, info = load_base("quick", progress=False)
    mix = TaskMixture(info["tasks"], seed=0, length=info["length"])
    ems = [evaluate_lm(base, *mix.eval_set(t, 64))["exact_match"] for t in info["tasks"]]
    expected = sum(ems) / len(ems)
    for rec in result["records"]:
        assert rec.a_em_before == pytest.approx(expected)
        # the held-out task-A set never appears in training: the eval split is disjoint
        assert rec.curve[0]["a_em"] == rec.a_em_before


def test_records_are_internally_consistent(tour_run):
    _, result, _ = tour_run
    for rec in result["records"]:
        assert rec.a_em_after == rec.curve[-1]["a_em"]
        assert rec.b_em == rec.curve[-1]["b_em"]
        assert 0 < rec.trainable <= rec.total
        assert rec.adapter_bytes > 0 and rec.step_ms > 0 and rec.gen_ms_per_token > 0
        if rec.method == "full":
            assert rec.trainable == rec.total
        # forgetting at matched quality, recomputed here by a second route: walk the path to
        # the first evaluation at or above the level and interpolate from the one before it
        level, pts = rec.match_tok, rec.curve
        hit = next((i for i, p in enumerate(pts) if p["b_tok"] >= level), None)
        if hit is None:
            assert rec.a_em_at_match is None
        elif hit == 0:
            assert rec.a_em_at_match == pts[0]["a_em"]
        else:
            p, q = pts[hit - 1], pts[hit]
            w = (level - p["b_tok"]) / (q["b_tok"] - p["b_tok"])
            assert rec.a_em_at_match == pytest.approx(p["a_em"] + w * (q["a_em"] - p["a_em"]))
            assert p["step"] <= rec.step_at_match <= q["step"]
        # every evaluation scored task B and each old task
        assert all(set(p["tasks"]) == set(rec.tasks_before) for p in rec.curve)


def test_rehearsal_mixes_the_asked_fraction_of_old_rows():
    """Counted from the rows' first token (the task marker), not from the sampler's own draw."""
    from minipeft.data import STOI
    from minipeft.experiment import rehearsal_sampler

    mix_b = TaskMixture(["shift"], seed=1, length=4)
    mix_a = TaskMixture(["copy", "reverse"], seed=2, length=4)
    for fraction in (0.0, 0.1, 0.5):
        sample = rehearsal_sampler(mix_b, mix_a, fraction, seed=0)
        xs = [sample(64)[0] for _ in range(40)]
        assert all(x.shape[0] == 64 for x in xs)
        old = sum(int((x[:, 0] != STOI["<shift>"]).sum()) for x in xs) / (64 * 40)
        assert abs(old - fraction) < 0.03, (fraction, old)


def test_copy_outputs_agree_with_the_token_accuracy(tmp_path_factory, monkeypatch):
    """On <copy> rows, 'copied' is the copy task's answer-token accuracy scored by the separate
    scoring path."""
    from minipeft.base import load_base

    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    from minipeft.experiment import copy_outputs, score

    base, info = load_base("quick", progress=False)
    x, y = TaskMixture(["copy"], seed=0, length=info["length"]).eval_set("copy", 64)
    c = copy_outputs(base, x, y, "shift")
    assert c["copied"] == pytest.approx(score(base, x, y)["token_acc"])
    assert c["copied"] + c["shifted"] + c["other"] == pytest.approx(1.0)


def test_unknown_method_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path))
    from minipeft.experiment import StudyConfig, run_study

    with pytest.raises(ValueError, match="unknown methods"):
        run_study(StudyConfig(base="quick", methods=("nope",)))


def test_finetune_scores_the_task_as_its_base_was_pretrained(tour_run, tmp_path_factory,
                                                              tmp_path, monkeypatch, capsys):
    """`minipeft finetune --base quick --task copy` must build examples of the quick base's own
    length: its printed step-0 score equals the plain base scored independently."""
    from minipeft.base import load_base
    from minipeft.cli import main

    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    base, info = load_base("quick", progress=False)
    x, y = TaskMixture(["copy"], seed=0, length=info["length"]).eval_set("copy", 300)
    expected = evaluate_lm(base, x, y)["exact_match"]
    assert expected > 0.5                                   # the base knows copy
    main(["finetune", "--method", "lora", "--task", "copy", "--base", "quick", "--steps", "1",
          "--out", str(tmp_path / "ad")])
    assert f"copy: exact match {expected:.1%} ->" in capsys.readouterr().out
