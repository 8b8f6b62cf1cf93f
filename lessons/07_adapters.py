"""Lesson 07: bottleneck adapters, against LoRA at the same number of trainable parameters.

An adapter (Houlsby et al. 2019) is a small network put *inside* each frozen block. It reads a
sublayer's output h (B, T, C), squeezes it through a bottleneck of width m << C and adds the
result back:

    out = h + W_up f(W_down h + b_down) + b_up       W_down (m, C), W_up (C, m), f = ReLU

It trains 2Cm + m + C numbers per adapter. W_up and b_up start at ZERO, so at step 0 the branch
adds exactly 0 and the adapted model *is* the base model (W_down stays random: were it zero too,
no gradient could ever reach either matrix). Where the adapters go is a design choice:

    houlsby    after the attention output AND after the MLP      (2 adapters per block, and
               the block's layer norms train too, as in Houlsby et al.: 4C more per block)
    pfeiffer   once per block, reading the stream after the MLP's residual add (Pfeiffer et
               al. 2021; AdapterHub's SeqBnConfig): x2 + adapter(x2)          (1 per block)
    parallel   beside the MLP, reading its input (He et al. 2022): mlp(x) + adapter(x)

LoRA (lesson 05) adds a branch too, y = W0 x + s B A x, but its branch is *linear*: B A is one
matrix, so after training it folds into W0 (merge) and the model is again the base architecture.
An adapter's f sits between its two projections, so its branch is no single matrix and can never
be merged: every generated token pays for the extra layers. IA3 (Liu et al. 2022) is the smallest
additive method: one learned vector rescales the keys, the values and the MLP's hidden units, 6C
numbers per block, and a diagonal scale folds into the neighbouring matrix, so it merges too.

The fair question is not "which is better" but "which is better *for the same budget*". So the
lesson fixes LoRA's rank and chooses each adapter's bottleneck m so that the trainable counts
match (printed side by side), then trains every method on the new task "sort" for the same
number of steps, each at its own learning rate (PEFT methods need about 10x full fine-tuning's):

    (a) matched trainable counts, and where each method puts its tensors;
    (b) step 0 equals the base model, measured (max |logit difference|);
    (c) quality (held-out exact match, answer-token accuracy, loss), step memory
        (``minipeft.memory.measure_step``) and step time (interleaved medians);
    (d) inference: KV-cached generation latency of the base, the adapter models, LoRA unmerged,
        LoRA merged and IA3 merged, timed round-robin so that machine noise hits all alike; the
        base is timed twice to show what "no difference" looks like.

Sort is hard for a frozen model: its answer is no simple function of one input position. Exact
match (every answer token right) may stay near 0 within this budget, so the token accuracy on
the answer is the quality measure that separates the methods; the lesson prints both.

Run:  python lessons/07_adapters.py [--quick] [--seed N]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # render to a file; no display needed
import matplotlib.pyplot as plt
import numpy as np  # host-side only: tables and the figure

from minipeft import backend as bk
from minipeft import lessonkit
from minipeft.autograd import counters, no_grad
from minipeft.base import load_base
from minipeft.data import TaskMixture
from minipeft.experiment import method_specs
from minipeft.memory import measure_step
from minipeft.nn import generate
from minipeft.params import lora_parameter_count, spec_from_config
from minipeft.peft import (
    AdapterConfig,
    AdapterLayer,
    IA3Config,
    LoraConfig,
    get_peft_model,
    load_peft_model,
)
from minipeft.train import TrainConfig, evaluate_lm, train

TASK = "sort"                       # a skill the base has never seen
LORA_RANK = 8                       # LoRA's budget, which every adapter is matched to
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")   # all of attention
PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
STEPS, QUICK_STEPS = 500, 30        # optimizer steps, the same for every method
BATCH, QUICK_BATCH = 32, 16
EVAL_EVERY, QUICK_EVAL_EVERY = 100, 10
EVAL_EXAMPLES, QUICK_EVAL = 300, 64
TIMING_ROUNDS, QUICK_TIMING_ROUNDS = 7, 2     # interleaved training steps per method
GEN_ROUNDS, QUICK_GEN_ROUNDS = 40, 3          # interleaved generations per model
LR = {name: spec.lr for name, spec in method_specs().items()}  # the study's tuned defaults
OUT_NAME = "07_adapters.png"


# --------------------------------------------------------------------------- (a) matching
def adapter_count(C: int, n_layer: int, m: int, placement: str) -> int:
    """Trainable numbers of bottleneck-m adapters: 2Cm + m + C each, 2 per block for Houlsby,
    plus Houlsby's two trained layer norms (4C per block)."""
    per_block = 2 if placement == "houlsby" else 1
    norms = 4 * C if placement == "houlsby" else 0
    return n_layer * (per_block * (2 * C * m + m + C) + norms)


def matched_bottleneck(C: int, n_layer: int, target: int, placement: str) -> int:
    """The bottleneck width m whose adapter count lies closest to ``target``."""
    return min(range(1, 4 * C + 1),
               key=lambda m: abs(adapter_count(C, n_layer, m, placement) - target))


def build_configs(cfg) -> dict:
    lora_n = lora_parameter_count(spec_from_config(cfg), LORA_RANK, LORA_TARGETS)
    configs = {"lora": (LoraConfig(r=LORA_RANK, alpha=2 * LORA_RANK,
                                   target_modules=LORA_TARGETS), LR["lora_r8_qv"])}
    for placement in PLACEMENTS:
        m = matched_bottleneck(cfg.n_embd, cfg.n_layer, lora_n, placement)
        configs[placement] = (AdapterConfig(bottleneck=m, placement=placement), LR["houlsby"])
    configs["ia3"] = (IA3Config(), LR["ia3"])
    return configs


def print_counts(models: dict, configs: dict, base) -> dict:
    """Are the budgets matched, and where does each method act? The trainable count of every
    model beside its formula, and the adapter layers found on block 0 of each model."""
    C, L = base.config.n_embd, base.config.n_layer
    total = base.num_parameters()
    lora_n = models["lora"].num_parameters(trainable_only=True)
    print(f"\n(a) Matched budgets: LoRA r={LORA_RANK} on {', '.join(LORA_TARGETS)}; each "
          f"adapter's bottleneck m chosen to match it (C={C}, {L} blocks)\n")
    print(f"    {'method':<9} {'setting':<22} {'formula':>9} {'counted':>9} {'vs LoRA':>8} "
          f"{'of base':>8}  where it acts")
    counts, wraps = {}, {}
    for name, m in models.items():
        config = configs[name][0]
        n = m.num_parameters(trainable_only=True)
        if name == "lora":
            setting, formula = f"r={config.r}", L * len(LORA_TARGETS) * config.r * 2 * C
            where = "beside " + ", ".join(LORA_TARGETS) + " (mergeable)"
        elif name == "ia3":
            setting, formula = "vectors on k, v, fc_out", L * 6 * C
            where = "scales keys, values, MLP hidden units (mergeable)"
        else:
            setting = f"m={config.bottleneck}"
            formula = adapter_count(C, L, config.bottleneck, config.placement)
            paths = [p for p, mod in m.base_model.named_modules()
                     if isinstance(mod, AdapterLayer) and f"{p}.".startswith("blocks.0.")]
            wraps[name] = {"the block" if p == "blocks.0" else p.replace("blocks.0.", "")
                           for p in paths}                              # found on the model
            where = ", ".join(sorted(wraps[name]))
            where = ("wraps " if config.placement != "parallel" else "beside ") + where
        counts[name] = n
        print(f"    {name:<9} {setting:<22} {formula:>9,} {n:>9,} {n / lora_n - 1:>+8.1%} "
              f"{n / total:>8.2%}  {where}")
    print(f"    (formulas: LoRA r(in+out) per matrix; adapter 2Cm+m+C each, 2 per block for "
          f"Houlsby plus its two layer norms (4C); IA3 6C per block.\n     The base has "
          f"{total:,} parameters.)")
    counts["_wraps"] = wraps
    return counts


# --------------------------------------------------------------------------- (b) step 0
def step0_check(models: dict, base, x) -> dict:
    """max |logits(PEFT model at init) - logits(base)|: 0 means step 0 is the base model."""
    with no_grad():
        ref = bk.to_numpy(base(x).data)
        diffs = {n: float(np.abs(bk.to_numpy(m(x).data) - ref).max()) for n, m in models.items()}
    print("\n(b) Step 0 equals the base model (B = 0, W_up = 0, IA3 vectors = 1): "
          "max |logit difference| on a batch")
    print("    " + "   ".join(f"{n} {d:.1e}" for n, d in diffs.items()))
    return diffs


# --------------------------------------------------------------------------- (c) training
def token_accuracy(model, x, y) -> float:
    """Share of answer tokens predicted right (teacher forcing), the fine-grained quality."""
    with no_grad():
        pred = bk.to_numpy(model(bk.asarray(x)).data.argmax(axis=-1))
    scored = y != -100
    return float((pred == y)[scored].mean())


def train_all(models, configs, ctx) -> dict:
    """Train every model the same steps at its own lr; held-out quality every few steps."""
    x_e, y_e = ctx["eval"]

    def evaluate(m):
        return {**evaluate_lm(m, x_e, y_e), "token_acc": token_accuracy(m, x_e, y_e)}

    runs = {}
    for name, model in models.items():
        lr = configs[name][1]
        before = evaluate(model)
        cfg = TrainConfig(steps=ctx["steps"], batch_size=ctx["batch"], lr=lr,
                          eval_every=ctx["eval_every"], progress=not ctx["quick"], desc=name)
        result = train(model, ctx["mix"].sample, cfg, evaluate=evaluate)
        runs[name] = {"lr": lr, "before": before, "curve": [{"step": 0, **before}] + result.evals,
                      "final": result.evals[-1], "seconds": result.seconds,
                      "losses": result.losses}
    return runs


def memory_and_time(models, x, y, rounds) -> dict:
    """measure_step per model, then the median training step, interleaved (lessonkit)."""
    out = {}
    for name, model in models.items():
        mem = measure_step(model, x, y)
        got = mem.measured
        out[name] = {"peak_mib": got["peak_train"] / 2**20,
                     "grad_opt_mib": (got["gradients"] + got["optimizer"]) / 2**20,
                     "act_mib": got["activations"] / 2**20}
    ms = lessonkit.step_ms({name: (model, (x, y)) for name, model in models.items()}, rounds)
    for name, model in models.items():
        model.eval()
        out[name]["step_ms"] = ms[name]
    return out


def train_and_measure(models, configs, counts, ctx) -> tuple:
    """Which method learns most for the same budget, and what does a step cost? Every model
    trains, then one step of each is measured (memory) and timed (interleaved)."""
    runs = train_all(models, configs, ctx)
    x, y = (bk.asarray(a) for a in ctx["mix"].sample(ctx["batch"]))
    mem = memory_and_time(models, x, y, QUICK_TIMING_ROUNDS if ctx["quick"] else TIMING_ROUNDS)
    print(f"\n(c) Task '{TASK}', {ctx['steps']} steps each: quality, memory and speed of "
          "training\n")
    print(f"    {'method':<9} {'trainable':>9} {'lr':>6} {'exact':>7} {'token acc':>10} "
          f"{'(step 0)':>9} {'loss':>6} {'peak MiB':>9} {'grad+opt':>9} {'act MiB':>8} "
          f"{'step ms':>8}")
    for name, r in runs.items():
        f, m = r["final"], mem[name]
        print(f"    {name:<9} {counts[name]:>9,} {r['lr']:>6.0e} {f['exact_match']:>7.1%} "
              f"{f['token_acc']:>10.1%} {r['before']['token_acc']:>9.1%} {f['loss']:>6.3f} "
              f"{m['peak_mib']:>9.2f} {m['grad_opt_mib']:>9.3f} {m['act_mib']:>8.2f} "
              f"{m['step_ms']:>8.1f}")
    print("    grad+opt: gradients + AdamW m, v of the trainable tensors (measured);"
          " act: activations kept by the graph;\n    peak: weights + optimizer + the step's "
          "peak (measure_step). Step time: the median of interleaved rounds.")
    return runs, mem


# --------------------------------------------------------------------------- (d) inference
def export_merged(peft_model, base):
    """A plain GPT holding a *merged* PEFT model's weights: the base architecture, nothing more.
    Wrapped modules keep their frozen layer as ``.base``; the adapter tensors are dropped."""
    state = {k.replace(".base.", "."): v for k, v in peft_model.base_model.state_dict().items()
             if ".adapters." not in k}
    return lessonkit.fresh_copy(base, state)


def matmul_flops_per_token(model, prompt, new_tokens: int) -> float:
    """Matmul FLOPs (linear layers and attention) of one KV-cached generation, per new token:
    the part of inference cost that no machine noise can blur."""
    counters.clear()
    generate(model, prompt, new_tokens)
    return counters["matmul_flops"] / new_tokens


def latency(models: dict, prompt, new_tokens: int, rounds: int, seed: int) -> tuple:
    """ms per generated token (KV cache, batch 1): (median, best) over rounds. Every round times
    each model once, in a fresh random order, so no model always runs first (or after the same
    one). Other work on the machine only ever *adds* time, so the best (fastest) round is the
    estimate least hurt by it (timeit's rule); the median shows the typical run."""
    times = {n: [] for n in models}
    names = list(models)
    order = np.random.default_rng(seed)
    for r in range(rounds + 1):                       # round 0 warms up, and is dropped
        for name in order.permutation(names):
            model = models[name]
            bk.synchronize()
            t = time.perf_counter()
            generate(model, prompt, new_tokens)
            bk.synchronize()
            if r:
                times[name].append((time.perf_counter() - t) * 1e3 / new_tokens)
    return ({n: statistics.median(v) for n, v in times.items()},
            {n: min(v) for n, v in times.items()})


def inference(models, base, ctx) -> dict:
    """What does each method cost at inference? Merged copies are rebuilt from the saved adapter
    files, as a server would; then every model generates the same answer, its matmul FLOPs
    counted and its latency timed round-robin, the base twice to measure the noise."""
    eval_xy = ctx["eval"]
    with tempfile.TemporaryDirectory() as tmp:
        sizes, merged = {}, {}
        for name in ("lora", "ia3"):
            sizes[name] = models[name].save_adapter(Path(tmp) / name)
            merged[name] = load_peft_model(lessonkit.fresh_copy(base), Path(tmp) / name)
            merged[name].merge()
        for name in PLACEMENTS:
            sizes[name] = models[name].save_adapter(Path(tmp) / name)
    with no_grad():
        ref = bk.to_numpy(models["lora"](eval_xy[0][:64]).data)
        merge_diff = float(np.abs(bk.to_numpy(merged["lora"](eval_xy[0][:64]).data) - ref).max())
    lora_plain = export_merged(merged["lora"], base)
    with no_grad():
        plain_diff = float(np.abs(bk.to_numpy(lora_plain(eval_xy[0][:64]).data) - ref).max())
    base_again = lessonkit.fresh_copy(base)
    x0 = eval_xy[0][:1]
    prompt = bk.asarray(x0[:, :int(np.argmax(eval_xy[1][0] != -100)) + 1])   # up to '='
    new_tokens = int((eval_xy[1][0] != -100).sum())
    timed = {"base": base, "base (again)": base_again, "lora merged, plain GPT": lora_plain,
             "lora merged": merged["lora"], "ia3 merged": merged["ia3"],
             "lora unmerged": models["lora"], "ia3 unmerged": models["ia3"],
             **{n: models[n] for n in PLACEMENTS}}
    rounds = QUICK_GEN_ROUNDS if ctx["quick"] else GEN_ROUNDS
    flops = {n: matmul_flops_per_token(m, prompt, new_tokens) for n, m in timed.items()}
    lat_median, lat = latency(timed, prompt, new_tokens, rounds, ctx["seed"])
    noise = max(abs(lat["base (again)"] / lat["base"] - 1),
                abs(lat_median["base (again)"] / lat_median["base"] - 1))
    threshold = max(2 * noise, 0.03)
    print(f"\n(d) Inference: {new_tokens} new tokens after a {prompt.shape[1]}-token prompt, "
          f"KV cache, batch 1; {rounds} rounds, each timing every\n    model once in a random "
          "order. 'best' is the fastest round (other load only adds time), 'median' the "
          "typical one.\n")
    print(f"    merged LoRA vs unmerged: max |logit diff| {merge_diff:.1e}; exported to a plain "
          f"GPT: {plain_diff:.1e}")
    print(f"    {'model':<24} {'FLOPs/token':>12} {'vs base':>8} {'best ms/tok':>12} "
          f"{'vs base':>8} {'median':>8} {'vs base':>8} {'adapter file':>13}")
    for name, ms in lat.items():
        key = name.split(" ")[0]
        size = f"{sizes[key] / 1024:.1f} KiB" if key in sizes and key != "base" else ""
        med = lat_median[name]
        print(f"    {name:<24} {flops[name]:>12,.0f} {flops[name] / flops['base'] - 1:>+8.1%} "
              f"{ms:>12.3f} {ms / lat['base'] - 1:>+8.1%} {med:>8.3f} "
              f"{med / lat_median['base'] - 1:>+8.1%} {size:>13}")
    print(f"    (FLOPs: matmuls of linear layers and attention, counted; IA3's elementwise "
          f"scaling is not a matmul.\n    The base timed twice differs by up to {noise:.1%}: "
          f"time differences under {threshold:.0%} are read as noise.)")
    print("    At this size a token's time is mostly the fixed cost of each op, not its "
          "arithmetic, so latency\n    counts ops: every unmerged branch adds several per "
          "block; a merged one adds none.")
    return {"sizes": sizes, "merge_diff": merge_diff, "plain_diff": plain_diff, "flops": flops,
            "lat": lat, "lat_median": lat_median, "noise": noise, "threshold": threshold}


# --------------------------------------------------------------------------- the verdicts
def verdicts(runs, mem, counts, wraps, step0, inf) -> bool:
    """Rows 7 and 12 of SEED-NOTES and the two inference claims, each chosen by the numbers
    printed beside it (time differences only beyond the base-vs-base noise). Returns row 7."""
    flops, lat, threshold = inf["flops"], inf["lat"], inf["threshold"]
    adapter_over = {n: lat[n] / lat["base"] - 1 for n in PLACEMENTS}
    merged_over = lat["lora merged, plain GPT"] / lat["base"] - 1
    best = max(runs, key=lambda n: runs[n]["final"]["token_acc"])
    learned = {n: r["final"]["token_acc"] - r["before"]["token_acc"] for n, r in runs.items()}
    print("\nVerdicts (measured here):")
    # Row 7 is about structure: held when the adapter layers found on each model sit where
    # the claim says (after attention's output projection and after the MLP; Pfeiffer on the
    # block's output, after the feed-forward residual add) and each model
    # starts as the base model exactly.
    expect = {"houlsby": {"attn.o_proj", "mlp.fc_out"}, "pfeiffer": {"the block"}}
    placed = all(wraps.get(n) == w for n, w in expect.items()) and bool(wraps.get("parallel"))
    start0 = all(step0[n] == 0.0 for n in PLACEMENTS)
    print(f"  Row 7 'adapters add trainable layers inside the blocks, after attention or after "
          f"the feed-forward network':\n    {'held' if placed and start0 else 'did not hold'}: "
          f"found on the models: Houlsby wraps {', '.join(sorted(wraps.get('houlsby', ())))}, "
          f"Pfeiffer {', '.join(sorted(wraps.get('pfeiffer', ())))}, parallel sits beside "
          f"{', '.join(sorted(wraps.get('parallel', ())))};\n    each starts as the base "
          f"model (max |diff| {max(step0[n] for n in PLACEMENTS):.0e}) and learned "
          + ", ".join(f"{n} {learned[n]:+.1%}" for n in PLACEMENTS)
          + " answer-token accuracy (one seed).")
    extra_flops = {n: flops[n] / flops["base"] - 1 for n in PLACEMENTS}
    slow = [n for n, v in adapter_over.items() if v > threshold]
    print(f"  Adapters cost inference: {'held' if all(extra_flops.values()) else 'did not hold'}"
          f" in FLOPs ("
          + ", ".join(f"{n} {extra_flops[n]:+.1%}" for n in PLACEMENTS)
          + " per token: their layers cannot be merged);\n    in measured time "
          + ", ".join(f"{n} {v:+.1%}" for n, v in adapter_over.items())
          + f": above the noise for {', '.join(slow) or 'none'}.")
    same = flops["lora merged, plain GPT"] == flops["lora merged"] == flops["base"]
    free = same and merged_over <= threshold
    print(f"  Merged LoRA costs none: {'held' if free else 'did not hold'}: exactly the base's "
          f"FLOPs ({same}); time {merged_over:+.1%} as a plain GPT\n    "
          f"({lat['lora merged'] / lat['base'] - 1:+.1%} still inside the wrapper, "
          f"{lat['lora unmerged'] / lat['base'] - 1:+.1%} and "
          f"{flops['lora unmerged'] / flops['base'] - 1:+.1%} FLOPs unmerged).")
    order = sorted(runs, key=lambda n: -runs[n]["final"]["token_acc"])
    act_rules = all(m["act_mib"] > m["grad_opt_mib"] for m in mem.values())
    print(f"  Row 12, quality at matched budgets (one seed, so a gap of a few points may be "
          f"noise): best {best}\n    ({runs[best]['final']['token_acc']:.1%} answer tokens); "
          f"order: {' > '.join(order)}. "
          f"IA3 trains {counts['ia3']:,} numbers\n    ({counts['ia3'] / counts['lora']:.0%} "
          f"of LoRA's) to reach {runs['ia3']['final']['token_acc']:.1%}. Peak step memory "
          f"spans {min(m['peak_mib'] for m in mem.values()):.2f}-"
          f"{max(m['peak_mib'] for m in mem.values()):.2f} MiB: "
          + ("the activations outweigh gradients + optimizer state in every method, so they,\n"
             "    not the trainable tensors, set it." if act_rules else
             "in some method gradients + optimizer state outweigh the activations."))
    return placed and start0


# --------------------------------------------------------------------------- the figure
def figure(runs, mem, lat, counts):
    """Learning curves at matched budgets, training cost, and inference latency."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    for name, r in runs.items():
        ax.plot([p["step"] for p in r["curve"]], [p["token_acc"] for p in r["curve"]],
                marker="o", ms=3, label=f"{name} ({counts[name]:,} trainable)")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out answer-token accuracy")
    ax.set_title(f"Learning '{TASK}' at matched budgets (IA3: tiny)")
    ax.legend(fontsize=8)

    ax = axes[1]
    names = list(mem)
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, [mem[n]["peak_mib"] for n in names], 0.4, label="peak MiB (one step)")
    ax2 = ax.twinx()
    ax2.bar(xs + 0.2, [mem[n]["step_ms"] for n in names], 0.4, color="tab:orange",
            label="step ms")
    ax.set_xticks(xs, names)
    ax.set_ylabel("MiB")
    ax2.set_ylabel("ms per training step")
    ax.set_title("Training cost: memory (blue) and time (orange)")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)

    ax = axes[2]
    names = list(lat)
    colors = ["tab:gray" if n.startswith("base") else "tab:red" if "unmerged" in n
              else "tab:green" if "merged" in n else "tab:red" for n in names]
    ax.barh(names, [lat[n] for n in names], color=colors)
    ax.axvline(lat["base"], color="k", ls="--", lw=1)
    ax.invert_yaxis()
    ax.set_xlabel("ms per generated token\n(KV cache, batch 1, best of rounds)")
    ax.set_title("Inference: unmerged branches cost time (red);\nmerged ones do not (green)")
    return fig


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = lessonkit.arguments(__doc__, quick="the tiny quick base, few steps").parse_args(argv)
    clock = lessonkit.Stopwatch()
    quick = args.quick
    kind = "quick" if quick else "default"
    print(f"Lesson 07: adapters vs LoRA ({kind} base, task '{TASK}', backend {bk.name}, "
          f"seed {args.seed})")
    base, info = load_base(kind, seed=args.seed, progress=not quick)
    mix = TaskMixture([TASK], seed=1000 + args.seed, length=info["length"])
    ctx = {"mix": mix, "eval": mix.eval_set(TASK, QUICK_EVAL if quick else EVAL_EXAMPLES),
           "steps": QUICK_STEPS if quick else STEPS, "batch": QUICK_BATCH if quick else BATCH,
           "eval_every": QUICK_EVAL_EVERY if quick else EVAL_EVERY, "quick": quick,
           "seed": args.seed}

    configs = build_configs(base.config)
    models = {n: get_peft_model(lessonkit.fresh_copy(base), c, seed=args.seed)
              for n, (c, _) in configs.items()}
    counts = print_counts(models, configs, base)
    wraps = counts.pop("_wraps")
    step0 = step0_check(models, base, bk.asarray(ctx["eval"][0][:64]))
    runs, mem = train_and_measure(models, configs, counts, ctx)
    inf = inference(models, base, ctx)
    row7 = verdicts(runs, mem, counts, wraps, step0, inf)

    path = lessonkit.save_figure(figure(runs, mem, inf["lat"], counts), OUT_NAME)
    seconds = clock.seconds()
    print(f"\n    figure saved to {path}  ({seconds:.0f} s in all)")
    return {"kind": kind, "counts": counts, "configs": {n: c.to_dict() for n, (c, _) in
                                                        configs.items()},
            "step0_diff": step0, "runs": runs, "memory": mem, "latency_ms": inf["lat"],
            "latency_median_ms": inf["lat_median"], "gen_flops": inf["flops"],
            "noise": inf["noise"], "threshold": inf["threshold"],
            "merge_diff": inf["merge_diff"], "wraps": {k: sorted(v) for k, v in wraps.items()},
            "row7_held": row7, "plain_diff": inf["plain_diff"], "adapter_bytes": inf["sizes"],
            "figure": str(path), "seconds": seconds}


if __name__ == "__main__":
    main()
