"""``minipeft tour``, ``compare`` and ``finetune``: the study and single runs, from the shell.

The tour is the README's main job: load (or pretrain) the base model, fine-tune it on task B
with one method of each kind, and write what was measured into ``./minipeft-out/``:
``table.md``, ``results.csv``, five figures and ``report.html`` (figures inline).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from minipeft.experiment import StudyConfig, method_specs, run_study
from minipeft.report import markdown_table, write_report

TOUR_METHODS = ("full", "last1", "bitfit", "mask10", "lora_r1_qv", "lora_r8_qv", "lora_r8_all",
                "houlsby", "pfeiffer", "prompt16", "prefix8", "ia3")
QUICK_METHODS = ("full", "bitfit", "lora_r8_qv", "houlsby", "prompt16", "ia3")

NOTES = ("Base model pretrained on task A (the skills listed in the table's 'task A' columns); "
         "each method then trains on task B for the same number of steps and tokens, from the "
         "same base, with its own learning rate. Forgetting is measured on held-out task-A "
         "examples with the adapter active (merged where mergeable). Soft prompts can only steer "
         "skills the frozen model already has, so they are not expected to learn a new task B. "
         "A method that learns little of task B has not 'forgotten less' for it: compare the "
         "'A EM at matched B' column, filled only where task B reached the match level.")


def tour(out_dir="minipeft-out", quick: bool = False, seed: int = 0, log=print) -> dict:
    """Run the compact study and write its report; returns the written paths."""
    start = time.perf_counter()
    study = StudyConfig(base="quick" if quick else "default", task_b="shift",
                        methods=QUICK_METHODS if quick else TOUR_METHODS, seeds=(seed,),
                        steps=40 if quick else 200, eval_every=10 if quick else 20,
                        eval_examples=64 if quick else 300, gen_tokens=4 if quick else 16,
                        batch_size=32 if quick else 64, progress=not quick)
    log(f"minipeft tour: {len(study.methods)} methods, {study.steps} steps each on task "
        f"{study.task_b!r}{' (quick)' if quick else ''}")
    records = run_study(study, log=log)
    paths = write_report(records, out_dir, notes=NOTES)
    log("\n" + markdown_table(records) + "\n")
    log(f"wrote {', '.join(str(p) for p in paths.values())}")
    log(f"tour finished in {time.perf_counter() - start:.0f} s")
    return {"records": records, "paths": paths}


def compare_cli(args) -> int:
    methods = tuple(args.methods.split(",")) if args.methods else tuple(method_specs())
    seeds = tuple(int(s) for s in args.seeds.split(","))
    study = StudyConfig(base=args.base, methods=methods, seeds=seeds,
                        **({"steps": args.steps} if args.steps else {}))
    records = run_study(study)
    paths = write_report(records, args.out, notes=NOTES)
    print(markdown_table(records))
    print(f"report: {paths['html']}")
    return 0


FINETUNE_METHODS = {  # CLI name -> study method name
    "full": "full", "last1": "last1", "bitfit": "bitfit", "mask": "mask10",
    "lora": "lora_r8_qv", "lora_all": "lora_r8_all", "houlsby": "houlsby",
    "pfeiffer": "pfeiffer", "prompt": "prompt16", "prefix": "prefix8", "ia3": "ia3",
}


def finetune_cli(args) -> int:
    """Train one method on one built-in task and save its adapter."""
    from minipeft.base import load_base
    from minipeft.data import TASKS, TaskMixture
    from minipeft.peft import get_peft_model
    from minipeft.train import TrainConfig, evaluate_lm, train

    if args.method not in FINETUNE_METHODS:
        raise ValueError(f"--method: unknown method {args.method!r}; choose from "
                         f"{', '.join(FINETUNE_METHODS)}")
    if args.task not in TASKS:
        raise ValueError(f"--task: unknown task {args.task!r}; choose from {', '.join(TASKS)}")
    spec = method_specs()[FINETUNE_METHODS[args.method]]
    base, info = load_base(args.base, seed=0)
    mix = TaskMixture([args.task], seed=args.seed)
    model = get_peft_model(base, spec.build(), seed=args.seed)
    model.print_trainable_parameters()
    x_eval, y_eval = mix.eval_set(args.task, 300)
    before = evaluate_lm(model, x_eval, y_eval)
    train(model, mix.sample, TrainConfig(steps=args.steps, lr=args.lr or spec.lr,
                                         desc=f"{args.method} on {args.task}"))
    after = evaluate_lm(model, x_eval, y_eval)
    size = model.save_adapter(Path(args.out))
    print(f"{args.task}: exact match {before['exact_match']:.1%} -> {after['exact_match']:.1%}, "
          f"loss {before['loss']:.3f} -> {after['loss']:.3f}")
    print(f"saved {args.method} adapter ({size / 1024:.1f} KB) to {args.out}", file=sys.stderr)
    return 0
