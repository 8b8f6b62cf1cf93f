"""Lesson 09: catastrophic forgetting. Does PEFT forget less than full fine-tuning?

The claim (SEED-NOTES row 3): "because few parameters change, PEFT is less prone to catastrophic
forgetting than full fine-tuning."

The experiment. Our base model was pretrained on task A (copy, reverse, cipher, count). We
fine-tune it on a new task B with each method, from the same base, for the same number of
tokens, each method with its own learning rate, over several seeds. Before and after, we score
task A on held-out examples *with the adapter active* (merged where it can be): the question is
how much the adapted model still knows, not whether the base survives underneath (for LoRA,
adapters and prompts it always does: switch the adapter off and task A is back, bit for bit).

Two traps make such comparisons dishonest, and the lesson avoids both:
  * a method that learns nothing forgets nothing, so we also read forgetting at *matched task-B
    quality*: the first evaluation at which task B reaches MATCH_EM;
  * one seed is an anecdote, so every number is a mean over seeds, with its spread.

    forgetting = EM_A(before) - EM_A(after)          (percentage points, held-out task A)
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from minipeft.experiment import StudyConfig, run_study

METHODS = ("full", "last1", "bitfit", "lora_r1_qv", "lora_r8_qv", "lora_r8_all", "houlsby",
           "ia3", "prompt16")
QUICK_METHODS = ("full", "bitfit", "lora_r8_qv", "prompt16")
SEEDS = (0, 1, 2)
STEPS = 200
MATCH_EM = 0.5          # task-B accuracy at which forgetting is compared across methods
MARGIN = 5.0            # points of forgetting: smaller differences are not called "less"
TASK_B = "shift"


def out_dir() -> Path:
    root = Path(__file__).resolve().parent
    out = Path(os.environ.get("MINIPEFT_LESSON_OUT", root / "out"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(records) -> list[dict]:
    """One row per method: means and spreads over seeds."""
    rows = []
    for method in dict.fromkeys(r.method for r in records):
        recs = [r for r in records if r.method == method]
        b, b_sd = mean_sd([100 * r.b_em for r in recs])
        f, f_sd = mean_sd([100 * r.forgetting for r in recs])
        at_match = [100 * (r.a_em_before - r.a_em_at_match) for r in recs
                    if r.a_em_at_match is not None]
        rows.append({"method": method, "family": recs[0].family,
                     "trainable_pct": recs[0].trainable_pct, "b_em": b, "b_sd": b_sd,
                     "forgetting": f, "forgetting_sd": f_sd,
                     "a_before": statistics.mean(100 * r.a_em_before for r in recs),
                     "a_after": statistics.mean(100 * r.a_em_after for r in recs),
                     "forgetting_at_match": statistics.mean(at_match) if at_match else None,
                     "reached_match": f"{len(at_match)}/{len(recs)}"})
    return rows


def print_table(rows) -> None:
    print(f"{'method':<12} {'trainable%':>10} {'task B EM':>13} {'task A before':>13} "
          f"{'after':>7} {'forgetting':>14} {'forgot @ B=' + str(int(100 * MATCH_EM)) + '%':>13}")
    for r in rows:
        at = "-" if r["forgetting_at_match"] is None else f"{r['forgetting_at_match']:.1f}"
        print(f"{r['method']:<12} {r['trainable_pct']:>10.3f} {r['b_em']:>7.1f} ± "
              f"{r['b_sd']:<4.1f} {r['a_before']:>13.1f} {r['a_after']:>7.1f} "
              f"{r['forgetting']:>7.1f} ± {r['forgetting_sd']:<4.1f} {at:>8} "
              f"({r['reached_match']})")


def plot(records, rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"selective": "tab:blue", "reparameterisation": "tab:red", "additive": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    ax = axes[0]
    for r in rows:
        ax.errorbar(r["forgetting"], r["b_em"], xerr=r["forgetting_sd"], yerr=r["b_sd"],
                    fmt="o", color=colours[r["family"]], capsize=3)
        ax.annotate(r["method"], (r["forgetting"], r["b_em"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("forgotten: task-A exact match lost (points)")
    ax.set_ylabel("learned: task-B exact match (%)")
    ax.set_title("Learned vs forgotten (mean ± sd over seeds)")
    ax = axes[1]  # the trajectory: each evaluation point of the first seed, B gained vs A kept
    for method in dict.fromkeys(r.method for r in records):
        rec = next(r for r in records if r.method == method)
        pts = [p for p in rec.curve if p.get("b_em") is not None]
        ax.plot([100 * p["b_em"] for p in pts], [100 * p["a_em"] for p in pts], "o-",
                color=colours[rec.family], alpha=0.7, ms=3)
        if pts:
            ax.annotate(method, (100 * pts[-1]["b_em"], 100 * pts[-1]["a_em"]), fontsize=7)
    ax.axvline(100 * MATCH_EM, color="k", lw=0.5, ls="--")
    ax.set_xlabel("task-B exact match (%)")
    ax.set_ylabel("task-A exact match kept (%)")
    ax.set_title("During training: what each method trades (seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(rows) -> str:
    full = next((r for r in rows if r["method"] == "full"), None)
    peft = [r for r in rows if r["method"] != "full"]
    if full is None or not peft:
        return "verdict: needs full fine-tuning and at least one PEFT method"
    lines = []

    def clearly_less(r) -> bool:  # by more than MARGIN points and more than the seeds' spread
        return (full["forgetting"] - r["forgetting"]
                > max(MARGIN, full["forgetting_sd"] + r["forgetting_sd"]))

    less = [r["method"] for r in peft if clearly_less(r)]
    lines.append(f"At the end of training, {len(less)}/{len(peft)} PEFT methods forgot clearly "
                 f"less (by more than {MARGIN:.0f} points and the seeds' spread) than full "
                 f"fine-tuning ({full['forgetting']:.1f} points): {', '.join(less) or 'none'}.")
    matched = [r for r in peft if r["forgetting_at_match"] is not None]
    if full["forgetting_at_match"] is not None and matched:
        less_m = [r["method"] for r in matched
                  if full["forgetting_at_match"] - r["forgetting_at_match"] > MARGIN]
        lines.append(f"At matched task-B quality ({100 * MATCH_EM:.0f}%), {len(less_m)}/"
                     f"{len(matched)} of the PEFT methods that got there forgot clearly less "
                     f"than full fine-tuning ({full['forgetting_at_match']:.1f} points)"
                     f"{': ' + ', '.join(less_m) if less_m else ''}.")
    learned_little = [r["method"] for r in peft if r["b_em"] < 100 * MATCH_EM]
    if learned_little:
        lines.append(f"Careful: {', '.join(learned_little)} did not reach {100 * MATCH_EM:.0f}% "
                     "on task B; forgetting little while learning little is no evidence for "
                     "the claim, so the verdict below leaves them out.")
    # The verdict: among the methods that learned task B, did most forget clearly less than
    # full fine-tuning? "Clearly" = by more than MARGIN points and more than the seeds' spread.
    learners = [r for r in peft if r["b_em"] >= 100 * MATCH_EM]
    clearly = [r["method"] for r in learners if clearly_less(r)]
    if not learners:
        lines.append("No PEFT method learned task B here, so the claim could not be tested.")
    else:
        held = len(clearly) > len(learners) / 2
        lines.append(f"Of the {len(learners)} PEFT methods that learned task B, {len(clearly)} "
                     f"forgot clearly less than full fine-tuning ({', '.join(clearly) or 'none'}). "
                     + ("The claim held here" if held else "The claim did NOT hold here")
                     + ", measured with the adapter active.")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny base, 2 seeds, a few methods")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    args = ap.parse_args(argv)
    seeds = tuple(args.seed + s for s in ((0, 1) if args.quick else SEEDS))
    study = StudyConfig(base="quick" if args.quick else "default", task_b=TASK_B,
                        methods=QUICK_METHODS if args.quick else METHODS, seeds=seeds,
                        steps=40 if args.quick else STEPS, eval_every=10 if args.quick else 20,
                        eval_examples=64 if args.quick else 300, match_em=MATCH_EM,
                        gen_tokens=2, batch_size=32 if args.quick else 64,
                        progress=not args.quick)
    records = run_study(study)
    rows = summarise(records)
    print()
    print_table(rows)
    print()
    text = verdict(rows)
    print(text)
    path = out_dir() / "09_forgetting.png"
    plot(records, rows, path)
    print(f"saved {path}")
    return {"rows": rows, "records": records, "verdict": text, "figure": str(path)}


if __name__ == "__main__":
    main()
