"""Lesson 10b: does a fine-tune's update have low rank, and is LoRA the best rank-r update?

LoRA (Hu et al. 2021) bets that the update a fine-tune needs has low "intrinsic rank". This
lesson does not take the bet on trust: it fine-tunes our base model on a task it never saw
("sort") with every weight free, looks at the update, and then trains LoRA on the same budget.

(2) Intrinsic rank of a fine-tune.  Train *every* weight (full fine-tuning) and take, per
    matrix, ``ΔW = W_after - W_before``. If its spectrum falls fast, a few directions carry the
    update, and ``W + truncate(ΔW, r)`` should perform almost like ``W + ΔW`` (lesson 10a: the
    truncation is the Frobenius-best rank-r matrix). Part 2a measures the spectrum, the top-r
    energy ``Σ_{i≤r} σ_i² / Σ σ_i²`` and two smooth ranks (stable rank ``Σσ²/σ_1²`` and
    effective rank ``exp(entropy of σ/Σσ)``, both r for r equal singular values) against random
    matrices; part 2b the task quality of the truncated update at several r.

(3) LoRA vs truncation.  Truncating the full update is the *Frobenius*-best rank-r ΔW, but the
    task does not score Frobenius distance: the loss weighs each direction by how strongly real
    inputs excite it, and the full update of q and v was learnt *together with* the updates of
    every other weight. LoRA instead minimises the loss itself inside the rank-r constraint, with
    everything else frozen. Part 3 stores the same numbers both ways (r (d_in + d_out) per
    matrix) and compares the task quality, then explains the winner.

Run:  python lessons/10b_intrinsic_rank.py [--quick] [--seed N]
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
from minipeft.experiment import score as measure
from minipeft.lowrank import (
    effective_rank,
    energy_captured,
    stable_rank,
    subspace_similarity,
    svd,
    truncate,
    truncation_error,
)
from minipeft.peft import LoraConfig, LoRALinear, full_finetuning, get_peft_model
from minipeft.train import TrainConfig, train

BASE_SEED = 0               # the cached base every lesson adapts
TASK = "sort"               # new to the base (it learnt copy, reverse, cipher, count)
STEPS, QUICK_STEPS = 300, 40            # the same budget for every fine-tune below
BATCH, QUICK_BATCH = 64, 32
EVAL_EXAMPLES, QUICK_EVAL_EXAMPLES = 300, 100
EVAL_SEED = 1000            # the held-out set is the same whatever --seed says
LORA_R = 8                  # the rank of part 3
LEARNED = 0.5               # a fine-tune "learned" when it closed half the base's answer-token gap
ENERGY_RANKS = (1, 2, 4, 8, 16)
MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out")
QV = ("q_proj", "v_proj")
FIGURE = "10b_intrinsic_rank.png"


def f64(a):
    """An analysis copy in float64 (the model trains in float32)."""
    return bk.asarray(a, dtype=np.float64)


def score(model, evalset) -> dict:
    """Held-out loss, exact match and answer-token accuracy on the new task."""
    s = measure(model, *evalset)
    return {"loss": s["loss"], "em": s["exact_match"], "token_acc": s["token_acc"]}


def finetune(base, config, lr: float, seed: int, run: dict, desc: str):
    """Fine-tune a fresh copy of the base on TASK; returns the wrapped model."""
    peft = get_peft_model(lessonkit.fresh_copy(base), config, seed=seed)
    data = TaskMixture([TASK], seed=seed, length=run["length"])
    tc = TrainConfig(steps=run["steps"], batch_size=run["batch"], lr=lr,
                     progress=run["progress"], desc=desc)
    train(peft, data.sample, tc)
    return peft


# --------------------------------------------------------------------------- (2a) spectra
def random_reference(shape, seed: int) -> dict:
    """The same measures on a random Gaussian matrix: what "no structure" looks like."""
    G = f64(bk.host_rng(seed).standard_normal(shape))
    _, S, _ = svd(G)
    return {"energy": {r: energy_captured(S, r) for r in ENERGY_RANKS},
            "stable": stable_rank(G), "effective": effective_rank(G), "S": bk.to_numpy(S)}


def spectra(deltas: dict, base_state: dict, seed: int) -> dict:
    """How fast does each matrix's update spectrum fall, next to random matrices?"""
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
        spectra[name] = bk.to_numpy(S)
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
    return {"rows": rows, "mean_energy8": mean8, "random_energy8": ref8,
            "mean_stable_fraction": stab, "spectra": spectra,
            "random_spectra": {shape: ref["S"] for shape, ref in refs.items()}}


# --------------------------------------------------------------------------- (2b) truncation
def patched(base, updates: dict, rest: dict | None = None):
    """A copy of the base with ``W + update`` for each named matrix; ``rest`` overrides other
    entries (e.g. the fine-tune's biases and embeddings)."""
    base_state = base.state_dict()
    state = dict(base_state)
    state.update(rest or {})
    for k, d in updates.items():
        state[k] = base_state[k] + bk.asarray(d, dtype=base_state[k].dtype)
    return lessonkit.fresh_copy(base, state)


def truncation(base, ft_state, deltas, evalset, base_score, ft_score) -> dict:
    """How much of the fine-tune's loss drop survives when every block matrix keeps only the
    rank-r cut of its update (everything else the fine-tune changed kept in full)?"""
    base_state = base.state_dict()
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
        rows[r] = score(patched(base, ups, rest), evalset)
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
    return {"rows": rows, "full_rank_matches": same, "rest_share": d_rest / (d_mat + d_rest)}


def low_rank_verdict(spec: dict, trunc: dict, base_score: dict, ft_score: dict) -> dict:
    """'The update has low intrinsic rank', judged from parts 2a and 2b, and only for an update
    that did something: the fine-tune must have closed at least LEARNED of the base's
    answer-token gap on the new task."""
    kept8 = trunc["rows"][8]["kept"] if 8 in trunc["rows"] else float("nan")
    # "low rank" = the top 8 hold more than halfway from noise's share to all of it
    low = spec["mean_energy8"] > (1 + spec["random_energy8"]) / 2
    print(f"\n    measured: rank 8 keeps {kept8:.0%} of the fine-tune's loss drop; ΔW's top 8 "
          f"directions hold {spec['mean_energy8']:.0%} of its energy (random "
          f"{spec['random_energy8']:.0%}).")
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
    return {"ft_learned": learned, "ft_gain": gain}


# --------------------------------------------------------------------------- (3) LoRA vs trunc.
def lora_vs_truncation(base, deltas, lora, lora_deltas, evalset, base_score, ft_score,
                       r: int) -> dict:
    """Same storage, two rank-r updates: LoRA trained on the loss, or the truncated full ΔW."""
    base_state = base.state_dict()
    qv = {k: D for k, D in deltas.items() if k.split(".")[-2] in QV}
    rows = {
        "base model": base_score,
        f"LoRA r={r} on q,v (trained)": score(lora, evalset),
        "full ΔW on q,v only": score(patched(base, qv), evalset),
        f"truncate(ΔW, {r}) on q,v only": score(
            patched(base, {k: truncate(D, r) for k, D in qv.items()}), evalset),
        f"truncate(ΔW, {r}) on all matrices": score(
            patched(base, {k: truncate(D, r) for k, D in deltas.items()}), evalset),
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


# --------------------------------------------------------------------------- the figure
def figure(spec: dict, trunc: dict, base_score: dict, ft_score: dict):
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    for name, S in spec["spectra"].items():
        label = name.removesuffix(".weight").replace("blocks.", "b")
        axes[0].semilogy(np.arange(1, len(S) + 1), S / S[0], label=label, lw=1)
        axes[1].plot(np.arange(1, len(S) + 1), np.cumsum(S**2) / np.sum(S**2), lw=1)
    for (shape, S), color in zip(spec["random_spectra"].items(), ("k", "grey", "silver"),
                                 strict=False):
        axes[0].semilogy(np.arange(1, len(S) + 1), S / S[0], color=color, ls="--", lw=2,
                         label=f"random {shape}")
        axes[1].plot(np.arange(1, len(S) + 1), np.cumsum(S**2) / np.sum(S**2), color=color,
                     ls="--", lw=2)
    axes[0].set_xlabel("index i")
    axes[0].set_ylabel("σ_i / σ_1")
    axes[0].set_title("(2a) Spectrum of the full fine-tune's ΔW, per matrix")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("rank r")
    axes[1].set_ylabel("energy captured by the top r")
    axes[1].set_title("(2a) Energy curves (dashed: random matrices)")
    ax, rows = axes[2], trunc["rows"]
    ranks = list(rows)
    xs = [max(r, 0.5) for r in ranks]
    ax.semilogx(xs, [rows[r]["loss"] for r in ranks], "o-", label="W + truncate(ΔW, r)")
    ax.axhline(ft_score["loss"], color="k", ls="--", label="full fine-tune")
    ax.axhline(base_score["loss"], color="grey", ls=":", label="base model")
    ax.set_xticks(xs, ["0"] + [str(r) for r in ranks[1:]])
    ax.set_xlabel("rank r of every block matrix's update (0: none)")
    ax.set_ylabel(f"held-out '{TASK}' loss")
    ax.set_yscale("log")
    ax.set_title("(2b) How much of the full fine-tune survives truncation")
    ax.legend()
    return fig


def main(argv=None) -> dict:
    args = lessonkit.arguments(__doc__, quick="the tiny quick base, few steps").parse_args(argv)
    clock = lessonkit.Stopwatch()
    kind = "quick" if args.quick else "default"
    print(f"Lesson 10b: the rank of a fine-tune ({kind} base, backend: {bk.name}, "
          f"seed {args.seed})")
    base, info = load_base(kind, seed=BASE_SEED, progress=not args.quick)
    run = {"steps": QUICK_STEPS if args.quick else STEPS, "length": info["length"],
           "batch": QUICK_BATCH if args.quick else BATCH, "progress": not args.quick}
    n_eval = QUICK_EVAL_EXAMPLES if args.quick else EVAL_EXAMPLES
    evalset = TaskMixture([TASK], seed=EVAL_SEED, length=info["length"]).eval_set(TASK, n_eval)
    lr_full, lr_lora = method_specs()["full"].lr, method_specs()["lora_r8_qv"].lr
    print(f"    base: width {base.config.n_embd}, {base.config.n_layer} blocks, pretrained on "
          f"{', '.join(info['tasks'])}; new task '{TASK}', {run['steps']} steps x "
          f"{run['batch']} rows per fine-tune; lr full {lr_full:g}, LoRA {lr_lora:g}")
    full = finetune(base, full_finetuning(), lr_full, args.seed, run, "full FT")
    lora = finetune(base, LoraConfig(r=LORA_R, alpha=2 * LORA_R), lr_lora, args.seed, run,
                    f"LoRA r={LORA_R}")                              # s = alpha / r = 2
    base_state, ft_state = base.state_dict(), full.base_model.state_dict()
    deltas = {k: f64(ft_state[k] - base_state[k]) for k in base_state   # the block matrices
              if k.startswith("blocks.") and k.endswith(".weight") and k.split(".")[-2] in MATRICES}
    base_score, ft_score = score(base, evalset), score(full, evalset)
    spec = spectra(deltas, base_state, args.seed)
    trunc = truncation(base, ft_state, deltas, evalset, base_score, ft_score)
    verdict = low_rank_verdict(spec, trunc, base_score, ft_score)
    lora_deltas = {p: m.delta_weight("default") for p, m in lora.base_model.named_modules()
                   if isinstance(m, LoRALinear)}
    lora_vs = lora_vs_truncation(base, deltas, lora, lora_deltas, evalset, base_score,
                                 ft_score, LORA_R)
    path = lessonkit.save_figure(figure(spec, trunc, base_score, ft_score), FIGURE)
    print(f"\nfigure saved to {path}; lesson ran in {clock.seconds():.0f} s")
    spec = {k: v for k, v in spec.items() if k not in ("spectra", "random_spectra")}
    return {**verdict, "spectra": spec, "truncation": trunc, "lora_vs_truncation": lora_vs,
            "base_score": base_score, "ft_score": ft_score, "figure": str(path),
            "seconds": clock.seconds()}


if __name__ == "__main__":
    main()
