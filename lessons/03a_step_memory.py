"""Lesson 03a: why full fine-tuning is expensive: the memory of one training step, measured.

A training step (forward, backward, AdamW update) must hold five kinds of bytes at once:

    weights      W = every parameter, b bytes each                      N b
    gradients    G = one gradient per *trainable* parameter             T b
    optimizer    O = AdamW's running mean m and variance v per trainable   2 T b
    activations  A = what the forward pass saved for the backward pass
    workspace      = the temporaries of the busiest single backward op

with N parameters, T of them trainable (full fine-tuning: T = N). So W + G + O = 4 N b: in fp32
(b = 4) every parameter costs 16 bytes before a single token is seen. That part does not depend
on the batch at all.

Activations do. Every op keeps what its backward needs, and every one of those arrays has a
batch axis B and a token axis T_ctx. For our GPT, per block, with C the width and H heads
(``minipeft.memory.gpt_activation_breakdown`` lists the terms as our ops save them):

    A_block ≈ b (25 B T_ctx C + B H T_ctx²)    layer norms, q/k/v, MLP hidden (12 of the 25), …
                                               plus the attention probabilities (B, H, T, T)

so A grows linearly with B and, apart from the T² attention term, linearly with T_ctx, while
W + G + O stay put.

LoRA (Hu et al. 2021) trains T ≪ N. Then G and O nearly vanish, but W does not (the frozen model
must still run), and neither does A: to pass the gradient *through* a frozen layer to the LoRA
factors below it, the backward pass still needs that layer's activations.

The parts, each measured on config S, predicted (counted from parameters and the graph) beside
measured (the allocator):
  (a) full fine-tuning at two batch sizes and two context lengths: what grows with B and T;
  (b) the activations broken down by layer and, within a block, by term;
  (c) LoRA on the same batches: what it removes and what it keeps.
Lesson 03b scales the same formulas to GPT-2, LLaMA-2-7B and GPT-3 175B (the LoRA paper's
figures) and finds the width at which parameter state overtakes activations.

Run:  python lessons/03a_step_memory.py [--quick] [--seed N]
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # render to a file; no display needed
import matplotlib.pyplot as plt
import numpy as np  # host-side only: random batches, tables and the figure

from minipeft import backend as bk
from minipeft import lessonkit
from minipeft.memory import gpt_activation_breakdown, gpt_activation_bytes, measure_step
from minipeft.nn import GPT, GPTConfig
from minipeft.peft import LoraConfig, full_finetuning, get_peft_model

CONFIG = "S"                       # the study's small config (the bench's S too)
MODEL = dict(vocab_size=512, n_embd=128, n_layer=4, n_head=4, block_size=128)
BATCHES, CONTEXTS = (8, 16), (64, 128)
QUICK_BATCHES, QUICK_CONTEXTS = (2, 4), (16, 32)
LORA = dict(r=8, alpha=16)         # on q_proj and v_proj, as in the LoRA paper
OUT_NAME = "03a_step_memory.png"
MiB = 2 ** 20
CATS = ("weights", "gradients", "optimizer", "activations")


# --------------------------------------------------------------------------- the measurement
# Every part measures one training step of a freshly built model on a random batch:
# ``measure_step`` walks the graph (predicted) and reads the allocator (measured).
def random_batch(cfg: GPTConfig, B: int, T: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, (B, T))
    y = rng.integers(0, cfg.vocab_size, (B, T))
    return bk.asarray(x), bk.asarray(y)


def step_memory(cfg: GPTConfig, peft_config, B: int, T: int, seed: int):
    model = get_peft_model(GPT(cfg, seed=seed), peft_config, seed=seed)
    x, y = random_batch(cfg, B, T, seed)
    return model, measure_step(model, x, y)


# --------------------------------------------------------------------------- (a) full FT, B x T
def full_ft_grid(cfg: GPTConfig, batches, contexts, seed: int) -> list[dict]:
    """Does W + G + O stay put while the activations grow with B and T? Full fine-tuning at
    every (B, T) of the grid, predicted beside measured, and verdicts on how A scales."""
    print(f"\n(a) Full fine-tuning of config {CONFIG} ({cfg.n_layer} layers, C={cfg.n_embd}, "
          f"V={cfg.vocab_size}), fp32, AdamW: one training step, MiB\n")
    print(f"    {'B':>3} {'T':>4} {'B*T':>5} " + " ".join(f"{c:>17}" for c in CATS)
          + f" {'peak':>17} {'A / (B*T)':>10}")
    print(f"    {'':14}" + " ".join(f"{'pred / meas':>17}" for _ in CATS + ("peak",))
          + f" {'KiB/token':>10}")
    rows = []
    for B in batches:
        for T in contexts:
            _, mem = step_memory(cfg, full_finetuning(), B, T, seed)
            p, m = mem.predicted, mem.measured
            row = {"B": B, "T": T, "per_layer": mem.per_layer,
                   "predicted": {c: p[c] for c in CATS} | {
                       "peak": p["peak"], "workspace": p["workspace"],
                       "workspace_op": p["workspace_op"]},
                   "measured": {c: m[c] for c in CATS} | {"peak": m["peak_train"]},
                   "formula_activations": gpt_activation_bytes(
                       B, T, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size)}
            rows.append(row)
            cells = " ".join(f"{p[c] / MiB:8.2f}/{m[c] / MiB:8.2f}" for c in CATS)
            print(f"    {B:>3} {T:>4} {B * T:>5} {cells} {p['peak'] / MiB:8.2f}/"
                  f"{m['peak_train'] / MiB:8.2f} {m['activations'] / (B * T) / 1024:>10.2f}")
    state = [r["measured"]["weights"] + r["measured"]["gradients"] + r["measured"]["optimizer"]
             for r in rows]
    per_token = [r["measured"]["activations"] / (r["B"] * r["T"]) for r in rows]
    act_err = max(abs(r["measured"]["activations"] / r["predicted"]["activations"] - 1)
                  for r in rows)
    formula_err = max(abs(r["formula_activations"] / r["predicted"]["activations"] - 1)
                      for r in rows)
    peak_over = [r["predicted"]["peak"] / r["measured"]["peak"] - 1 for r in rows]
    print(f"\n    W + G + O measured: {min(state) / MiB:.2f} to {max(state) / MiB:.2f} MiB in all "
          f"{len(rows)} settings (it does not depend on B or T).")
    act = {(r["B"], r["T"]): r["measured"]["activations"] for r in rows}
    (b0, b1), (t0, t1) = batches[:2], contexts[:2]
    b_ratio, t_ratio = act[(b1, t0)] / act[(b0, t0)], act[(b0, t1)] / act[(b0, t0)]
    # The verdict on T needs a margin above the noise: the measured activations differ from
    # the exact graph walk by act_err, so a ratio is trusted only beyond 3 x that (and 2%).
    margin = max(0.02, 3 * act_err)
    if t_ratio > (t1 / t0) * (1 + margin):
        t_key, t_verdict = "faster", "faster than T: the B H T^2 attention probabilities show"
    elif t_ratio >= (t1 / t0) * (1 - margin):
        t_key, t_verdict = "proportional", (
            f"in proportion to T (within the {margin:.0%} margin): at this width the T^2 "
            "attention term is too small to show")
    else:
        t_key, t_verdict = "slower", "less than in proportion to T"
    print(f"    Activations per token: {min(per_token) / 1024:.1f} to "
          f"{max(per_token) / 1024:.1f} KiB. B {b0} -> {b1} (x{b1 / b0:g}) multiplies A by "
          f"{b_ratio:.3f};\n    T {t0} -> {t1} (x{t1 / t0:g}) by {t_ratio:.3f}: A grows "
          f"{t_verdict}.")
    print(f"    Measured activations are within {act_err:.1%} of the graph walk, and the "
          f"closed-form gpt_activation_bytes\n    within {formula_err:.2%} of the walk.")
    if min(peak_over) >= 0:
        print(f"    The predicted peak (W+O+A+G+workspace) is an upper bound: {min(peak_over):.0%}"
              f" to {max(peak_over):.0%} above the measured\n    peak, because backward frees "
              "each op's saved extras (layer-norm xhat, attention P, GELU's tanh) as it goes,\n"
              "    before all the gradients exist.")
    else:
        print(f"    The predicted peak missed the measured one by {min(peak_over):.0%} to "
              f"{max(peak_over):.0%}: it is NOT an upper bound here.")
    biggest = max(rows, key=lambda r: r["B"] * r["T"])
    print(f"    The busiest backward op (its workspace, declared by the op and measured in "
          f"tests/test_memory.py):\n    {biggest['predicted']['workspace_op']}, "
          f"{biggest['predicted']['workspace'] / MiB:.2f} MiB at B={biggest['B']}, "
          f"T={biggest['T']}.")
    share = biggest["measured"]["activations"] / sum(biggest["measured"][c] for c in CATS)
    if share > 0.55:
        share_verdict = ": at this size, fine-tuning memory is mostly activations."
    elif share < 0.45:
        share_verdict = "; parameter state still dominates at this small batch."
    else:
        share_verdict = ": about half, neither dominates."
    print(f"    At B={biggest['B']}, T={biggest['T']} activations are {share:.0%} of W+G+O+A"
          + share_verdict)
    for r in rows:
        r["verdicts"] = {"t_ratio": t_ratio, "t_factor": t1 / t0, "margin": margin,
                         "t_verdict": t_key}
    return rows


# --------------------------------------------------------------------------- (b) per layer
def per_layer(cfg: GPTConfig, row: dict) -> dict:
    """Where are the activations? The graph walk credits each buffer to the block that made
    it; the closed formula splits one block into its terms."""
    B, T = row["B"], row["T"]
    f = gpt_activation_breakdown(B, T, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size)
    formula = {"embeddings": f["embeddings"], "head": f["head"],
               **{f"blocks.{i}": f["per_layer"] for i in range(cfg.n_layer)}}
    print(f"\n(b) Where the activations are (B={B}, T={T}): the graph walk credits each buffer "
          "to the block that made it\n")
    print(f"    {'group':<11} {'walked MiB':>10} {'formula MiB':>11}")
    for name, walked in row["per_layer"].items():
        print(f"    {name:<11} {walked / MiB:>10.2f} {formula.get(name, 0) / MiB:>11.2f}")
    terms = f["per_layer_terms"]
    total = sum(terms.values())
    print(f"\n    one block, term by term (gpt_activation_breakdown, C={cfg.n_embd}, "
          f"H={cfg.n_head}, B*T={B * T}):")
    for k, v in sorted(terms.items(), key=lambda kv: -kv[1]):
        if v:
            print(f"      {k:<16} {v / MiB:7.2f} MiB  {v / total:6.1%}")
    largest = max(terms, key=terms.get)
    what = {"mlp_hidden": "The MLP's hidden layer (width 4C: fc_in output, GELU's tanh term, "
                          "GELU output)",
            "attention_probs": "The attention probabilities (B H T^2)"}.get(largest, largest)
    print(f"    {what} is the largest term here; by the formula the attention probabilities "
          f"(12 N C vs B H T^2 values)\n    pass the MLP's hidden layer at T > 12 C / H = "
          f"{12 * cfg.n_embd // cfg.n_head} for this width (here T = {T}).")
    return {"walked": row["per_layer"], "formula": formula, "terms": terms}


# --------------------------------------------------------------------------- (c) LoRA, measured
def lora_vs_full(cfg: GPTConfig, settings, seed: int) -> list[dict]:
    """What does LoRA remove? Full FT and LoRA measured on the same batches, at each (B, T) of
    ``settings``; verdicts on the activations and the peak, with a 2% margin."""
    results = []
    for B, T in settings:
        out = {"B": B, "T": T}
        for name, pc in (("full", full_finetuning()), ("lora", LoraConfig(**LORA))):
            model, mem = step_memory(cfg, pc, B, T, seed)
            out[name] = {"trainable": model.num_parameters(trainable_only=True),
                         "measured": {c: mem.measured[c] for c in CATS}
                         | {"peak": mem.measured["peak_train"]}}
        f, lo = out["full"]["measured"], out["lora"]["measured"]
        out["grad_opt_saved"] = f["gradients"] + f["optimizer"] - lo["gradients"] - lo["optimizer"]
        out["activation_change"] = lo["activations"] - f["activations"]
        out["peak_change"] = lo["peak"] / f["peak"] - 1
        results.append(out)
    print(f"\n(c) LoRA r={LORA['r']} on q_proj, v_proj, same model and batches, measured MiB\n")
    heads = [f"B={r['B']}, T={r['T']}: full" for r in results]
    print(f"    {'':12} " + " ".join(f"{h:>20} {'LoRA':>8} {'LoRA/full':>9}" for h in heads))
    print(f"    {'trainable':12} " + " ".join(
        f"{r['full']['trainable']:>20,} {r['lora']['trainable']:>8,} "
        f"{r['lora']['trainable'] / r['full']['trainable']:>9.2%}" for r in results))
    for c in CATS + ("peak",):
        print(f"    {c:12} " + " ".join(
            f"{r['full']['measured'][c] / MiB:>20.2f} {r['lora']['measured'][c] / MiB:>8.2f} "
            f"{r['lora']['measured'][c] / r['full']['measured'][c]:>9.1%}" for r in results))
    for r in results:
        f = r["full"]["measured"]
        share = r["grad_opt_saved"] / (f["gradients"] + f["optimizer"])
        moved = (f"fell {-r['peak_change']:.0%}" if r["peak_change"] < 0 else
                 f"ROSE {r['peak_change']:.0%}")
        print(f"\n    B={r['B']}, T={r['T']}: LoRA removed {r['grad_opt_saved'] / MiB:.2f} MiB of "
              f"gradients + optimizer state ({share:.0%} of it); activations changed by "
              f"{r['activation_change'] / MiB:+.2f} MiB; the peak {moved}.")
    # Verdicts with a margin: the allocator's activations differ from the exact walk by a few
    # tenths of a percent (part (a)), so a change within 2% of full FT's counts as "no change".
    margin = 0.02
    rel = [r["activation_change"] / r["full"]["measured"]["activations"] for r in results]
    shrank = any(x < -margin for x in rel)
    grew = all(x > margin for x in rel)
    rose = [r for r in results if r["peak_change"] > margin]
    span = f"{min(rel):+.1%} to {max(rel):+.1%}"
    if shrank:
        print(f"\n    The saving is in G and O, and activations shrank too ({span} of full "
              "FT's): this engine kept fewer\n    arrays for the frozen layers here.")
    else:
        print(f"\n    The saving is all in G and O. Activations did not shrink ({span} of full "
              "FT's, margin +-2%): to pass\n    the gradient through a frozen layer to the LoRA "
              "factors below it, its activations must still be kept.")
    if grew:
        print("    In our engine they even grow, since it keeps every node's output until "
              "backward ends and each LoRA\n    branch adds its own arrays (x A^T and what joins "
              "it to the frozen output). (PyTorch frees outputs\n    no backward needs, and a "
              "frozen linear keeps nothing for a weight gradient; a PyTorch probe of this\n"
              "    config measured LoRA at ~70% of full FT's activations.)")
    smaller_saving = len(results) > 1 and all(
        b["peak_change"] > a["peak_change"] + margin for a, b in zip(results, results[1:]))
    if smaller_saving:
        print(f"    The larger the batch, the less LoRA saves: the peak moved "
              f"{results[0]['peak_change']:+.0%} at B*T={results[0]['B'] * results[0]['T']}, "
              f"{results[-1]['peak_change']:+.0%} at B*T={results[-1]['B'] * results[-1]['T']}.")
    if rose:
        print(f"    At B={rose[0]['B']}, T={rose[0]['T']} LoRA's peak is "
              f"{rose[0]['peak_change']:.0%} ABOVE full fine-tuning's, on this engine.")
    for r in results:
        r["verdicts"] = {"shrank": shrank, "grew": grew, "rose": bool(rose),
                         "smaller_saving": smaller_saving, "margin": margin}
    return results


# --------------------------------------------------------------------------- the figure
def figure(grid, layers, lora):
    """(a) the grid stacked, (b) by layer and by term, (c) full FT beside LoRA."""
    colors = dict(weights="tab:blue", gradients="tab:orange", optimizer="tab:green",
                  activations="tab:red")
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))

    ax = axes[0, 0]
    labels, x = [], 0
    for r in grid:
        for kind, hatch in (("predicted", ""), ("measured", "//")):
            bottom = 0.0
            for c in CATS:
                v = r[kind][c] / MiB
                ax.bar(x, v, bottom=bottom, color=colors[c], hatch=hatch, edgecolor="k",
                       lw=0.3, label=c if x == 0 else None)
                bottom += v
            x += 1
        labels += [f"B{r['B']} T{r['T']}\npred", "meas"]
        x += 0.5
    pos = [i + 0.5 * (i // 2) for i in range(len(labels))]
    ax.set_xticks(pos, labels, fontsize=7)
    ax.set_ylabel("MiB")
    ax.set_title(f"Full FT, config {CONFIG}: activations scale with B*T, the rest does not")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    names = list(layers["walked"])
    ax.bar(names, [layers["walked"][n] / MiB for n in names], color="tab:red", label="walked")
    ax.plot(names, [layers["formula"].get(n, 0) / MiB for n in names], "ko", label="formula")
    ax.set_ylabel("MiB")
    ax.set_title("Activations by layer (largest B*T)")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=8)

    ax = axes[1, 0]
    terms = {k: v for k, v in layers["terms"].items() if v}
    ax.barh(list(terms), [v / MiB for v in terms.values()], color="tab:red")
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    ax.set_title("One block's activations, term by term")

    ax = axes[1, 1]
    ticks = []
    for j, r in enumerate(lora):
        for i, name in enumerate(("full", "lora")):
            bottom = 0.0
            for c in CATS:
                v = r[name]["measured"][c] / MiB
                ax.bar(2.5 * j + i, v, bottom=bottom, color=colors[c],
                       label=c if i == j == 0 else None)
                bottom += v
        ticks += [f"full\nB{r['B']} T{r['T']}", f"LoRA r={LORA['r']}\nB{r['B']} T{r['T']}"]
    ax.set_xticks([2.5 * j + i for j in range(len(lora)) for i in range(2)], ticks, fontsize=8)
    ax.set_ylabel("MiB (measured; stacked, so a linear scale)")
    v = lora[0]["verdicts"]
    acts = "shrink" if v["shrank"] else ("stay, and grow here" if v["grew"] else "stay")
    ax.set_title(f"LoRA removes G and O; activations {acts}")
    ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = lessonkit.arguments(__doc__, quick="small batches and contexts").parse_args(argv)
    clock = lessonkit.Stopwatch()
    cfg = GPTConfig(**MODEL)
    batches, contexts = (QUICK_BATCHES, QUICK_CONTEXTS) if args.quick else (BATCHES, CONTEXTS)
    print(f"Lesson 03a: the memory of one step of full fine-tuning (config {CONFIG}, backend "
          f"{bk.name}, seed {args.seed}{', quick' if args.quick else ''})")

    grid = full_ft_grid(cfg, batches, contexts, args.seed)
    largest = max(grid, key=lambda r: r["B"] * r["T"])
    layers = per_layer(cfg, largest)
    smallest = min(grid, key=lambda r: r["B"] * r["T"])
    lora = lora_vs_full(cfg, [(smallest["B"], smallest["T"]), (largest["B"], largest["T"])],
                        args.seed)

    path = lessonkit.save_figure(figure(grid, layers, lora), OUT_NAME)
    seconds = clock.seconds()
    print(f"\n    figure saved to {path}  ({seconds:.0f} s in all)")
    return {"grid": grid, "layers": layers, "lora": lora, "figure": str(path),
            "seconds": seconds}


if __name__ == "__main__":
    main()
