"""Lesson 10c: what LoRA learns: shared subspaces and amplified directions (LoRA paper 7.2-7.3).

LoRA (Hu et al. 2021) trains ``ΔW = s B A`` with ``B: (d_out, r)``, ``A: (r, d_in)``. Its
section 7 asks what such an update looks like. This lesson trains LoRA on a task our base never
saw ("sort") at two ranks and two seeds, plus one full fine-tune as a reference, and replays
two of the paper's measurements.

(4) Subspace similarity (paper section 7.2, Figure 3).  Compare the row spaces of the A
    matrices of the r = 8 and r = 64 runs through their top i and top j right singular vectors::

        φ(A_8, A_64, i, j) = ||U_8,iᵀ U_64,j||_F² / min(i, j)      in [0, 1]

    1 when one subspace contains the other, 0 when orthogonal. Random subspaces of R^d give
    ``max(i, j) / d`` on average. CAUTION: our width is d = 128, so r = 64 is *half* the space
    and a random 64-dim subspace already holds half of any vector's energy; the paper's GPT-3
    has d = 12288, where r = 64 is 0.5%.

(5) Amplification (section 7.3, Table 7).  Project W onto ΔW's top-r singular directions,
    ``||Uᵀ W V||_F``, and compare with W's own top-r directions (the largest possible value) and
    random ones. The paper finds ΔW's directions are NOT W's loudest ones (a weak projection)
    and ``||ΔW||_F / ||Uᵀ W V||_F`` is large: the update amplifies directions W holds but
    under-uses. Two LoRA seeds give the noise every verdict is judged against.

Run:  python lessons/10c_subspaces.py [--quick] [--seed N]
(--seed changes the fine-tunes; the base model is always the cached seed-0 base.)
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # render to a file; no display needed
import matplotlib.pyplot as plt
import numpy as np  # host-side only: tables and figures

from minipeft import backend as bk
from minipeft import lessonkit
from minipeft.base import load_base
from minipeft.data import TaskMixture
from minipeft.experiment import method_specs
from minipeft.lowrank import (
    amplification,
    random_orthonormal,
    subspace_similarity,
    subspace_similarity_grid,
)
from minipeft.peft import LoraConfig, LoRALinear, full_finetuning, get_peft_model
from minipeft.train import TrainConfig, train
from minipeft.verdicts import spread

BASE_SEED = 0               # the cached base every lesson adapts
TASK = "sort"               # new to the base (it learnt copy, reverse, cipher, count)
STEPS, QUICK_STEPS = 300, 40            # the same budget for every fine-tune below
BATCH, QUICK_BATCH = 64, 32
LORA_R = 8                  # the small rank
R_BIG = 64                  # the "large" rank of part 4 (capped at half the width in --quick)
PAPER_FACTOR = 21.5         # LoRA paper Table 7: GPT-3 W_q, r = 4
FIGURE = "10c_subspaces.png"


def f64(a):
    """An analysis copy in float64 (the model trains in float32)."""
    return bk.asarray(a, dtype=np.float64)


def lora_layers(peft) -> dict:
    """path -> LoRALinear, e.g. ``blocks.0.attn.q_proj``."""
    return {p: m for p, m in peft.base_model.named_modules() if isinstance(m, LoRALinear)}


def finetune(base, config, lr: float, seed: int, run: dict, desc: str):
    """Fine-tune a fresh copy of the base on TASK; returns (the wrapped model, the LoRA A
    matrices as they were before the first step)."""
    peft = get_peft_model(lessonkit.fresh_copy(base), config, seed=seed)
    init_A = {p: m.factors("default").A.data.copy() for p, m in lora_layers(peft).items()}
    data = TaskMixture([TASK], seed=seed, length=run["length"])
    tc = TrainConfig(steps=run["steps"], batch_size=run["batch"], lr=lr,
                     progress=run["progress"], desc=desc)
    train(peft, data.sample, tc)
    return peft, init_A


# --------------------------------------------------------------------------- (4) subspaces
def subspaces(lora8, lora_big, lora8b, init_A, r_big: int, d: int, seed: int) -> dict:
    """Do the r = 8 and r = r_big runs (and two seeds at r = 8) share their top directions?
    φ on A's row spaces, on ΔW = s B A itself, and on random subspaces for chance."""
    L8, Lb, L8b = lora_layers(lora8), lora_layers(lora_big), lora_layers(lora8b)
    r = LORA_R
    print(f"\n(4) Subspace similarity of the LoRA A matrices (d_in = {d}; r = {r_big} is "
          f"{r_big / d:.0%} of the width)\n")
    print(f"    {'matrix':<22} {'φ(1,1)':>8} {'φ(' + str(r) + ',' + str(r_big) + ')':>9} | "
          f"{'seeds φ(1,1)':>12} {'φ(' + str(r) + ',' + str(r) + ')':>8} | "
          f"{'A moved':>8} {'ΔW: φ(1,1)':>11}")
    table, grids = {}, {}
    for p in L8:
        A8 = f64(L8[p].factors("default").A.data)                    # (8, d)
        Ab = f64(Lb[p].factors("default").A.data)                    # (64, d)
        A8b = f64(L8b[p].factors("default").A.data)                  # (8, d), other seed
        g_big = bk.to_numpy(subspace_similarity_grid(A8, Ab))        # (8, 64)
        g_seed = bk.to_numpy(subspace_similarity_grid(A8, A8b))      # (8, 8)
        A0 = f64(init_A[p])
        moved = float(bk.xp.linalg.norm(A8 - A0) / bk.xp.linalg.norm(A0))
        dW8 = f64(L8[p].delta_weight("default"))
        dWb = f64(Lb[p].delta_weight("default"))
        table[p] = {"phi11_big": float(g_big[0, 0]), "phi_r_big": float(g_big[r - 1, -1]),
                    "phi11_seed": float(g_seed[0, 0]), "phi_rr_seed": float(g_seed[-1, -1]),
                    "A_moved": moved, "dW_phi11_big": subspace_similarity(dW8, dWb, 1, 1)}
        grids[p] = (g_big, g_seed)
        t = table[p]
        print(f"    {p:<22} {t['phi11_big']:>8.3f} {t['phi_r_big']:>9.3f} | "
              f"{t['phi11_seed']:>12.3f} {t['phi_rr_seed']:>8.3f} | {moved:>8.1%} "
              f"{t['dW_phi11_big']:>11.3f}")
    rnd = {"phi11": 1 / d, "phi_r_big": r_big / d, "phi_rr": r / d}
    R8, Rb = random_orthonormal(d, r, seed + 7).T, random_orthonormal(d, r_big, seed + 8).T
    g_rand = bk.to_numpy(subspace_similarity_grid(R8, Rb))
    print(f"    {'random expectation':<22} {rnd['phi11']:>8.3f} {rnd['phi_r_big']:>9.3f} | "
          f"{rnd['phi11']:>12.3f} {rnd['phi_rr']:>8.3f} |")
    print(f"    {'random draw':<22} {g_rand[0, 0]:>8.3f} {g_rand[-1, -1]:>9.3f} |")
    print("    (A moved = ||A - A_init|| / ||A_init||; 'ΔW: φ(1,1)' uses the update s B A "
          "itself, whose directions\n     are ordered by what was learnt rather than by A's "
          "random start)")
    mean11 = float(np.mean([t["phi11_big"] for t in table.values()]))
    mean_seed = float(np.mean([t["phi_rr_seed"] for t in table.values()]))
    mean_dw = float(np.mean([t["dW_phi11_big"] for t in table.values()]))
    moved = float(np.mean([t["A_moved"] for t in table.values()]))
    held = mean11 > 0.5                   # the paper's Figure 3: φ(1,1) well above 0.5
    mean_rb = float(np.mean([t["phi_r_big"] for t in table.values()]))

    def verdict(phi):
        return "held" if phi > 0.5 else "held only partly (above chance, below 0.5)" \
            if phi > 5 / d else "did NOT hold"

    print(f"\n    measured: mean φ(1,1) between the r = {LORA_R} and r = {r_big} A's is "
          f"{mean11:.3f} (random {1 / d:.3f}); on ΔW = s B A itself {mean_dw:.3f};\n"
          f"    mean φ({r},{r_big}) = {mean_rb:.3f} (random {r_big / d:.3f}).")
    print("    The paper's finding (the top direction is shared, so a small rank already holds "
          f"it): on A it {verdict(mean11)};\n    on ΔW it {verdict(mean_dw)}.")
    if moved < 1.0:
        print(f"    A moved {moved:.0%} of its initial norm on average: the part that did not "
              "move is the random start, which\n    differs between runs and blurs A's own "
              "singular directions (ΔW's are ordered by the update).")
    else:
        print(f"    A moved {moved:.0%} of its initial norm on average, so its random start "
              "does not explain what is not shared:\n    in this short run on a small model the "
              "two ranks found leading directions that only partly agree.")
    print(f"    Two seeds at r = {LORA_R}: mean φ({LORA_R},{LORA_R}) = {mean_seed:.3f} vs "
          f"random {r / d:.3f}: {'more' if mean_seed > 1.5 * r / d else 'hardly more'} "
          "shared than chance.")
    print(f"    Caveat: at width {d}, r = {r_big} spans {r_big / d:.0%} of the input space, so "
          f"φ({r},{r_big}) = {r_big / d:.2f} by chance alone.")
    return {"table": table, "mean_phi11": mean11, "mean_phi11_dW": mean_dw, "mean_phi_r_big":
            mean_rb, "mean_seed_phi": mean_seed, "A_moved": moved, "random": rnd, "held": held,
            "grids": grids, "random_grid": g_rand}


# --------------------------------------------------------------------------- (5) amplification
def amplified(base_state, deltas, lora_deltas, lora_deltas_b, r: int, seed: int,
              lr_ratio: float) -> dict:
    """Does ΔW point along W's loud directions or along ones W under-uses? ``amplification``
    projects W onto ΔW's top-r directions, W's own and random ones; the second LoRA seed gives
    the spread the verdict must beat."""
    print(f"\n(5) Amplification (LoRA paper Table 7): W projected onto r = {r} directions\n")
    print(f"    {'matrix':<22} {'ΔW from':<8} {'||ΔW||':>8} {'ΔW dirs':>8} {'W dirs':>8} "
          f"{'random':>8} {'factor':>7} {'position':>9}")
    rows = {}
    for name in deltas:
        key = name.removesuffix(".weight")
        if key not in lora_deltas:
            continue
        W = f64(base_state[name])
        for src, D in (("LoRA", f64(lora_deltas[key])), ("full FT", deltas[name])):
            a = amplification(D, W, r, seed=seed)
            pos = (a.proj_norm - a.random_norm) / (a.w_own_norm - a.random_norm)
            rows[(key, src)] = {**a.__dict__, "position": pos}
            print(f"    {key:<22} {src:<8} {a.delta_norm:>8.3f} {a.proj_norm:>8.3f} "
                  f"{a.w_own_norm:>8.3f} {a.random_norm:>8.3f} {a.factor:>7.2f} {pos:>9.1%}")
    print("    (ΔW dirs = ||Uᵀ W V||_F on ΔW's top-r singular directions; W dirs on W's own; "
          "factor = ||ΔW||_F / ΔW dirs;\n     position = where ΔW dirs sits from random (0%) "
          "to W's own (100%). Paper, GPT-3 W_q, r = 4: 0.32 vs 21.67 vs 0.02,\n     position "
          "1.4%, factor 21.5)")
    lora_rows = [v for (_, s), v in rows.items() if s == "LoRA"]
    above_random = all(v["proj_norm"] > v["random_norm"] for v in lora_rows)
    # the same measures on the second seed's LoRA: the seeds' spread is the noise
    per_seed = [(float(np.mean([v["position"] for v in lora_rows])),
                 float(np.mean([v["factor"] for v in lora_rows])))]
    pos_b, fac_b = [], []
    for key, D in lora_deltas_b.items():
        W = f64(base_state[key + ".weight"])
        a = amplification(f64(D), W, r, seed=seed)
        pos_b.append((a.proj_norm - a.random_norm) / (a.w_own_norm - a.random_norm))
        fac_b.append(a.factor)
    per_seed.append((float(np.mean(pos_b)), float(np.mean(fac_b))))
    mean_pos, pos_sd = spread([p for p, _ in per_seed])
    mean_factor, factor_sd = spread([f for _, f in per_seed])
    # the finding: ΔW's directions are NOT W's loud ones: below halfway, by more than the spread
    held = above_random and mean_pos + pos_sd < 0.5
    print(f"\n    measured (LoRA, 2 seeds): ΔW's directions project {'above' if above_random else 'NOT always above'}"  # noqa: E501
          f" random ones, at {mean_pos:.0%} ± {pos_sd:.0%} of the way to W's own\n    top "
          f"directions (paper 1.4%); amplification factor {mean_factor:.2f} ± {factor_sd:.2f} "
          f"(paper {PAPER_FACTOR}).")
    if held:
        print("    The paper's direction finding held: the update amplifies directions W "
              f"contains but does not emphasise\n    (more weakly than in GPT-3: "
              f"{mean_pos:.0%} of the way vs the paper's 1.4%).")
    else:
        print("    The paper's direction finding did not hold here: the update's directions "
              "sit halfway or more toward\n    W's loudest ones (or within the seeds' spread of "
              "it).")
    print(f"    The factor is ||ΔW||_F over a projection of W, so it grows with how far training "
          f"moved ΔW: with Adam,\n    about lr x steps. LoRA trained at {lr_ratio:g}x full "
          f"FT's lr; at full FT's lr its factor would be about {mean_factor / lr_ratio:.2f}. "
          f"Our factor is\n    "
          + (f"{PAPER_FACTOR / mean_factor:.0f}x smaller" if mean_factor < PAPER_FACTOR else
             f"{mean_factor / PAPER_FACTOR:.1f}x larger")
          + " than the paper's, whose update came from a far longer run on a far larger model.")
    full_rows = [v for (_, s), v in rows.items() if s == "full FT"]
    full_pos = float(np.mean([v["position"] for v in full_rows]))
    full_factor = float(np.mean([v["factor"] for v in full_rows]))
    print(f"    The full fine-tune's ΔW (top {r} of a full-rank update) sits at {full_pos:.0%}, "
          f"factor {full_factor:.2f}: {'closer to' if full_pos > mean_pos else 'no closer to'} "
          "W's own directions than LoRA's.")
    return {"rows": {f"{k}|{s}": v for (k, s), v in rows.items()}, "held": held,
            "mean_position": mean_pos, "mean_factor": mean_factor, "position_sd": pos_sd,
            "factor_sd": factor_sd, "per_seed": per_seed, "paper_factor": PAPER_FACTOR,
            "lr_ratio": lr_ratio, "full_position": full_pos, "full_factor": full_factor}


# --------------------------------------------------------------------------- the figure
def figure(sub: dict, amp: dict, r_big: int):
    """Top rows: φ grids of the last block's q and v (part 4); bottom row: part 5's bars."""
    r = LORA_R
    n_blocks = 1 + max(int(p.split(".")[1]) for p in sub["grids"])
    shown = [p for p in sub["grids"] if p.startswith(f"blocks.{n_blocks - 1}.")]   # q, v
    fig = plt.figure(figsize=(14, 3.4 * len(shown) + 4.5))
    grid = fig.add_gridspec(len(shown) + 1, 3)
    for row, p in enumerate(shown):
        g_big, g_seed = sub["grids"][p]
        for col, (g, title, xl) in enumerate((
                (g_big, f"{p}: φ(A_r={r}, A_r={r_big}, i, j)", f"j (r = {r_big})"),
                (g_seed, f"{p}: two seeds at r = {r}", "j (seed 2)"),
                (sub["random_grid"], f"random subspaces, {r} vs {r_big}", f"j (r = {r_big})"))):
            ax = fig.add_subplot(grid[row, col])
            im = ax.imshow(g, vmin=0, vmax=1, cmap="viridis", aspect="auto",
                           extent=(0.5, g.shape[1] + 0.5, g.shape[0] + 0.5, 0.5))
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(xl)
            ax.set_ylabel(f"i (r = {r})")
            if col == 2:
                fig.colorbar(im, ax=ax, shrink=0.8)
    ax = fig.add_subplot(grid[len(shown), :])
    rows = amp["rows"]
    labels = [k.replace("blocks.", "b").replace(".attn", "").replace("|", "\n") for k in rows]
    x = np.arange(len(rows))
    for off, col, name in ((-0.27, "random_norm", "random directions"),
                           (0.0, "proj_norm", "ΔW's top-r directions"),
                           (0.27, "w_own_norm", "W's own top-r directions")):
        ax.bar(x + off, [v[col] for v in rows.values()], width=0.27, label=name)
    ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("||Uᵀ W V||_F")
    ax.set_title(f"(5) How strongly W already points along r = {r} directions")
    ax.legend()
    return fig


def main(argv=None) -> dict:
    args = lessonkit.arguments(__doc__, quick="the tiny quick base, few steps").parse_args(argv)
    clock = lessonkit.Stopwatch()
    kind = "quick" if args.quick else "default"
    print(f"Lesson 10c: LoRA's subspaces ({kind} base, backend: {bk.name}, seed {args.seed})")
    base, info = load_base(kind, seed=BASE_SEED, progress=not args.quick)
    d = base.config.n_embd
    r_big = min(R_BIG, d // 2)
    run = {"steps": QUICK_STEPS if args.quick else STEPS, "length": info["length"],
           "batch": QUICK_BATCH if args.quick else BATCH, "progress": not args.quick}
    lr_full, lr_lora = method_specs()["full"].lr, method_specs()["lora_r8_qv"].lr
    print(f"    base: width {d}, {base.config.n_layer} blocks; new task '{TASK}', "
          f"{run['steps']} steps x {run['batch']} rows per fine-tune; lr full {lr_full:g}, "
          f"LoRA {lr_lora:g}")
    lcfg = LoraConfig(r=LORA_R, alpha=2 * LORA_R)                   # s = alpha / r = 2
    full, _ = finetune(base, full_finetuning(), lr_full, args.seed, run, "full FT")
    lora8, init_A = finetune(base, lcfg, lr_lora, args.seed, run, f"LoRA r={LORA_R}")
    lora_big, _ = finetune(base, LoraConfig(r=r_big, alpha=2 * r_big), lr_lora, args.seed, run,
                           f"LoRA r={r_big}")
    lora8b, _ = finetune(base, lcfg, lr_lora, args.seed + 1, run, f"LoRA r={LORA_R} seed 2")
    sub = subspaces(lora8, lora_big, lora8b, init_A, r_big, d, args.seed)
    base_state, ft_state = base.state_dict(), full.base_model.state_dict()
    deltas = {k: f64(ft_state[k] - base_state[k]) for k in base_state   # q and v are enough
              if k.startswith("blocks.") and k.endswith(".weight") and k.split(".")[-2] in
              ("q_proj", "v_proj")}
    lora_deltas, lora_deltas_b = ({p: layer.delta_weight("default") for p, layer in
                                   lora_layers(peft).items()} for peft in (lora8, lora8b))
    amp = amplified(base_state, deltas, lora_deltas, lora_deltas_b, LORA_R, args.seed,
                    lr_lora / lr_full)
    path = lessonkit.save_figure(figure(sub, amp, r_big), FIGURE)
    print(f"\nfigure saved to {path}; lesson ran in {clock.seconds():.0f} s")
    sub = {k: v for k, v in sub.items() if k not in ("grids", "random_grid")}
    return {"subspaces": sub, "amplification": amp, "r_big": r_big, "width": d,
            "figure": str(path), "seconds": clock.seconds()}


if __name__ == "__main__":
    main()
