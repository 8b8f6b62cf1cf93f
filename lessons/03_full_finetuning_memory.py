"""Lesson 03: why full fine-tuning is expensive: the memory of one training step.

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
W + G + O stay put. Which of the two dominates is a race between C² (the parameters:
12 L C² weights) and B T_ctx C (the activations): small models at long contexts are dominated by
activations, big models by parameter state, and the lesson finds the width where they cross.

Real models are trained in 16-bit. The standard mixed-precision accounting (ZeRO, Rajbhandari
et al. 2020) keeps 16-bit weights and gradients (2 + 2 bytes) plus an fp32 master copy and the
two fp32 Adam moments (4 + 4 + 4): still 16 bytes per trainable parameter. Mixed precision
halves the activations, not the parameter state. Keeping everything (weights, gradients, m, v)
in 16-bit costs 8 bytes per parameter.

LoRA (Hu et al. 2021) trains T ≪ N. Then G and O nearly vanish, but W does not (the frozen model
must still run), and neither does A: to pass the gradient *through* a frozen layer to the LoRA
factors below it, the backward pass still needs that layer's activations. The paper's Sec. 4.2
reports, for GPT-3 175B, 1.2 TB of VRAM for full fine-tuning against 350 GB with LoRA (r = 4 on
W_q and W_v), 10,000x fewer trainable parameters and 3x less memory. The lesson recomputes those
figures from the architecture and says which accounting reproduces them.

What it does: (a) measures full fine-tuning of config S at two batch sizes and two context
lengths, predicted (counted from parameters and the graph) beside measured (the allocator);
(b) breaks the activations down by layer and by term; (c) measures LoRA on the same batch;
(d) scales the formula to GPT-2, LLaMA-2-7B and GPT-3 175B; (e) finds the width at which
parameter state overtakes activations, from the formulas, and checks it with measurements.

Run:  python lessons/03_full_finetuning_memory.py [--quick] [--seed N]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # render to a file; no display needed
import matplotlib.pyplot as plt
import numpy as np  # host-side only: random batches, tables and the figure

from minipeft import backend as bk
from minipeft.memory import (
    gpt_activation_breakdown,
    gpt_activation_bytes,
    measure_step,
    training_memory_formula,
)
from minipeft.nn import GPT, GPTConfig
from minipeft.params import (
    PRESETS,
    count_parameters,
    lora_parameter_count,
    spec_from_config,
    with_overrides,
)
from minipeft.peft import LoraConfig, full_finetuning, get_peft_model

SEED = 0
CONFIG = "S"                       # the study's small config (the bench's S too)
MODEL = dict(vocab_size=512, n_embd=128, n_layer=4, n_head=4, block_size=128)
BATCHES, CONTEXTS = (8, 16), (64, 128)
QUICK_BATCHES, QUICK_CONTEXTS = (2, 4), (16, 32)
LORA = dict(r=8, alpha=16)         # on q_proj and v_proj, as in the LoRA paper
REAL_MODELS = ("gpt2-124m", "llama2-7b", "gpt3-175b")
REAL_LORA_R = 4                    # the LoRA paper's GPT-3 setting (Sec. 4.2): r = 4 on q, v
PUBLISHED = {"full": 1.2e12, "lora": 350e9, "fewer_params": 10_000, "less_memory": 3}
FLIP_TOKENS = (16, 128)            # (B, T_ctx) held fixed while the width grows: config S's
FLIP_CHECK = (4, 128)              # a smaller B x T_ctx whose crossing we can build and measure
QUICK_FLIP_CHECK = (1, 32)
OUT_NAME = "03_full_finetuning_memory.png"
MiB, GB = 2 ** 20, 1e9
CATS = ("weights", "gradients", "optimizer", "activations")


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
    """Full FT and LoRA measured on the same batches, at each (B, T) of ``settings``."""
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


# --------------------------------------------------------------------------- (d) real models
def accountings(n: int, t: int, act16: int, act32: int) -> dict:
    """Bytes of a step for n parameters, t trainable, in three precisions (see the docstring)."""
    fp32 = training_memory_formula(n, t, 4, "adam", activations_bytes=act32)
    pure16 = training_memory_formula(n, t, 2, "adam", activations_bytes=act16)
    mixed = training_memory_formula(n, t, 2, "sgd", activations_bytes=act16)  # 16-bit W and G
    mixed["optimizer"] = 3 * 4 * t                 # fp32 master copy, m and v of what trains
    mixed["total"] = sum(mixed[k] for k in ("weights", "gradients", "optimizer", "activations",
                                            "workspace"))
    return {"fp32 + AdamW": fp32, "mixed (2+2+12 B)": mixed, "all 16-bit (2+2+4 B)": pure16}


def real_models() -> dict:
    print(f"\n(d) The same formula on real models: full fine-tuning vs LoRA r={REAL_LORA_R} on "
          "q, v; activations for ONE sequence at\n    the full context, as our engine saves "
          "them (no recomputation, no fused attention; LoRA: frozen tables, its branches'\n"
          "    own intermediates not counted), GB = 1e9 bytes\n")
    print(f"    {'model':<11} {'accounting':<21} {'method':<5} {'trainable':>13} {'W':>8} "
          f"{'G':>8} {'O':>8} {'W+G+O':>8} {'A(1 seq)':>9}")
    out = {}
    for key in REAL_MODELS:
        s = PRESETS[key]
        n = count_parameters(s)["total"]
        t_lora = lora_parameter_count(s, REAL_LORA_R)
        act, act_frozen = ({bpv: gpt_activation_bytes(1, s.block_size, s.d_model, s.n_layer,
                                                      s.n_head, s.vocab_size, bpv,
                                                      trainable_embeddings=emb)
                            for bpv in (2, 4)} for emb in (True, False))  # LoRA: frozen tables
        out[key] = {"params": n, "lora_trainable": t_lora, "rows": {}}
        for method, t, a in (("full", n, act), ("LoRA", t_lora, act_frozen)):
            for acc, r in accountings(n, t, a[2], a[4]).items():
                state = r["weights"] + r["gradients"] + r["optimizer"]
                out[key]["rows"][(acc, method)] = {**r, "state": state}
                print(f"    {s.name:<11} {acc:<21} {method:<5} {t:>13,} "
                      f"{r['weights'] / GB:>8.1f} {r['gradients'] / GB:>8.1f} "
                      f"{r['optimizer'] / GB:>8.1f} {state / GB:>8.1f} "
                      f"{r['activations'] / GB:>9.1f}")
        if s.mlp == "swiglu":
            print(f"    ({s.name}'s activations use our GELU-MLP accounting with C={s.d_model}; "
                  "its SwiGLU MLP differs: an estimate)")
    return out


def compare_published(real: dict) -> dict:
    g = real["gpt3-175b"]
    n, t = g["params"], g["lora_trainable"]
    print("\n    GPT-3 175B against the LoRA paper (Sec. 4.2), parameter state W+G+O only (the "
          "published totals\n    leave activations out, as the LoRA number shows):\n")
    print(f"    {'accounting':<21} {'full':>9} {'LoRA':>9} {'ratio':>6}   published: full "
          f"{PUBLISHED['full'] / 1e12:.1f} TB, LoRA {PUBLISHED['lora'] / GB:.0f} GB, "
          f"~{PUBLISHED['less_memory']}x")
    res = {}
    for acc in accountings(1, 1, 0, 0):
        full, lora = g["rows"][(acc, "full")]["state"], g["rows"][(acc, "LoRA")]["state"]
        res[acc] = {"full": full, "lora": lora, "ratio": full / lora}
        print(f"    {acc:<21} {full / 1e12:>6.2f} TB {lora / GB:>6.0f} GB {full / lora:>5.1f}x")
    implied = PUBLISHED["full"] / n
    closest = min(res, key=lambda a: abs(res[a]["full"] - PUBLISHED["full"]))
    lora_err = abs(res[closest]["lora"] / PUBLISHED["lora"] - 1)
    fewer = n / t
    agrees = abs(fewer / PUBLISHED["fewer_params"] - 1) < 0.2      # "~10,000x": within 20%
    print(f"\n    Trainable: {n:,} / {t:,} = {fewer:,.0f}x fewer (published: "
          f"~{PUBLISHED['fewer_params']:,}x): {'agrees' if agrees else 'does NOT agree'} "
          "(within 20%).")
    print(f"    LoRA checkpoint: {t:,} x 2 bytes = {2 * t / 1e6:.1f} MB (published: 35 MB).")
    print(f"    The published 1.2 TB implies {implied:.1f} bytes per parameter. Of our "
          f"accountings, {closest!r} comes closest:\n    {res[closest]['full'] / 1e12:.2f} TB "
          f"(= {res[closest]['full'] / 2 ** 40:.2f} TiB), and its LoRA figure, "
          f"{res[closest]['lora'] / GB:.0f} GB, is the published 350 GB within "
          f"{lora_err:.1%}" + (
              ":\n    the 16-bit frozen weights alone. So the paper's numbers fit a run that "
              "keeps Adam's state in 16-bit\n    (or shards it)"
              if closest == "all 16-bit (2+2+4 B)" and lora_err < 0.05 else
              ":\n    no accounting here reproduces both published figures within 5%") +
          f"; under the standard "
          f"mixed-precision accounting (16 B/param) full fine-tuning needs\n    "
          f"{res['mixed (2+2+12 B)']['full'] / 1e12:.1f} TB and LoRA saves "
          f"{res['mixed (2+2+12 B)']['ratio']:.0f}x, not 3x. Mixed precision does not shrink "
          "parameter state at all:\n    fp32 + AdamW is also 16 B/param.")
    act = real["gpt3-175b"]["rows"][("all 16-bit (2+2+4 B)", "full")]["activations"]
    print(f"    Activations come on top and are the same for both methods: "
          f"{act / GB:.0f} GB per 2048-token sequence in our\n    engine's accounting "
          f"(attention probabilities alone: 96 layers x 96 heads x 2048^2 x 2 B = "
          f"{96 * 96 * 2048 ** 2 * 2 / GB:.0f} GB),\n    which real trainers cut with "
          "activation checkpointing and fused attention.")
    return {"by_accounting": res, "implied_bytes_per_param": implied, "closest": closest,
            "fewer_params": fewer, "lora_checkpoint_bytes": 2 * t}


# --------------------------------------------------------------------------- (e) the flip
def flip_curves(cfg: GPTConfig, B: int, T: int, widths) -> dict:
    """Parameter state (fp32 AdamW) and activations from the formulas, width by width."""
    spec = spec_from_config(cfg)
    full, lora, act = [], [], []
    for C in widths:
        s = with_overrides(spec, d_model=int(C), d_ff=4 * int(C), block_size=max(T, 1))
        n = count_parameters(s)["total"]
        full.append(sum(training_memory_formula(n, n)[k] for k in ("weights", "gradients",
                                                                    "optimizer")))
        t = lora_parameter_count(s, LORA["r"])
        lora.append(sum(training_memory_formula(n, t)[k] for k in ("weights", "gradients",
                                                                   "optimizer")))
        act.append(gpt_activation_bytes(B, T, int(C), cfg.n_layer, cfg.n_head, cfg.vocab_size))
    full, lora, act = map(np.asarray, (full, lora, act))
    return {"widths": np.asarray(widths), "full_state": full, "lora_state": lora,
            "activations": act, "flip_full": _crossing(widths, full, act),
            "flip_lora": _crossing(widths, lora, act)}


def _crossing(widths, state, act) -> float | None:
    """First width at which parameter state reaches the activations (linear interpolation)."""
    d = np.asarray(state, float) - np.asarray(act, float)
    idx = np.flatnonzero(d >= 0)
    if not len(idx):
        return None
    i = idx[0]
    if i == 0:
        return float(widths[0])
    w0, w1 = widths[i - 1], widths[i]
    return float(w0 + (w1 - w0) * (-d[i - 1]) / (d[i] - d[i - 1]))


def flip(cfg: GPTConfig, check: tuple, seed: int) -> dict:
    H = cfg.n_head
    widths = np.unique(np.round(np.geomspace(16, 2 ** 17, 240) / H).astype(int) * H)
    B, T = FLIP_TOKENS
    curves = flip_curves(cfg, B, T, widths)
    print(f"\n(e) When do parameters outweigh activations? Our architecture ({cfg.n_layer} "
          f"layers, {H} heads, V={cfg.vocab_size}), fp32 AdamW,\n    width C growing, "
          f"B x T held at {B} x {T} = {B * T} tokens (formulas):\n")
    print(f"    full fine-tuning: W+G+O (16 B/param) passes the activations at C ~ "
          f"{curves['flip_full']:.0f}")
    print(f"    LoRA r={LORA['r']} q,v:     W+G+O (~W, 4 B/param) passes them at C ~ "
          f"{curves['flip_lora']:.0f}")
    table = {}
    for tokens in ((1, 128), (4, 128), (16, 128), (16, 512), (64, 512)):
        c = flip_curves(cfg, *tokens, widths)
        table[tokens] = (c["flip_full"], c["flip_lora"])
    print(f"\n    {'B x T':>10} {'tokens':>7} {'flip, full FT':>14} {'flip, LoRA':>11}")
    show = lambda c: f"{c:.0f}" if c else f"> {widths[-1]}"
    for (b, t), (ff, fl) in table.items():
        print(f"    {f'{b} x {t}':>10} {b * t:>7} {show(ff):>14} {show(fl):>11}")
    fixed_t = [(b * t, ff) for (b, t), (ff, _) in table.items() if t == 128 and ff]
    slope = np.polyfit(np.log([x for x, _ in fixed_t]), np.log([f for _, f in fixed_t]), 1)[0]
    how = "about linearly" if 0.8 <= slope <= 1.2 else "NOT linearly"
    print(f"    At T = 128 the flip width grows {how} with the tokens per step (log-log slope "
          f"{slope:.2f}; linear: 0.8 to 1.2):\n    parameter state ~ C^2, activations ~ tokens "
          "x C.")

    # check: measure around the predicted crossing at a token count small enough to build
    cb, ct = check
    pred = flip_curves(cfg, cb, ct, widths)["flip_full"]
    measure_widths = sorted({max(H, int(round(pred * f / H)) * H) for f in (0.5, 0.8, 1.25, 2)})
    print(f"\n    Check by measurement at B x T = {cb} x {ct} (formula's flip: C ~ {pred:.0f}):")
    print(f"    {'C':>6} {'W+G+O MiB':>10} {'A MiB':>8} {'state/A':>8}")
    measured = []
    for C in measure_widths:
        c = GPTConfig(vocab_size=cfg.vocab_size, block_size=ct, n_layer=cfg.n_layer,
                      n_head=H, n_embd=C)
        _, mem = step_memory(c, full_finetuning(), cb, ct, seed)
        m = mem.measured
        state = m["weights"] + m["gradients"] + m["optimizer"]
        measured.append({"C": C, "state": state, "activations": m["activations"]})
        print(f"    {C:>6} {state / MiB:>10.2f} {m['activations'] / MiB:>8.2f} "
              f"{state / m['activations']:>8.2f}")
    below = [r for r in measured if r["C"] < pred]
    above = [r for r in measured if r["C"] > pred]
    agrees = all(r["state"] < r["activations"] for r in below) and \
        all(r["state"] > r["activations"] for r in above)
    print(f"    measured: the balance flips between the widths the formula brackets: "
          f"{'yes' if agrees else 'NO'}")
    return {**curves, "table": table, "check": {"tokens": check, "predicted_flip": pred,
                                                "measured": measured, "agrees": agrees}}


# --------------------------------------------------------------------------- the figure
def save_figure(grid, layers, lora, real, flipped, path: Path) -> None:
    colors = dict(weights="tab:blue", gradients="tab:orange", optimizer="tab:green",
                  activations="tab:red")
    fig, axes = plt.subplots(2, 3, figsize=(18, 10))

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

    ax = axes[0, 2]
    terms = {k: v for k, v in layers["terms"].items() if v}
    ax.barh(list(terms), [v / MiB for v in terms.values()], color="tab:red")
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    ax.set_title("One block's activations, term by term")

    ax = axes[1, 0]
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

    ax = axes[1, 1]
    acc = "all 16-bit (2+2+4 B)"
    xs = np.arange(len(real))
    width = 0.1             # side by side, not stacked: on a log scale stacked heights lie
    for j, method in enumerate(("full", "LoRA")):
        for i, c in enumerate(CATS):
            v = np.array([real[k]["rows"][(acc, method)][c] / GB for k in real])
            ax.bar(xs + width * (4 * j + i), np.maximum(v, 1e-6), width * 0.9, color=colors[c],
                   hatch="" if method == "full" else "//", edgecolor="k", lw=0.3)
    ax.set_xticks(xs + width * 3.5, [f"{PRESETS[k].name}\nfull | LoRA" for k in real],
                  fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("GB (16-bit W, G, m, v; one sequence)")
    ax.axhline(PUBLISHED["full"] / GB, color="k", ls="--", lw=1)
    ax.axhline(PUBLISHED["lora"] / GB, color="k", ls=":", lw=1)
    ax.text(0, PUBLISHED["full"] / GB * 1.1, "LoRA paper: GPT-3 full 1.2 TB", fontsize=7)
    ax.text(0, PUBLISHED["lora"] / GB * 1.1, "LoRA paper: GPT-3 LoRA 350 GB", fontsize=7)
    ax.set_title("Real models from the formula")

    ax = axes[1, 2]
    w = flipped["widths"]
    ax.loglog(w, flipped["full_state"] / MiB, color="tab:green", label="W+G+O, full FT")
    ax.loglog(w, flipped["lora_state"] / MiB, color="tab:olive", label="W+G+O, LoRA")
    ax.loglog(w, flipped["activations"] / MiB, color="tab:red",
              label=f"activations, B x T = {FLIP_TOKENS[0]} x {FLIP_TOKENS[1]}")
    for key, ls in (("flip_full", "--"), ("flip_lora", ":")):
        if flipped[key]:
            ax.axvline(flipped[key], color="k", ls=ls, lw=1)
            ax.text(flipped[key] * 1.05, ax.get_ylim()[0] * 3, f"C ~ {flipped[key]:.0f}",
                    fontsize=8, rotation=90)
    for r in flipped["check"]["measured"]:
        ax.plot(r["C"], r["state"] / MiB, "g^", ms=5)
        ax.plot(r["C"], r["activations"] / MiB, "rv", ms=5)
    ax.set_xlabel("width C")
    ax.set_ylabel("MiB")
    ax.set_title("Width at which parameter state overtakes activations\n"
                 f"(triangles: measured at B x T = {flipped['check']['tokens'][0]} x "
                 f"{flipped['check']['tokens'][1]})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches and contexts")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cfg = GPTConfig(**MODEL)
    batches, contexts = (QUICK_BATCHES, QUICK_CONTEXTS) if args.quick else (BATCHES, CONTEXTS)
    print(f"Lesson 03: the memory of full fine-tuning (config {CONFIG}, backend {bk.name}, "
          f"seed {args.seed}{', quick' if args.quick else ''})")

    grid = full_ft_grid(cfg, batches, contexts, args.seed)
    largest = max(grid, key=lambda r: r["B"] * r["T"])
    layers = per_layer(cfg, largest)
    smallest = min(grid, key=lambda r: r["B"] * r["T"])
    lora = lora_vs_full(cfg, [(smallest["B"], smallest["T"]), (largest["B"], largest["T"])],
                        args.seed)
    real = real_models()
    published = compare_published(real)
    flipped = flip(cfg, QUICK_FLIP_CHECK if args.quick else FLIP_CHECK, args.seed)

    out_dir = Path(os.environ.get("MINIPEFT_LESSON_OUT") or Path(__file__).resolve().parent / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / OUT_NAME
    save_figure(grid, layers, lora, real, flipped, path)
    seconds = time.perf_counter() - start
    print(f"\n    figure saved to {path}  ({seconds:.0f} s in all)")
    return {"grid": grid, "layers": layers, "lora": lora, "real": real,
            "published": published, "flip": flipped, "figure": str(path), "seconds": seconds}


if __name__ == "__main__":
    main()
