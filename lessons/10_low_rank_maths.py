"""Lesson 10: the maths under LoRA, measured on our own model (the LoRA paper's section 7, small).

LoRA (Hu et al. 2021) trains ``ΔW = s B A`` with ``B: (d_out, r)``, ``A: (r, d_in)``, betting that
the update a fine-tune needs has low "intrinsic rank". This lesson does not take the bet on
trust: it fine-tunes our base model on a task it never saw ("sort"), looks at the update, and
replays the paper's analysis.

1. Eckart-Young.  Write ``W = Σ_i σ_i u_i v_iᵀ`` (the SVD, σ_1 ≥ σ_2 ≥ ...). Keeping the first r
   terms gives ``W_r``, and no matrix of rank ≤ r is closer to W in Frobenius norm::

       min_{rank X ≤ r} ||W - X||_F = ||W - W_r||_F = sqrt(σ_{r+1}² + ... + σ_k²)

   Why: ``||W - X||_F²`` is the sum of squares of W - X's singular values; a rank-r X can cancel
   at most r "layers" of W, and cancelling the r loudest ones leaves the smallest remainder. So
   the fraction ``Σ_{i≤r} σ_i² / Σ_i σ_i²`` (the energy of the top r directions) says how much of
   a matrix rank r can hold. Part 1 checks the formula at every rank, on a pretrained weight and
   on a random matrix, whose flat spectrum is the "not low rank" reference.

2. Intrinsic rank of a fine-tune.  Train *every* weight (full fine-tuning) and take, per matrix,
   ``ΔW = W_after - W_before``. If its spectrum falls fast, a few directions carry the update,
   and ``W + truncate(ΔW, r)`` should perform almost like ``W + ΔW``. Part 2 measures the
   spectrum, the top-r energy, two smooth ranks (stable rank ``Σσ²/σ_1²`` and effective rank
   ``exp(entropy of σ/Σσ)``, both r for r equal singular values), and the task quality of the
   truncated update at several r.

3. LoRA vs truncation.  Truncating the full update is the *Frobenius*-best rank-r ΔW, but the
   task does not score Frobenius distance: the loss weighs each direction by how strongly real
   inputs excite it, and the full update of q and v was learnt *together with* the updates of
   every other weight. LoRA instead minimises the loss itself inside the rank-r constraint, with
   everything else frozen. Part 3 stores the same numbers both ways (r (d_in + d_out) per
   matrix) and compares the task quality, then explains the winner.

4. Subspace similarity (paper section 7.2, Figure 3).  Train LoRA at r = 8 and r = 64 and compare
   the row spaces of the two A matrices through their top i and top j right singular vectors::

       φ(A_8, A_64, i, j) = ||U_8,iᵀ U_64,j||_F² / min(i, j)      in [0, 1]

   1 when one subspace contains the other, 0 when orthogonal. Random subspaces of R^d give
   ``max(i, j) / d`` on average. CAUTION: our width is d = 128, so r = 64 is *half* the space and
   a random 64-dim subspace already holds half of any vector's energy; the paper's GPT-3 has
   d = 12288, where r = 64 is 0.5%.

5. Amplification (section 7.3, Table 7).  Project W onto ΔW's top-r singular directions,
   ``||Uᵀ W V||_F``, and compare with W's own top-r directions (the largest possible value) and
   random ones. The paper finds ΔW's directions are NOT W's loudest ones (a weak projection) and
   ``||ΔW||_F / ||Uᵀ W V||_F`` is large: the update amplifies directions W holds but under-uses.

6. PiSSA (Meng et al. 2024).  Start B A on W's top-r singular directions, freeze the residual
   ``W - B A``: step 0 is still the base model, and training moves the loudest directions first.

Every part prints a table, saves a figure, and says whether the paper's finding held here.

Run:  python lessons/10_low_rank_maths.py [--quick] [--seed N]
(--seed changes the fine-tunes; the base model is always the cached seed-0 base.)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # render to a file; no display needed
import matplotlib.pyplot as plt
import numpy as np  # host-side only: tables and figures

from minipeft import backend as bk
from minipeft.autograd import no_grad
from minipeft.base import load_base
from minipeft.data import TaskMixture
from minipeft.experiment import method_specs
from minipeft.lowrank import (
    amplification,
    effective_rank,
    energy_captured,
    energy_curve,
    pissa_init,
    random_orthonormal,
    stable_rank,
    subspace_similarity,
    subspace_similarity_grid,
    svd,
    tail_energy,
    truncate,
    truncation_error,
)
from minipeft.nn import GPT
from minipeft.peft import LoraConfig, LoRALinear, full_finetuning, get_peft_model
from minipeft.train import TrainConfig, evaluate_lm, train
from minipeft.verdicts import differs, spread

SEED = 0
BASE_SEED = 0               # the cached base every lesson adapts
TASK = "sort"               # new to the base (it learnt copy, reverse, cipher, count)
STEPS, QUICK_STEPS = 300, 40            # the same budget for every fine-tune below
BATCH, QUICK_BATCH = 64, 32
EVAL_EXAMPLES, QUICK_EVAL_EXAMPLES = 300, 100
EVAL_EVERY, QUICK_EVAL_EVERY = 25, 10   # learning-curve resolution (parts 3 and 6)
EVAL_SEED = 1000            # the held-out set is the same whatever --seed says
LORA_R = 8                  # the rank of parts 3-6
LEARNED = 0.5               # a fine-tune "learned" when it closed half the base's answer-token gap
PAPER_FACTOR = 21.5         # LoRA paper Table 7: GPT-3 W_q, r = 4
R_BIG = 64                  # the "large" rank of part 4 (capped at half the width in --quick)
ENERGY_RANKS = (1, 2, 4, 8, 16)
EY_MATRIX = "blocks.0.attn.q_proj.weight"   # part 1's pretrained weight
MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out")
QV = ("q_proj", "v_proj")
OUT_PREFIX = "10_low_rank_maths"


def out_dir() -> Path:
    path = Path(os.environ.get("MINIPEFT_LESSON_OUT") or Path(__file__).resolve().parent / "out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def f64(a):
    """An analysis copy in float64 (the model trains in float32)."""
    return bk.asarray(a, dtype=np.float64)


def host(a) -> np.ndarray:
    return bk.to_numpy(a)


def matrix_names(state: dict, kinds=MATRICES) -> list[str]:
    """The Linear weights inside the blocks, e.g. ``blocks.0.attn.q_proj.weight``."""
    return [k for k in state if k.startswith("blocks.") and k.endswith(".weight")
            and k.split(".")[-2] in kinds]


def model_from(cfg, state: dict) -> GPT:
    model = GPT(cfg)
    model.load_state_dict(state)
    return model


def patched(cfg, base_state: dict, updates: dict, rest: dict | None = None) -> GPT:
    """A copy of the base with ``W + update`` for each named matrix; ``rest`` overrides other
    entries (e.g. the fine-tune's biases and embeddings)."""
    state = dict(base_state)
    state.update(rest or {})
    for k, d in updates.items():
        state[k] = base_state[k] + bk.asarray(d, dtype=base_state[k].dtype)
    return model_from(cfg, state)


def finetune(cfg, base_state, config, lr, seed, run, evalset=None, desc="fine-tune"):
    """Fine-tune a fresh copy of the base; returns (peft model, TrainResult, seconds, the
    LoRA A matrices as they were before the first step).

    ``run`` holds steps, batch, eval_every and progress; ``evalset`` (x, y) makes a curve."""
    peft = get_peft_model(model_from(cfg, base_state), config, seed=seed)
    init_A = {p: m.factors("default").A.data.copy() for p, m in lora_layers(peft).items()}
    data = TaskMixture([TASK], seed=seed, length=run["length"])
    tc = TrainConfig(steps=run["steps"], batch_size=run["batch"], lr=lr,
                     eval_every=run["eval_every"] if evalset else 0,
                     progress=run["progress"], desc=desc)
    evaluate = (lambda m: evaluate_lm(m, *evalset)) if evalset else None
    t = time.perf_counter()
    result = train(peft, data.sample, tc, evaluate=evaluate)
    return peft, result, time.perf_counter() - t, init_A


def lora_layers(peft) -> dict:
    """path -> LoRALinear, e.g. ``blocks.0.attn.q_proj``."""
    return {p: m for p, m in peft.base_model.named_modules() if isinstance(m, LoRALinear)}


def score(model, evalset) -> dict:
    from minipeft.experiment import score as measure

    s = measure(model, *evalset)
    return {"loss": s["loss"], "em": s["exact_match"], "token_acc": s["token_acc"]}


# --------------------------------------------------------------------------- (1) Eckart-Young
def part1_eckart_young(base_state, seed: int, path: Path) -> dict:
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
        curves[label] = {"err": err, "tail": tail, "S": host(S),
                         "energy": host(energy_curve(S))}
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"max_abs_diff": worst, "held": held, "energy8": {"pretrained": float(e8p),
                                                             "random": float(e8g)}}


# --------------------------------------------------------------------------- (2) full FT's ΔW
def random_reference(shape, seed: int) -> dict:
    G = f64(bk.host_rng(seed).standard_normal(shape))
    _, S, _ = svd(G)
    return {"energy": {r: energy_captured(S, r) for r in ENERGY_RANKS},
            "stable": stable_rank(G), "effective": effective_rank(G)}


def part2_spectra(deltas: dict, base_state: dict, seed: int, path: Path) -> dict:
    print("\n(2a) The full fine-tune's update ΔW = W_after - W_before, per matrix\n")
    head = " ".join(f"{'top' + str(r):>6}" for r in ENERGY_RANKS)
    print(f"    {'matrix':<26} {'shape':>10} {'||ΔW||':>7} {'/||W||':>7} | {head} | "
          f"{'stable':>6} {'eff.':>6} {'of':>4}")
    rows, spectra = {}, {}
    for name, D in deltas.items():
        _, S, _ = svd(D)
        energy = {r: energy_captured(S, r) for r in ENERGY_RANKS if r <= S.shape[0]}
        rel = float(bk.xp.linalg.norm(D) / bk.xp.linalg.norm(f64(base_state[name])))
        rows[name] = {"norm": float(bk.xp.linalg.norm(D)), "rel": rel, "energy": energy,
                      "stable": stable_rank(D), "effective": effective_rank(D),
                      "size": min(D.shape)}
        spectra[name] = host(S)
        r_ = rows[name]
        cells = " ".join(f"{energy.get(r, float('nan')):>6.1%}" for r in ENERGY_RANKS)
        print(f"    {name.removesuffix('.weight'):<26} {str(tuple(D.shape)):>10} "
              f"{r_['norm']:>7.3f} {rel:>7.1%} | {cells} | {r_['stable']:>6.1f} "
              f"{r_['effective']:>6.1f} {r_['size']:>4}")
    refs = {}
    for shape in sorted({tuple(D.shape) for D in deltas.values()}):
        refs[shape] = ref = random_reference(shape, seed)
        cells = " ".join(f"{ref['energy'][r]:>6.1%}" for r in ENERGY_RANKS)
        print(f"    {'random Gaussian (reference)':<26} {str(shape):>10} {'':>7} {'':>7} | "
              f"{cells} | {ref['stable']:>6.1f} {ref['effective']:>6.1f} {min(shape):>4}")
    mean8 = float(np.mean([r["energy"][8] for r in rows.values() if 8 in r["energy"]]))
    ref8 = float(np.mean([refs[tuple(d.shape)]["energy"][8] for d in deltas.values()]))
    stab = float(np.mean([r["stable"] / r["size"] for r in rows.values()]))
    print(f"\n    mean top-8 energy: ΔW {mean8:.1%} vs random {ref8:.1%}; mean stable rank "
          f"{stab:.1%} of the matrix size.")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, S in spectra.items():
        label = name.removesuffix(".weight").replace("blocks.", "b")
        axes[0].semilogy(np.arange(1, len(S) + 1), S / S[0], label=label, lw=1)
        axes[1].plot(np.arange(1, len(S) + 1), np.cumsum(S**2) / np.sum(S**2), lw=1)
    for shape, color in zip(refs, ("k", "grey", "silver"), strict=False):
        G = f64(bk.host_rng(seed).standard_normal(shape))
        _, S, _ = svd(G)
        S = host(S)
        axes[0].semilogy(np.arange(1, len(S) + 1), S / S[0], color=color, ls="--", lw=2,
                         label=f"random {shape}")
        axes[1].plot(np.arange(1, len(S) + 1), np.cumsum(S**2) / np.sum(S**2), color=color,
                     ls="--", lw=2)
    axes[0].set_xlabel("index i")
    axes[0].set_ylabel("σ_i / σ_1")
    axes[0].set_title("Spectrum of the full fine-tune's ΔW, per matrix")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("rank r")
    axes[1].set_ylabel("energy captured by the top r")
    axes[1].set_title("Energy curves (dashed: random matrices)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"rows": rows, "mean_energy8": mean8, "random_energy8": ref8,
            "mean_stable_fraction": stab}


def part2_truncation(cfg, base_state, ft_state, deltas, evalset, base_score, ft_score,
                     path: Path) -> dict:
    rest = {k: v for k, v in ft_state.items() if k not in deltas}  # biases, norms, embeddings
    k_max = max(min(D.shape) for D in deltas.values())
    ranks = [0] + [r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256) if r <= k_max]
    d_mat = sum(float(bk.xp.sum(D**2)) for D in deltas.values())
    d_rest = sum(float(bk.xp.sum(f64(v - base_state[k]) ** 2)) for k, v in rest.items())
    print(f"\n(2b) Task quality of W + truncate(ΔW, r) in all {len(deltas)} block matrices. "
          f"Everything else the\n     fine-tune changed (biases, norms, embeddings: "
          f"{d_rest / (d_mat + d_rest):.1%} of ||Δθ||²) is kept in full;\n     'kept' = share "
          "of the loss drop from the r = 0 row to the full fine-tune that rank r keeps.\n")
    print(f"    {'update':<34} {'loss':>7} {'exact':>7} {'kept':>7}")
    print(f"    {'base model (no update)':<34} {base_score['loss']:>7.3f} "
          f"{base_score['em']:>7.1%}")
    rows = {}
    for r in ranks:
        ups = {k: (truncate(D, min(r, *D.shape)) if r else 0 * D) for k, D in deltas.items()}
        rows[r] = score(patched(cfg, base_state, ups, rest), evalset)
    gap = rows[0]["loss"] - ft_score["loss"]
    for r in ranks:
        kept = (rows[0]["loss"] - rows[r]["loss"]) / gap if gap > 0 else float("nan")
        rows[r]["kept"] = kept
        label = "r = 0 (matrices at base, rest FT)" if r == 0 else f"r = {r}"
        if r >= k_max:
            label += " (full rank)"
        print(f"    {label:<34} {rows[r]['loss']:>7.3f} {rows[r]['em']:>7.1%} {kept:>7.1%}")
    print(f"    {'full fine-tune':<34} {ft_score['loss']:>7.3f} {ft_score['em']:>7.1%}")
    same = abs(rows[ranks[-1]]["loss"] - ft_score["loss"]) < 1e-3
    print(f"    (check: the full-rank row reproduces the full fine-tune: {same})")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [max(r, 0.5) for r in ranks]
    ax.semilogx(xs, [rows[r]["loss"] for r in ranks], "o-", label="W + truncate(ΔW, r)")
    ax.axhline(ft_score["loss"], color="k", ls="--", label="full fine-tune")
    ax.axhline(base_score["loss"], color="grey", ls=":", label="base model")
    ax.set_xticks(xs, ["0"] + [str(r) for r in ranks[1:]])
    ax.set_xlabel("rank r of every block matrix's update (0: none)")
    ax.set_ylabel(f"held-out '{TASK}' loss")
    ax.set_yscale("log")
    ax.set_title("How much of the full fine-tune survives truncation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"rows": rows, "full_rank_matches": same, "rest_share": d_rest / (d_mat + d_rest)}


# --------------------------------------------------------------------------- (3) LoRA vs trunc.
def part3_lora_vs_truncation(cfg, base_state, deltas, lora, lora_deltas, evalset, base_score,
                             ft_score, r: int) -> dict:
    qv = {k: D for k, D in deltas.items() if k.split(".")[-2] in QV}
    rows = {
        "base model": base_score,
        f"LoRA r={r} on q,v (trained)": score(lora, evalset),
        "full ΔW on q,v only": score(patched(cfg, base_state, qv), evalset),
        f"truncate(ΔW, {r}) on q,v only": score(
            patched(cfg, base_state, {k: truncate(D, r) for k, D in qv.items()}), evalset),
        f"truncate(ΔW, {r}) on all matrices": score(
            patched(cfg, base_state, {k: truncate(D, r) for k, D in deltas.items()}), evalset),
        "full fine-tune": ft_score,
    }
    n_in_out = sum(sum(D.shape) for D in qv.values())
    stored = {f"LoRA r={r} on q,v (trained)": r * n_in_out,
              f"truncate(ΔW, {r}) on q,v only": r * n_in_out,
              f"truncate(ΔW, {r}) on all matrices": r * sum(sum(D.shape) for D in deltas.values()),
              "full ΔW on q,v only": sum(D.size for D in qv.values()),
              "full fine-tune": None}
    print(f"\n(3) A trained rank-{r} LoRA (q, v; same task, steps and data) against rank-{r} "
          "truncations of the full update\n    (everything not named keeps its base value)\n")
    print(f"    {'model':<34} {'loss':>7} {'exact':>7} {'stored numbers':>15}")
    for name, s in rows.items():
        n = stored.get(name)
        print(f"    {name:<34} {s['loss']:>7.3f} {s['em']:>7.1%} "
              f"{'' if n is None else f'{n:,}':>15}")
    # Frobenius view: which rank-r update is closer to the full fine-tune's ΔW?
    print(f"\n    Frobenius distance to the full fine-tune's ΔW (q, v), and φ between the row "
          f"spaces of LoRA's ΔW\n    and the full ΔW's top {r} directions (random: {r}/d_in):\n")
    print(f"    {'matrix':<22} {'||W||':>7} {'||ΔW||':>8} {'||ΔW_LoRA||':>12} "
          f"{'||ΔW-trunc||':>13} {'||ΔW-ΔW_LoRA||':>15} {'φ(LoRA, full)':>14}")
    frob = {}
    for k, D in qv.items():
        L = f64(lora_deltas[k.removesuffix(".weight")])
        t_err, l_err = truncation_error(D, r), float(bk.xp.linalg.norm(D - L))
        phi = subspace_similarity(L, D, r, r)
        frob[k] = {"trunc": t_err, "lora": l_err, "phi": phi,
                   "full_norm": float(bk.xp.linalg.norm(D)),
                   "lora_norm": float(bk.xp.linalg.norm(L))}
        w_norm = float(bk.xp.linalg.norm(f64(base_state[k])))
        print(f"    {k.removesuffix('.weight'):<22} {w_norm:>7.3f} {frob[k]['full_norm']:>8.3f} "
              f"{frob[k]['lora_norm']:>12.3f} {t_err:>13.3f} {l_err:>15.3f} {phi:>14.2f}")
    ratio = float(np.mean([f["lora_norm"] / f["full_norm"] for f in frob.values()]))
    print(f"    LoRA's update of q, v is {ratio:.1f}x the size of the full fine-tune's "
          "(mean ratio of Frobenius norms).")
    lora_loss = rows[f"LoRA r={r} on q,v (trained)"]["loss"]
    trunc_loss = rows[f"truncate(ΔW, {r}) on q,v only"]["loss"]
    qv_full = rows["full ΔW on q,v only"]["loss"]
    print()
    if lora_loss < trunc_loss:
        print(f"    measured: LoRA beats the truncation with the same storage (loss {lora_loss:.3f}"
              f" vs {trunc_loss:.3f}), although the truncation is closer\n    to the full "
              "update in Frobenius norm (Eckart-Young guarantees that). Closeness to ΔW is not "
              "the goal:\n    the full ΔW of q and v was learnt together with updates to every "
              "other weight, and alone it is\n    worth only loss "
              f"{qv_full:.3f}. LoRA optimises the loss directly inside the rank-{r}, q-and-v-only "
              "constraint,\n    so it finds the update that works with everything else frozen.")
        trunc_all = rows[f"truncate(ΔW, {r}) on all matrices"]["loss"]
        if lora_loss < trunc_all:
            times = stored[f"truncate(ΔW, {r}) on all matrices"] / (r * n_in_out)
            print(f"    Even the rank-{r} cut of all {len(deltas)} matrices ({times:.1f}x the "
                  "storage) "
                  f"reaches only loss {trunc_all:.3f}: the biases, norms and embeddings the "
                  "full fine-tune\n    also moved are part of its solution (compare part 2's "
                  "r = 8 row, which keeps them).")
    else:
        print(f"    measured: the truncation matches or beats LoRA here (loss {trunc_loss:.3f} vs "
              f"{lora_loss:.3f}): with this budget LoRA has not found\n    a better rank-{r} "
              "update than the Frobenius-optimal cut of the full one.")
    return {"rows": rows, "frobenius": frob, "lora_better": lora_loss < trunc_loss,
            "lora_norm_ratio": ratio}


# --------------------------------------------------------------------------- (4) subspaces
def part4_subspaces(lora8, lora_big, lora8b, init_A, r_big: int, d: int, seed: int,
                    path: Path) -> dict:
    L8, Lb, L8b = lora_layers(lora8), lora_layers(lora_big), lora_layers(lora8b)
    n_blocks = 1 + max(int(p.split(".")[1]) for p in L8)
    shown = [p for p in L8 if p.startswith(f"blocks.{n_blocks - 1}.")]   # the last block: q, v
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
        g_big = host(subspace_similarity_grid(A8, Ab))               # (8, 64)
        g_seed = host(subspace_similarity_grid(A8, A8b))             # (8, 8)
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
    g_rand = host(subspace_similarity_grid(R8, Rb))
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

    fig, axes = plt.subplots(len(shown), 3, figsize=(14, 3.4 * len(shown)), squeeze=False,
                             layout="constrained")
    for row, p in enumerate(shown):
        g_big, g_seed = grids[p]
        for col, (g, title, xl) in enumerate((
                (g_big, f"{p}: φ(A_r={r}, A_r={r_big}, i, j)", f"j (r = {r_big})"),
                (g_seed, f"{p}: two seeds at r = {r}", "j (seed 2)"),
                (g_rand, f"random subspaces, {r} vs {r_big}", f"j (r = {r_big})"))):
            ax = axes[row, col]
            im = ax.imshow(g, vmin=0, vmax=1, cmap="viridis", aspect="auto",
                           extent=(0.5, g.shape[1] + 0.5, g.shape[0] + 0.5, 0.5))
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(xl)
            ax.set_ylabel(f"i (r = {r})")
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"table": table, "mean_phi11": mean11, "mean_phi11_dW": mean_dw, "mean_phi_r_big":
            mean_rb,
            "mean_seed_phi": mean_seed, "A_moved": moved, "random": rnd, "held": held}


# --------------------------------------------------------------------------- (5) amplification
def part5_amplification(base_state, deltas, lora_deltas, lora_deltas_b, r: int, seed: int,
                        lr_ratio: float, path: Path) -> dict:
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

    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels = [f"{k.replace('blocks.', 'b').replace('.attn', '')}\n{s}" for k, s in rows]
    x = np.arange(len(rows))
    for off, col, name in ((-0.27, "random_norm", "random directions"),
                           (0.0, "proj_norm", "ΔW's top-r directions"),
                           (0.27, "w_own_norm", "W's own top-r directions")):
        ax.bar(x + off, [v[col] for v in rows.values()], width=0.27, label=name)
    ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("||Uᵀ W V||_F")
    ax.set_title(f"How strongly W already points along r = {r} directions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"rows": {f"{k}|{s}": v for (k, s), v in rows.items()}, "held": held,
            "mean_position": mean_pos, "mean_factor": mean_factor, "position_sd": pos_sd,
            "factor_sd": factor_sd, "per_seed": per_seed, "paper_factor": PAPER_FACTOR,
            "lr_ratio": lr_ratio,
            "full_position": full_pos, "full_factor": full_factor}


# --------------------------------------------------------------------------- (6) PiSSA
def part6_pissa(cfg, base_state, lora8_result, pissa, pissa_result, step0, evalset,
                base_score, path: Path, lora8_result_b=None, pissa_result_b=None) -> dict:
    def curve(res):
        return [0] + [e["step"] for e in res.evals], \
            [base_score["loss"]] + [e["loss"] for e in res.evals]

    s_def, l_def = curve(lora8_result)
    s_pis, l_pis = curve(pissa_result)
    print(f"\n(6) PiSSA init vs the default (A random, B = 0) at r = {LORA_R}, same lr, steps "
          "and data\n")
    print(f"    step 0: max |logits(PiSSA) - logits(base)| = {step0['pissa']:.2e}, "
          f"default init {step0['default']:.2e} (float32)")
    ok = step0["pissa"] < 1e-3 and step0["default"] == 0.0
    print(f"    -> step 0 {'equals' if ok else 'does NOT equal'} the base model for both "
          "(PiSSA: W_res + B A = W up to float32 round-off; default: B A = 0 exactly)")
    print(f"    {step0['path']}: max |s B A - truncate(W, {LORA_R})| = "
          f"{step0['ba_vs_truncate']:.1e}, vs lowrank.pissa_init's B A "
          f"{step0['ba_vs_pissa_init']:.1e}; max |W_res + s B A - W| = {step0['residual']:.1e}\n")
    print(f"    {'step':>6} {'default loss':>13} {'PiSSA loss':>11}")
    for s, a, b in zip(s_def, l_def, l_pis, strict=True):
        print(f"    {s:>6} {a:>13.3f} {b:>11.3f}")
    final = {"default": score_from(lora8_result), "pissa": score_from(pissa_result)}
    print(f"    final exact match: default {final['default']['em']:.1%}, PiSSA "
          f"{final['pissa']['em']:.1%}")
    target = l_def[-1]
    reach = next((s for s, v in zip(s_pis, l_pis, strict=True) if v <= target), None)
    half = len(l_def) // 2                      # evaluations in the first half of training

    def early_final(res) -> tuple[float, float]:
        """(mean log held-out loss over the first half of training, final loss)."""
        ls = curve(res)[1]
        return float(np.mean(np.log(ls[1:half + 1]))), ls[-1]

    pairs = [(lora8_result, pissa_result)]
    if lora8_result_b is not None and pissa_result_b is not None:
        pairs.append((lora8_result_b, pissa_result_b))
    d_early, d_final = zip(*(early_final(d) for d, _ in pairs))
    p_early, p_final = zip(*(early_final(p) for _, p in pairs))
    early = float(np.mean(p_early) - np.mean(d_early))
    # PiSSA "faster" / "better" only when the gap beats the seeds' spread (sd + sd)
    fast, good = differs(p_early, d_early), differs(p_final, d_final)
    faster, better = fast == "less", good == "less"
    word = {"less": "held", "more": "did NOT hold (PiSSA was worse)",
            "within noise": "not shown: within the seeds' spread"}
    print(f"\n    measured over {len(pairs)} seeds: in the first half of training PiSSA's "
          f"held-out loss is {abs(np.expm1(early)):.0%} {'lower' if early < 0 else 'higher'} "
          f"(geometric mean; seeds' spread of the log loss: {spread(p_early)[1] + spread(d_early)[1]:.3f});"  # noqa: E501
          f"\n    final loss {spread(p_final)[0]:.3f} ± {spread(p_final)[1]:.3f} vs default "
          f"{spread(d_final)[0]:.3f} ± {spread(d_final)[1]:.3f}"
          + (f"; first seed: PiSSA reached the default's final loss at step {reach} of "
             f"{s_def[-1]}." if reach is not None else
             "; first seed: PiSSA never reached the default's final loss."))
    print(f"    PiSSA's claims: faster convergence {word[fast]}; better final loss {word[good]} "
          "here.")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for res, label in ((lora8_result, "default init"), (pissa_result, "PiSSA init")):
        losses = np.asarray(res.losses)
        w = max(1, len(losses) // 20)
        axes[0].plot(np.arange(w, len(losses) + 1), np.convolve(losses, np.ones(w) / w, "valid"),
                     label=label)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel(f"training loss (mean of {w} steps)")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[0].set_title(f"LoRA r = {LORA_R} on q, v: training loss")
    axes[1].plot(s_def, l_def, "o-", label="default init")
    axes[1].plot(s_pis, l_pis, "s-", label="PiSSA init")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel(f"held-out '{TASK}' loss")
    axes[1].set_yscale("log")
    axes[1].legend()
    axes[1].set_title("Held-out loss (step 0 = the base model for both)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"step0_ok": ok, "step0": step0, "curve_default": l_def, "curve_pissa": l_pis,
            "pissa_faster": faster, "pissa_better": better, "early_log_ratio": early,
            "early": {"default": list(d_early), "pissa": list(p_early)},
            "final_loss": {"default": list(d_final), "pissa": list(p_final)},
            "faster_verdict": fast, "better_verdict": good,
            "reach_step": reach, "final": final}


def score_from(result) -> dict:
    e = result.evals[-1]
    return {"loss": e["loss"], "em": e["exact_match"]}


def max_logit_diff(a, b, x) -> float:
    with no_grad():
        return float(bk.xp.max(bk.xp.abs(a(bk.asarray(x)).data - b(bk.asarray(x)).data)))


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny quick base, few steps")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    kind = "quick" if args.quick else "default"
    print(f"Lesson 10: the low-rank maths behind LoRA ({kind} base, backend: {bk.name}, "
          f"seed {args.seed})")
    base, info = load_base(kind, seed=BASE_SEED, progress=not args.quick)
    cfg = base.config
    base_state = {k: v.copy() for k, v in base.state_dict().items()}
    d = cfg.n_embd
    r_big = min(R_BIG, d // 2)
    run = {"steps": QUICK_STEPS if args.quick else STEPS,
           "batch": QUICK_BATCH if args.quick else BATCH,
           "eval_every": QUICK_EVAL_EVERY if args.quick else EVAL_EVERY,
           "progress": not args.quick, "length": info["length"]}
    n_eval = QUICK_EVAL_EXAMPLES if args.quick else EVAL_EXAMPLES
    evalset = TaskMixture([TASK], seed=EVAL_SEED, length=info["length"]).eval_set(TASK, n_eval)
    specs = method_specs()
    lr_full, lr_lora = specs["full"].lr, specs["lora_r8_qv"].lr
    print(f"    base: width {d}, {cfg.n_layer} blocks, pretrained on {', '.join(info['tasks'])}; "
          f"new task '{TASK}', {run['steps']} steps x {run['batch']} rows per fine-tune; "
          f"lr full {lr_full:g}, LoRA {lr_lora:g}")
    out = out_dir()
    figures = {k: out / f"{OUT_PREFIX}_{k}.png" for k in
               ("1_eckart_young", "2_spectra", "2_truncation", "4_subspaces", "5_amplification",
                "6_pissa")}

    ey = part1_eckart_young(base_state, args.seed, figures["1_eckart_young"])

    # ---- every fine-tune the later parts share, trained once
    times = {}
    full, _, times["full"], _ = finetune(cfg, base_state, full_finetuning(), lr_full,
                                         args.seed, run, desc="full FT")
    ft_state = full.base_model.state_dict()
    lcfg = LoraConfig(r=LORA_R, alpha=2 * LORA_R)                   # s = alpha / r = 2
    lora8, lora8_res, times["lora8"], init_A = finetune(cfg, base_state, lcfg, lr_lora,
                                                        args.seed, run, evalset,
                                                        desc=f"LoRA r={LORA_R}")
    lora_big, _, times["lora_big"], _ = finetune(cfg, base_state,
                                              LoraConfig(r=r_big, alpha=2 * r_big), lr_lora,
                                              args.seed, run, desc=f"LoRA r={r_big}")
    lora8b, lora8b_res, times["lora8_seed2"], _ = finetune(cfg, base_state, lcfg, lr_lora,
                                                           args.seed + 1, run, evalset,
                                                           desc=f"LoRA r={LORA_R} seed 2")
    pcfg = LoraConfig(r=LORA_R, alpha=2 * LORA_R, init="pissa")
    x0 = evalset[0][:64]
    pissa0 = get_peft_model(model_from(cfg, base_state), pcfg, seed=args.seed)  # step 0
    path0, layer0 = next(iter(lora_layers(pissa0).items()))
    W0 = f64(base_state[path0 + ".weight"])
    A_p, B_p, _ = pissa_init(W0, LORA_R)                            # the recipe, by hand
    dW0 = f64(layer0.delta_weight("default"))                       # s B A inside the layer
    step0 = {"pissa": max_logit_diff(pissa0, base, x0),
             "default": max_logit_diff(get_peft_model(model_from(cfg, base_state), lcfg,
                                                      seed=args.seed), base, x0),
             "path": path0,
             "ba_vs_truncate": float(bk.xp.max(bk.xp.abs(dW0 - truncate(W0, LORA_R)))),
             "ba_vs_pissa_init": float(bk.xp.max(bk.xp.abs(dW0 - B_p @ A_p))),
             "residual": float(bk.xp.max(bk.xp.abs(f64(layer0.base.weight.data) + dW0 - W0)))}
    pissa, pissa_res, times["pissa"], _ = finetune(cfg, base_state, pcfg, lr_lora, args.seed, run,
                                                evalset, desc="PiSSA")
    _, pissa_res_b, times["pissa_seed2"], _ = finetune(cfg, base_state, pcfg, lr_lora,
                                                       args.seed + 1, run, evalset,
                                                       desc="PiSSA seed 2")
    print("    fine-tunes: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))

    base_score, ft_score = score(base, evalset), score(full, evalset)
    deltas = {k: f64(ft_state[k] - base_state[k]) for k in matrix_names(base_state)}
    lora_deltas = {p: m.delta_weight("default") for p, m in lora_layers(lora8).items()}

    spectra = part2_spectra(deltas, base_state, args.seed, figures["2_spectra"])
    trunc = part2_truncation(cfg, base_state, ft_state, deltas, evalset, base_score, ft_score,
                             figures["2_truncation"])
    kept8 = trunc["rows"][8]["kept"] if 8 in trunc["rows"] else float("nan")
    # "low rank" = the top 8 hold more than halfway from noise's share to all of it
    low = spectra["mean_energy8"] > (1 + spectra["random_energy8"]) / 2
    print(f"\n    measured: rank 8 keeps {kept8:.0%} of the fine-tune's loss drop; ΔW's top 8 "
          f"directions hold {spectra['mean_energy8']:.0%} of its energy (random "
          f"{spectra['random_energy8']:.0%}).")
    # the question only makes sense for an update that did something: the fine-tune must have
    # closed at least LEARNED of the base's answer-token gap on the new task
    gain = (ft_score["token_acc"] - base_score["token_acc"]) / max(1 - base_score["token_acc"],
                                                                   1e-9)
    learned = gain >= LEARNED
    print(f"    The full fine-tune answers {ft_score['token_acc']:.1%} of held-out answer tokens "
          f"(base {base_score['token_acc']:.1%}; exact match {ft_score['em']:.1%}): it closed "
          f"{gain:.0%} of the gap\n    (needed: {LEARNED:.0%}).")
    print("    'The update has low intrinsic rank': "
          + ("cannot be judged here: the fine-tune has not learned its task yet (it closed "
             f"less than {LEARNED:.0%} of the gap),\n    so its update is not yet the task's "
             "update." if not learned else
             "held here -- a few directions carry most of it." if low and kept8 > 0.9 else
             "held only partly here: the spectrum is steeper than noise, but a rank-8 cut "
             "loses part of what the update does." if low else
             "did NOT hold here: the update's spectrum is about as flat as noise."))

    lora_vs = part3_lora_vs_truncation(cfg, base_state, deltas, lora8, lora_deltas, evalset,
                                       base_score, ft_score, LORA_R)
    sub = part4_subspaces(lora8, lora_big, lora8b, init_A, r_big, d, args.seed,
                          figures["4_subspaces"])
    lora_deltas_b = {p: m.delta_weight("default") for p, m in lora_layers(lora8b).items()}
    amp = part5_amplification(base_state, deltas, lora_deltas, lora_deltas_b, LORA_R, args.seed,
                              lr_lora / lr_full, figures["5_amplification"])
    pis = part6_pissa(cfg, base_state, lora8_res, pissa, pissa_res, step0, evalset, base_score,
                      figures["6_pissa"], lora8b_res, pissa_res_b)

    seconds = time.perf_counter() - start
    print(f"\nfigures saved to {out}/{OUT_PREFIX}_*.png; lesson ran in {seconds:.0f} s")
    return {"ft_learned": learned, "ft_gain": gain, "eckart_young": ey, "spectra": spectra,
            "truncation": trunc, "lora_vs_truncation": lora_vs, "subspaces": sub,
            "amplification": amp, "pissa": pis,
            "base_score": base_score, "ft_score": ft_score, "r_big": r_big, "width": d,
            "figures": {k: str(v) for k, v in figures.items()}, "seconds": seconds}


if __name__ == "__main__":
    main()
