"""Lesson 13: 4-bit NormalFloat and QLoRA. How small can the frozen base get, and what does it cost?

LoRA removes the gradients and optimizer state of the frozen weights (lesson 03), but the frozen
weights themselves stay: 4 bytes a parameter in float32, 2 in bf16. LLaMA-2-7B's weights alone are
27 GB in float32. QLoRA (Dettmers et al. 2023) stores the frozen base in 4 bits and trains LoRA in
float on top; the 4-bit code is designed for weights that look normally distributed:

  1. The code book. NF4's 16 levels sit at quantiles of a normal distribution (an exact 0, 8
     levels above, 7 below, scaled to [-1, 1]); uniform int4 spaces them evenly. If weights are
     normal, each NF4 level is used about equally often: every code carries information.
  2. The error. Each block of 64 weights keeps its largest |w| (absmax) and every weight becomes
     the nearest level times that constant. We quantise every weight matrix of our Shakespeare
     base both ways and measure the error against the float weights.
  3. The bytes. 4 bits of code per weight, plus one 32-bit constant per 64 weights (0.5 bit),
     cut to 0.127 bit by double quantisation (the constants themselves in 8 bits): 4.127 bits.
  4. The quality. The quantised base's held-out loss, beside the float base's, per window,
     with the windows' spread as the margin.
  5. QLoRA against LoRA: the same LoRA (r = 8 on every linear of the blocks), the same steps,
     learning rate and seeds, trained on Python code once over the float base and once over the
     4-bit one. Does the 4-bit base cost quality, and what does it save?
  6. At scale: the weights of real models at 32, 16 and 4 bits (``minipeft params``).

The library: ``minipeft/quant.py`` (code book, block-wise absmax, packing, double quantisation,
``QuantLinear``), tested against the published NF4 levels in ``tests/test_quant.py``.

Each step below is one part of the code, in this order, printing its own table and verdict.

Run:  python lessons/13_quantisation.py [--quick] [--seed N]
"""

from __future__ import annotations

from statistics import NormalDist

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np  # host-side only: the tables and the figure

from minipeft import backend as bk
from minipeft import lessonkit
from minipeft.autograd import no_grad
from minipeft.base import base_domains, load_base
from minipeft.nn.layers import Linear
from minipeft.params import PRESETS, weight_bytes
from minipeft.peft import LoraConfig, get_peft_model
from minipeft.peft.qlora import QLoraConfig
from minipeft.quant import (
    NF4Weight,
    QuantLinear,
    dequantize_blockwise,
    int4_levels,
    nf4_levels,
    quantize_blockwise,
    quantize_model,
)
from minipeft.train import TrainConfig, train
from minipeft.verdicts import spread

BASE, QUICK_BASE = "shakespeare", "shakespeare_quick"
BLOCK = 64                    # the paper's block; the quick base (width 48) uses 16
EVAL_WINDOWS, QUICK_EVAL = 64, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out")
FT = dict(steps=100, batch_size=12, lr=1e-2, seeds=(0, 1, 2))           # LoRA r=8 on code
QUICK_FT = dict(steps=30, batch_size=8, lr=1e-2, seeds=(0, 1))
SE_MARGIN = 2.0               # a difference counts when it exceeds 2 standard errors
FIGURE = "13_quantisation.png"


# --------------------------------------------------------------------------- 1. the code book
def code_book() -> dict:
    """Where NF4's 16 levels sit: the normal CDF at each, against int4's even spacing."""
    nf4, int4 = np.array(nf4_levels()), np.array(int4_levels())
    print("1. The 16 NF4 levels are quantiles of a normal distribution; int4's are evenly spaced.")
    top = NormalDist().inv_cdf(0.5 * ((1 - 1 / 30) + (1 - 1 / 32)))
    cdf = [NormalDist().cdf(q * top) for q in nf4]
    print("   NF4 level   normal CDF at it      int4 level")
    for i, (q, c) in enumerate(zip(nf4, cdf)):
        u = f"{int4[i]:+.4f}" if i < len(int4) else ""
        print(f"   {q:+.4f}      {c:.4f}                {u}")
    gaps = np.diff(cdf)
    print(f"   probability between neighbouring NF4 levels: {gaps.min():.3f} to {gaps.max():.3f} "
          f"(even spacing would be {1 / 15:.3f} each)")
    return {"nf4_levels": nf4.tolist()}


# --------------------------------------------------------------------------- 2. the error
def the_error(base, info: dict, kind: str, mats: dict) -> dict:
    """Block-wise absmax in NF4 and int4 on every weight matrix of the blocks: relative RMS
    error against the float weights, per matrix, and which code is closer how often."""
    block = BLOCK if base.config.n_embd % BLOCK == 0 else 16
    print(f"\n2. Block-wise absmax, {block} weights a block, on the {len(mats)} weight matrices of "
          f"the {kind!r} base ({info['num_parameters']:,} parameters):")
    print("   matrix                      NF4 rel. error   int4 rel. error   NF4 / int4")
    errors = {"nf4": [], "int4": []}
    for path, W in mats.items():
        Wn = bk.to_numpy(W).astype(np.float64)
        row = []
        for name, levels in (("nf4", nf4_levels()), ("int4", int4_levels())):
            codes, c = quantize_blockwise(W, levels, block)
            back = bk.to_numpy(dequantize_blockwise(codes, c, levels, block))
            rel = float(np.sqrt(((back - Wn) ** 2).mean() / (Wn ** 2).mean()))
            errors[name].append(rel)
            row.append(rel)
        print(f"   {path:<27} {row[0]:>13.4f}   {row[1]:>15.4f}   {row[0] / row[1]:>9.2f}")
    ratio = np.array(errors["nf4"]) / np.array(errors["int4"])
    wins = int((ratio < 1).sum())
    if wins == len(ratio) and ratio.max() < 0.95:
        verdict = (f"NF4's error is below int4's on all {len(ratio)} matrices (ratio "
                   f"{ratio.min():.2f}-{ratio.max():.2f}): the paper's claim held here")
    elif wins > len(ratio) // 2:
        verdict = (f"NF4's error is below int4's on {wins} of {len(ratio)} matrices (ratio up to "
                   f"{ratio.max():.2f}): the claim held on most, not all")
    else:
        verdict = (f"NF4's error is below int4's on only {wins} of {len(ratio)} matrices: the "
                   f"claim did not hold for these weights")
    print(f"   -> {verdict}")
    return {"nf4_errors": errors["nf4"], "int4_errors": errors["int4"],
            "error_verdict": verdict, "block": block, "ratio": ratio}


# --------------------------------------------------------------------------- 3. the bytes
def the_bytes(mats: dict, block: int) -> dict:
    """Bytes of the quantised weights, with and without double quantisation, against the
    formula 4 + 8/block + 32/(block*256) bits a weight."""
    n = sum(int(W.size) for W in mats.values())
    single = sum(NF4Weight(W, block, double=False).nbytes() for W in mats.values())
    double = sum(NF4Weight(W, block, double=True).nbytes() for W in mats.values())
    formula = 4 + 8 / block + 32 / (block * 256)
    print(f"\n3. Bytes of those {n:,} weights: float32 {4 * n:,}; NF4 with 32-bit constants "
          f"{single:,} ({8 * single / n:.3f} bits/param); with double quantisation {double:,} "
          f"({8 * double / n:.3f} bits/param; the formula 4 + 8/{block} + 32/({block}*256) gives "
          f"{formula:.3f}, the rest is the padding of the last block of constants)")
    return {"bits_single": 8 * single / n, "bits_double": 8 * double / n}


# --------------------------------------------------------------------------- 4. the quality
def window_bits(model, ev) -> np.ndarray:
    """Held-out bits per character of each window: (N,), so windows give the noise."""
    with no_grad():
        logits = bk.to_numpy(model(ev.x).data).astype(np.float64)     # (N, T, V)
    y = bk.to_numpy(ev.y)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nats = -np.take_along_axis(logp, y[..., None], -1)[..., 0].sum(1)  # (N,) nats per window
    chars_per_window = ev.chars / y.shape[0]
    return nats / chars_per_window / np.log(2)


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of b - a over windows and its standard error."""
    d = b - a
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def the_quality(base, mats: dict, block: int, plays, T: int, windows: int) -> dict:
    """Held-out plays in bits per character: the float base, the real 4-bit model
    (QuantLinear), NF4 without double quantisation and int4, paired per window so the windows'
    spread is the margin."""
    ev = plays.eval_set(windows, T)
    quantised = {}
    for name, levels in (("nf4", nf4_levels()), ("int4", int4_levels())):
        twin = lessonkit.fresh_copy(base)
        for path in mats:
            W = twin.get_submodule(path).weight
            codes, c = quantize_blockwise(W.data, levels, block)
            W.data = dequantize_blockwise(codes, c, levels, block).astype(W.dtype)
        quantised[name] = twin
    qmodel = lessonkit.fresh_copy(base)                 # the real thing: 4-bit QuantLinears
    quantize_model(qmodel, block=block)
    bits = {"float": window_bits(base, ev), "nf4": window_bits(qmodel, ev),
            "nf4 (no double quant.)": window_bits(quantised["nf4"], ev),
            "int4": window_bits(quantised["int4"], ev)}
    print(f"\n4. Held-out plays ({windows} windows of {T} tokens), bits per character:")
    cost = {}
    for name, b in bits.items():
        if name == "float":
            print(f"   {name:<24} {b.mean():.4f}")
            continue
        cost[name] = paired(bits["float"], b)
        print(f"   {name:<24} {b.mean():.4f}   vs float {cost[name][0]:+.4f} "
              f"± {cost[name][1]:.4f} (1 s.e. over windows)")
    d_nf4, se_nf4 = cost["nf4"]
    gap, gap_se = paired(bits["nf4"], bits["int4"])
    if gap > SE_MARGIN * gap_se:
        q_verdict = (f"int4 costs more than NF4 by {gap:.4f} bits/char, more than "
                     f"{SE_MARGIN:g} standard errors ({SE_MARGIN * gap_se:.4f})")
    elif gap < -SE_MARGIN * gap_se:
        q_verdict = (f"NF4 costs more than int4 by {-gap:.4f} bits/char (beyond "
                     f"{SE_MARGIN:g} s.e.): the claim did not hold here")
    else:
        q_verdict = (f"NF4 and int4 differ by {gap:+.4f} bits/char, within {SE_MARGIN:g} "
                     f"standard errors ({SE_MARGIN * gap_se:.4f}): no difference measured")
    nf4_hurts = d_nf4 > SE_MARGIN * se_nf4
    print(f"   -> {q_verdict}; NF4 " + (f"costs {d_nf4:.4f} bits/char against float (beyond "
                                         f"{SE_MARGIN:g} s.e.)" if nf4_hurts else
                                         "is within noise of the float base"))
    return {"bits": {k: float(v.mean()) for k, v in bits.items()}, "quality_verdict": q_verdict,
            "nf4_cost": d_nf4, "nf4_cost_se": se_nf4, "int4_minus_nf4": gap,
            "int4_minus_nf4_se": gap_se}


# --------------------------------------------------------------------------- 5. QLoRA vs LoRA
def block_weight_bytes(model) -> int:
    """Bytes of the frozen weight matrices in the blocks: float arrays, or NF4 codes + constants."""
    total = 0
    for path, m in model.named_modules():
        if isinstance(m, QuantLinear):
            total += m.qweight.nbytes()
        elif isinstance(m, Linear) and path.startswith("blocks."):
            total += m.weight.data.nbytes
    return total


def qlora_vs_lora(base, block: int, code, T: int, windows: int, ft: dict) -> dict:
    """The same LoRA over the float base and over the 4-bit one, same steps, lr and seeds:
    held-out code loss (the seeds' spread is the margin) and the frozen weights' bytes."""
    ev_code = code.eval_set(windows, T)
    before = window_bits(base, ev_code)
    print(f"\n5. LoRA r=8 on {', '.join(TARGETS)}, {ft['steps']} steps of code (batch "
          f"{ft['batch_size']}, lr {ft['lr']:g}), seeds {list(ft['seeds'])}; held-out code, "
          f"bits per character (the base: {before.mean():.3f}):")
    finals = {"LoRA": [], "QLoRA": []}
    frozen = {}
    for seed in ft["seeds"]:
        for name in ("LoRA", "QLoRA"):
            model = lessonkit.fresh_copy(base)
            if name == "QLoRA":
                quantize_model(model, block=block)
                config = QLoraConfig(r=8, alpha=16, target_modules=TARGETS)
            else:
                config = LoraConfig(r=8, alpha=16, target_modules=TARGETS)
            frozen[name] = block_weight_bytes(model)
            peft = get_peft_model(model, config, seed=seed)
            train(peft, code.sampler(T, seed), TrainConfig(
                steps=ft["steps"], batch_size=ft["batch_size"], lr=ft["lr"],
                warmup=ft["steps"] // 10, progress=False))
            finals[name].append(float(window_bits(peft, ev_code).mean()))
    (ml, sl), (mq, sq) = spread(finals["LoRA"]), spread(finals["QLoRA"])
    for name, (mean, sd) in (("LoRA", (ml, sl)), ("QLoRA", (mq, sq))):
        print(f"   {name:<6} {mean:.3f} ± {sd:.3f} bits/char (sd over seeds; per seed "
              f"{', '.join(f'{v:.3f}' for v in finals[name])})")
    margin = sl + sq
    if mq - ml > margin:
        ql_verdict = (f"QLoRA ended {mq - ml:.3f} bits/char above LoRA, more than the seeds' "
                      f"spread ({margin:.3f}): the 4-bit base cost quality here")
    elif ml - mq > margin:
        ql_verdict = (f"QLoRA ended {ml - mq:.3f} bits/char below LoRA, beyond the seeds' "
                      f"spread ({margin:.3f})")
    else:
        ql_verdict = (f"QLoRA and LoRA ended {mq - ml:+.3f} bits/char apart, within the seeds' "
                      f"spread ({margin:.3f}): no difference measured (the paper found 4-bit QLoRA "
                      "matching 16-bit LoRA)")
    print(f"   -> {ql_verdict}")
    print(f"   frozen block weights held in memory: float32 {frozen['LoRA']:,} bytes, NF4 "
          f"{frozen['QLoRA']:,} bytes ({frozen['LoRA'] / frozen['QLoRA']:.1f}x smaller)")
    return {"qlora": finals["QLoRA"], "lora": finals["LoRA"], "code_before": float(before.mean()),
            "qlora_verdict": ql_verdict, "frozen_bytes": frozen}


# --------------------------------------------------------------------------- 6. at scale
def at_scale() -> dict:
    """The weights alone of real models at 32, 16 and 4 bits (``minipeft.params``)."""
    print("\n6. The weights of real models (weights alone), GB:")
    print("   model          fp32      bf16      NF4")
    for key in ("gpt2-124m", "llama2-7b", "gpt3-175b"):
        spec = PRESETS[key]
        gb = [weight_bytes(spec, p) / 1e9 for p in ("fp32", "bf16", "nf4")]
        print(f"   {spec.name:<13} {gb[0]:>7.2f}  {gb[1]:>8.2f}  {gb[2]:>7.2f}")
    return {"llama2_7b_nf4_gb": weight_bytes(PRESETS["llama2-7b"], "nf4") / 1e9}


# --------------------------------------------------------------------------- the figure
def figure(mats: dict, block: int, ratio):
    nf4, int4 = np.array(nf4_levels()), np.array(int4_levels())
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    W = np.concatenate([bk.to_numpy(W).reshape(-1, block) for W in mats.values()])
    u = (W / np.abs(W).max(1, keepdims=True)).ravel()
    ax[0].hist(u, bins=120, density=True, color="0.75", label="weights / block absmax")
    for q in nf4:
        ax[0].axvline(q, color="C0", lw=0.8)
    for q in int4:
        ax[0].axvline(q, color="C3", lw=0.8, ls=":")
    ax[0].set_title("our base's weights and the levels (NF4 solid, int4 dotted)")
    ax[0].legend(loc="upper right")
    ax[1].bar(range(len(ratio)), ratio, color="C0")
    ax[1].axhline(1.0, color="k", lw=0.8)
    ax[1].set_xlabel("weight matrix")
    ax[1].set_ylabel("NF4 error / int4 error")
    ax[1].set_title("relative error, per matrix (below 1: NF4 closer)")
    return fig


def main(argv=None) -> dict:
    args = lessonkit.arguments(__doc__, quick="the tiny Shakespeare base").parse_args(argv)
    kind = QUICK_BASE if args.quick else BASE
    out = code_book()
    base, info = load_base(kind, seed=args.seed, progress=not args.quick)
    mats = {p: m.weight.data for p, m in base.named_modules()       # the blocks' matrices
            if isinstance(m, Linear) and p.startswith("blocks.")}
    err = the_error(base, info, kind, mats)
    block, ratio = err.pop("block"), err.pop("ratio")
    out.update(err)
    out.update(the_bytes(mats, block))
    _, plays, code = base_domains(kind)
    windows = QUICK_EVAL if args.quick else EVAL_WINDOWS
    out.update(the_quality(base, mats, block, plays, info["length"], windows))
    out.update(qlora_vs_lora(base, block, code, info["length"], windows,
                             QUICK_FT if args.quick else FT))
    out.update(at_scale())
    path = lessonkit.save_figure(figure(mats, block, ratio), FIGURE, dpi=110)
    print(f"\nfigure: {path}")
    out["figure"] = str(path)
    return out


if __name__ == "__main__":
    main()
