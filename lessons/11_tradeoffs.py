"""Lesson 11: the five trade-offs, every method, one table.

The claim (SEED-NOTES row 12): PEFT methods trade off five things against each other:
  1. parameter efficiency  -- how many weights train (and how big the saved adapter is);
  2. memory efficiency     -- the peak memory of a training step;
  3. training speed        -- time per step;
  4. model quality         -- how well the new task is learned;
  5. inference cost        -- time per generated token once trained (mergeable methods fold
                              into the weights and cost nothing; adapters add layers; prompts add
                              sequence length).
and (row 13) that LoRA reaches quality comparable to full fine-tuning.

Every number below comes from one run of ``minipeft.experiment.run_study``: the same base, the
same task, the same token budget, each method at its own learning rate. Each axis is also shown
relative to full fine-tuning, so the trade-offs read at a glance: below 1 is cheaper, and for
quality, below 1 is worse.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from minipeft.experiment import StudyConfig, run_study
from minipeft.report import write_report

METHODS = ("full", "last1", "bitfit", "mask10", "lora_r1_qv", "lora_r8_qv", "lora_r8_all",
           "houlsby", "pfeiffer", "ia3", "prompt16", "prefix8")
QUICK_METHODS = ("full", "bitfit", "lora_r8_qv", "houlsby", "prompt16")
STEPS = 200
TASK_B = "shift"
AXES = [  # (column, how to read it, lower is better?)
    ("trainable %", lambda r: r.trainable_pct, True),
    ("adapter KB", lambda r: r.adapter_bytes / 1024, True),
    ("peak step MB", lambda r: r.memory["measured"]["peak_step"] / 2**20, True),
    ("step ms", lambda r: r.step_ms, True),
    ("task B EM %", lambda r: 100 * r.b_em, False),
    ("ms/token", lambda r: r.gen_ms_per_token, True),
]


def out_dir() -> Path:
    root = Path(__file__).resolve().parent
    out = Path(os.environ.get("MINIPEFT_LESSON_OUT", root / "out"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def axis_table(records) -> list[dict]:
    """Per method: each axis's mean over seeds, and its ratio to full fine-tuning."""
    methods = list(dict.fromkeys(r.method for r in records))
    means = {m: {name: statistics.mean(get(r) for r in records if r.method == m)
                 for name, get, _ in AXES} for m in methods}
    full = means.get("full")
    rows = []
    for m in methods:
        row = {"method": m, **means[m]}
        if full:
            row.update({f"{name} vs full": (means[m][name] / full[name] if full[name] else None)
                        for name, _, _ in AXES})
        rows.append(row)
    return rows


def print_axes(rows) -> None:
    names = [name for name, _, _ in AXES]
    print(f"{'method':<12}" + "".join(f"{n:>14}" for n in names))
    for r in rows:
        print(f"{r['method']:<12}" + "".join(f"{r[n]:>14.3g}" for n in names))
    if "trainable % vs full" in rows[0]:
        print("\nrelative to full fine-tuning (1 = the same):")
        print(f"{'method':<12}" + "".join(f"{n:>14}" for n in names))
        for r in rows:
            print(f"{r['method']:<12}" + "".join(
                f"{r[n + ' vs full']:>14.3g}" if r[n + " vs full"] is not None else f"{'-':>14}"
                for n in names))


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    names = [r["method"] for r in rows]
    for ax, (name, _, lower_better) in zip(axes.flat, AXES):
        vals = [r[name] for r in rows]
        ax.bar(names, vals, color=["tab:gray" if n == "full" else "tab:blue" for n in names])
        if name in ("trainable %", "adapter KB"):
            ax.set_yscale("log")
        ax.set_title(f"{name} ({'lower' if lower_better else 'higher'} is better)")
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    fig.suptitle("Five trade-offs, one base, one task")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdicts(rows) -> list[str]:
    by = {r["method"]: r for r in rows}
    out = []
    full = by.get("full")
    if not full:
        return ["(no full fine-tuning row to compare with)"]
    cheapest = min(rows, key=lambda r: r["trainable %"])
    best = max(rows, key=lambda r: r["task B EM %"])
    out.append(f"Parameter efficiency: {cheapest['method']} trains {cheapest['trainable %']:.3g}%"
               f" of the weights; full fine-tuning 100%.")
    out.append(f"Quality: the best task-B score is {best['method']} "
               f"({best['task B EM %']:.1f}%); full fine-tuning reached "
               f"{full['task B EM %']:.1f}%.")
    slower = [r["method"] for r in rows if r["step ms vs full"] and r["step ms vs full"] > 1.0]
    out.append("Training speed: slower per step than full fine-tuning: "
               f"{', '.join(slower) if slower else 'none'} (frozen weights skip their gradient "
               "products, but added layers and longer sequences cost time).")
    pricier = [r["method"] for r in rows if r["ms/token vs full"] and r["ms/token vs full"] > 1.1]
    out.append("Inference: more than 10% slower per generated token than the base/full model: "
               f"{', '.join(pricier) if pricier else 'none'} (merged LoRA and IA3 cost nothing).")
    loras = [r for r in rows if r["method"].startswith("lora")]
    if loras:
        top = max(loras, key=lambda r: r["task B EM %"])
        ratio = top["task B EM %"] / max(full["task B EM %"], 1e-9)
        held = ratio >= 0.9
        out.append(f"Row 13: the best LoRA ({top['method']}) reached {ratio:.0%} of full "
                   f"fine-tuning's task-B accuracy: the claim of comparable quality "
                   f"{'held' if held else 'did NOT hold'} here at this budget.")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny base, a few methods")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    study = StudyConfig(base="quick" if args.quick else "default", task_b=TASK_B,
                        methods=QUICK_METHODS if args.quick else METHODS, seeds=(args.seed,),
                        steps=40 if args.quick else STEPS, eval_every=10 if args.quick else 50,
                        eval_examples=64 if args.quick else 300,
                        gen_tokens=4 if args.quick else 16, batch_size=32 if args.quick else 64,
                        progress=not args.quick)
    records = run_study(study)
    rows = axis_table(records)
    print()
    print_axes(rows)
    print()
    lines = verdicts(rows)
    print("\n".join(lines))
    out = out_dir()
    fig = out / "11_tradeoffs.png"
    plot(rows, fig)
    paths = write_report(records, out / "11_report", title="Lesson 11: the five trade-offs")
    print(f"saved {fig} and {paths['html']}")
    return {"rows": rows, "records": records, "verdicts": lines, "figure": str(fig)}


if __name__ == "__main__":
    main()
