"""Lesson 15: gradient checkpointing. Trading compute for the activation memory PEFT cannot remove.

Lesson 03 measured where a training step's memory goes: at this size activations dominate, and
LoRA does not shrink them (a frozen layer's activations are still needed to pass the gradient
through it). The standard answer is gradient checkpointing (Chen et al. 2016): keep only each
block's *input* during the forward pass, and when backward reaches a block, run its forward again
to rebuild that block's activations, use them at once, and let them go.

    plain:        activations kept = every op's saved arrays in every block       ~ L x (one block)
    checkpointed: activations kept = one input (B, T, C) per block, + one block rebuilt in backward
    cost:         one more forward per block: about a third more compute (forward ~ 1/3 of a step)

The arithmetic is the same arithmetic on the same numbers, so the gradients do not change at all.
The lesson measures, on a GPT of growing depth, with full fine-tuning and with LoRA:

  1. that the gradients are bit-for-bit those of the plain step;
  2. the activations kept after the forward pass (the graph walk's prediction and the allocator's
     measurement) and the step's peak, with and without checkpointing;
  3. the extra time per step, against the third that the forward's share predicts, over repeats
     (a step here is what ``lessonkit.step_ms`` times: zero_grad, forward, backward, AdamW step).

Each is one part of the code below, in this order, printing its own table; the verdicts read
the printed rows.

Run:  python lessons/15_checkpointing.py [--quick] [--seed N]
"""

from __future__ import annotations

from dataclasses import replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np  # host-side only

from minipeft import backend as bk
from minipeft import lessonkit
from minipeft.memory import measure_step
from minipeft.nn import GPT, GPTConfig
from minipeft.peft import LoraConfig, get_peft_model

CONFIG = GPTConfig(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=128)
DEPTHS, QUICK_DEPTHS = (2, 4, 8), (1, 2, 4)
BATCH, QUICK_BATCH = 16, 4
SEQ, QUICK_SEQ = 128, 32
REPEATS, QUICK_REPEATS = 6, 3     # timed steps per model, after one warm-up step
MB = 2 ** 20
FIGURE = "15_checkpointing.png"


def build(cfg: GPTConfig, method: str, seed: int):
    """A model of ``cfg`` (random weights: memory and time do not depend on them)."""
    model = GPT(cfg, seed=seed)
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=8, alpha=16), seed=seed)
    return model


# --------------------------------------------------------------------------- 1. same gradients
def gradients(model, x, y) -> dict:
    for p in model.parameters():
        p.grad = None
    model.loss(x, y).backward()
    return {n: bk.to_numpy(p.grad) for n, p in model.named_parameters() if p.grad is not None}


def same_gradients(depth: int, T: int, x, y, seed: int) -> float:
    """Every parameter's gradient with and without checkpointing, full FT and LoRA: the
    largest difference (0 when the recomputation is the forward's own arithmetic)."""
    cfg = replace(CONFIG, n_layer=depth, block_size=T)
    worst = 0.0
    for method in ("full", "lora"):
        plain = gradients(build(cfg, method, seed), x, y)
        ckpt = gradients(build(replace(cfg, checkpoint=True), method, seed), x, y)
        assert plain.keys() == ckpt.keys()
        worst = max(worst, max(float(np.abs(plain[k] - ckpt[k]).max()) for k in plain))
    print(f"1. Gradients with and without checkpointing ({depth} blocks, full FT and LoRA): "
          f"largest difference {worst:.1e} " + ("(bit for bit the same)" if worst == 0 else
                                                "(NOT identical: a bug)"))
    return worst


# --------------------------------------------------------------------------- 2-3. by depth
def memory_and_time(depths, B: int, T: int, x, y, repeats: int, seed: int) -> list:
    """Per method and depth: activations kept after forward (predicted by the graph walk,
    measured by the allocator), the step's peak, and the step time (``lessonkit.step_times``,
    plain and checkpointed in turns, so the machine's noise is shared)."""
    print(f"\n2-3. One step, batch {B} x {T} tokens, width {CONFIG.n_embd}; MiB and ms "
          f"(median of {repeats} interleaved repeats):")
    print("   method  blocks  activations kept (pred / meas)        step peak           "
          "time per step")
    print("                   plain            checkpointed         plain   checkpointed"
          "  plain  ckpt  extra")
    rows = []
    for method in ("full", "lora"):
        for L in depths:
            cfg = replace(CONFIG, n_layer=L, block_size=T)
            models = {flag: build(replace(cfg, checkpoint=flag), method, seed)
                      for flag in (False, True)}
            mem = {flag: measure_step(m, x, y) for flag, m in models.items()}
            times = lessonkit.step_times({f: (m, (x, y)) for f, m in models.items()}, repeats)
            row = {"method": method, "blocks": L,
                   "act_pred": {f: mem[f].predicted["activations"] for f in mem},
                   "act_meas": {f: mem[f].measured["activations"] for f in mem},
                   "peak": {f: mem[f].measured["peak_train"] for f in mem},
                   "ms": {f: float(np.median(v)) for f, v in times.items()},
                   "ms_spread": {f: max(v) - min(v) for f, v in times.items()}}
            row["extra"] = row["ms"][True] / row["ms"][False] - 1
            rows.append(row)
            print(f"   {method:<7} {L:>5}  {row['act_pred'][False] / MB:6.1f} / "
                  f"{row['act_meas'][False] / MB:6.1f}    {row['act_pred'][True] / MB:6.1f} / "
                  f"{row['act_meas'][True] / MB:6.1f}     {row['peak'][False] / MB:7.1f} "
                  f"{row['peak'][True] / MB:9.1f}   {row['ms'][False]:6.0f} "
                  f"{row['ms'][True]:5.0f} {100 * row['extra']:+5.0f}%")
    return rows


# --------------------------------------------------------------------------- verdicts
def verdicts(rows: list, depth: int) -> dict:
    """At the deepest model: did the kept activations shrink (> 1.5x), did the peak fall
    (> 5%), and is the extra time larger than the repeats' spread?"""
    deepest = [r for r in rows if r["blocks"] == depth]
    shrink = {r["method"]: r["act_meas"][False] / max(r["act_meas"][True], 1) for r in deepest}
    peak_cut = {r["method"]: 1 - r["peak"][True] / r["peak"][False] for r in deepest}
    print("\nWhat was measured:")
    for r in deepest:
        m = r["method"]
        kept = "shrank" if shrink[m] > 1.5 else "did not shrink clearly"
        fell = "fell" if peak_cut[m] > 0.05 else "did not fall clearly"
        print(f"   {m}: activations kept after forward {kept} ({shrink[m]:.1f}x smaller with "
              f"{r['blocks']} blocks); the step's peak {fell} ({r['peak'][False] / MB:.1f} -> "
              f"{r['peak'][True] / MB:.1f} MiB; it also holds one block rebuilt in backward, "
              "the weights, gradients and optimizer state)")
        noise = max(r["ms_spread"].values()) / r["ms"][False]
        if r["extra"] > noise:
            print(f"   {m}: checkpointing cost {100 * r['extra']:.0f}% more time per step "
                  f"(repeats spread {100 * noise:.0f}%; one extra forward predicts about 33%)")
        else:
            print(f"   {m}: the extra time ({100 * r['extra']:+.0f}%) is within the repeats' "
                  f"spread ({100 * noise:.0f}%): not measured at this size")
    return {"activation_shrink": shrink, "peak_cut": peak_cut}


# --------------------------------------------------------------------------- the figure
def figure(rows: list):
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for i, method in enumerate(("full", "lora")):
        mine = [r for r in rows if r["method"] == method]
        Ls = [r["blocks"] for r in mine]
        for flag, ls in ((False, "-"), (True, "--")):
            label = f"{method}, {'checkpointed' if flag else 'plain'}"
            ax[0].plot(Ls, [r["act_meas"][flag] / MB for r in mine], ls, marker="o",
                       color=f"C{i}", label=label)
            ax[1].plot(Ls, [r["ms"][flag] for r in mine], ls, marker="o", color=f"C{i}",
                       label=label)
    ax[0].set(xlabel="blocks", ylabel="MiB", title="activations kept after forward (measured)")
    ax[1].set(xlabel="blocks", ylabel="ms", title="time per step (zero_grad, forward, backward, "
              "AdamW)")
    ax[0].legend()
    return fig


def main(argv=None) -> dict:
    args = lessonkit.arguments(__doc__, quick="small model, few repeats").parse_args(argv)
    depths = QUICK_DEPTHS if args.quick else DEPTHS
    B, T = (QUICK_BATCH, QUICK_SEQ) if args.quick else (BATCH, SEQ)
    rng = np.random.default_rng(args.seed)
    x = bk.asarray(rng.integers(0, CONFIG.vocab_size, (B, T)))
    y = bk.asarray(rng.integers(0, CONFIG.vocab_size, (B, T)))
    worst = same_gradients(depths[-1], T, x, y, args.seed)
    rows = memory_and_time(depths, B, T, x, y, QUICK_REPEATS if args.quick else REPEATS,
                           args.seed)
    found = verdicts(rows, depths[-1])
    path = lessonkit.save_figure(figure(rows), FIGURE, dpi=110)
    print(f"\nfigure: {path}")
    return {"rows": rows, "max_grad_diff": worst, **found, "figure": str(path)}


if __name__ == "__main__":
    main()
