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
  3. the extra time per step, against the third that the forward's share predicts, over repeats.

Run:  python lessons/15_checkpointing.py [--quick] [--seed N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np  # host-side only

from minipeft import backend as bk
from minipeft.memory import measure_step
from minipeft.nn import GPT, GPTConfig
from minipeft.peft import LoraConfig, get_peft_model

CONFIG = GPTConfig(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=128)
DEPTHS, QUICK_DEPTHS = (2, 4, 8), (1, 2, 4)
BATCH, QUICK_BATCH = 16, 4
SEQ, QUICK_SEQ = 128, 32
REPEATS, QUICK_REPEATS = 7, 3
MB = 2 ** 20


def out_dir() -> Path:
    root = Path(__file__).resolve().parent
    out = Path(os.environ.get("MINIPEFT_LESSON_OUT") or root / "out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def build(cfg: GPTConfig, method: str, seed: int):
    """A model of ``cfg`` (random weights: memory and time do not depend on them)."""
    model = GPT(cfg, seed=seed)
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=8, alpha=16), seed=seed)
    return model


def gradients(model, x, y) -> dict:
    for p in model.parameters():
        p.grad = None
    model.loss(x, y).backward()
    return {n: bk.to_numpy(p.grad) for n, p in model.named_parameters() if p.grad is not None}


def step_seconds(model, x, y) -> float:
    start = time.perf_counter()
    model.loss(x, y).backward()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, few repeats")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    depths = QUICK_DEPTHS if args.quick else DEPTHS
    B, T = (QUICK_BATCH, QUICK_SEQ) if args.quick else (BATCH, SEQ)
    repeats = QUICK_REPEATS if args.quick else REPEATS
    rng = np.random.default_rng(args.seed)
    x = bk.asarray(rng.integers(0, CONFIG.vocab_size, (B, T)))
    y = bk.asarray(rng.integers(0, CONFIG.vocab_size, (B, T)))
    results: dict = {"rows": []}

    # 1. the same gradients ---------------------------------------------------------------
    cfg = replace(CONFIG, n_layer=depths[-1], block_size=T)
    worst = 0.0
    for method in ("full", "lora"):
        plain = gradients(build(cfg, method, args.seed), x, y)
        ckpt = gradients(build(replace(cfg, checkpoint=True), method, args.seed), x, y)
        assert plain.keys() == ckpt.keys()
        worst = max(worst, max(float(np.abs(plain[k] - ckpt[k]).max()) for k in plain))
    print(f"1. Gradients with and without checkpointing ({depths[-1]} blocks, full FT and LoRA): "
          f"largest difference {worst:.1e} " + ("(bit for bit the same)" if worst == 0 else
                                                "(NOT identical: a bug)"))
    results["max_grad_diff"] = worst

    # 2-3. memory and time, by depth ------------------------------------------------------
    print(f"\n2-3. One step, batch {B} x {T} tokens, width {CONFIG.n_embd}; MiB and ms "
          f"(median of {repeats} interleaved repeats):")
    print("   method  blocks  activations kept (pred / meas)        step peak           "
          "time per step")
    print("                   plain            checkpointed         plain   checkpointed"
          "  plain  ckpt  extra")
    for method in ("full", "lora"):
        for L in depths:
            cfg = replace(CONFIG, n_layer=L, block_size=T)
            models = {flag: build(replace(cfg, checkpoint=flag), method, args.seed)
                      for flag in (False, True)}
            mem = {flag: measure_step(m, x, y) for flag, m in models.items()}
            times = {False: [], True: []}
            for _ in range(repeats):                  # take turns: the machine's noise is shared
                for flag, m in models.items():
                    times[flag].append(step_seconds(m, x, y))
            t = {f: statistics.median(v) for f, v in times.items()}
            row = {"method": method, "blocks": L,
                   "act_pred": {f: mem[f].predicted["activations"] for f in mem},
                   "act_meas": {f: mem[f].measured["activations"] for f in mem},
                   "peak": {f: mem[f].measured["peak_train"] for f in mem},
                   "ms": {f: 1e3 * t[f] for f in t},
                   "ms_spread": {f: 1e3 * (max(v) - min(v)) for f, v in times.items()}}
            row["extra"] = t[True] / t[False] - 1
            results["rows"].append(row)
            print(f"   {method:<7} {L:>5}  {row['act_pred'][False] / MB:6.1f} / "
                  f"{row['act_meas'][False] / MB:6.1f}    {row['act_pred'][True] / MB:6.1f} / "
                  f"{row['act_meas'][True] / MB:6.1f}     {row['peak'][False] / MB:7.1f} "
                  f"{row['peak'][True] / MB:9.1f}   {row['ms'][False]:6.0f} "
                  f"{row['ms'][True]:5.0f} {100 * row['extra']:+5.0f}%")

    # the verdicts, from the rows above ------------------------------------------------------
    deepest = [r for r in results["rows"] if r["blocks"] == depths[-1]]
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
    results.update(activation_shrink=shrink, peak_cut=peak_cut)

    # the figure --------------------------------------------------------------------------
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for i, method in enumerate(("full", "lora")):
        rows = [r for r in results["rows"] if r["method"] == method]
        Ls = [r["blocks"] for r in rows]
        for flag, ls in ((False, "-"), (True, "--")):
            label = f"{method}, {'checkpointed' if flag else 'plain'}"
            ax[0].plot(Ls, [r["act_meas"][flag] / MB for r in rows], ls, marker="o",
                       color=f"C{i}", label=label)
            ax[1].plot(Ls, [r["ms"][flag] for r in rows], ls, marker="o", color=f"C{i}",
                       label=label)
    ax[0].set(xlabel="blocks", ylabel="MiB", title="activations kept after forward (measured)")
    ax[1].set(xlabel="blocks", ylabel="ms", title="time per step (forward + backward)")
    ax[0].legend()
    fig.tight_layout()
    figure = out_dir() / "15_checkpointing.png"
    fig.savefig(figure, dpi=110)
    plt.close(fig)
    print(f"\nfigure: {figure}")
    results["figure"] = str(figure)
    return results


if __name__ == "__main__":
    main()
