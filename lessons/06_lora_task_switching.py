"""Lesson 06: one base model, many tasks: small LoRA checkpoints, switched, merged and mixed.

A fine-tuned copy of a model is as large as the model. A LoRA fine-tune is not: it is the pair
(A, B) for each adapted matrix, r (in + out) numbers each, plus a small JSON config. So one frozen
base can serve many tasks, each a file of kilobytes, and "switching task" means changing which
(A, B) is used, never reloading the base. There are three ways to use an adapter:

1. Unmerged: y = W0 x + s B (A x). The base weights are untouched; the adapter is an extra path.
   Swapping tasks is ``set_adapter(name)``: free. Every token pays two thin extra matmuls per
   adapted matrix, r·in + r·out multiply-adds against the base's in·out.

2. Merged: W <- W0 + s B A, computed once (one matmul per matrix). The model is then an ordinary
   model of the base's shapes, so it costs exactly what the base costs (the LoRA paper's "no
   additional inference latency", section 4.1). To switch: ``unmerge()`` (W <- W - s B A) and
   merge the next adapter. In exact arithmetic the unmerge restores W0; in float32 it restores
   it to within round-off (about 1e-7 of |W|), which the lesson measures, even after many cycles.

3. Mixed batch: each row of one batch uses its own adapter (``adapter_names=[...]``, None = the
   base). The frozen W0 x is computed once for the whole batch; each adapter's small term only
   for its rows. One server, many tasks, one forward pass. This needs the unmerged form: a merged
   W holds one adapter for every row.

Which tasks? The base knows copy, reverse, cipher and count. The lesson trains one LoRA adapter
(r = 8 on q, v) for each of several unseen tasks with the same budget, and keeps the two that
learnt best (held-out exact match): it *measures* which tasks LoRA can pick up in a few hundred
steps instead of assuming. One candidate is a new marker: ``<new0>`` followed by a reverse
example, an unseen trigger for a skill the base has (cf. lesson 05: a new skill such as sort is
much slower for LoRA on q, v).

Then: (b) save both adapters and the base, and compare file sizes; (c) reload both into one
fresh base and check they reproduce the trained adapters; (d) each task with the right adapter,
the wrong one and none; (e) switching by unmerge + merge without reloading; (f) a mixed batch
against each row alone; (g) the speed of KV-cached generation: base vs merged vs unmerged.

Run:  python lessons/06_lora_task_switching.py [--quick] [--seed N]
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # render to a file; no display needed
import matplotlib.pyplot as plt
import numpy as np  # host-side only: comparisons, tables and the figure

from minipeft import backend as bk
from minipeft import lessonkit
from minipeft.autograd import counters, no_grad
from minipeft.base import load_base
from minipeft.data import TaskMixture, decode, swap_marker
from minipeft.io import save_model
from minipeft.nn import generate
from minipeft.peft import LoraConfig, LoRALinear, get_peft_model, load_peft_model
from minipeft.train import TrainConfig, evaluate_lm, train

CANDIDATES = ("shift", "sort", "add", "brackets", "new0")  # tasks the base never saw
NEW_MARKER_SKILL = "reverse"       # "new0": <new0> + a reverse example (an unseen trigger)
RANK, ALPHA, LR = 8, 16, 1e-2      # LoRA on q, v (LoraConfig's default targets)
STEPS, QUICK_STEPS = 300, 40       # per adapter, the same for every candidate
BATCH, QUICK_BATCH = 32, 16
EVAL_EXAMPLES, QUICK_EVAL = 300, 100
SWITCH_CYCLES = 50                 # merge A, unmerge, merge B, unmerge ... : does W0 drift?
MIXED_ROWS = 6                     # rows per task in the mixed batch (plus as many base rows)
GEN_BATCH = 16                     # prompts generated together in the speed test
GEN_REPEATS, QUICK_GEN_REPEATS = 21, 3
SAME_SPEED = 0.10                  # "at the base's speed": medians within 10%
OUT_NAME = "06_lora_task_switching.png"
KiB, MiB = 2 ** 10, 2 ** 20


def task_data(name: str, seed: int, length: int, n_eval: int):
    """(sample(batch) -> (x, y), held-out (x, y)) for a task; "new0" is a reverse example
    whose marker is swapped to the unseen <new0>."""
    if name == "new0":
        mix = TaskMixture([NEW_MARKER_SKILL], seed=seed, length=length)
        swap = lambda xy: swap_marker(*xy, NEW_MARKER_SKILL, "new0")
        return (lambda b: swap(mix.sample(b))), swap(mix.eval_set(NEW_MARKER_SKILL, n_eval))
    mix = TaskMixture([name], seed=seed, length=length)
    return mix.sample, mix.eval_set(name, n_eval)


def logits_of(model, x, **kwargs) -> np.ndarray:
    with no_grad():
        return bk.to_numpy(model(bk.asarray(x), **kwargs).data)


def dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def prompts_of(x, y):
    """Generation prompts: every row cut just after '=' (all rows of one task have the same
    length), and how many answer tokens follow."""
    scored = np.asarray(y) != -100                      # (n, T): targets that are answer tokens
    first = int(np.argmax(scored[0]))                   # x[:, first] is '=', predicting answer 1
    return np.asarray(x)[:, :first + 1], int(scored[0].sum())


# --------------------------------------------------------------------------- (a) choose
def train_candidates(base, ctx) -> tuple:
    """Which unseen tasks can LoRA pick up in the budget? One adapter per candidate on one model,
    trained in turn; the two with the best held-out exact match are kept."""
    print(f"\n(a) One LoRA adapter (r={RANK}, alpha={ALPHA}, q and v) per unseen task, "
          f"{ctx['steps']} steps x {ctx['batch']} rows each, lr {LR:g}\n")
    print(f"    {'task':<9} {'example (held-out)':<32} {'EM, adapter':>12} {'EM, base':>9} "
          f"{'loss':>7} {'time':>6}")
    lcfg = LoraConfig(r=RANK, alpha=ALPHA)
    model = get_peft_model(lessonkit.fresh_copy(base), lcfg, adapter_name=CANDIDATES[0],
                           seed=ctx["seed"])
    scores, data = {}, {}
    for i, name in enumerate(CANDIDATES):
        if i:
            model.add_adapter(name, lcfg, seed=ctx["seed"] + i)   # active, and the only trainable
        sample, ev = task_data(name, 1000 + ctx["seed"], ctx["length"], ctx["n_eval"])
        data[name] = (sample, ev)
        result = train(model, sample, TrainConfig(steps=ctx["steps"], batch_size=ctx["batch"],
                                                  lr=LR, progress=False, desc=name))
        s = evaluate_lm(model, *ev)
        with model.disable_adapter():
            s_base = evaluate_lm(model, *ev)
        scores[name] = {"em": s["exact_match"], "loss": s["loss"], "em_base": s_base["exact_match"],
                        "seconds": result.seconds, "final_train_loss": result.final_loss}
        x, y = ev
        row = x[0][:int(np.argmax(np.asarray(y[0]) != -100)) + 1]
        example = decode(row) + decode([t for t in y[0] if t != -100])
        print(f"    {name:<9} {example:<32} {s['exact_match']:>12.1%} "
              f"{s_base['exact_match']:>9.1%} {s['loss']:>7.3f} {result.seconds:>5.0f}s")
    ranked = sorted(CANDIDATES, key=lambda n: (-scores[n]["em"], scores[n]["loss"]))
    chosen = ranked[:2]
    for name in CANDIDATES:
        if name not in chosen:
            model.delete_adapter(name)
    print(f"\n    kept the two that learnt best: {chosen[0]} and {chosen[1]}.")
    return model, chosen, scores, data


# --------------------------------------------------------------------------- (b) sizes
def save_and_measure(model, chosen, base, folder: Path) -> dict:
    """How small is a task? The base and both adapters saved as files, their bytes compared."""
    shutil.rmtree(folder, ignore_errors=True)
    save_model(base, folder / "base")
    base_bytes = dir_bytes(folder / "base")
    print(f"\n(b) On disk (safetensors + JSON config), in {folder}\n")
    print(f"    {'file':<18} {'parameters':>11} {'bytes':>11} {'size':>10} {'of the base':>12}")
    n_base = base.num_parameters()
    print(f"    {'base model':<18} {n_base:>11,} {base_bytes:>11,} "
          f"{base_bytes / MiB:>7.2f} MiB {1:>12.1%}")
    sizes = {"base": base_bytes}
    for name in chosen:
        written = model.save_adapter(folder / name, name)
        on_disk = dir_bytes(folder / name)
        n = sum(int(a.size) for a in model.adapter_state(name).values())
        sizes[name] = on_disk
        assert written == on_disk
        print(f"    {'adapter ' + name:<18} {n:>11,} {on_disk:>11,} {on_disk / KiB:>7.1f} KiB "
              f"{on_disk / base_bytes:>12.2%}")
    ratio = base_bytes / max(sizes[n] for n in chosen)
    print(f"    4 bytes per float32 parameter plus headers: each adapter is {ratio:.0f}x smaller "
          "than the model it adapts.")
    return sizes


# --------------------------------------------------------------------------- (c) reload
def reload_both(trained, chosen, base, folder: Path, evals) -> tuple:
    """Do the files hold the fine-tunes? One fresh base, both adapters loaded from disk, its
    logits against the trained model's."""
    a, b = chosen
    served = load_peft_model(lessonkit.fresh_copy(base), folder / a, adapter_name=a)
    served.load_adapter(folder / b, name=b)
    reload_diff = {}
    for n in chosen:
        trained.set_adapter(n)
        served.set_adapter(n)
        x = evals[n][0][:64]
        reload_diff[n] = float(np.abs(logits_of(served, x) - logits_of(trained, x)).max())
    print("\n(c) Reloaded into one fresh base: max |logits - trained model's logits| = "
          + ", ".join(f"{n}: {v:.1e}" for n, v in reload_diff.items())
          + "\n    (the same float32 numbers through the same operations: the task-specific "
          "fine-tunes, reproduced)")
    return served, reload_diff


# --------------------------------------------------------------------------- (d) which adapter
def right_wrong_none(served, chosen, evals) -> tuple:
    """Is an adapter a task-specific edit? Each task's held-out exact match with its own
    adapter, the other one, and none."""
    a, b = chosen
    print("\n(d) Held-out exact match of each task with each adapter (one base, "
          "set_adapter(name); None = the base)\n")
    columns = [a, b, None]
    print(f"    {'task':<9}" + "".join(f"{'adapter ' + str(c):>18}" for c in columns))
    accuracy = {}
    for task in chosen:
        accuracy[task] = {}
        for c in columns:
            served.set_adapter(c)
            accuracy[task][str(c)] = evaluate_lm(served, *evals[task])["exact_match"]
        print(f"    {task:<9}" + "".join(f"{accuracy[task][str(c)]:>18.1%}" for c in columns))
    right_wins = all(accuracy[t][t] > max(accuracy[t][str(c)] for c in columns if c != t)
                     for t in chosen)
    wrong_helps = [t for t in chosen for c in chosen
                   if c != t and accuracy[t][c] > accuracy[t]["None"] + 0.05]
    print(f"    Each task is best served by its own adapter: {right_wins}. The wrong adapter "
          + ("beats none by more than 5 points on: " + ", ".join(wrong_helps) if wrong_helps
             else "is no better than none") + ":\n    an adapter is a task-specific edit, not a "
          "general improvement.")
    return accuracy, right_wins


# --------------------------------------------------------------------------- (e) merge switching
def switch_by_merge(served, chosen, evals) -> tuple:
    """Can a server switch tasks by merging, W0 + ΔW_a -> W0 -> W0 + ΔW_b, never reloading the
    base? Merged against unmerged logits, and W against W0 after one and many cycles."""
    layers = [m for _, m in served.base_model.named_modules() if isinstance(m, LoRALinear)]
    W0 = [m.base.weight.data.copy() for m in layers]
    buffers = [id(m.base.weight) for m in layers]
    merge = {}
    for n in chosen:
        served.set_adapter(n)
        x = evals[n][0][:64]
        unmerged = logits_of(served, x)
        served.merge()
        merged = logits_of(served, x)
        em = evaluate_lm(served, *evals[n])["exact_match"]
        served.unmerge()
        drift = max(float(bk.xp.abs(m.base.weight.data - w).max()) for m, w in zip(layers, W0))
        merge[n] = {"max_abs_diff": float(np.abs(merged - unmerged).max()), "em_merged": em,
                    "drift_after_unmerge": drift}
    for _ in range(SWITCH_CYCLES):
        for n in chosen:
            served.set_adapter(n)
            served.merge()
            served.unmerge()
    drift_cycles = max(float(bk.xp.abs(m.base.weight.data - w).max()) for m, w in zip(layers, W0))
    w_max = max(float(bk.xp.abs(w).max()) for w in W0)
    same_params = buffers == [id(m.base.weight) for m in layers]
    print("\n(e) Switching by merging: set_adapter(a); merge(); ...; unmerge(); set_adapter(b); "
          "merge()\n    (the base is never reloaded)\n")
    print(f"    {'adapter':<9} {'max |merged - unmerged logits|':>31} {'EM merged':>10} "
          f"{'max |W - W0| after unmerge':>28}")
    for n in chosen:
        r = merge[n]
        print(f"    {n:<9} {r['max_abs_diff']:>31.1e} {r['em_merged']:>10.1%} "
              f"{r['drift_after_unmerge']:>28.1e}")
    drift_one = max(r["drift_after_unmerge"] for r in merge.values())
    print(f"    after {SWITCH_CYCLES} more cycles of both: max |W - W0| = {drift_cycles:.1e} "
          f"(largest |W0| entry {w_max:.2f}); the same Parameter\n    objects throughout: "
          f"{same_params}.\n    Merged equals unmerged within float32 round-off; unmerge "
          "restores W0 to round-off, not bit for bit:\n    (W0 + ΔW) - ΔW rounds twice"
          + (f", and the error accumulates ({drift_cycles / drift_one:.0f}x after "
             f"{SWITCH_CYCLES} cycles): a server that\n    switches often should restore W0 "
             "from its file now and then." if drift_cycles > 2 * drift_one else
             "; it did not grow over the cycles."))
    return merge, drift_cycles, same_params


# --------------------------------------------------------------------------- (f) mixed batch
def mixed_batch(served, chosen, evals) -> tuple:
    """Can one batch serve several tasks? Row i uses adapter names[i]; logits and greedy
    generation against each row run alone with its adapter."""
    a, b = chosen
    rows, names, tasks = [], [], []
    for i in range(MIXED_ROWS):          # a's row, b's row, and one of a's rows on the bare base
        for n, task, j in ((a, a, i), (b, b, i), (None, a, MIXED_ROWS + i)):
            rows.append(evals[task][0][j])
            names.append(n)
            tasks.append(task)
    xm = np.stack(rows)                                                   # (3 MIXED_ROWS, T)
    mixed = logits_of(served, xm, adapter_names=names)
    alone = []
    for i, n in enumerate(names):
        served.set_adapter(n)
        alone.append(logits_of(served, xm[i:i + 1])[0])
    alone = np.stack(alone)
    mixed_diff = float(np.abs(mixed - alone).max())
    same_pred = bool((mixed.argmax(-1) == alone.argmax(-1)).all())
    # generation needs one prompt length per batch: keep the rows whose prompt is as long as a's
    plen = {n: prompts_of(*evals[n]) for n in chosen}                     # (prompts, answer len)
    p_len, n_new = plen[a][0].shape[1], max(v[1] for v in plen.values())
    keep = [i for i, t in enumerate(tasks) if plen[t][0].shape[1] == p_len]
    gen_x = bk.asarray(xm[keep, :p_len])
    gen_names = [names[i] for i in keep]
    gen_mixed = bk.to_numpy(generate(served, gen_x, n_new, adapter_names=gen_names))
    gen_alone = []
    for i, n in enumerate(gen_names):
        served.set_adapter(n)
        gen_alone.append(bk.to_numpy(generate(served, gen_x[i:i + 1], n_new))[0])
    gen_same = bool((gen_mixed == np.stack(gen_alone)).all())
    print(f"\n(f) One mixed batch of {len(names)} rows, adapter_names = {names[:3]} * "
          f"{MIXED_ROWS}\n    max |mixed logits - each row run alone with its adapter| = "
          f"{mixed_diff:.1e}; same predictions: {same_pred}\n    greedy KV-cached generation "
          f"of {len(keep)} of those rows in one call vs one by one: identical tokens: {gen_same}")
    return mixed_diff, same_pred, gen_same


# --------------------------------------------------------------------------- (g) speed
def generation_speed(served, base, chosen, evals, reps: int) -> dict:
    """Does a merged adapter cost nothing at inference? KV-cached generation of the base, the
    merged and the unmerged model: matmul FLOPs counted, time as interleaved medians (this
    loop times generate() calls, switching merge on and off, so it is written out here)."""
    a = chosen[0]
    plain = lessonkit.fresh_copy(base)
    served.set_adapter(a)
    px, n_ans = prompts_of(*evals[a])
    px = bk.asarray(px[:GEN_BATCH])
    run = {"base": lambda: generate(plain, px, n_ans),
           "merged": lambda: generate(served, px, n_ans),
           "unmerged": lambda: generate(served, px, n_ans)}
    flops, outputs, times = {}, {}, {k: [] for k in run}
    for k in run:                                            # warm-up, FLOPs and the tokens
        if k == "merged":
            served.merge()
        counters.clear()
        outputs[k] = bk.to_numpy(run[k]())
        flops[k] = counters["matmul_flops"]
        served.unmerge()
    for _ in range(reps):                                    # interleaved: drift hits all alike
        for k in ("base", "merged", "unmerged"):
            if k == "merged":
                served.merge()
            bk.synchronize()
            t = time.perf_counter()
            run[k]()
            bk.synchronize()
            times[k].append((time.perf_counter() - t) * 1e3)
            served.unmerge()
    med = {k: statistics.median(v) for k, v in times.items()}
    same_tokens = bool((outputs["merged"] == outputs["unmerged"]).all())
    print(f"\n(g) KV-cached greedy generation: {GEN_BATCH} '{a}' prompts, {n_ans} new tokens, "
          f"median of {reps} interleaved repeats\n")
    print(f"    {'model':<10} {'median ms':>10} {'ms / token':>11} {'vs base':>8} "
          f"{'matmul FLOPs':>13}")
    for k in run:
        print(f"    {k:<10} {med[k]:>10.2f} {med[k] / n_ans:>11.3f} {med[k] / med['base']:>8.2f} "
              f"{flops[k]:>13,}")
    at_base = abs(med["merged"] / med["base"] - 1) <= SAME_SPEED
    print(f"    merged and unmerged generate the same tokens: {same_tokens}. The merged model "
          f"does exactly the base's\n    FLOPs ({flops['merged'] == flops['base']}); the "
          f"unmerged one {flops['unmerged'] / flops['base'] - 1:+.1%} FLOPs and "
          f"{med['unmerged'] / med['base'] - 1:+.0%} time: per token and adapted\n    matrix "
          "two thin matmuls, a scale and an add, each a separate array operation.")
    print(f"    Merged runs at the base's speed (within {SAME_SPEED:.0%}): {at_base} "
          f"(measured {med['merged'] / med['base']:.2f}x).")
    return {"med": med, "flops": flops, "times": times, "same_tokens": same_tokens,
            "at_base": at_base}


# --------------------------------------------------------------------------- the claim
def claim(sizes, chosen, reload_diff, right_wins, same_pred) -> bool:
    """SEED-NOTES row 4, judged by the numbers of (b), (c), (d) and (f)."""
    print("\nClaim (SEED-NOTES row 4): a PEFT checkpoint is tiny and one base serves many tasks "
          "by swapping the small weights.\n    measured: adapters of "
          + " and ".join(f"{sizes[n] / KiB:.0f} KiB" for n in chosen)
          + f" against a {sizes['base'] / MiB:.2f} MiB base; reloaded adapters reproduce the "
          f"trained ones\n    (max diff {max(reload_diff.values()):.0e}); right adapter beats "
          f"wrong and none on every task: {right_wins};\n    switching by merge/unmerge needs no "
          f"reload; mixed batch = rows alone: {same_pred}.")
    held = (right_wins and same_pred and max(sizes[n] for n in chosen) < 0.1 * sizes["base"]
            and max(reload_diff.values()) < 1e-5)
    print("    The claim " + ("held here." if held else "did not fully hold here (see above)."))
    return held


# --------------------------------------------------------------------------- the figure
def figure(candidates, chosen, sizes, accuracy, times):
    """What each candidate learnt, the file sizes, the right/wrong/none grid, generation time."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))

    ax = axes[0, 0]
    names = list(candidates)
    ax.bar(names, [candidates[n]["em"] for n in names],
           color=["tab:green" if n in chosen else "tab:blue" for n in names],
           label="with its adapter (green: kept)")
    ax.bar(names, [candidates[n]["em_base"] for n in names], color="k", alpha=0.5,
           label="the base, no adapter")
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out exact match with its adapter")
    ax.set_title("Which unseen tasks LoRA (r=8, q,v) learns in the budget")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    labels = ["base model"] + [f"adapter {n}" for n in chosen]
    vals = [sizes["base"] / KiB] + [sizes[n] / KiB for n in chosen]
    ax.bar(labels, vals, color=["tab:gray", "tab:blue", "tab:orange"])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:,.0f} KiB", ha="center", va="bottom")
    ax.set_yscale("log")
    ax.set_ylabel("bytes on disk (KiB, log scale)")
    ax.set_title("Checkpoint sizes")

    ax = axes[1, 0]
    cols = [chosen[0], chosen[1], "None"]
    grid = np.array([[accuracy[t][c] for c in cols] for t in chosen])
    ax.imshow(grid, vmin=0, vmax=1, cmap="Greens")
    for i in range(len(chosen)):
        for j in range(len(cols)):
            ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center",
                    color="white" if grid[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(cols)), [f"adapter {c}" for c in cols])
    ax.set_yticks(range(len(chosen)), [f"task {t}" for t in chosen])
    ax.set_title("Held-out exact match: right adapter, wrong adapter, none")

    ax = axes[1, 1]
    keys = list(times)
    ax.boxplot([times[k] for k in keys])
    ax.set_xticks(range(1, len(keys) + 1), keys)
    ax.set_ylabel("ms per generate() call")
    ax.set_title("KV-cached generation time (interleaved repeats)")
    return fig


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = lessonkit.arguments(__doc__, quick="the tiny quick base, few steps").parse_args(argv)
    clock = lessonkit.Stopwatch()
    kind = "quick" if args.quick else "default"
    print(f"Lesson 06: LoRA task switching ({kind} base, backend {bk.name}, seed {args.seed})")
    base, info = load_base(kind, seed=args.seed, progress=not args.quick)
    ctx = {"seed": args.seed, "length": info["length"],
           "steps": QUICK_STEPS if args.quick else STEPS,
           "batch": QUICK_BATCH if args.quick else BATCH,
           "n_eval": QUICK_EVAL if args.quick else EVAL_EXAMPLES}

    trained, chosen, candidates, data = train_candidates(base, ctx)
    evals = {n: data[n][1] for n in chosen}
    folder = lessonkit.out_dir() / "06_adapters"
    sizes = save_and_measure(trained, chosen, base, folder)
    served, reload_diff = reload_both(trained, chosen, base, folder, evals)
    accuracy, right_wins = right_wrong_none(served, chosen, evals)
    merge, drift_cycles, same_params = switch_by_merge(served, chosen, evals)
    mixed_diff, same_pred, gen_same = mixed_batch(served, chosen, evals)
    speed = generation_speed(served, base, chosen, evals,
                             QUICK_GEN_REPEATS if args.quick else GEN_REPEATS)
    held = claim(sizes, chosen, reload_diff, right_wins, same_pred)

    path = lessonkit.save_figure(figure(candidates, chosen, sizes, accuracy, speed["times"]),
                                 OUT_NAME)
    seconds = clock.seconds()
    print(f"\n    figure saved to {path}  ({seconds:.0f} s in all)")
    return {"kind": kind, "chosen": chosen, "candidates": candidates, "sizes": sizes,
            "adapter_folder": str(folder), "reload_max_abs_diff": reload_diff,
            "accuracy": accuracy, "right_adapter_wins": right_wins, "merge": merge,
            "drift_after_cycles": drift_cycles, "same_parameters": same_params,
            "mixed_max_abs_diff": mixed_diff, "mixed_same_predictions": same_pred,
            "mixed_generation_identical": gen_same, "gen_ms": speed["med"],
            "gen_flops": speed["flops"], "merged_same_tokens": speed["same_tokens"],
            "merged_at_base_speed": speed["at_base"], "claim_held": held, "figure": str(path),
            "seconds": seconds}


if __name__ == "__main__":
    main()
