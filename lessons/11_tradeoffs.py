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

Every number below comes from ``minipeft.experiment.run_study``: the same base, the same task,
the same token budget, each method at its own learning rate, the new task's marker row trainable
for every method. Each axis is also shown relative to full fine-tuning, so the trade-offs read at
a glance: below 1 is cheaper, and for quality, below 1 is worse.

LoRA's descendants (lesson 14) are rows here too: QLoRA (LoRA r=8 on q, v over a 4-bit NF4
base), DoRA r=8 on q, v, VeRA r=16 on every linear layer, LoKr r=4 on q, v and LLaMA-Adapter
(10 gated prompts in the top block), each at the learning rate swept on this task
(``minipeft.experiment.LR_SWEEP``, one seed). QLoRA's saving is in the weights the step keeps
resident, so memory has two columns: the resident weights and optimizer state, and the step's
own peak above them.

Noise. Full fine-tuning and the LoRAs run with three seeds, the other methods with one (to fit
the lesson's time). The seeds give the noise every verdict must beat: the spread of task-B
accuracy between seeds, and the spread of the step and token times between the repeated
measurements of one method. Row 13 ("comparable to full fine-tuning") uses the project's one
definition, ``minipeft.verdicts.compare_quality``, as lesson 05 does.
"""

from __future__ import annotations

import dataclasses
import statistics

from minipeft import lessonkit
from minipeft.experiment import StudyConfig, run_study
from minipeft.report import write_report
from minipeft.verdicts import compare_quality, describe_quality, spread

METHODS = ("full", "last1", "bitfit", "mask10", "lora_r1_qv", "lora_r8_qv", "lora_r8_all",
           "houlsby", "pfeiffer", "ia3", "prompt16", "prefix8",
           # LoRA's descendants (lesson 14)
           "qlora_r8_qv", "dora_r8_qv", "vera_r16_all", "lokr_r4_qv", "llama_adapter")
QUICK_METHODS = ("full", "bitfit", "lora_r8_qv", "houlsby", "prompt16", "qlora_r8_qv",
                 "llama_adapter")
SEEDED = ("full", "lora_r8_qv", "lora_r8_all")   # run with several seeds: row 13 and the noise
SEEDS, QUICK_SEEDS = 3, 2
STEPS = 200
TASK_B = "shift"
AXES = [  # (column, how to read it, lower is better?)
    ("trainable %", lambda r: r.trainable_pct, True),
    ("adapter KB", lambda r: r.adapter_bytes / 1024, True),
    ("weights+opt MB", lambda r: (r.memory["measured"]["weights"]
                                  + r.memory["measured"]["optimizer"]) / 2**20, True),
    ("peak step MB", lambda r: r.memory["measured"]["peak_step"] / 2**20, True),
    ("step ms", lambda r: r.step_ms, True),
    ("task B EM %", lambda r: 100 * r.b_em, False),
    ("task B tok %", lambda r: 100 * r.b_tok, False),
    ("ms/token", lambda r: r.gen_ms_per_token, True),
]


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
    print(f"{'method':<14}" + "".join(f"{n:>15}" for n in names))
    for r in rows:
        print(f"{r['method']:<14}" + "".join(f"{r[n]:>15.3g}" for n in names))
    if "trainable % vs full" in rows[0]:
        print("\nrelative to full fine-tuning (1 = the same):")
        print(f"{'method':<14}" + "".join(f"{n:>15}" for n in names))
        for r in rows:
            print(f"{r['method']:<14}" + "".join(
                f"{r[n + ' vs full']:>15.3g}" if r[n + " vs full"] is not None else f"{'-':>15}"
                for n in names))


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(18, 7))     # one panel per axis
    names = [r["method"] for r in rows]
    for ax, (name, _, lower_better) in zip(axes.flat, AXES):
        vals = [r[name] for r in rows]
        ax.bar(names, vals, color=["tab:gray" if n == "full" else "tab:blue" for n in names])
        if name in ("trainable %", "adapter KB", "weights+opt MB"):
            ax.set_yscale("log")
        ax.set_title(f"{name} ({'lower' if lower_better else 'higher'} is better)")
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    fig.suptitle("Five trade-offs, one base, one task")
    return lessonkit.save_figure(fig, "11_tradeoffs.png", dpi=110)


def noise_of(records, get) -> float:
    """Relative spread of a measurement between the seeds of one method: the largest
    (max - min) / mean over the methods that ran several seeds."""
    out = 0.0
    for m in dict.fromkeys(r.method for r in records):
        v = [get(r) for r in records if r.method == m]
        if len(v) > 1 and statistics.mean(v) > 0:
            out = max(out, (max(v) - min(v)) / statistics.mean(v))
    return out


def verdicts(rows, records) -> list[str]:
    by = {r["method"]: r for r in rows}
    out = []
    full = by.get("full")
    if not full:
        return ["(no full fine-tuning row to compare with)"]
    cheapest = min(rows, key=lambda r: r["trainable %"])
    out.append(f"Parameter efficiency: {cheapest['method']} trains {cheapest['trainable %']:.3g}%"
               f" of the weights; full fine-tuning 100% (counted: no noise).")
    # quality: every method within the seeds' noise of the best counts as tied for best
    tok_sd = max((spread([100 * r.b_tok for r in records if r.method == m])[1]
                  for m in SEEDED if m in by), default=0.0)
    best = max(rows, key=lambda r: r["task B tok %"])
    tied = [r["method"] for r in rows if best["task B tok %"] - r["task B tok %"] <= 2 * tok_sd]
    out.append(f"Quality (task-B answer tokens): best {best['method']} "
               f"({best['task B tok %']:.1f}%); within twice the seeds' sd ({tok_sd:.1f} points)"
               f" of it: {', '.join(tied)}. Full fine-tuning {full['task B tok %']:.1f}%.")
    step_noise = noise_of(records, lambda r: r.step_ms)
    thr = max(2 * step_noise, 0.05)
    slower = [r["method"] for r in rows if r["step ms vs full"] and r["step ms vs full"] > 1 + thr]
    faster = [r["method"] for r in rows if r["step ms vs full"] and r["step ms vs full"] < 1 - thr]
    out.append(f"Training speed (differences under {thr:.0%} are noise: one method's step time "
               f"varied by {step_noise:.0%} between seeds): slower per step than full "
               f"fine-tuning: {', '.join(slower) or 'none'}; faster: "
               f"{', '.join(faster) or 'none'}.")
    gen_noise = noise_of(records, lambda r: r.gen_ms_per_token)
    thr = max(2 * gen_noise, 0.10)
    pricier = [r["method"] for r in rows
               if r["ms/token vs full"] and r["ms/token vs full"] > 1 + thr]
    merged = {r.method for r in records if r.mergeable}
    free = [r["method"] for r in rows if r["method"] in merged and r["ms/token vs full"]
            and r["ms/token vs full"] <= 1 + thr]
    out.append(f"Inference (differences under {thr:.0%} are noise; seeds varied by "
               f"{gen_noise:.0%}): slower per generated token than the full model: "
               f"{', '.join(pricier) or 'none'}. Merged methods within the noise of the plain "
               f"model: {', '.join(free) or 'none'}"
               + (f"; merged but measurably slower: {', '.join(sorted(merged - set(free)))}"
                  if merged - set(free) else "") + ".")
    loras = [m for m in SEEDED if m.startswith("lora") and m in by]
    full_tok = [r.b_tok for r in records if r.method == "full"]
    for m in loras:
        c = compare_quality([r.b_tok for r in records if r.method == m], full_tok)
        out.append("Row 13: " + describe_quality(m, c) + ".")
        by[m]["comparable"] = c
    verdict_words = [by[m]["comparable"]["verdict"] for m in loras]
    if verdict_words:
        out.append("Row 13 here: " + ("held (some LoRA comparable to full fine-tuning)"
                                      if "comparable" in verdict_words else
                                      "undecided" if "undecided" in verdict_words else
                                      "did NOT hold") + " at this budget.")
    return out


def main(argv=None) -> dict:
    args = lessonkit.arguments(__doc__, quick="tiny base, a few methods").parse_args(argv)
    clock = lessonkit.Stopwatch()
    methods = QUICK_METHODS if args.quick else METHODS
    n = QUICK_SEEDS if args.quick else SEEDS
    study = StudyConfig(base="quick" if args.quick else "default", task_b=TASK_B,
                        methods=tuple(m for m in methods if m in SEEDED),
                        seeds=tuple(args.seed + i for i in range(n)),
                        steps=40 if args.quick else STEPS, eval_every=10 if args.quick else 100,
                        eval_examples=64 if args.quick else 300,
                        gen_tokens=4 if args.quick else 16, batch_size=32 if args.quick else 64,
                        progress=not args.quick)
    records = run_study(study)
    records += run_study(dataclasses.replace(study, seeds=(args.seed,), methods=tuple(
        m for m in methods if m not in SEEDED)))
    order = {m: i for i, m in enumerate(methods)}
    records.sort(key=lambda r: order[r.method])
    rows = axis_table(records)
    print()
    print_axes(rows)
    print()
    lines = verdicts(rows, records)
    print("\n".join(lines))
    fig = plot(rows)
    paths = write_report(records, lessonkit.out_dir() / "11_report",
                         title="Lesson 11: the five trade-offs")
    print(f"saved {fig} and {paths['html']}  ({clock.seconds():.0f} s in all)")
    return {"rows": rows, "records": records, "verdicts": lines, "figure": str(fig)}


if __name__ == "__main__":
    main()
