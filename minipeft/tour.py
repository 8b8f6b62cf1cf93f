"""``minipeft tour``, ``compare`` and ``finetune``: the study and single runs, from the shell.

The tour is the README's main job. First the real-text study (:mod:`minipeft.realtext`): a
Shakespeare base continues training on Python code with every method; its path figure, table and
verdict lead the report. Then the synthetic study: the task base fine-tuned on task B with one
method of each kind. Written into ``./minipeft-out/``: ``realtext_paths.png``,
``realtext_table.md``, ``table.md``, ``results.csv``, five figures and ``report.html`` (figures
inline, the real-text section first).

``finetune`` trains one method on a built-in task (``--task``) or on your own text file
(``--text``, on the Shakespeare base of :mod:`minipeft.base`, in its BPE) and saves the adapter.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from minipeft.checks import check_output_dir
from minipeft.experiment import StudyConfig, method_specs, run_study
from minipeft.report import markdown_table, write_report

TOUR_METHODS = ("full", "last1", "bitfit", "mask10", "lora_r1_qv", "lora_r8_qv", "lora_r8_all",
                "houlsby", "pfeiffer", "prompt16", "prefix8", "ia3")
QUICK_METHODS = ("full", "bitfit", "lora_r8_qv", "houlsby", "prompt16", "ia3")
# the synthetic study after the real-text one: fewer methods, so both fit in about 5 minutes
SYNTHETIC_METHODS = ("full", "lora_r8_qv", "prompt16", "ia3")
REAL_QUICK_METHODS = ("full", "lora_r8_all", "ia3")

NOTES = ("Base model pretrained on task A (the skills listed in the table's 'task A' columns); "
         "each method then trains on task B for the same number of steps and tokens, from the "
         "same base, with its own learning rate. Forgetting is measured on held-out task-A "
         "examples with the adapter active. The new task's marker row of the embedding trains with "
         "every method (trainable_token_indices). A method that learns little of task B has "
         "not 'forgotten less' for it: compare the 'A EM at matched B' column (old-task exact "
         "match where task B's answer-token accuracy crossed the match level, interpolated "
         "along the run), filled only where task B reached that level.")


REAL_NOTES = ("A GPT pretrained on 34 of Shakespeare's plays continues training on Python's "
              "standard library with each method, same steps and tokens, own learning rate. Each "
              "path runs from the base's point (the star, where an adapter switched off returns) "
              "through held-out code loss (learned) and held-out-play loss (forgotten), adapter "
              "active. Forgetting is compared at matched code loss, not at the end.")


def real_text_section(out: Path, quick: bool, seed: int, log=print) -> dict:
    """The real-text study (minipeft.realtext), compact: its figure, table and verdict."""
    from minipeft import realtext as rt

    cfg = rt.RealTextConfig(
        base="shakespeare_quick" if quick else "shakespeare",
        methods=REAL_QUICK_METHODS if quick else rt.METHODS, seeds=(seed, seed + 1),
        steps=40 if quick else 80, eval_windows=16 if quick else 32, progress=not quick)
    log(f"minipeft tour: real text first, {len(cfg.methods)} methods x {cfg.steps} steps of "
        f"Python code from the {cfg.base!r} base{' (quick)' if quick else ''}")
    runs, origin = rt.run_realtext(cfg, log=log)
    rows = rt.verdicts(runs, origin)
    verdict = rt.overall_verdict(rows)
    moved = [r["method"] for r in rows if r["verdict"] != "learned no code"
             and r["final_a"] > origin["a"] + 0.01]
    if quick and ("full" not in moved or len(moved) < 2):
        verdict += (" Quick mode cannot answer the question: it needs full fine-tuning and at "
                    "least one PEFT method that both learn code and forget plays (here: "
                    f"{', '.join(moved) or 'none'}); run the tour without --quick.")
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "realtext_paths.png"
    rt.plot_paths(runs, origin, figure, title="Shakespeare base learning Python code: paths "
                  f"(mean of seeds {seed}, {seed + 1})")
    (out / "realtext_table.md").write_text(rt.table(rows) + "\n\n" + verdict + "\n")
    log("\n" + rt.table(rows) + "\n\n" + verdict + "\n")
    return {"title": "Real text: Shakespeare base, continued training on Python code",
            "text": verdict, "head": rt.TABLE_HEAD, "rows": rt.table_cells(rows),
            "figure": figure, "notes": REAL_NOTES, "runs": runs, "origin": origin,
            "caption": "paths in the (held-out code, held-out plays) plane, bits per character"}


def tour(out_dir="minipeft-out", quick: bool = False, seed: int = 0, log=print) -> dict:
    """Run the real-text study, then the compact synthetic study, and write one report (the
    real-text section first); returns the records and the written paths."""
    check_output_dir("tour: out_dir", out_dir)        # before the study, not after it
    start = time.perf_counter()
    lead = real_text_section(Path(out_dir), quick, seed, log)
    study = StudyConfig(base="quick" if quick else "default", task_b="shift",
                        methods=QUICK_METHODS if quick else SYNTHETIC_METHODS, seeds=(seed,),
                        steps=40 if quick else 200, eval_every=10 if quick else 20,
                        eval_examples=64 if quick else 300, gen_tokens=4 if quick else 16,
                        batch_size=32 if quick else 64, progress=not quick)
    log(f"then the synthetic study: {len(study.methods)} methods, {study.steps} steps each on "
        f"task {study.task_b!r}{' (quick)' if quick else ''}")
    records = run_study(study, log=log)
    paths = write_report(records, out_dir, notes=NOTES,
                         lead={k: v for k, v in lead.items() if k not in ("runs", "origin")})
    paths.update(realtext_figure=lead["figure"], realtext_table=Path(out_dir) /
                 "realtext_table.md")
    log("\n" + markdown_table(records) + "\n")
    log(f"wrote {', '.join(str(p) for p in paths.values())}")
    log(f"tour finished in {time.perf_counter() - start:.0f} s")
    return {"records": records, "paths": paths, "realtext": lead}


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
    """Train one method on one built-in task (``args.task``) or on a text file
    (``args.text``) and save its adapter."""
    from minipeft.base import RECIPES
    from minipeft.data import TASKS, TaskMixture

    # --method was checked by cli.check_args, before any work
    if args.text is not None:
        if args.base is not None:
            raise ValueError(f"--base {args.base}: applies to --task only; --text always "
                             f"fine-tunes the {TEXT_BASE!r} base")
        return finetune_text(args)
    if args.task not in TASKS:
        raise ValueError(f"--task: unknown task {args.task!r}; choose from {', '.join(TASKS)}")
    kind = args.base or "default"
    mix = TaskMixture([args.task], seed=args.seed, length=RECIPES[kind].length)  # as pretrained
    model, before, after, _ = _adapt(args, kind, mix.sample,
                                     *mix.eval_set(args.task, 300),
                                     desc=f"{args.method} on {args.task}")
    size = model.save_adapter(Path(args.out))
    print(f"{args.task}: exact match {before['exact_match']:.1%} -> {after['exact_match']:.1%}, "
          f"loss {before['loss']:.3f} -> {after['loss']:.3f}")
    print(f"saved {args.method} adapter ({size / 1024:.1f} KB) to {args.out}", file=sys.stderr)
    return 0


def _adapt(args, base_kind: str, sample, x_eval, y_eval, desc: str, **train_kw):
    """What both finetune paths share: wrap the base with ``args.method``, score the held-out
    set, train, score it again. Returns (model, scores before, scores after, lr)."""
    from minipeft.base import load_base
    from minipeft.train import TrainConfig, evaluate_lm, train

    spec = method_specs()[FINETUNE_METHODS[args.method]]
    base, _ = load_base(base_kind, seed=0)
    model = spec.wrap(base, seed=args.seed)
    model.print_trainable_parameters()
    before = evaluate_lm(model, x_eval, y_eval)
    lr = args.lr or spec.lr
    train(model, sample, TrainConfig(steps=args.steps, lr=lr, desc=desc, **train_kw))
    return model, before, evaluate_lm(model, x_eval, y_eval), lr


TEXT_VAL_FRACTION = 0.1  # the end of the file held out for validation (at least one window)
TEXT_BASE = "shakespeare"  # the base --text adapts: it knows English (of a kind) already


def read_text_file(path) -> str:
    """The text of ``path``, checked before any training: it must be a file, not empty, more
    than one byte, free of NUL bytes (a binary file) and valid UTF-8. Errors are one line that
    names the file and says what is wrong."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--text: no such file: {path}")
    if not path.is_file():
        raise ValueError(f"--text: {path} is not a file; give a plain text file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"--text: cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) <= 1:
        what = "is empty" if not data else "holds a single byte"
        raise ValueError(f"--text: {path} {what}; give a text file to learn from")
    if b"\0" in data:
        raise ValueError(f"--text: {path} looks binary (it holds NUL bytes); give a UTF-8 text "
                         "file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--text: {path} is not UTF-8 (byte {data[exc.start]:#04x} at offset "
                         f"{exc.start}); convert it, e.g. iconv -t utf-8") from None
    return text.replace("\r\n", "\n")


def finetune_text(args) -> int:
    """``minipeft finetune --text FILE``: adapt the Shakespeare base to a file.

    The file is encoded with the base's byte-level BPE (any UTF-8 text encodes, nothing is
    unknown), its last 10% (at least one window) is held out, and the method trains on random
    windows of the rest. The validation loss is printed before and after, in nats per token and
    per character (every held-out token after the first scored once). Saved in ``--out``: the
    adapter, the tokenizer (``tokenizer.json``) and a record of the run (``finetune.json``).
    """
    from minipeft.base import RECIPES, base_tokenizer, recipe_key
    from minipeft.data import TextDataset, train_val_split
    from minipeft.data.domains import EvalSet
    from minipeft.io import save_json

    recipe = RECIPES[TEXT_BASE]
    context = recipe.length
    text = read_text_file(args.text)  # before any training: a bad file fails at once
    tok = base_tokenizer(TEXT_BASE)
    ids = tok.encode_text(text)
    need = 2 * (context + 1)
    if len(ids) < need:
        raise ValueError(f"--text: {args.text} holds only {len(ids)} tokens ({len(text)} "
                         f"characters); it needs at least {need}: {context + 1} to train on "
                         f"(one {context}-token window and its next token) and as many again "
                         "to validate on")
    train_ids, val_ids = train_val_split(ids, max(TEXT_VAL_FRACTION, (context + 1) / len(ids)))
    x_val, y_val = TextDataset(val_ids, context, args.seed).windows()  # (N, T) each
    val = EvalSet(x_val, y_val, sum(len(tok.decode(row)) for row in y_val))
    data = TextDataset(train_ids, context, args.seed)
    print(f"{args.text}: {len(text):,} characters, {len(ids):,} tokens "
          f"({len(text) / len(ids):.2f} characters per token); {len(train_ids):,} tokens to "
          f"train on, {len(val_ids):,} to validate on")

    model, before, after, lr = _adapt(args, TEXT_BASE, data.sample, x_val, y_val,
                                      desc=f"{args.method} on {Path(args.text).name}",
                                      batch_size=recipe.batch_size)
    nats = {k: v["loss"] for k, v in (("before", before), ("after", after))}
    per_char = {k: val.bits_per_char(v) * math.log(2) for k, v in nats.items()}
    uniform = val.bits_per_char(math.log(tok.vocab_size)) * math.log(2)
    print(f"validation loss: {nats['before']:.4f} -> {nats['after']:.4f} nats per token; "
          f"{per_char['before']:.4f} -> {per_char['after']:.4f} nats per character (a uniform "
          f"guess over the {tok.vocab_size} tokens: {uniform:.3f} per character)")

    out = Path(args.out)
    size = model.save_adapter(out)
    tok.save(out / "tokenizer.json")
    save_json(out / "finetune.json", {
        "text": str(args.text), "characters": len(text), "tokens": len(ids),
        "train_tokens": len(train_ids), "validation_tokens": len(val_ids),
        "validation_characters": val.chars, "context": context, "method": args.method,
        "steps": args.steps, "lr": lr, "seed": args.seed, "base": TEXT_BASE,
        "base_key": recipe_key(TEXT_BASE, recipe, 0),
        "val_loss_before": nats["before"], "val_loss_after": nats["after"],
        "val_nats_per_char_before": per_char["before"],
        "val_nats_per_char_after": per_char["after"]})
    print(f"saved {args.method} adapter ({size / 1024:.1f} KB) to {out}/ with "
          f"tokenizer.json and finetune.json; load it with "
          f"load_peft_model(load_base('{TEXT_BASE}')[0], '{out}')")
    return 0
