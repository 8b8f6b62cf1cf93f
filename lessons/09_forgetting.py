"""Lesson 09: catastrophic forgetting. Does PEFT forget less than full fine-tuning?

The claim (SEED-NOTES row 3): "because few parameters change, PEFT is less prone to catastrophic
forgetting than full fine-tuning."

The experiment. Our base model was pretrained on the old tasks (copy, reverse, cipher, count).
We fine-tune it on a new task, shift (each letter moved 3 places), from the same base, for the
same number of tokens, and score every old task on held-out examples *with the adapter active*
(switch a LoRA, adapter or prompt off and the base is back bit for bit; the question is what the
adapted model still knows).

    forgetting = EM_old(before) - EM_old(after)     (points of exact match, mean over old tasks)

A fair comparison has to remove what would make it measure its own design instead of PEFT
(``minipeft.experiment`` explains each):
  * the new marker ``<shift>`` was never an input in pretraining; a method that cannot move
    its embedding cannot condition on it and learns "shift everything". Its embedding row
    trains with every method (``trainable_token_indices``); part (c) shows it frozen once;
  * with no old-task row in the data nothing says old inputs keep their answers: part (b)
    mixes in 10% of old-task rows (rehearsal);
  * a method that learns little may forget little: forgetting is read where each run's path
    crosses MATCH_TOK of task-B answer tokens, interpolated between evaluations;
  * one learning rate or one seed is an anecdote: each method runs at three learning rates
    and three seeds; a method is judged at its own most favourable learning rate, and a
    difference counts only when it beats max(MARGIN, the seeds' spread).

Which methods: the lr x seed grid is run here for full fine-tuning and LoRA (r = 8 on q, v), to
fit the lesson's time. ``--sweep FILE`` runs the same grid for every method of the study and
writes one CSV row per run; ``09_sweep.csv`` beside this file is such a recorded sweep, printed
at the end, labelled as recorded, when it exists.

The parts, in the order they run:
    (a) the lr x seed grid for full fine-tuning and LoRA; each method's most favourable lr;
    (b, c) each method at that lr again with 10% rehearsal and (LoRA) with the marker row
        frozen: the closing table, and what the models answer on <copy> rows;
    the verdicts, each chosen by the printed numbers against max(MARGIN, the seeds' spread);
    (d) the recorded sweep of every method, when 09_sweep.csv exists (``--sweep`` makes it).

Run:  python lessons/09_forgetting.py [--quick] [--seed N] [--sweep FILE]
"""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
from pathlib import Path

from minipeft import lessonkit
from minipeft.experiment import StudyConfig, method_specs, run_study
from minipeft.verdicts import differs, spread

GRID_METHODS = ("full", "lora_r8_qv")   # the lr x seed grid run in the lesson
LR_MULTS = (0.3, 1.0, 3.0)              # times each method's default lr (experiment.method_specs)
QUICK_LR_MULTS = (1.0, 3.0)             # --quick: two lrs, to stay fast
SEEDS, QUICK_SEEDS = (0, 1, 2), (0, 1)
STEPS, QUICK_STEPS = 200, 60
EVAL_EVERY, QUICK_EVAL_EVERY = 10, 10   # evaluations along the path
EVAL_EXAMPLES, QUICK_EVAL = 200, 64
MATCH_TOK = 0.5         # task-B answer-token accuracy at which forgetting is compared
MARGIN = 5.0            # points: smaller differences are never called "less" or "more"
REHEARSAL = 0.1         # part (b): this fraction of training rows comes from the old tasks
TASK_B = "shift"
RECORDED = Path(__file__).resolve().parent / "09_sweep.csv"
FIGURE = "09_forgetting.png"


# --------------------------------------------------------------------------- reading runs
def pts(v):
    return None if v is None else 100 * v


def cell(values, width: int = 13) -> str:
    """'mean ± sd' of the values that exist, with how many exist when some are missing."""
    have = [v for v in values if v is not None]
    if not have:
        return f"{'-':>{width}}"
    m, s = spread(have)
    text = f"{m:.1f} ± {s:.1f}" + ("" if len(have) == len(values) else f" ({len(have)}/"
                                                                        f"{len(values)})")
    return f"{text:>{width}}"


def groups(records) -> dict:
    """(method, lr, rehearsal, marker) -> the runs of each seed."""
    out = {}
    for r in records:
        out.setdefault((r.method, r.lr, r.rehearsal, r.train_marker), []).append(r)
    return out


def label(method: str, rehearsal: float, marker: bool) -> str:
    return (f"{method}, rehearsal {rehearsal:.0%}"
            + ("" if marker else ", marker frozen"))


# --------------------------------------------------------------------------- (a) the grid
def choose_lr(records, method: str) -> float:
    """A method's most favourable lr: among those at which every seed reached MATCH_TOK, the
    lowest mean forgetting at matched quality; if none, the best final task-B token accuracy."""
    by = {k[1]: v for k, v in groups(records).items() if k[0] == method}
    reached = {lr: rs for lr, rs in by.items() if all(r.a_em_at_match is not None for r in rs)}
    if reached:
        return min(reached, key=lambda lr: statistics.mean(r.forgetting_at_match
                                                           for r in reached[lr]))
    return max(by, key=lambda lr: statistics.mean(r.b_tok for r in by[lr]))


def print_grid(records) -> None:
    print(f"\n(a) The lr x seed grid, no rehearsal, marker row trainable: task-B answer tokens "
          f"at the end, and old-task\n    exact match lost at matched quality ({MATCH_TOK:.0%} "
          "of task-B answer tokens; mean ± sd over seeds, (n/N) = seeds that got there)\n")
    print(f"    {'method':<12} {'lr':>7} {'task B tokens':>14} {'task B EM':>13} "
          f"{'forgot at end':>14} {'forgot @ match':>16}")
    for (m, lr, _, _), rs in groups(records).items():
        print(f"    {m:<12} {lr:>7.0e} {cell([pts(r.b_tok) for r in rs], 14)} "
              f"{cell([pts(r.b_em) for r in rs])} {cell([pts(r.forgetting) for r in rs], 14)} "
              f"{cell([pts(r.forgetting_at_match) for r in rs], 16)}")


def lr_grid(study: StudyConfig) -> tuple[list, dict]:
    """(a) Every method of GRID_METHODS at each lr and seed, from the same base: task-B tokens
    learnt, and old-task exact match lost at the end and at matched quality. Returns the runs
    and each method's most favourable lr (``choose_lr``)."""
    grid = run_study(study)
    print_grid(grid)
    best = {m: choose_lr(grid, m) for m in GRID_METHODS}
    print("\n    each method's most favourable lr: "
          + ", ".join(f"{m} {lr:.0e}" for m, lr in best.items()))
    return grid, best


# --------------------------------------------------------------------------- (b, c) conditions
def summary_rows(conditions: dict) -> list[dict]:
    """One row per (label -> runs of each seed): the numbers of the closing table."""
    rows = []
    for label, rs in conditions.items():
        old_loss = [statistics.mean(v["loss"] for t, v in r.tasks_after.items() if t != TASK_B)
                    for r in rs]
        rows.append({"label": label, "method": rs[0].method, "lr": rs[0].lr,
                     "rehearsal": rs[0].rehearsal, "marker": rs[0].train_marker,
                     "b_em": [pts(r.b_em) for r in rs], "b_tok": [pts(r.b_tok) for r in rs],
                     "old_loss": old_loss, "old_tok": [pts(r.a_tok_after) for r in rs],
                     "old_em": [pts(r.a_em_after) for r in rs],
                     "forgot": [pts(r.forgetting) for r in rs],
                     "at_match": [pts(r.forgetting_at_match) for r in rs],
                     "copy": {k: statistics.mean(r.copy_outputs[k] for r in rs)
                              for k in ("copied", "shifted", "other")}
                     if rs[0].copy_outputs else None})
    return rows


def print_summary(rows, before) -> None:
    print(f"\n    {'condition':<40} {'lr':>7} {'B EM':>13} {'B tokens':>13} {'old loss':>9} "
          f"{'old tokens':>13} {'old EM':>13} {'forgot @ end':>13} {'forgot @ match':>16}")
    print(f"    {'base (adapter off)':<40} {'-':>7} {pts(before['b_em']):>13.1f} "
          f"{pts(before['b_tok']):>13.1f} {before['old_loss']:>9.3f} "
          f"{pts(before['old_tok']):>13.1f} {pts(before['old_em']):>13.1f}")
    for r in rows:
        print(f"    {r['label']:<40} {r['lr']:>7.0e} {cell(r['b_em'])} {cell(r['b_tok'])} "
              f"{statistics.mean(r['old_loss']):>9.3f} {cell(r['old_tok'])} {cell(r['old_em'])}"
              f" {cell(r['forgot'])} {cell(r['at_match'], 16)}")


def print_copy(rows, before) -> None:
    print("\n    On held-out <copy> rows the model now outputs (share of answer tokens; mean "
          "over seeds):\n")
    print(f"    {'condition':<40} {'copied':>8} {'shifted':>8} {'other':>8}")
    c = before["copy"]
    print(f"    {'base (adapter off)':<40} {c['copied']:>8.1%} {c['shifted']:>8.1%} "
          f"{c['other']:>8.1%}")
    for r in rows:
        if r["copy"]:
            c = r["copy"]
            print(f"    {r['label']:<40} {c['copied']:>8.1%} {c['shifted']:>8.1%} "
                  f"{c['other']:>8.1%}")


def conditions_at_best_lr(study: StudyConfig, grid: list, best: dict) -> dict:
    """(b) rehearsal and (c) the marker row frozen, each method at its most favourable lr,
    beside the grid's run at that lr: the closing table, and what <copy> rows now get."""
    records = list(grid)
    for m, lr in best.items():
        one = dataclasses.replace(study, methods=(m,), lr_mults=(lr / method_specs()[m].lr,))
        records += run_study(dataclasses.replace(one, rehearsal=REHEARSAL), log=lambda s: None)
        if m != "full":              # full fine-tuning trains the marker row anyway
            records += run_study(dataclasses.replace(one, train_marker=False),
                                 log=lambda s: None)
    conditions = {}
    for (m, lr, reh, marker), rs in groups(records).items():
        if math.isclose(lr, best[m], rel_tol=1e-9):   # lr0 * (lr / lr0) may differ by an ulp
            conditions[label(m, reh, marker)] = rs
    rows = summary_rows(conditions)
    first = grid[0]
    before = {"b_em": first.curve[0]["b_em"], "b_tok": first.curve[0]["b_tok"],
              "old_loss": first.a_loss_before, "old_tok": first.a_tok_before,
              "old_em": first.a_em_before, "copy": first.copy_outputs_before}
    print(f"\n(b, c) Each method at its most favourable lr: no rehearsal, {REHEARSAL:.0%} "
          "rehearsal, and the marker row frozen\n    (points; mean ± sd over seeds; old = "
          "mean over the old tasks; forgot @ match: read where task-B tokens crossed "
          f"{MATCH_TOK:.0%})")
    print_summary(rows, before)
    if before["copy"]:
        print_copy(rows, before)
    return {"records": records, "conditions": conditions, "rows": rows, "before": before}


# --------------------------------------------------------------------------- verdicts
def compare(peft_row, full_row, key: str) -> tuple[str, str]:
    """(verdict word, numbers) for one PEFT row against full FT on forgetting ``key``."""
    p, f = peft_row[key], full_row[key]
    if any(v is None for v in p + f):
        return "not comparable", (f"not every seed reached {MATCH_TOK:.0%} of task-B tokens "
                                  f"({sum(v is not None for v in p)}/{len(p)} and "
                                  f"{sum(v is not None for v in f)}/{len(f)})")
    d = differs(p, f, floor=MARGIN)
    (mp, sp), (mf, sf) = spread(p), spread(f)
    return d, (f"{mp:.1f} ± {sp:.1f} vs full FT {mf:.1f} ± {sf:.1f} points (margin "
               f"{max(MARGIN, sp + sf):.1f})")


def verdicts(rows) -> list[str]:
    """The claim, per PEFT method and rehearsal, against full fine-tuning: at matched quality
    and at the end; then what rehearsal and a frozen marker changed; then the overall line."""
    by = {r["label"]: r for r in rows}
    lines, held = [], {}
    words = {"less": "forgot clearly less than full fine-tuning",
             "more": "forgot clearly MORE than full fine-tuning",
             "within noise": "forgot as much as full fine-tuning, within the margin",
             "not comparable": "cannot be compared with full fine-tuning"}
    for reh in (0.0, REHEARSAL):
        full = by.get(label("full", reh, True))
        peft = [r for r in rows if r["method"] != "full" and r["rehearsal"] == reh
                and r["marker"]]
        if not full or not peft:
            continue
        for r in peft:
            d, nums = compare(r, full, "at_match")
            held[(r["method"], reh)] = d
            lines.append(f"  {r['method']}, rehearsal {reh:.0%}, at matched quality: "
                         f"{words[d]}: {nums}.")
            d_end, nums_end = compare(r, full, "forgot")
            learned = min(r["b_tok"]) >= 100 * MATCH_TOK and min(full["b_tok"]) >= 100 * MATCH_TOK
            lines.append(f"    at the end of training: {words[d_end]}: {nums_end}"
                         + ("" if learned else f" (careful: not every run reached "
                            f"{MATCH_TOK:.0%} of task-B tokens by the end, so the end compares "
                            "unequal learning)") + ".")
    for m in dict.fromkeys(r["method"] for r in rows):
        a, b = by.get(label(m, 0.0, True)), by.get(label(m, REHEARSAL, True))
        if a and b and None not in a["forgot"] + b["forgot"]:
            d = differs(b["forgot"], a["forgot"], floor=MARGIN)
            lines.append(f"  Rehearsal ({REHEARSAL:.0%} old rows), {m}: forgetting at the end "
                         f"{spread(b['forgot'])[0]:.1f} vs {spread(a['forgot'])[0]:.1f} points "
                         f"without: {'less' if d == 'less' else 'more' if d == 'more' else 'no clear change'}"  # noqa: E501
                         f" (margin {max(MARGIN, spread(a['forgot'])[1] + spread(b['forgot'])[1]):.1f}).")  # noqa: E501
    frozen = [r for r in rows if not r["marker"]]
    for r in frozen:
        on = by.get(label(r["method"], r["rehearsal"], True))
        if on and r["copy"] and on["copy"]:
            d = differs(r["forgot"], on["forgot"], floor=MARGIN)
            lines.append(f"  Marker row frozen, {r['method']}: <copy> answers shifted "
                         f"{r['copy']['shifted']:.0%} vs {on['copy']['shifted']:.0%} with it "
                         f"trainable; forgetting at the end {spread(r['forgot'])[0]:.1f} vs "
                         f"{spread(on['forgot'])[0]:.1f} points: "
                         + {"more": "freezing the marker made it forget clearly more",
                            "less": "freezing the marker made it forget clearly less",
                            "within noise": "no clear difference"}[d] + ".")
    judged = {k: v for k, v in held.items() if v != "not comparable"}
    if not judged:
        lines.append("The claim could not be tested: no PEFT method and full fine-tuning both "
                     f"reached {MATCH_TOK:.0%} of task-B tokens in every seed.")
    else:
        less = [f"{m} (rehearsal {r:.0%})" for (m, r), v in judged.items() if v == "less"]
        more = [f"{m} (rehearsal {r:.0%})" for (m, r), v in judged.items() if v == "more"]
        if less and not more:
            verdict = "The claim held here"
        elif more and not less:
            verdict = "The claim did NOT hold here: PEFT forgot more"
        elif not less and not more:
            verdict = "The claim did NOT hold here: no difference beyond the margin"
        else:
            verdict = "Mixed here"
        lines.append(f"{verdict}, at matched task-B quality with the adapter active: forgot "
                     f"clearly less: {', '.join(less) or 'none'}; clearly more: "
                     f"{', '.join(more) or 'none'}; of {len(judged)} comparisons.")
    return lines


def judge(conditions: dict, rows: list, best: dict, quick: bool) -> dict:
    """Can this run answer the question (every seed of full FT and of a PEFT method reached
    MATCH_TOK)? Then print the verdict lines."""
    reached = {m: all(r.a_em_at_match is not None for r in conditions[label(m, 0.0, True)])
               for m in best}
    print()
    if not reached.get("full") or not any(v for m, v in reached.items() if m != "full"):
        print(f"This run cannot answer the question: full fine-tuning and at least one PEFT "
              f"method must reach {MATCH_TOK:.0%} of task-B tokens in every seed (reached: "
              + ", ".join(f"{m} {'yes' if v else 'no'}" for m, v in reached.items())
              + ")." + (" Quick mode is too short; run without --quick." if quick else ""))
    text = "\n".join(verdicts(rows))
    print(text)
    return {"reached": reached, "verdict": text}


# --------------------------------------------------------------------------- (d) the sweep
SWEEP_FIELDS = ("method", "lr", "seed", "rehearsal", "train_marker", "b_em", "b_tok",
                "a_em_before", "a_em_after", "a_tok_after", "forgetting", "forgetting_at_match")


def write_sweep(records, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SWEEP_FIELDS)
        for r in records:
            w.writerow([getattr(r, k) for k in SWEEP_FIELDS])


def sweep_every_method(study: StudyConfig, path: Path) -> list:
    """``--sweep``: the grid for every method of the study, without and with rehearsal, one CSV
    row per run (this is how 09_sweep.csv was made)."""
    every = tuple(method_specs())
    records = []
    for reh in (0.0, REHEARSAL):
        records += run_study(dataclasses.replace(study, methods=every, rehearsal=reh))
    write_sweep(records, path)
    print(f"wrote {path}")
    return records


def print_recorded(path: Path) -> None:
    """The recorded sweep, per method at its most favourable lr (labelled: not run now)."""
    rows = list(csv.DictReader(open(path)))
    if not rows:
        return
    print(f"\n(d) RECORDED, not measured in this run: {path.name} ({len(rows)} runs; "
          "reproduce with --sweep). Per method and rehearsal, the lr with the least forgetting "
          "at matched quality:\n")
    print(f"    {'method':<12} {'rehearsal':>9} {'lr':>7} {'B tokens':>13} {'forgot @ match':>16}")
    num = lambda v: None if v in ("", "None") else float(v)  # noqa: E731
    keys = dict.fromkeys((r["method"], r["rehearsal"]) for r in rows if r["train_marker"] == "True")
    for m, reh in keys:
        by = {}
        for r in rows:
            if (r["method"], r["rehearsal"], r["train_marker"]) == (m, reh, "True"):
                by.setdefault(r["lr"], []).append(r)
        best = min(by, key=lambda lr: (any(num(r["forgetting_at_match"]) is None
                                           for r in by[lr]),
                                       statistics.mean(num(r["forgetting_at_match"]) or 0
                                                       for r in by[lr])))
        rs = by[best]
        print(f"    {m:<12} {float(reh):>9.0%} {float(best):>7.0e} "
              f"{cell([100 * float(r['b_tok']) for r in rs])} "
              f"{cell([pts(num(r['forgetting_at_match'])) for r in rs], 16)}")


# --------------------------------------------------------------------------- the figure
def figure(conditions: dict, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    colours = {m: c for m, c in zip(dict.fromkeys(r["method"] for r in rows),
                                    ("tab:blue", "tab:red", "tab:green", "tab:purple"))}
    for name, rs in conditions.items():
        style = "-" if rs[0].rehearsal == 0 else "--"
        style = ":" if not rs[0].train_marker else style
        for i, r in enumerate(rs):
            ax.plot([100 * p["b_tok"] for p in r.curve], [100 * p["a_em"] for p in r.curve],
                    style, color=colours[r.method], alpha=0.6, lw=1,
                    label=name if i == 0 else None)
    ax.axvline(100 * MATCH_TOK, color="k", lw=0.5)
    ax.set_xlabel("task-B answer tokens right (%)")
    ax.set_ylabel("old tasks: exact match kept (%)")
    ax.set_title("Each run's path (solid: no rehearsal, dashed: 10%, dotted: marker frozen)")
    ax.legend(fontsize=7)
    ax = axes[1]
    names = [r["label"] for r in rows]
    means = [spread([v for v in r["at_match"] if v is not None])[0]
             if any(v is not None for v in r["at_match"]) else 0 for r in rows]
    sds = [spread([v for v in r["at_match"] if v is not None])[1]
           if any(v is not None for v in r["at_match"]) else 0 for r in rows]
    ax.barh(names, means, xerr=sds, color=[colours[r["method"]] for r in rows], capsize=3)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel(f"old-task exact match lost at {MATCH_TOK:.0%} task-B tokens (points)")
    ax.set_title("Forgetting at matched quality (mean ± sd over seeds)")
    return fig


def main(argv=None) -> dict:
    ap = lessonkit.arguments(__doc__, quick="tiny base, 2 seeds, fewer steps")
    ap.add_argument("--sweep", type=Path, default=None,
                    help="run the lr x seed x rehearsal grid for EVERY method and write a CSV")
    args = ap.parse_args(argv)
    seeds = tuple(args.seed + s for s in (QUICK_SEEDS if args.quick else SEEDS))
    study = StudyConfig(base="quick" if args.quick else "default", task_b=TASK_B,
                        methods=GRID_METHODS, seeds=seeds,
                        lr_mults=QUICK_LR_MULTS if args.quick else LR_MULTS,
                        steps=QUICK_STEPS if args.quick else STEPS,
                        eval_every=QUICK_EVAL_EVERY if args.quick else EVAL_EVERY,
                        eval_examples=QUICK_EVAL if args.quick else EVAL_EXAMPLES,
                        match_tok=MATCH_TOK, batch_size=32 if args.quick else 64,
                        measure_costs=False, progress=False)
    if args.sweep:
        return {"records": sweep_every_method(study, args.sweep)}
    grid, best = lr_grid(study)
    bc = conditions_at_best_lr(study, grid, best)
    found = judge(bc["conditions"], bc["rows"], best, args.quick)
    if RECORDED.is_file():
        print_recorded(RECORDED)
    path = lessonkit.save_figure(figure(bc["conditions"], bc["rows"]), FIGURE, dpi=110)
    print(f"saved {path}")
    return {"rows": bc["rows"], "records": bc["records"], "grid": grid, "best_lr": best,
            "conditions": bc["conditions"], "before": bc["before"], **found,
            "figure": str(path)}


if __name__ == "__main__":
    main()
