"""Lesson 10a: the best rank-r matrix (Eckart-Young), measured on a pretrained weight.

LoRA (Hu et al. 2021) trains ``ΔW = s B A`` with ``B: (d_out, r)``, ``A: (r, d_in)``: an update
of rank at most r. Lessons 10a-10d replay the maths under that bet (the LoRA paper's section 7,
small) on our own model. This first one asks what rank r can hold at all.

Write ``W = Σ_i σ_i u_i v_iᵀ`` (the SVD, σ_1 ≥ σ_2 ≥ ...). Keeping the first r terms gives
``W_r``, and no matrix of rank ≤ r is closer to W in Frobenius norm::

    min_{rank X ≤ r} ||W - X||_F = ||W - W_r||_F = sqrt(σ_{r+1}² + ... + σ_k²)

Why: ``||W - X||_F²`` is the sum of squares of W - X's singular values; a rank-r X can cancel at
most r "layers" of W, and cancelling the r loudest ones leaves the smallest remainder. So the
fraction ``Σ_{i≤r} σ_i² / Σ_i σ_i²`` (the energy of the top r directions) says how much of a
matrix rank r can hold.

The one part: check the formula at every rank, on a pretrained weight and on a random matrix of
the same shape and norm, whose flat spectrum is the "not low rank" reference; then compare how
much energy the top 8 directions of each hold.

Next: 10b (the rank of a fine-tune's update), 10c (LoRA's subspaces and amplification),
10d (PiSSA).

Run:  python lessons/10a_eckart_young.py [--quick] [--seed N]
(--seed draws the random matrix; the base model is always the cached seed-0 base.)
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # render to a file; no display needed
import matplotlib.pyplot as plt
import numpy as np  # host-side only: tables and figures

from minipeft import backend as bk
from minipeft import lessonkit
from minipeft.base import load_base
from minipeft.lowrank import energy_curve, svd, tail_energy, truncation_error

BASE_SEED = 0               # the cached base every lesson adapts
EY_MATRIX = "blocks.0.attn.q_proj.weight"   # the pretrained weight we decompose
FIGURE = "10a_eckart_young.png"


def f64(a):
    """An analysis copy in float64 (the model trains in float32)."""
    return bk.asarray(a, dtype=np.float64)


# --------------------------------------------------------------------------- Eckart-Young
def eckart_young(base_state: dict, seed: int) -> dict:
    """Is the measured error of the best rank-r approximation the tail of the spectrum, at
    every r? Measured with ``truncation_error`` (build W_r, subtract, take the norm) against the
    formula ``tail_energy`` (from the singular values alone)."""
    W = f64(base_state[EY_MATRIX])                                  # (d_out, d_in)
    G = f64(bk.host_rng(seed).standard_normal(W.shape))
    G = G * (bk.xp.linalg.norm(W) / bk.xp.linalg.norm(G))          # same ||.||_F as W
    k = min(W.shape)
    ranks = list(range(1, k + 1))
    curves, worst = {}, {}
    for label, M in (("pretrained", W), ("random", G)):
        _, S, _ = svd(M)
        err = np.array([truncation_error(M, r) for r in ranks])     # ||M - M_r||_F, measured
        tail = np.array([tail_energy(S, r) for r in ranks])         # sqrt(Σ_{i>r} σ_i²)
        curves[label] = {"err": err, "tail": tail, "S": bk.to_numpy(S),
                         "energy": bk.to_numpy(energy_curve(S))}
        worst[label] = float(np.max(np.abs(err - tail)))
    print(f"\n(1) Eckart-Young on {EY_MATRIX} {tuple(W.shape)} and a random Gaussian matrix "
          "of the same shape and Frobenius norm\n")
    print(f"    {'r':>4} | {'||W-W_r||':>10} {'tail':>10} {'energy':>7} | "
          f"{'||G-G_r||':>10} {'tail':>10} {'energy':>7}")
    for r in sorted({r for r in (1, 2, 4, 8, 16, 32, 64, k // 2, k - 1) if r <= k}):
        p, g = curves["pretrained"], curves["random"]
        print(f"    {r:>4} | {p['err'][r - 1]:>10.4f} {p['tail'][r - 1]:>10.4f} "
              f"{p['energy'][r - 1]:>7.1%} | {g['err'][r - 1]:>10.4f} {g['tail'][r - 1]:>10.4f} "
              f"{g['energy'][r - 1]:>7.1%}")
    scale = float(bk.xp.linalg.norm(W))
    print(f"\n    max |error - tail| over r = 1..{k}: pretrained {worst['pretrained']:.2e}, "
          f"random {worst['random']:.2e} (||W||_F = {scale:.2f}; float64 round-off)")
    held = max(worst.values()) < 1e-9 * scale
    print(f"    measured: the best rank-r error IS the tail energy at every rank; "
          f"Eckart-Young {'held' if held else 'did NOT hold'}.")
    e8p, e8g = curves["pretrained"]["energy"][7], curves["random"]["energy"][7]
    print(f"    The pretrained weight's spectrum is steeper than noise: its top 8 of {k} "
          f"directions hold {e8p:.1%} of its energy, the random matrix's {e8g:.1%}.")
    return {"max_abs_diff": worst, "held": held, "ranks": ranks, "curves": curves,
            "energy8": {"pretrained": float(e8p), "random": float(e8g)}}


# --------------------------------------------------------------------------- the figure
def figure(ey: dict):
    ranks, curves = ey["ranks"], ey["curves"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for label, color in (("pretrained", "C0"), ("random", "C3")):
        c = curves[label]
        ax.plot(ranks, c["tail"], color=color, lw=2.5, alpha=0.5,
                label=f"{label}: sqrt(Σ_(i>r) σ_i²)")
        ax.plot(ranks[::4], c["err"][::4], "o", color=color, ms=4,
                label=f"{label}: ||M - truncate(M, r)||_F")
    ax.set_xlabel("rank r")
    ax.set_ylabel("Frobenius error")
    ax.set_title("Eckart-Young: the truncation error is the tail of the spectrum")
    ax.legend(fontsize=8)
    ax = axes[1]
    for label, color in (("pretrained", "C0"), ("random", "C3")):
        ax.plot(ranks, curves[label]["energy"], color=color, label=label)
    ax.set_xlabel("rank r")
    ax.set_ylabel("energy captured  Σ_(i≤r) σ_i² / Σ σ_i²")
    ax.set_title(f"{EY_MATRIX}: a steeper spectrum than noise")
    ax.legend()
    return fig


def main(argv=None) -> dict:
    args = lessonkit.arguments(__doc__, quick="the tiny quick base").parse_args(argv)
    clock = lessonkit.Stopwatch()
    kind = "quick" if args.quick else "default"
    print(f"Lesson 10a: Eckart-Young ({kind} base, backend: {bk.name}, seed {args.seed})")
    base, _ = load_base(kind, seed=BASE_SEED, progress=not args.quick)
    ey = eckart_young(base.state_dict(), args.seed)
    path = lessonkit.save_figure(fig=figure(ey), name=FIGURE)
    print(f"\nfigure saved to {path}; lesson ran in {clock.seconds():.0f} s")
    ey = {k: v for k, v in ey.items() if k not in ("ranks", "curves")}
    return {"eckart_young": ey, "figure": str(path), "seconds": clock.seconds()}


if __name__ == "__main__":
    main()
