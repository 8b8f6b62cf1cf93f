"""Lesson 04: selective fine-tuning: train a chosen subset of the model's own weights.

The simplest PEFT family adds nothing. It picks some of the pretrained weights, lets them train,
and freezes the rest. ``SelectiveConfig`` picks along four axes:

    component   attention, MLP, layer norms, embeddings (or all of them)
    layer       e.g. only the last k blocks (plus the final layer norm)
    type        weights and/or biases; BitFit (Ben Zaken et al. 2021) trains the biases only
    element     a boolean mask M inside each chosen tensor keeps a fraction of its entries:
                random, the largest |w| (magnitude), or the largest accumulated squared
                gradient over a few calibration batches (a diagonal-Fisher score)

The first three choose whole tensors, and a whole frozen tensor is cheap: backward never forms
its gradient dW = δᵀx (that matmul is simply skipped), and AdamW keeps no m or v for it.

An element mask is different. For a chosen tensor W with mask M the update is

    W <- W - lr · M ⊙ adam(∇W)          (frozen entries: M = 0, bit-identical forever)

but ∇W itself is the same dense matmul δᵀx as in full fine-tuning: there is no cheaper way to
get 10% of the entries of a matrix product than to compute all of it. So a 10% mask trains 10%
of the parameters at 100% of the gradient compute and (in our straightforward optimizer, as in
most) 100% of the gradient and optimizer memory: m and v are full-size, and the update is
computed everywhere, then masked. Parameter efficiency is not compute or memory efficiency,
which is the trade-off the article means when it calls selective methods' results "mixed".

"PEFT trains 15-20% of the weights." That figure describes selective choices such as "the last
few blocks": the lesson computes which choices land in 15-20% on our model and on GPT-2 124M.
(LoRA and the additive methods are usually well under 1%.)

What it does, on the new task "sort" from the default base: (a) trainable counts of each variant;
(b) which choices give 15-20%; (c) the same number of steps for every variant, each at its own
learning rate from a two-point sweep, held-out exact match and loss; (d) a check that every frozen
or masked-out element is bit-identical after training; (e) memory of one step (``measure_step``)
and its time, split into forward+backward and the update; (f) what the element mask cost.

Run:  python lessons/04_selective.py [--quick] [--seed N]
"""

from __future__ import annotations

import statistics
import time

import matplotlib

matplotlib.use("Agg")  # render to a file; no display needed
import matplotlib.pyplot as plt
import numpy as np  # host-side only: the bit-identical check, tables and the figure

from minipeft import backend as bk
from minipeft import lessonkit
from minipeft.autograd import no_grad
from minipeft.base import load_base
from minipeft.data import TaskMixture
from minipeft.memory import measure_step
from minipeft.optim import AdamW
from minipeft.params import PRESETS, count_parameters, lora_parameter_count, spec_from_config
from minipeft.peft import SelectiveConfig, bitfit, full_finetuning, get_peft_model, last_blocks
from minipeft.train import TrainConfig, evaluate_lm, train
from minipeft.verdicts import differs, spread

TASK = "sort"                      # not one of the base's skills
STEPS, QUICK_STEPS = 200, 25       # the same for every variant and learning rate
BATCH, QUICK_BATCH = 32, 16
EVAL_EXAMPLES, QUICK_EVAL = 300, 100
MASK_FRACTION = 0.1
CALIBRATION_BATCHES = 4            # batches scored for the gradient (Fisher) mask
TIMING_REPS = 15                   # timed steps per variant, interleaved across variants
EXTRA_SEEDS = 2                    # more seeds for the runs a verdict compares (full FT and the
                                   # pair behind "mixed results"): their spread is the noise
MARGIN = 0.02                      # nats: loss differences smaller than this are never called
BAND = (0.15, 0.20)                # "15-20% of the weights"
OUT_NAME = "04_selective.png"
MiB = 2 ** 20


def variants(calibration) -> dict:
    """name -> (SelectiveConfig, two learning rates to try). Whole-tensor variants with few
    parameters (biases, norms) need larger steps; the lrs came from a probe at 150 steps."""
    mask = lambda kind, **kw: SelectiveConfig(mask=kind, mask_fraction=MASK_FRACTION,
                                              label=f"mask_{kind}", **kw)
    return {
        "full": (full_finetuning(), (1e-3, 3e-3)),
        "bitfit": (bitfit(), (1e-2, 3e-2)),
        "layernorm": (SelectiveConfig(components=("norms",), label="layernorm"), (1e-2, 3e-2)),
        "attention": (SelectiveConfig(components=("attention",), label="attention"),
                      (3e-3, 1e-2)),
        "mlp": (SelectiveConfig(components=("mlp",), label="mlp"), (3e-3, 1e-2)),
        "last1": (last_blocks(1), (3e-3, 1e-2)),
        "mask_random": (mask("random"), (3e-3, 1e-2)),
        "mask_magnitude": (mask("magnitude"), (3e-3, 1e-2)),
        "mask_gradient": (mask("gradient", calibration=calibration), (3e-3, 1e-2)),
    }


def fresh(base, config, seed: int):
    """A fresh copy of the base with ``config`` applied: every run starts from the same weights."""
    return get_peft_model(lessonkit.fresh_copy(base), config, seed=seed)


# --------------------------------------------------------------------------- (a) counts
def print_counts(models: dict) -> dict:
    """What does each variant train? Counted on the models themselves (a mask counts only its
    True entries)."""
    print("\n(a) The variants: what trains (counted on the model; masks count only their True "
          "entries)\n")
    print(f"    {'variant':<15} {'trainable':>9} {'%':>7} {'tensors':>8} {'masked':>7}")
    out = {}
    for name, m in models.items():
        params = m.trainable_parameters()
        n, total = m.num_parameters(trainable_only=True), m.num_parameters()
        out[name] = {"trainable": n, "total": total, "pct": 100 * n / total,
                     "tensors": len(params),
                     "masked": sum(p.mask is not None for p in params)}
        print(f"    {name:<15} {n:>9,} {100 * n / total:>6.2f}% {len(params):>8} "
              f"{out[name]['masked']:>7}")
    return out


# --------------------------------------------------------------------------- (b) 15-20%
def choice_counts(spec) -> dict:
    """Trainable parameters of each selective choice, from the calculator alone."""
    c = count_parameters(spec)
    L, d = spec.n_layer, spec.d_model
    norm = spec.norm_params * d if spec.bias or spec.norm_params == 1 else d
    block = (c["attention"] + c["mlp"]) // L + 2 * norm          # one block: attn, mlp, ln_1, ln_2
    biases = 0
    if spec.bias:
        biases = L * (sum(o for o, _ in spec.matrices().values()) + 2 * d) + d  # + LN biases
    out = {"full": c["total"], "bitfit (biases)": biases, "layernorm only": c["norms"],
           "embeddings only": c["embeddings"], "attention (all blocks)": c["attention"],
           "mlp (all blocks)": c["mlp"]}
    for k in range(1, L + 1):
        out[f"last {k} block{'s' if k > 1 else ''}"] = k * block + norm + c["head"]  # + ln_f
        out[f"attention of last {k}"] = k * c["attention"] // L
        out[f"mlp of last {k}"] = k * c["mlp"] // L
    return out


def selective_configs(L: int) -> dict:
    """The same choices as ``choice_counts`` as SelectiveConfigs, to check the calculator."""
    out = {"full": full_finetuning(), "bitfit (biases)": bitfit(),
           "layernorm only": SelectiveConfig(components=("norms",)),
           "embeddings only": SelectiveConfig(components=("embeddings",)),
           "attention (all blocks)": SelectiveConfig(components=("attention",)),
           "mlp (all blocks)": SelectiveConfig(components=("mlp",))}
    for k in range(1, L + 1):
        out[f"last {k} block{'s' if k > 1 else ''}"] = last_blocks(k)
        out[f"attention of last {k}"] = SelectiveConfig(components=("attention",), last_k=k)
        out[f"mlp of last {k}"] = SelectiveConfig(components=("mlp",), last_k=k)
    return out


def fifteen_to_twenty(base) -> dict:
    """Which selective choices train 15-20% of the weights? The calculator on our base (checked
    against SelectiveConfig.selected()) and on GPT-2 124M."""
    ours = choice_counts(spec_from_config(base.config, "our base"))
    params = dict(base.named_parameters())
    real = {name: sum(params[n].size for n in cfg.selected(base))
            for name, cfg in selective_configs(base.config.n_layer).items()}
    agree = all(ours[k] == real[k] for k in ours)
    gpt2 = choice_counts(PRESETS["gpt2-124m"])
    lo, hi = BAND
    print(f"\n(b) Which choices train {lo:.0%}-{hi:.0%} of the weights? (calculator; on our model "
          f"it equals SelectiveConfig.selected(): {'yes' if agree else 'NO'})\n")
    result = {"agree": agree}
    for label, counts in (("our base", ours), ("GPT-2 124M", gpt2)):
        total = counts["full"]
        pct = {k: v / total for k, v in counts.items()}
        inside = [k for k, p in pct.items() if lo <= p <= hi]
        shown = [k for k in counts if not k.startswith(("last", "attention of", "mlp of"))
                 or k in inside or k.endswith((" 1", " 1 block"))
                 or (k.startswith("last ") and pct[k] < 0.35)]
        print(f"    {label} ({total:,} parameters):")
        for k in shown:
            mark = "   <-- in the band" if k in inside else ""
            print(f"      {k:<24} {counts[k]:>12,} {pct[k]:>7.2%}{mark}")
        result[label] = {"pct": pct, "inside": inside}
        print(f"      in {lo:.0%}-{hi:.0%}: {', '.join(inside) if inside else 'none'}\n")
    lora = lora_parameter_count(PRESETS["gpt2-124m"], 8)
    result["gpt2_lora_pct"] = lora / gpt2["full"]
    print(f"    For contrast, LoRA r=8 on q, v of GPT-2: {lora:,} = "
          f"{lora / gpt2['full']:.2%}. The 15-20% figure is a selective choice (a few last "
          "blocks,\n    or one component of some blocks), not what LoRA or adapters train.")
    return result


# --------------------------------------------------------------------------- (c) training
def quality(model, x, y) -> dict:
    """evaluate_lm's loss and exact match, plus the fraction of answer tokens predicted right
    (a finer signal while whole strings are still rarely right)."""
    out = evaluate_lm(model, x, y)
    model.eval()
    with no_grad():
        pred = bk.to_numpy(model(bk.asarray(x)).data.argmax(axis=-1))
    answer = np.asarray(y) != -100                                 # answer positions only
    out["token_acc"] = float((pred == np.asarray(y))[answer].mean())
    return out


def train_all(ctx, specs) -> dict:
    """Does the subset learn the new task? Every variant trains the same steps at each of its two
    learning rates; the lower held-out loss is kept."""
    mix, eval_xy, steps, batch = ctx["mix"], ctx["eval"], ctx["steps"], ctx["batch"]
    print(f"\n(c) Fine-tuning on '{TASK}': {steps} steps of batch {batch} for every variant and "
          f"learning rate; on {len(eval_xy[0])} unseen\n    inputs: exact match (every answer "
          "token right), answer-token accuracy and loss\n")
    print(f"    {'variant':<15} {'lr':>7} {'exact match':>11} {'token acc':>9} {'loss':>7} "
          f"{'seconds':>8}")
    before = quality(fresh(ctx["base"], full_finetuning(), ctx["seed"]), *eval_xy)
    print(f"    {'(base, step 0)':<15} {'-':>7} {before['exact_match']:>11.1%} "
          f"{before['token_acc']:>9.1%} {before['loss']:>7.3f}")
    runs = {"_before": before}
    for name, (config, lrs) in specs.items():
        tried = []
        for lr in lrs:
            model = fresh(ctx["base"], config, ctx["seed"])
            cfg = TrainConfig(steps=steps, batch_size=batch, lr=lr, progress=False)
            t = time.perf_counter()
            try:
                train(model, mix.sample, cfg)
                ev = quality(model, *eval_xy)
            except FloatingPointError:
                ev = {"loss": float("inf"), "exact_match": 0.0, "token_acc": 0.0}
            secs = time.perf_counter() - t
            tried.append({"lr": lr, **ev, "seconds": secs, "model": model})
            print(f"    {name:<15} {lr:>7.0e} {ev['exact_match']:>11.1%} "
                  f"{ev['token_acc']:>9.1%} {ev['loss']:>7.3f} {secs:>8.1f}")
        best = min(tried, key=lambda r: r["loss"])
        runs[name] = {"best": best, "tried": [{k: v for k, v in r.items() if k != "model"}
                                              for r in tried]}
    return runs


# --------------------------------------------------------------------------- (d) frozen check
def frozen_check(models: dict, state: dict) -> dict:
    """Did training touch only what it should? Every trained weight against the base's, exactly,
    element by element."""
    print("\n(d) Did every frozen or masked-out element stay bit-identical? (trained weights vs "
          "the base's, compared exactly)\n")
    print(f"    {'variant':<15} {'frozen elements':>15} {'changed':>8} {'trainable':>10} "
          f"{'changed':>8}")
    out = {}
    for name, model in models.items():
        frozen = frozen_changed = train_n = train_changed = 0
        for pname, p in model.base_model.named_parameters():
            now, before = bk.to_numpy(p.data), bk.to_numpy(state[pname])
            diff = now != before                                   # exact, elementwise
            keep = np.zeros(p.shape, bool) if p.requires_grad else np.ones(p.shape, bool)
            if p.requires_grad and p.mask is not None:
                keep = ~bk.to_numpy(p.mask)
            frozen += int(keep.sum())
            frozen_changed += int(diff[keep].sum())
            train_n += int((~keep).sum())
            train_changed += int(diff[~keep].sum())
        out[name] = {"frozen": frozen, "frozen_changed": frozen_changed,
                     "trainable": train_n, "trainable_changed": train_changed}
        print(f"    {name:<15} {frozen:>15,} {frozen_changed:>8,} {train_n:>10,} "
              f"{train_changed:>8,}")
    ok = all(r["frozen_changed"] == 0 for r in out.values())
    print(f"\n    every frozen or masked-out element identical to the base: "
          f"{'yes' if ok else 'NO'}; the trainable ones moved.")
    return out


# --------------------------------------------------------------------------- (e) memory, time
def step_times(models: dict, x, y, reps: int) -> dict:
    """Median ms of forward+backward and of the AdamW update for each model. The variants take
    turns, one step each per round, so a slow moment of a shared CPU hits them all alike."""
    opts = {n: AdamW(m.trainable_parameters(), lr=1e-12) for n, m in models.items()}  # ~no-op
    fb = {n: [] for n in models}
    up = {n: [] for n in models}
    for round_ in range(reps + 1):                  # round 0 is a warm-up, not recorded
        for name, model in models.items():
            bk.synchronize()
            t0 = time.perf_counter()
            opts[name].zero_grad()
            model.loss(x, y).backward()
            bk.synchronize()
            t1 = time.perf_counter()
            opts[name].step()
            bk.synchronize()
            if round_:
                fb[name].append(t1 - t0)
                up[name].append(time.perf_counter() - t1)
    out = {}
    for name, model in models.items():
        model.zero_grad()
        q1, q2, q3 = statistics.quantiles(fb[name], n=4)
        out[name] = {"fwd_bwd_ms": 1e3 * q2, "update_ms": 1e3 * statistics.median(up[name]),
                     "fwd_bwd_spread": (q3 - q1) / q2}         # interquartile range / median
    return out


def memory_and_time(models: dict, x, y, reps: int) -> dict:
    """What does one step cost each variant? Memory by ``measure_step``; time split into
    forward+backward and the update, on untrained copies."""
    print(f"\n(e) One training step (batch {x.shape[0]} x {x.shape[1]} tokens): memory "
          f"measured by measure_step, MiB; time, median of {reps}\n    steps per variant on "
          "untrained copies, the variants taking turns (a shared CPU's speed drifts; taking\n"
          "    turns keeps the comparison fair)\n")
    print(f"    {'variant':<15} {'grads':>7} {'optim':>7} {'activ':>7} {'peak':>7} "
          f"{'fwd+bwd ms':>10} {'update ms':>9}")
    times = step_times(models, x, y, reps)
    out = {}
    for name, model in models.items():
        mem = measure_step(model, x, y)
        m = mem.measured
        out[name] = {"gradients": m["gradients"], "optimizer": m["optimizer"],
                     "activations": m["activations"], "peak": m["peak_train"],
                     "weights": m["weights"], "predicted_gradients": mem.predicted["gradients"],
                     **times[name]}
        r = out[name]
        print(f"    {name:<15} {r['gradients'] / MiB:>7.3f} {r['optimizer'] / MiB:>7.3f} "
              f"{r['activations'] / MiB:>7.3f} {r['peak'] / MiB:>7.3f} "
              f"{r['fwd_bwd_ms']:>10.1f} {r['update_ms']:>9.2f}")
    full = out["full"]["activations"]
    low = min(out, key=lambda n: out[n]["activations"])
    print(f"\n    Activations: {low} keeps {out[low]['activations'] / full:.0%} of full FT's. When "
          "everything below a layer is frozen,\n    no gradient has to flow there, so those "
          "layers build no graph; a frozen layer *between* trainable ones\n    still keeps its "
          "activations to carry the gradient through. The masks keep all of full FT's.")
    return out


def mask_cost(mem: dict, counts: dict) -> dict:
    """What does an element mask save? Its gradient bytes, optimizer bytes and times against
    full fine-tuning's."""
    full = mem["full"]
    print(f"\n(f) What the element mask costs (each mask trains {MASK_FRACTION:.0%} of every "
          "tensor):\n")
    out = {}
    for name in [k for k in mem if k.startswith("mask_")]:
        r = mem[name]
        out[name] = {"grad_ratio": r["gradients"] / full["gradients"],
                     "optim_ratio": r["optimizer"] / full["optimizer"],
                     "fwd_bwd_ratio": r["fwd_bwd_ms"] / full["fwd_bwd_ms"],
                     "update_ratio": r["update_ms"] / full["update_ms"],
                     "pct": counts[name]["pct"]}
        o = out[name]
        print(f"    {name:<15} trains {o['pct']:.1f}%; vs full FT: gradient bytes "
              f"{o['grad_ratio']:.2f}x, optimizer bytes {o['optim_ratio']:.2f}x, fwd+bwd time "
              f"{o['fwd_bwd_ratio']:.2f}x, update time {o['update_ratio']:.2f}x")
    sparse = MASK_FRACTION * full["optimizer"]
    g = [o["grad_ratio"] for o in out.values()]
    t = [o["fwd_bwd_ratio"] for o in out.values()]
    u = [o["update_ratio"] for o in out.values()]
    print(f"\n    Plainly: a {MASK_FRACTION:.0%} mask still computes the FULL gradient of every "
          f"chosen tensor (measured gradient bytes\n    {min(g):.2f}-{max(g):.2f}x full FT's) "
          f"and the same forward+backward ({min(t):.2f}-{max(t):.2f}x full FT's time; "
          f"full FT's own steps\n    spread by {full['fwd_bwd_spread']:.0%}, IQR/median). The "
          f"optimizer keeps full-size m and v, and its update took {min(u):.2f}-{max(u):.2f}x\n"
          "    full FT's: it computes the update everywhere, then masks it. Only the *change* is "
          "restricted "
          "to the mask.\n    An optimizer that stored m, v for the masked entries alone would "
          f"hold {sparse / MiB:.3f} MiB instead of {full['optimizer'] / MiB:.3f} MiB,\n    "
          "but the dense gradient would remain. Whole-tensor choices (BitFit, layer norms, "
          "attention, MLP, last\n    block) do save: their frozen tensors get no gradient, "
          "no m, v, and no weight-gradient matmul.")
    return out


# --------------------------------------------------------------------------- the verdict
def reseed(ctx, config, lr) -> list:
    """Held-out losses of ``config`` at ``lr`` over EXTRA_SEEDS more seeds (mask or init and
    batch order change); the first seed's run is not repeated."""
    out = []
    for s in range(ctx["seed"] + 1, ctx["seed"] + 1 + EXTRA_SEEDS):
        model = fresh(ctx["base"], config, s)
        mix = TaskMixture([TASK], seed=1000 + s, length=ctx["length"])
        try:
            train(model, mix.sample, TrainConfig(steps=ctx["steps"], batch_size=ctx["batch"],
                                                 lr=lr, progress=False))
            out.append(evaluate_lm(model, *ctx["eval"])["loss"])
        except FloatingPointError:
            out.append(float("inf"))
    return out


def summary(ctx, specs, counts, runs, mem, before) -> dict:
    """Is quality "mixed"? The first seed's largest inversion (fewer parameters, lower loss) and
    full fine-tuning are trained again at more seeds; a verdict is printed only beyond the
    spread of those seeds (and MARGIN)."""
    steps = ctx["steps"]
    best = {n: r["best"] for n, r in runs.items()}
    pct = {n: counts[n]["pct"] for n in best}
    pairs = [(best[j]["loss"] - best[i]["loss"], i, j) for i in best for j in best
             if pct[i] < pct[j] and best[i]["loss"] < best[j]["loss"]]
    again = ["full"] + ([n for n in max(pairs)[1:] if n != "full"] if pairs else [])
    print(f"\n    More seeds ({EXTRA_SEEDS}) for the runs the verdicts compare: "
          f"{', '.join(again)}, each at its chosen lr")
    seeded = {n: [best[n]["loss"]] + reseed(ctx, specs[n][0], best[n]["lr"]) for n in again}
    if pairs:
        seeded["_pair"] = max(pairs)[1:]
    print("\n    Summary (best of the two learning rates by held-out loss):\n")
    print(f"    {'variant':<15} {'trainable':>9} {'lr':>7} {'exact':>7} {'tok acc':>7} "
          f"{'loss':>7} {'grads+opt MiB':>13} {'peak MiB':>8} {'step ms':>8}")
    for name in counts:
        b, r = runs[name]["best"], mem[name]
        print(f"    {name:<15} {counts[name]['pct']:>8.2f}% {b['lr']:>7.0e} "
              f"{b['exact_match']:>7.1%} {b['token_acc']:>7.1%} {b['loss']:>7.3f} "
              f"{(r['gradients'] + r['optimizer']) / MiB:>13.3f} {r['peak'] / MiB:>8.3f} "
              f"{r['fwd_bwd_ms'] + r['update_ms']:>8.1f}")
    losses = {n: seeded.get(n, [best[n]["loss"]]) for n in best}     # every seed's loss
    full, full_sd = spread(losses["full"])
    tol = max(0.1 * full, full_sd)                                    # 10%, or full's own noise
    close = [n for n in best if n != "full" and spread(losses[n])[0] <= full + tol]
    far = [n for n in best if n != "full" and n not in close]
    top_em = max(b["exact_match"] for b in best.values())
    print(f"\n    measured: after {steps} steps full fine-tuning took the held-out loss from "
          f"{before['loss']:.3f} to {full:.3f} ± {full_sd:.3f} ({len(losses['full'])} seeds)."
          f"\n    Within {tol:.3f} of full FT's loss (10% or its seeds' sd), or better: "
          f"{', '.join(close) or 'none'}.\n    Behind: {', '.join(far) or 'none'}.")
    if top_em < 0.5:
        print(f"    Whole strings are still rarely right after {steps} steps (best exact match "
              f"{top_em:.1%}); sort needs more training\n    than this lesson's budget, so the "
              "loss and token accuracy carry the comparison.")
    pair = seeded.get("_pair")
    inversion = None
    if pair:
        i, j = pair
        d = differs(losses[i], losses[j], floor=MARGIN)
        (mi, si), (mj, sj) = spread(losses[i]), spread(losses[j])
        print(f"    The first seed's largest inversion, over {len(losses[i])} seeds: {i} trains "
              f"{pct[i]:.1f}% "
              f"and reached loss {mi:.3f} ± {si:.3f};\n    {j} trains {pct[j]:.1f}% and "
              f"reached {mj:.3f} ± {sj:.3f} (margin {max(MARGIN, si + sj):.3f}).")
        if d == "less":
            inversion = (i, j)
            print("    Mixed results, beyond the seeds' noise: the count does not predict the "
                  "quality; WHICH weights train\n    matters more than how many.")
        else:
            print("    Within the seeds' noise: this run does not show that fewer parameters "
                  "can beat more.")
    else:
        print("    Here more trainable parameters always gave a lower loss (first seed).")
    return {"close_to_full": close, "far_from_full": far, "best_exact_match": top_em,
            "inversion": inversion, "losses": losses}


# --------------------------------------------------------------------------- the figure
def figure(counts, runs, mem, band):
    """Quality vs trainable %, the memory of a step, its time, and the 15-20% band."""
    names = list(counts)
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))

    ax = axes[0, 0]
    for n in names:
        b = runs[n]["best"]
        ax.scatter(counts[n]["pct"], b["loss"], s=40)
        ax.annotate(n, (counts[n]["pct"], b["loss"]), fontsize=8, xytext=(4, 2),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (%)")
    ax.set_ylabel(f"held-out '{TASK}' loss after the same steps (best lr)")
    ax.set_title("Quality vs parameter efficiency")

    ax = axes[0, 1]
    bottom = np.zeros(len(names))
    for key, color in (("weights", "tab:blue"), ("gradients", "tab:orange"),
                       ("optimizer", "tab:green"), ("activations", "tab:red")):
        v = np.array([mem[n][key] / MiB for n in names])
        ax.bar(names, v, bottom=bottom, color=color, label=key)
        bottom += v
    ax.set_ylabel("MiB (measured)")
    ax.set_title("Memory of one step: masks keep full-size gradients and m, v")
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    fb = np.array([mem[n]["fwd_bwd_ms"] for n in names])
    up = np.array([mem[n]["update_ms"] for n in names])
    ax.bar(names, fb, color="tab:purple", label="forward + backward")
    ax.bar(names, up, bottom=fb, color="tab:gray", label="AdamW update")
    ax.set_ylabel("ms per step (median)")
    ax.set_title("Step time: a mask saves no compute")
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    lo, hi = BAND
    rows = []
    for label in ("our base", "GPT-2 124M"):
        pct = band[label]["pct"]
        keep = [k for k in ("bitfit (biases)", "attention (all blocks)", "mlp (all blocks)",
                            "last 1 block") if k in pct] + band[label]["inside"]
        rows += [(f"{label}: {k}", 100 * pct[k], k in band[label]["inside"]) for k in keep]
    ax.barh([r[0] for r in rows], [r[1] for r in rows],
            color=["tab:orange" if r[2] else "tab:gray" for r in rows])
    ax.axvspan(100 * lo, 100 * hi, color="gold", alpha=0.3, label="15-20%")
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("trainable parameters (%)")
    ax.set_title("Which selective choices train 15-20% (orange: inside)")
    ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = lessonkit.arguments(__doc__, quick="the tiny quick base, few steps").parse_args(argv)
    clock = lessonkit.Stopwatch()
    kind = "quick" if args.quick else "default"
    steps, batch = (QUICK_STEPS, QUICK_BATCH) if args.quick else (STEPS, BATCH)
    n_eval = QUICK_EVAL if args.quick else EVAL_EXAMPLES
    print(f"Lesson 04: selective fine-tuning ({kind} base, task '{TASK}', backend {bk.name}, "
          f"seed {args.seed})")
    base, info = load_base(kind, seed=args.seed, progress=not args.quick)
    mix = TaskMixture([TASK], seed=1000 + args.seed, length=info["length"])
    ctx = {"base": base, "mix": mix, "eval": mix.eval_set(TASK, n_eval), "steps": steps,
           "batch": batch, "seed": args.seed, "length": info["length"]}
    specs = variants(tuple(mix.sample(batch) for _ in range(CALIBRATION_BATCHES)))

    untrained = {n: fresh(base, c, args.seed) for n, (c, _) in specs.items()}
    counts = print_counts(untrained)
    band = fifteen_to_twenty(base)
    runs = train_all(ctx, specs)
    before = runs.pop("_before")
    models = {n: r["best"].pop("model") for n, r in runs.items()}
    frozen = frozen_check(models, base.state_dict())
    x, y = (bk.asarray(a) for a in mix.sample(batch))
    mem = memory_and_time(untrained, x, y, TIMING_REPS)
    cost = mask_cost(mem, counts)
    verdict = summary(ctx, specs, counts, runs, mem, before)

    path = lessonkit.save_figure(figure(counts, runs, mem, band), OUT_NAME)
    seconds = clock.seconds()
    print(f"\n    figure saved to {path}  ({seconds:.0f} s in all)")
    return {"kind": kind, "counts": counts, "band": band, "before": before, "runs": runs,
            "verdict": verdict, "frozen": frozen,
            "memory": mem, "mask_cost": cost, "figure": str(path), "seconds": seconds}


if __name__ == "__main__":
    main()
