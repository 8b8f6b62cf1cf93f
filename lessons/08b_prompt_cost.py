"""Lesson 08b: what a soft prompt costs at inference: n more positions in every forward pass.

Prompt tuning (Lester et al. 2021; lesson 08a) prepends n trained vectors P (n, C) to the
input's embeddings, so the model runs on n + T positions instead of T::

    h0 = [P ; tok_emb(ids) + pos_emb(0..T-1)]      (B, n + T, C)

Every layer then does its work on n more rows: the matmuls of a batched forward (prefill,
training) grow by about (n + T) / T, and attention by ((n + T) / T)². Generating with a KV
cache, each new token attends to n more keys, which is cheap when T is small. Prefix tuning (Li
& Liang 2021) stores ready keys and values for every layer instead, so it skips the work on the
prompt rows, but every token still attends to n more keys. Both spend n positions of the
context window (``block_size``), which the input can no longer use. LoRA merged and
embedding-only tuning cost nothing extra: they change weights, not lengths.

None of this depends on what the vectors hold, so the models here are timed as built (vocab-init
prompts, a collapsed prefix table), untrained: training would change the numbers in them, not
the work they cause.

    (d) matmul FLOPs of a batched forward (counted), and wall time of that forward and of
        generation with a KV cache, for the base, the base again (the noise), embedding-only,
        prompts of 1, 4 and 16 vectors and a 4-vector prefix, timed in interleaved rounds.

Run:  python lessons/08b_prompt_cost.py [--quick] [--seed N]
"""

from __future__ import annotations

import statistics
import time

import matplotlib

matplotlib.use("Agg")  # render to a file; no display needed
import matplotlib.pyplot as plt
import numpy as np  # host-side only: data rows, tables and the figure

from minipeft import backend as bk
from minipeft import lessonkit
from minipeft.autograd import counters, no_grad
from minipeft.base import load_base
from minipeft.data import TaskMixture, swap_marker
from minipeft.nn import generate
from minipeft.peft import (
    PrefixTuningConfig,
    PromptTuningConfig,
    collapse_prefix,
    embedding_only,
    get_peft_model,
)

SKILL, MARKER = "reverse", "new0"       # the rows of lesson 08a: <new0> + letters, reversed
LENGTHS = (1, 4, 16)                    # prompt lengths compared (vocab init)
PREFIX_N, PREFIX_HIDDEN = 4, 64
EVAL_EXAMPLES, QUICK_EVAL = 300, 64
GEN_ROUNDS, QUICK_GEN_ROUNDS = 30, 2    # interleaved timing rounds
FORWARD_BATCH = 64                      # rows in the batched (uncached) forward timing
FIGURE = "08b_prompt_cost.png"


def models_to_time(base, seed: int) -> dict:
    """name -> model: the base twice (their gap is the timing noise), embedding-only, prompts
    of each length, and a prefix collapsed to its table (how it is served)."""
    def wrap(config):
        return get_peft_model(lessonkit.fresh_copy(base), config, seed=seed)

    pre = wrap(PrefixTuningConfig(PREFIX_N, reparameterize=True, hidden=PREFIX_HIDDEN))
    collapse_prefix(pre)
    return {"base": base, "base (again)": lessonkit.fresh_copy(base),
            "embedding-only": wrap(embedding_only()),
            **{f"prompt n={n}": wrap(PromptTuningConfig(n, "vocab")) for n in LENGTHS},
            f"prefix n={PREFIX_N}": pre}


# --------------------------------------------------------------------------- (d) the cost
def forward_no_grad(model, x):
    with no_grad():
        model(x)


def interleaved_ms(calls: dict, rounds: int, seed: int) -> tuple:
    """(median, best) ms of each zero-argument call. Every round runs each once, in a fresh
    random order, so machine noise falls on all alike (round 0 warms up and is dropped). Other
    load only adds time, so the best round is the estimate least hurt by it."""
    times = {n: [] for n in calls}
    order = np.random.default_rng(seed)
    for r in range(rounds + 1):
        for name in order.permutation(list(calls)):
            bk.synchronize()
            t = time.perf_counter()
            calls[name]()
            bk.synchronize()
            if r:
                times[name].append((time.perf_counter() - t) * 1e3)
    return ({n: statistics.median(v) for n, v in times.items()},
            {n: min(v) for n, v in times.items()})


def inference_cost(timed: dict, x_e, y_e, rounds: int, seed: int) -> dict:
    """(d) Time per generated token (KV cache, batch 1) and per batched forward, against the
    base timed twice, whose gap is the noise any verdict must beat; matmul FLOPs counted."""
    base = timed["base"]
    cfg = base.config
    one = bk.asarray(x_e[:1, :int(np.argmax(y_e[0] != -100)) + 1])          # (1, T) up to '='
    new_tokens = int((y_e[0] != -100).sum())
    batch_x = bk.asarray(x_e[:FORWARD_BATCH])                               # (B, block) rows
    gen_med, gen = interleaved_ms(
        {n: (lambda m=m: generate(m, one, new_tokens)) for n, m in timed.items()}, rounds, seed)
    lat = {n: v / new_tokens for n, v in gen.items()}                       # ms per token
    lat_med = {n: v / new_tokens for n, v in gen_med.items()}
    flops = {}
    for name, m in timed.items():                 # matmul FLOPs of the batched forward, counted
        counters.clear()
        forward_no_grad(m, batch_x)
        flops[name] = counters["matmul_flops"]
    fwd_med, fwd = interleaved_ms(
        {n: (lambda m=m: forward_no_grad(m, batch_x)) for n, m in timed.items()}, rounds, seed)
    noise = max(abs(lat["base (again)"] / lat["base"] - 1), abs(fwd["base (again)"] / fwd["base"]
                                                                 - 1))
    T, Tb = one.shape[1], batch_x.shape[1]
    extra = {n: 0 for n in timed} | {f"prefix n={PREFIX_N}": PREFIX_N} | {
        f"prompt n={n}": n for n in LENGTHS}
    print(f"\n(d) Inference cost of the extra length ({rounds} interleaved rounds; best = "
          f"fastest round, median in brackets).\n    generate: {new_tokens} tokens after a "
          f"{T}-token input, KV cache, batch 1. forward: {FORWARD_BATCH} rows of {Tb} tokens, "
          "no cache.\n")
    print(f"    {'model':<16} {'ms/token':>9} {'vs base':>8} {'(median)':>9} {'forward ms':>11} "
          f"{'vs base':>8} {'(median)':>9} {'MFLOPs':>7} {'positions':>10} {'keys, last':>11} "
          f"{'longest input':>14}")
    for name in timed:
        n = extra[name]
        positions = Tb + (n if name.startswith("prompt") else 0)
        print(f"    {name:<16} {lat[name]:>9.3f} {lat[name] / lat['base'] - 1:>+8.1%} "
              f"{lat_med[name] / lat_med['base'] - 1:>+9.1%} {fwd[name]:>11.2f} "
              f"{fwd[name] / fwd['base'] - 1:>+8.1%} {fwd_med[name] / fwd_med['base'] - 1:>+9.1%}"
              f" {flops[name] / 1e6:>7.1f} {positions:>10} {T + new_tokens - 1 + n:>11} "
              f"{cfg.block_size - n:>14}")
    big = f"prompt n={max(LENGTHS)}"
    gen_cost, fwd_cost = lat[big] / lat["base"] - 1, fwd[big] / fwd["base"] - 1
    print(f"    Measured for {big}: {fwd_cost:+.0%} time and {flops[big] / flops['base'] - 1:+.0%}"
          f" matmul FLOPs in the batched forward (prefill and training pay this);\n    "
          f"{gen_cost:+.1%} per generated token, "
          + ("within the noise: with a KV cache, attending to a few more keys is cheap at this "
             "size." if abs(gen_cost) <= max(2 * noise, 0.03) else "beyond the noise."))
    print(f"    (the base timed twice differs by up to {noise:.1%} (best): that much is noise.)\n"
          "    Prompt vectors run through every layer, like n more input tokens; a prefix is "
          "already keys and values,\n    so it skips that work, but every token still attends "
          "to n more keys, and n positions of the context are spent.")
    return {"latency_ms": lat, "forward_ms": fwd, "forward_flops": flops,
            "latency_median_ms": lat_med, "forward_median_ms": fwd_med, "noise": noise}


# --------------------------------------------------------------------------- the figure
def figure(cost: dict):
    lat, fwd, noise = cost["latency_ms"], cost["forward_ms"], max(2 * cost["noise"], 0.03)
    fig, ax = plt.subplots(figsize=(7, 5))
    names = list(lat)
    ys = np.arange(len(names))
    ax.barh(ys - 0.2, [100 * (fwd[n] / fwd["base"] - 1) for n in names], 0.4,
            color="tab:orange", label="batched forward (prefill, training)")
    ax.barh(ys + 0.2, [100 * (lat[n] / lat["base"] - 1) for n in names], 0.4,
            color="tab:purple", label="per generated token (KV cache)")
    ax.axvline(0, color="k", lw=1)
    ax.axvspan(-100 * noise, 100 * noise, color="gray", alpha=0.25,
               label="noise: twice the base-vs-itself gap")
    ax.set_yticks(ys, names)
    ax.invert_yaxis()
    ax.set_xlabel("time vs the base model, % (best of interleaved rounds)")
    inside = sum(abs(lat[n] / lat["base"] - 1) <= noise for n in names)
    ax.set_title(f"(d) The cost of n extra positions\n({inside} of {len(names)} per-token "
                 "times inside the grey noise band)")
    ax.legend(fontsize=8)
    return fig


def main(argv=None) -> dict:
    args = lessonkit.arguments(__doc__, quick="the tiny quick base, few rounds").parse_args(argv)
    clock = lessonkit.Stopwatch()
    kind = "quick" if args.quick else "default"
    print(f"Lesson 08b: the inference cost of soft prompts ({kind} base, backend {bk.name}, "
          f"seed {args.seed})")
    base, info = load_base(kind, seed=args.seed, progress=not args.quick)
    mix = TaskMixture([SKILL], seed=1000 + args.seed, length=info["length"])
    x_e, y_e = swap_marker(*mix.eval_set(SKILL, QUICK_EVAL if args.quick else EVAL_EXAMPLES),
                           SKILL, MARKER)
    rounds = QUICK_GEN_ROUNDS if args.quick else GEN_ROUNDS
    cost = inference_cost(models_to_time(base, args.seed), x_e, y_e, rounds, args.seed)
    path = lessonkit.save_figure(figure(cost), FIGURE)
    print(f"\n    figure saved to {path}  ({clock.seconds():.0f} s in all)")
    return {"kind": kind, **cost, "figure": str(path), "seconds": clock.seconds()}


if __name__ == "__main__":
    main()
