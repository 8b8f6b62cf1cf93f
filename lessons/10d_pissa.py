"""Lesson 10d: PiSSA: start LoRA on W's loudest directions instead of at zero.

LoRA (Hu et al. 2021) starts ``ΔW = s B A`` at zero (A random, B = 0), so step 0 is the base
model and training grows the update from nothing. PiSSA (Meng et al. 2024) starts B A on W's
top-r singular directions instead and freezes the residual::

    W = U Σ Vᵀ,   s B A = U_r Σ_r V_rᵀ = truncate(W, r)    (lesson 10a: the best rank-r part)
    W_res = W - s B A          (frozen)       forward: W_res + s B A = W   at step 0

Step 0 is still the base model (up to float32 round-off), but the trainable factors now hold the
directions that carry most of W, so training moves them first. The paper claims this converges
faster and ends lower than the default init.

The one part: check step 0 (the logits, and B A against the SVD by hand), then train LoRA at
r = 8 on a task the base never saw ("sort") both ways, with the same lr, steps and data, over
two seeds; compare the held-out loss curves early and at the end, against the seeds' spread.

Run:  python lessons/10d_pissa.py [--quick] [--seed N]
(--seed changes the fine-tunes; the base model is always the cached seed-0 base.)
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # render to a file; no display needed
import matplotlib.pyplot as plt
import numpy as np  # host-side only: tables and figures

from minipeft import backend as bk
from minipeft import lessonkit
from minipeft.autograd import no_grad
from minipeft.base import load_base
from minipeft.data import TaskMixture
from minipeft.experiment import method_specs
from minipeft.experiment import score as measure
from minipeft.lowrank import pissa_init, truncate
from minipeft.peft import LoraConfig, LoRALinear, get_peft_model
from minipeft.train import TrainConfig, evaluate_lm, train
from minipeft.verdicts import differs, spread

BASE_SEED = 0               # the cached base every lesson adapts
TASK = "sort"               # new to the base (it learnt copy, reverse, cipher, count)
STEPS, QUICK_STEPS = 300, 40            # the same budget for every fine-tune below
BATCH, QUICK_BATCH = 64, 32
EVAL_EXAMPLES, QUICK_EVAL_EXAMPLES = 300, 100
EVAL_EVERY, QUICK_EVAL_EVERY = 25, 10   # learning-curve resolution
EVAL_SEED = 1000            # the held-out set is the same whatever --seed says
LORA_R = 8
FIGURE = "10d_pissa.png"


def f64(a):
    """An analysis copy in float64 (the model trains in float32)."""
    return bk.asarray(a, dtype=np.float64)


# --------------------------------------------------------------------------- step 0
def max_logit_diff(a, b, x) -> float:
    with no_grad():
        return float(bk.xp.max(bk.xp.abs(a(bk.asarray(x)).data - b(bk.asarray(x)).data)))


def step_zero(base, default_cfg, pissa_cfg, x0, seed: int) -> dict:
    """Before any training: is each init the base model, and is PiSSA's s B A the rank-r cut
    of W (checked against ``truncate`` and against ``lowrank.pissa_init``'s recipe by hand)?"""
    pissa0 = get_peft_model(lessonkit.fresh_copy(base), pissa_cfg, seed=seed)
    path0, layer0 = next((p, m) for p, m in pissa0.base_model.named_modules()
                         if isinstance(m, LoRALinear))
    W0 = f64(base.state_dict()[path0 + ".weight"])
    A_p, B_p, _ = pissa_init(W0, LORA_R)                            # the recipe, by hand
    dW0 = f64(layer0.delta_weight("default"))                       # s B A inside the layer
    default0 = get_peft_model(lessonkit.fresh_copy(base), default_cfg, seed=seed)
    step0 = {"pissa": max_logit_diff(pissa0, base, x0),
             "default": max_logit_diff(default0, base, x0),
             "path": path0,
             "ba_vs_truncate": float(bk.xp.max(bk.xp.abs(dW0 - truncate(W0, LORA_R)))),
             "ba_vs_pissa_init": float(bk.xp.max(bk.xp.abs(dW0 - B_p @ A_p))),
             "residual": float(bk.xp.max(bk.xp.abs(f64(layer0.base.weight.data) + dW0 - W0)))}
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
    return {"step0_ok": ok, "step0": step0}


# --------------------------------------------------------------------------- the race
def finetune(base, config, lr: float, seed: int, run: dict, evalset, desc: str):
    """Fine-tune a fresh copy of the base on TASK, scoring the held-out set every
    ``eval_every`` steps; returns the TrainResult (its ``evals`` are the curve)."""
    peft = get_peft_model(lessonkit.fresh_copy(base), config, seed=seed)
    data = TaskMixture([TASK], seed=seed, length=run["length"])
    tc = TrainConfig(steps=run["steps"], batch_size=run["batch"], lr=lr,
                     eval_every=run["eval_every"], progress=run["progress"], desc=desc)
    return train(peft, data.sample, tc, evaluate=lambda m: evaluate_lm(m, *evalset))


def race(default_runs: list, pissa_runs: list, base_loss: float) -> dict:
    """Which init reaches a low held-out loss sooner, and which ends lower? Early = the mean log
    loss over the first half of the evaluations; each claim holds only when the gap beats the
    seeds' spread (``verdicts.differs``)."""
    def curve(res):
        return [0] + [e["step"] for e in res.evals], [base_loss] + [e["loss"] for e in res.evals]

    s_def, l_def = curve(default_runs[0])
    s_pis, l_pis = curve(pissa_runs[0])
    print(f"    {'step':>6} {'default loss':>13} {'PiSSA loss':>11}")
    for s, a, b in zip(s_def, l_def, l_pis, strict=True):
        print(f"    {s:>6} {a:>13.3f} {b:>11.3f}")
    final = {name: {"loss": runs[0].evals[-1]["loss"], "em": runs[0].evals[-1]["exact_match"]}
             for name, runs in (("default", default_runs), ("pissa", pissa_runs))}
    print(f"    final exact match: default {final['default']['em']:.1%}, PiSSA "
          f"{final['pissa']['em']:.1%}")
    target = l_def[-1]
    reach = next((s for s, v in zip(s_pis, l_pis, strict=True) if v <= target), None)
    half = len(l_def) // 2                      # evaluations in the first half of training

    def early_final(res) -> tuple[float, float]:
        """(mean log held-out loss over the first half of training, final loss)."""
        ls = curve(res)[1]
        return float(np.mean(np.log(ls[1:half + 1]))), ls[-1]

    d_early, d_final = zip(*(early_final(d) for d in default_runs))
    p_early, p_final = zip(*(early_final(p) for p in pissa_runs))
    early = float(np.mean(p_early) - np.mean(d_early))
    # PiSSA "faster" / "better" only when the gap beats the seeds' spread (sd + sd)
    fast, good = differs(p_early, d_early), differs(p_final, d_final)
    faster, better = fast == "less", good == "less"
    word = {"less": "held", "more": "did NOT hold (PiSSA was worse)",
            "within noise": "not shown: within the seeds' spread"}
    print(f"\n    measured over {len(default_runs)} seeds: in the first half of training PiSSA's "
          f"held-out loss is {abs(np.expm1(early)):.0%} {'lower' if early < 0 else 'higher'} "
          f"(geometric mean; seeds' spread of the log loss: {spread(p_early)[1] + spread(d_early)[1]:.3f});"  # noqa: E501
          f"\n    final loss {spread(p_final)[0]:.3f} ± {spread(p_final)[1]:.3f} vs default "
          f"{spread(d_final)[0]:.3f} ± {spread(d_final)[1]:.3f}"
          + (f"; first seed: PiSSA reached the default's final loss at step {reach} of "
             f"{s_def[-1]}." if reach is not None else
             "; first seed: PiSSA never reached the default's final loss."))
    print(f"    PiSSA's claims: faster convergence {word[fast]}; better final loss {word[good]} "
          "here.")
    return {"curve_default": l_def, "curve_pissa": l_pis, "steps": s_def,
            "pissa_faster": faster, "pissa_better": better, "early_log_ratio": early,
            "early": {"default": list(d_early), "pissa": list(p_early)},
            "final_loss": {"default": list(d_final), "pissa": list(p_final)},
            "faster_verdict": fast, "better_verdict": good,
            "reach_step": reach, "final": final}


# --------------------------------------------------------------------------- the figure
def figure(default_res, pissa_res, out: dict):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for res, label in ((default_res, "default init"), (pissa_res, "PiSSA init")):
        losses = np.asarray(res.losses)
        w = max(1, len(losses) // 20)
        axes[0].plot(np.arange(w, len(losses) + 1), np.convolve(losses, np.ones(w) / w, "valid"),
                     label=label)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel(f"training loss (mean of {w} steps)")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[0].set_title(f"LoRA r = {LORA_R} on q, v: training loss")
    axes[1].plot(out["steps"], out["curve_default"], "o-", label="default init")
    axes[1].plot(out["steps"], out["curve_pissa"], "s-", label="PiSSA init")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel(f"held-out '{TASK}' loss")
    axes[1].set_yscale("log")
    axes[1].legend()
    axes[1].set_title("Held-out loss (step 0 = the base model for both)")
    return fig


def main(argv=None) -> dict:
    args = lessonkit.arguments(__doc__, quick="the tiny quick base, few steps").parse_args(argv)
    clock = lessonkit.Stopwatch()
    kind = "quick" if args.quick else "default"
    print(f"Lesson 10d: PiSSA ({kind} base, backend: {bk.name}, seed {args.seed})")
    base, info = load_base(kind, seed=BASE_SEED, progress=not args.quick)
    run = {"steps": QUICK_STEPS if args.quick else STEPS, "length": info["length"],
           "batch": QUICK_BATCH if args.quick else BATCH, "progress": not args.quick,
           "eval_every": QUICK_EVAL_EVERY if args.quick else EVAL_EVERY}
    n_eval = QUICK_EVAL_EXAMPLES if args.quick else EVAL_EXAMPLES
    evalset = TaskMixture([TASK], seed=EVAL_SEED, length=info["length"]).eval_set(TASK, n_eval)
    lr = method_specs()["lora_r8_qv"].lr
    print(f"    base: width {base.config.n_embd}, {base.config.n_layer} blocks; new task "
          f"'{TASK}', {run['steps']} steps x {run['batch']} rows per fine-tune; lr {lr:g}")
    lcfg = LoraConfig(r=LORA_R, alpha=2 * LORA_R)                   # s = alpha / r = 2
    pcfg = LoraConfig(r=LORA_R, alpha=2 * LORA_R, init="pissa")
    out = step_zero(base, lcfg, pcfg, evalset[0][:64], args.seed)
    runs = {name: [finetune(base, cfg, lr, args.seed + k, run, evalset, f"{name} seed {k + 1}")
                   for k in (0, 1)]                                 # two seeds: the noise
            for name, cfg in (("default", lcfg), ("PiSSA", pcfg))}
    base_loss = measure(base, *evalset)["loss"]                     # both curves start here
    out.update(race(runs["default"], runs["PiSSA"], base_loss))
    path = lessonkit.save_figure(figure(runs["default"][0], runs["PiSSA"][0], out), FIGURE)
    print(f"\nfigure saved to {path}; lesson ran in {clock.seconds():.0f} s")
    return {"pissa": out, "base_loss": base_loss, "figure": str(path),
            "seconds": clock.seconds()}


if __name__ == "__main__":
    main()
