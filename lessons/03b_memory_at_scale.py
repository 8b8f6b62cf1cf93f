"""Lesson 03b: full fine-tuning's memory at scale: real models, and where parameters win.

Lesson 03a measured one training step of our small GPT: W + G + O = 16 bytes per parameter in
fp32 with AdamW (weights, gradients, m and v), and activations that grow with B x T_ctx. This
lesson takes the same formulas to sizes we cannot build.

Which of the two dominates is a race between C² (the parameters: 12 L C² weights) and B T_ctx C
(the activations: about 25 B T_ctx C per block, plus the attention probabilities B H T_ctx²):
small models at long contexts are dominated by activations, big models by parameter state.

Real models are trained in 16-bit. The standard mixed-precision accounting (ZeRO, Rajbhandari
et al. 2020) keeps 16-bit weights and gradients (2 + 2 bytes) plus an fp32 master copy and the
two fp32 Adam moments (4 + 4 + 4): still 16 bytes per trainable parameter. Mixed precision
halves the activations, not the parameter state. Keeping everything (weights, gradients, m, v)
in 16-bit costs 8 bytes per parameter.

LoRA (Hu et al. 2021) trains T ≪ N of the N parameters, so its G and O nearly vanish while W
and the activations stay. The paper's Sec. 4.2 reports, for GPT-3 175B, 1.2 TB of VRAM for full
fine-tuning against 350 GB with LoRA (r = 4 on W_q and W_v), 10,000x fewer trainable parameters
and 3x less memory. The lesson recomputes those figures from the architecture and says which
accounting reproduces them.

The parts:
  (d) the formula on GPT-2, LLaMA-2-7B and GPT-3 175B in three accountings, full FT and LoRA,
      and GPT-3 against the published figures;
  (e) the width at which parameter state overtakes activations, from the formulas, checked by
      measuring our own model on both sides of the predicted crossing.
(The letters continue lesson 03a's (a)-(c).)

Run:  python lessons/03b_memory_at_scale.py [--quick] [--seed N]
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # render to a file; no display needed
import matplotlib.pyplot as plt
import numpy as np  # host-side only: random batches, tables and the figure

from minipeft import backend as bk
from minipeft import lessonkit
from minipeft.memory import gpt_activation_bytes, measure_step, training_memory_formula
from minipeft.nn import GPT, GPTConfig
from minipeft.params import (
    PRESETS,
    count_parameters,
    lora_parameter_count,
    spec_from_config,
    with_overrides,
)
from minipeft.peft import full_finetuning, get_peft_model

CONFIG = "S"                       # the study's small config (lesson 03a's)
MODEL = dict(vocab_size=512, n_embd=128, n_layer=4, n_head=4, block_size=128)
LORA = dict(r=8, alpha=16)         # on q_proj and v_proj, as in the LoRA paper
REAL_MODELS = ("gpt2-124m", "llama2-7b", "gpt3-175b")
REAL_LORA_R = 4                    # the LoRA paper's GPT-3 setting (Sec. 4.2): r = 4 on q, v
PUBLISHED = {"full": 1.2e12, "lora": 350e9, "fewer_params": 10_000, "less_memory": 3}
FLIP_TOKENS = (16, 128)            # (B, T_ctx) held fixed while the width grows: config S's
FLIP_CHECK = (4, 128)              # a smaller B x T_ctx whose crossing we can build and measure
QUICK_FLIP_CHECK = (1, 32)
OUT_NAME = "03b_memory_at_scale.png"
MiB, GB = 2 ** 20, 1e9
CATS = ("weights", "gradients", "optimizer", "activations")


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
    """What would a step of a real model hold? The formulas at each preset's full context, for
    full fine-tuning and LoRA, in the three accountings (nothing here is measured)."""
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
    """Which accounting reproduces the LoRA paper's GPT-3 figures (1.2 TB, 350 GB, ~10,000x)?"""
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


# The check by measurement (part (e)) builds models of other widths: one fresh model and one
# random batch per width, measured by ``measure_step`` (the allocator, as in lesson 03a).
def random_batch(cfg: GPTConfig, B: int, T: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, (B, T))
    y = rng.integers(0, cfg.vocab_size, (B, T))
    return bk.asarray(x), bk.asarray(y)


def step_memory(cfg: GPTConfig, peft_config, B: int, T: int, seed: int):
    model = get_peft_model(GPT(cfg, seed=seed), peft_config, seed=seed)
    x, y = random_batch(cfg, B, T, seed)
    return model, measure_step(model, x, y)


def flip(cfg: GPTConfig, check: tuple, seed: int) -> dict:
    """At what width C does parameter state pass the activations? The formulas' crossing
    for several B x T, then a measurement on both sides of the crossing at ``check``."""
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
def figure(real, flipped):
    """(d) real models on a log scale beside the published lines, (e) the two curves crossing."""
    colors = dict(weights="tab:blue", gradients="tab:orange", optimizer="tab:green",
                  activations="tab:red")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))

    ax = axes[0]
    acc = "all 16-bit (2+2+4 B)"
    xs = np.arange(len(real))
    width = 0.1             # side by side, not stacked: on a log scale stacked heights lie
    for j, method in enumerate(("full", "LoRA")):
        for i, c in enumerate(CATS):
            v = np.array([real[k]["rows"][(acc, method)][c] / GB for k in real])
            ax.bar(xs + width * (4 * j + i), np.maximum(v, 1e-6), width * 0.9, color=colors[c],
                   hatch="" if method == "full" else "//", edgecolor="k", lw=0.3,
                   label=c if method == "full" else None)
    ax.set_xticks(xs + width * 3.5, [f"{PRESETS[k].name}\nfull | LoRA" for k in real],
                  fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("GB (16-bit W, G, m, v; one sequence)")
    ax.axhline(PUBLISHED["full"] / GB, color="k", ls="--", lw=1)
    ax.axhline(PUBLISHED["lora"] / GB, color="k", ls=":", lw=1)
    ax.text(0, PUBLISHED["full"] / GB * 1.1, "LoRA paper: GPT-3 full 1.2 TB", fontsize=7)
    ax.text(0, PUBLISHED["lora"] / GB * 1.1, "LoRA paper: GPT-3 LoRA 350 GB", fontsize=7)
    ax.set_title("Real models from the formula (hatched: LoRA)")
    ax.legend(fontsize=8, loc="lower right")

    ax = axes[1]
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
    return fig


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = lessonkit.arguments(__doc__, quick="a smaller measured check of the flip").parse_args(
        argv)
    clock = lessonkit.Stopwatch()
    cfg = GPTConfig(**MODEL)
    print(f"Lesson 03b: full fine-tuning's memory at scale (config {CONFIG}, backend {bk.name}, "
          f"seed {args.seed}{', quick' if args.quick else ''})")

    real = real_models()
    published = compare_published(real)
    flipped = flip(cfg, QUICK_FLIP_CHECK if args.quick else FLIP_CHECK, args.seed)

    path = lessonkit.save_figure(figure(real, flipped), OUT_NAME)
    seconds = clock.seconds()
    print(f"\n    figure saved to {path}  ({seconds:.0f} s in all)")
    return {"real": real, "published": published, "flip": flipped, "figure": str(path),
            "seconds": seconds}


if __name__ == "__main__":
    main()
