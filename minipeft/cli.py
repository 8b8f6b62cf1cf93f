"""The ``minipeft`` command: tour, pretrain, finetune, compare, params, bench.

    minipeft tour                 # the main job: every method side by side, in ./minipeft-out
    minipeft pretrain             # train (or load) the cached base model and print its scores
    minipeft finetune --method lora --task sort --out adapters/sort
    minipeft finetune --method lora --text notes.txt --out adapters/notes
    minipeft compare --methods full,lora_r8_qv,prompt16 --seeds 0,1
    minipeft params --preset gpt3-175b --lora-r 8
    minipeft bench --quick
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  minipeft tour --quick
  minipeft pretrain --base quick
  minipeft finetune --method lora --task sort --steps 300 --out adapters/sort
  minipeft finetune --method lora --text notes.txt --out adapters/notes
  minipeft compare --methods full,lora_r8_qv,bitfit --seeds 0
  minipeft params --preset llama2-7b --lora-r 8 --targets q_proj,v_proj
  minipeft bench --quick
"""


def _cmd_pretrain(args) -> int:
    from minipeft.base import load_base

    model, info = load_base(args.base, seed=args.seed, retrain=args.retrain)
    print(f"base {args.base!r}: {info['num_parameters']:,} parameters, tasks "
          f"{', '.join(info['tasks'])}, trained in {info['seconds']} s")
    for task, loss in info["eval_loss"].items():
        em = info["exact_match"].get(task)
        print(f"  {task:<10} held-out " + ("" if em is None else f"exact match {em:7.1%}   ") +
              f"loss {loss:.4f}" + (" nats per character" if task == "text" else ""))
    return 0


def _cmd_params(args) -> int:
    from minipeft.params import PRESETS, count_parameters, lora_parameter_count, weight_bytes

    names = list(PRESETS) if args.preset == "all" else [args.preset]
    targets = tuple(t for t in args.targets.split(",") if t)
    print(f"| model | total | embeddings | attention | MLP | MLP/attention | LoRA r={args.lora_r} "
          f"on {','.join(targets)} | LoRA % |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        spec = PRESETS[name]
        c = count_parameters(spec)
        lora = lora_parameter_count(spec, args.lora_r, targets)
        print(f"| {spec.name} | {c['total']:,} | {c['embeddings']:,} | {c['attention']:,} | "
              f"{c['mlp']:,} | {c['mlp'] / c['attention']:.2f} | {lora:,} | "
              f"{100 * lora / c['total']:.4f} |")
    print("\nWeights alone (no activations, gradients or optimizer state), in GB:")
    print("| model | fp32 | bf16 | NF4 (QLoRA base) |")
    print("|---|---|---|---|")
    for name in names:
        spec = PRESETS[name]
        gb = [weight_bytes(spec, p) / 1e9 for p in ("fp32", "bf16", "nf4")]
        print(f"| {spec.name} | {gb[0]:,.2f} | {gb[1]:,.2f} | {gb[2]:,.2f} |")
    return 0


def _cmd_bench(args) -> int:
    from minipeft import bench

    argv = (["--quick"] if args.quick else []) + (["--json", args.json] if args.json else [])
    bench.main(argv)
    return 0


def _cmd_finetune(args) -> int:
    from minipeft.tour import finetune_cli

    return finetune_cli(args)


def _cmd_compare(args) -> int:
    from minipeft.tour import compare_cli

    return compare_cli(args)


def _cmd_tour(args) -> int:
    from minipeft.tour import tour

    tour(out_dir=args.out, quick=args.quick, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from minipeft.params import PRESETS

    ap = argparse.ArgumentParser(
        prog="minipeft", description=__doc__.split("\n\n")[0], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("tour", help="run every method side by side and write a report",
                       description="Pretrain (or load) the base model, fine-tune it on a new task "
                       "with every method, and write a table, figures and an HTML report.",
                       epilog="example: minipeft tour --quick --out /tmp/tour")
    p.add_argument("--quick", action="store_true", help="tiny base and budget (under a minute)")
    p.add_argument("--out", default="minipeft-out", help="output folder (default ./minipeft-out)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_tour)

    p = sub.add_parser("pretrain", help="train or load the cached base model",
                       epilog="example: minipeft pretrain --base quick")
    p.add_argument("--base", default="default",
                   choices=["default", "quick", "language", "text"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="ignore the cache and train again")
    p.set_defaults(fn=_cmd_pretrain)

    p = sub.add_parser(
        "finetune", help="fine-tune with one method and save the adapter",
        description="Fine-tune one method on a built-in task (--task) or on your own text file\n"
        "(--text) and save the adapter. --text adapts the character-level 'text' base\n"
        "(pretrained on first use, under 2 minutes): characters outside printable ASCII and\n"
        "newline are encoded as one unknown id and counted; the last 10% of the file is held\n"
        "out, and the validation loss is printed before and after.",
        epilog="examples:\n  minipeft finetune --method lora --task sort --out adapters/sort\n"
        "  minipeft finetune --method lora --text notes.txt --steps 500 --out adapters/notes",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True,
                   help="full, last1, bitfit, mask, lora, lora_all, houlsby, pfeiffer, "
                   "prompt, prefix, ia3")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", help="built-in task (minipeft.data.TASKS), e.g. sort")
    what.add_argument("--text", metavar="FILE",
                      help="your own UTF-8 text file")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=None, help="default: the method's own")
    p.add_argument("--base", default=None, choices=["default", "quick"],
                   help="base for --task (default: default); --text always uses 'text'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for the adapter")
    p.set_defaults(fn=_cmd_finetune)

    p = sub.add_parser("compare", help="the full comparison: every method, several seeds",
                       epilog="example: minipeft compare --methods full,lora_r8_qv --seeds 0,1")
    p.add_argument("--methods", default=None, help="comma-separated (default: all)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=None, help="training steps per method")
    p.add_argument("--base", default="default", choices=["default", "quick"])
    p.add_argument("--out", default="minipeft-out/compare")
    p.set_defaults(fn=_cmd_compare)

    p = sub.add_parser("params", help="parameter counts of real models and their LoRA",
                       epilog="example: minipeft params --preset gpt3-175b --lora-r 1")
    p.add_argument("--preset", default="all", choices=["all", *PRESETS])
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.set_defaults(fn=_cmd_params)

    p = sub.add_parser("bench", help="training-step speed and memory (python -m minipeft.bench)",
                       epilog="example: minipeft bench --quick --json bench.json")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    p.set_defaults(fn=_cmd_bench)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 0
    try:
        return args.fn(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"minipeft {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
