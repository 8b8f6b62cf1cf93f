"""The real-text study: from a Shakespeare base, continue training on Python code; what is
learned (held-out code) and what is forgotten (held-out plays), method by method.

This is the regime where Biderman et al. (2024, "LoRA Learns Less and Forgets Less") measure
forgetting: continued training on a new *domain* (code), with the old domain's held-out loss
as what is forgotten. Every method starts from the same cached base (``minipeft.base``,
"shakespeare"), trains on random windows of the stdlib's source for the same steps and tokens,
with its own learning rate (:data:`LR_SWEEP`), and at log-spaced steps (dense early: the old
domain's loss jumps within the first 50 steps) we record, *with the adapter active*,

    learned   = held-out code loss          (bits per character, lower is better)
    forgotten = held-out Shakespeare loss   (bits per character, on plays never trained on)

Each run is a *path* in the (code, Shakespeare) plane starting at the base's point (the
adapter-off point, where every method starts). A method that learns little sits near the start
and has forgotten little; that is not "forgetting less". So forgetting is read at *matched code
loss*: for each PEFT method, at the code loss both it and full fine-tuning reached (the worse
of their two final losses), interpolated linearly along each path; the increase over the base's
Shakespeare loss, per seed, gives a mean and a spread. A verdict needs a difference larger than
the seeds' spread (:func:`verdicts`), and its sentence is chosen by the numbers.

    python -m minipeft.realtext --sweep      # reproduces LR_SWEEP (every method, 3 rates)
    python -m minipeft.realtext              # the study: writes figures and a table
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, field

from minipeft.experiment import method_specs
from minipeft.nn import GPT
from minipeft.train import TrainConfig, evaluate_lm, train

METHODS = ("full", "last1", "bitfit", "mask10", "lora_r1_qv", "lora_r8_qv", "lora_r8_all",
           "houlsby", "pfeiffer", "prompt16", "prefix8", "ia3")

# Per-method learning rates, swept on the "shakespeare" base (seed 0): SWEEP_STEPS steps on
# code at 0.3x, 1x and 3x each method's default rate, held-out code bits/char after them
# (`python -m minipeft.realtext --sweep` reproduces it: about 3.5 CPU-minutes). The study uses
# the rate with the lowest code loss. Only last1 and LoRA r=8 (q,v and all) were best inside the
# range; every other method was best at the highest rate tried, so a wider sweep may move them
# further (and a 60-step horizon favours high rates).
SWEEP_STEPS = 60
LR_SWEEP: dict[str, dict[float, float]] = {  # method: {lr: held-out code bits/char}
    "full": {3e-04: 4.1373, 1e-03: 3.1924, 3e-03: 2.8874},
    "last1": {3e-03: 4.4054, 1e-02: 4.2433, 3e-02: 4.3142},
    "bitfit": {3e-03: 5.6055, 1e-02: 4.9347, 3e-02: 4.6857},
    "mask10": {3e-04: 6.793, 1e-03: 5.0715, 3e-03: 4.0715},
    "lora_r1_qv": {3e-03: 6.2348, 1e-02: 5.3372, 3e-02: 4.9612},
    "lora_r8_qv": {3e-03: 5.1971, 1e-02: 4.775, 3e-02: 4.8193},
    "lora_r8_all": {3e-03: 4.4386, 1e-02: 4.2149, 3e-02: 4.967},
    "houlsby": {3e-03: 4.5615, 1e-02: 4.3321, 3e-02: 4.2754},
    "pfeiffer": {3e-03: 4.6197, 1e-02: 4.3838, 3e-02: 4.2877},
    "prompt16": {9e-03: 5.7206, 3e-02: 5.5675, 9e-02: 5.5488},
    "prefix8": {3e-03: 8.4635, 1e-02: 7.5875, 3e-02: 6.5064},
    "ia3": {3e-02: 5.6447, 1e-01: 5.0306, 3e-01: 4.852},
}
FALLBACK_LR = {"full": 1e-3}   # methods missing from LR_SWEEP use method_specs()'s lr


def chosen_lr(method: str) -> float:
    """The swept rate with the lowest held-out code loss, else the method's default."""
    rates = LR_SWEEP.get(method)
    if rates:
        return min(rates, key=rates.get)
    return FALLBACK_LR.get(method, method_specs()[method].lr)


def log_steps(steps: int) -> list[int]:
    """0, 1, 2, 4, 8, ... up to ``steps`` (always included): dense early, where the old
    domain's loss moves most."""
    out, s = [0], 1
    while s < steps:
        out.append(s)
        s *= 2
    return out + [steps]


@dataclass
class RealTextConfig:
    base: str = "shakespeare"      # a Shakespeare base of minipeft.base
    methods: tuple = METHODS
    seeds: tuple = (0,)
    steps: int = 200               # the same steps (and tokens) for every method
    batch_size: int = 12
    eval_windows: int = 48         # held-out windows per domain per evaluation
    lrs: dict = field(default_factory=dict)   # method -> lr, overriding chosen_lr
    progress: bool = True
    keep_models: bool = False      # keep each trained model on its run (lessons, tests)


@dataclass
class RealTextRun:
    """One (method, seed): its path and its size."""
    method: str
    family: str
    seed: int
    lr: float
    trainable: int
    total: int
    path: list          # [{"step", "b", "a"}]: held-out code and Shakespeare bits/char
    seconds: float
    model: object = field(default=None, repr=False)   # the trained model (not saved)

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / self.total


def evaluate_domains(model, eval_b, eval_a) -> dict:
    """Held-out code (``b``) and Shakespeare (``a``) bits per character of ``model`` as it is:
    for a PEFT model, with its adapter active."""
    return {"b": eval_b.bits_per_char(evaluate_lm(model, eval_b.x, eval_b.y)["loss"]),
            "a": eval_a.bits_per_char(evaluate_lm(model, eval_a.x, eval_a.y)["loss"])}


def study_data(cfg: RealTextConfig):
    """``(base model, base info, code sampler factory, code eval set, Shakespeare eval set)``."""
    from minipeft.base import base_domains, load_base

    base, info = load_base(cfg.base, progress=cfg.progress)
    _, plays, code = base_domains(cfg.base)
    T = info["length"]
    return (base, info, code, code.eval_set(cfg.eval_windows, T),
            plays.eval_set(cfg.eval_windows, T))


def run_method(method: str, seed: int, lr: float, base, code, eval_b, eval_a,
               cfg: RealTextConfig, T: int, marks=None) -> RealTextRun:
    """Continue training a fresh copy of ``base`` on code with ``method``; the path, evaluated
    at step 0 and at ``marks`` (default: :func:`log_steps`)."""

    spec = method_specs()[method]
    fresh = GPT(base.config)
    fresh.load_state_dict(base.state_dict())
    model = spec.wrap(fresh, seed=seed)
    marks = set(log_steps(cfg.steps) if marks is None else marks)
    path = [{"step": 0, **evaluate_domains(model, eval_b, eval_a)}]

    def checkpoint(step):
        if step in marks:
            path.append({"step": step, **evaluate_domains(model, eval_b, eval_a)})

    start = time.perf_counter()
    train(model, code.sampler(T, seed), TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=lr, warmup=min(20, cfg.steps // 10),
        progress=cfg.progress, desc=f"{method} seed {seed}", checkpoint_every=1),
        checkpoint=checkpoint)
    return RealTextRun(method, spec.family, seed, lr, model.num_parameters(trainable_only=True),
                       model.num_parameters(), path, time.perf_counter() - start, model)


def run_realtext(cfg: RealTextConfig, log=print) -> tuple[list[RealTextRun], dict]:
    """Every (method, seed) of ``cfg``; returns the runs and the base's point
    ``{"b", "a"}`` (the adapter-off point)."""
    unknown = [m for m in cfg.methods if m not in method_specs()]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; choose from {list(method_specs())}")
    base, info, code, eval_b, eval_a = study_data(cfg)
    origin = evaluate_domains(base, eval_b, eval_a)
    runs = []
    for method in cfg.methods:
        lr = cfg.lrs.get(method) or chosen_lr(method)
        for seed in cfg.seeds:
            run = run_method(method, seed, lr, base, code, eval_b, eval_a, cfg, info["length"])
            runs.append(run)
            if not cfg.keep_models:
                run.model = None
            end = run.path[-1]
            log(f"{method:<12} seed {seed}: code {origin['b']:.2f} -> {end['b']:.2f} bits/char,"
                f" Shakespeare {origin['a']:.2f} -> {end['a']:.2f}  (lr {lr:.0e}, "
                f"{run.trainable_pct:.3f}% trainable, {run.seconds:.0f} s)")
    return runs, origin


# ---------------------------------------------------------------------------- reading paths
def a_at_b(path: list, level: float) -> float | None:
    """Shakespeare loss where the path first reaches code loss ``level``, interpolated
    linearly between the two evaluations around that crossing; None if it never does (and
    the start's own point if the path starts at or below ``level``)."""
    if path[0]["b"] <= level:
        return path[0]["a"]
    for p, q in zip(path, path[1:]):
        if p["b"] >= level >= q["b"] and p["b"] != q["b"]:
            w = (p["b"] - level) / (p["b"] - q["b"])
            return p["a"] + w * (q["a"] - p["a"])
    return None


LEARNED_MIN = 0.05   # bits/char of code a method must gain to be compared at all


def by_method(runs) -> dict[str, list[RealTextRun]]:
    groups: dict = {}
    for r in runs:
        groups.setdefault(r.method, []).append(r)
    return groups


def spread(values) -> float:
    """The seeds' spread: max minus min (0 for one seed)."""
    return max(values) - min(values) if values else float("nan")


def verdicts(runs, origin: dict, reference: str = "full") -> list[dict]:
    """Per method, forgetting at matched code loss against ``reference``.

    The matched level is the highest final code loss among both methods' seeds: every path
    reaches it. ``forgot`` is the Shakespeare increase over the base there, per seed (mean and
    spread); ``verdict`` is "forgets less" / "forgets more" when the difference of means exceeds
    the larger of the two spreads (and a floor of 0.01 bits/char), else "comparable"; with
    fewer than two seeds on either side the spread is unknown and no verdict is given; a method
    whose code loss did not fall by ``LEARNED_MIN`` below the base's "learned no code", and is
    not compared (it has not forgotten less: it has not moved).
    """
    groups = by_method(runs)
    if reference not in groups:
        raise ValueError(f"verdicts: the reference {reference!r} was not run")
    worst_b = {m: max(r.path[-1]["b"] for r in rs) for m, rs in groups.items()}
    final_b = {m: statistics.mean(r.path[-1]["b"] for r in rs) for m, rs in groups.items()}
    rows = []
    for method, rs in groups.items():
        level = max(worst_b[method], worst_b[reference])
        ref = [a_at_b(r.path, level) for r in groups[reference]]
        own = [a_at_b(r.path, level) for r in rs]
        ref = [v - origin["a"] for v in ref if v is not None]
        own = [v - origin["a"] for v in own if v is not None]
        row = {"method": method, "family": rs[0].family, "trainable_pct": rs[0].trainable_pct,
               "lr": rs[0].lr, "final_b": final_b[method],
               "final_a": statistics.mean(r.path[-1]["a"] for r in rs), "level": level,
               "forgot": statistics.mean(own) if own else None, "forgot_spread": spread(own),
               "full_forgot": statistics.mean(ref) if ref else None,
               "full_spread": spread(ref), "verdict": "-"}
        # the same reading halfway from the base to the matched level: paths need not be
        # straight, so the ordering can differ along the way (no verdict drawn from it)
        half = (origin["b"] + level) / 2
        own_h = [a_at_b(r.path, half) for r in rs]
        ref_h = [a_at_b(r.path, half) for r in groups[reference]]
        own_h = [v - origin["a"] for v in own_h if v is not None]
        ref_h = [v - origin["a"] for v in ref_h if v is not None]
        row.update(half_level=half, forgot_half=statistics.mean(own_h) if own_h else None,
                   full_forgot_half=statistics.mean(ref_h) if ref_h else None)
        if final_b[method] > origin["b"] - LEARNED_MIN:
            row["verdict"] = "learned no code"
        elif method != reference and (len(own) < 2 or len(ref) < 2):
            row["verdict"] = "one seed: no spread"
        elif method != reference and own and ref:
            margin = max(row["forgot_spread"], row["full_spread"], 0.01)
            diff = row["full_forgot"] - row["forgot"]
            row["margin"] = margin
            row["verdict"] = ("forgets less" if diff > margin else
                              "forgets more" if diff < -margin else "comparable")
        rows.append(row)
    return rows


def overall_verdict(rows) -> str:
    """One sentence on "PEFT forgets less than full fine-tuning", counted from the rows."""
    idle = [r["method"] for r in rows if r["verdict"] == "learned no code"]
    tail = (f" Not compared: {', '.join(idle)} (code loss fell by less than {LEARNED_MIN} "
            f"bits/char).") if idle else ""
    if any(r["method"] == "full" for r in rows if r["verdict"] == "learned no code"):
        return "Full fine-tuning learned no code here, so nothing can be compared." + tail
    peft = [r for r in rows if r["method"] != "full" and r["verdict"] in
            ("forgets less", "forgets more", "comparable")]
    single = [r for r in rows if r["verdict"] == "one seed: no spread"]
    if single and not peft:
        diffs = ", ".join(f"{r['method']} {r['forgot'] - r['full_forgot']:+.3f}" for r in single)
        return ("One seed only: the seeds' spread is unknown, so no verdict is given. Shakespeare "
                f"increase at matched code loss minus full fine-tuning's (bits/char): {diffs}."
                + tail)
    if not peft:
        return "No PEFT method could be compared with full fine-tuning at matched code loss." \
            + tail
    less = [r["method"] for r in peft if r["verdict"] == "forgets less"]
    more = [r["method"] for r in peft if r["verdict"] == "forgets more"]
    same = [r["method"] for r in peft if r["verdict"] == "comparable"]
    parts = []
    for names, what in ((less, "forgot less than full fine-tuning"),
                        (same, "forgot as much, within the seeds' spread"),
                        (more, "forgot more")):
        if names:
            parts.append(f"{len(names)} of {len(peft)} ({', '.join(names)}) {what}")
    if len(less) > len(peft) / 2:
        head = "At matched code loss, PEFT mostly forgets less than full fine-tuning here: "
    elif len(less) == 0:
        head = "At matched code loss, no PEFT method forgot less than full fine-tuning here: "
    else:
        head = "At matched code loss, the claim holds for some PEFT methods only: "
    return head + "; ".join(parts) + "." + tail


def pareto_front(points: dict) -> list[str]:
    """Methods whose (code, Shakespeare) point no other point beats on both (lower is better)."""
    return [m for m, (b, a) in points.items()
            if not any(b2 <= b and a2 <= a and (b2, a2) != (b, a)
                       for m2, (b2, a2) in points.items() if m2 != m)]


TABLE_HEAD = ["method", "trainable %", "lr", "code bits/char (final)",
              "Shakespeare bits/char (final)", "matched code level",
              "Shakespeare increase at matched code (± seed spread)", "full FT's at that level",
              "verdict"]


def table_cells(rows) -> list[list[str]]:
    """The table's cells, one list per method, in the order of :data:`TABLE_HEAD`."""
    cells = []
    for r in rows:
        f = "-" if r["forgot"] is None else f"{r['forgot']:+.3f} ± {r['forgot_spread']:.3f}"
        g = "-" if r["full_forgot"] is None else \
            f"{r['full_forgot']:+.3f} ± {r['full_spread']:.3f}"
        cells.append([r["method"], f"{r['trainable_pct']:.3g}", f"{r['lr']:.0e}",
                      f"{r['final_b']:.3f}", f"{r['final_a']:.3f}", f"{r['level']:.3f}", f, g,
                      r["verdict"]])
    return cells


def table(rows) -> str:
    """The table in markdown."""
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "---|" * len(TABLE_HEAD)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in table_cells(rows)])


# ---------------------------------------------------------------------------- figures
COLOURS = {"selective": "tab:blue", "reparameterisation": "tab:red", "additive": "tab:green"}


def plot_paths(runs, origin: dict, path, title: str = "") -> None:
    """Each method's mean path in the (code loss, Shakespeare loss) plane, from the base's
    point (the star: every method's start, and where an adapter switched off returns), with
    the Pareto front of the final points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    cmap = plt.get_cmap("tab20").colors
    finals = {}
    for i, (method, rs) in enumerate(by_method(runs).items()):
        n = min(len(r.path) for r in rs)
        b = [statistics.mean(r.path[k]["b"] for r in rs) for k in range(n)]
        a = [statistics.mean(r.path[k]["a"] for r in rs) for k in range(n)]
        style = "-" if method == "full" else "--" if rs[0].family == "reparameterisation" \
            else ":" if rs[0].family == "additive" else "-."
        ax.plot(b, a, style, marker=".", ms=4, color=cmap[(2 * i) % 20 + (2 * i) // 20],
                lw=2.5 if method == "full" else 1.4, label=f"{method} ({rs[0].trainable_pct:.3g}%)")
        finals[method] = (b[-1], a[-1])
    front = sorted(pareto_front(finals), key=lambda m: finals[m][0])
    ax.plot([finals[m][0] for m in front], [finals[m][1] for m in front], color="k", lw=0.8,
            alpha=0.6, label="Pareto front (final points)")
    ax.scatter([origin["b"]], [origin["a"]], marker="*", s=250, color="gold", edgecolor="k",
               zorder=5, label="base = adapter off")
    ax.set_xlabel("learned: held-out Python code, bits per character (lower is better)")
    ax.set_ylabel("forgotten: held-out Shakespeare, bits per character (lower is better)")
    ax.set_title(title or "Learning code vs forgetting Shakespeare: each method's path")
    ax.legend(fontsize=7, ncol=2)
    ax.invert_xaxis()   # training moves right: the paper's orientation (learned to the right)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- the sweep
def sweep(methods=METHODS, base: str = "shakespeare", factors=(0.3, 1.0, 3.0),
          steps: int = SWEEP_STEPS, log=print) -> dict:
    """For each method, ``steps`` steps at three rates around its default (``factors``);
    returns ``{method: {lr: held-out code bits/char}}``, the content of :data:`LR_SWEEP`."""
    cfg = RealTextConfig(base=base, steps=steps, progress=False)
    model, info, code, eval_b, eval_a = study_data(cfg)
    out = {}
    for method in methods:
        default = FALLBACK_LR.get(method, method_specs()[method].lr)
        out[method] = {}
        for f in factors:
            lr = float(f"{default * f:.0e}")
            try:
                run = run_method(method, 0, lr, model, code, eval_b, eval_a, cfg,
                                 info["length"], marks={steps})
                out[method][lr] = round(run.path[-1]["b"], 4)
            except FloatingPointError:
                out[method][lr] = math.inf
            log(f"{method:<12} lr {lr:.0e}: code {out[method][lr]:.4f} bits/char")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minipeft.realtext", description=__doc__)
    ap.add_argument("--sweep", action="store_true", help="reproduce LR_SWEEP and print it")
    ap.add_argument("--base", default="shakespeare")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="minipeft-out/realtext")
    args = ap.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    if args.sweep:
        print(json.dumps(sweep(methods, args.base), indent=1))
        return 0
    from pathlib import Path

    cfg = RealTextConfig(base=args.base, methods=methods, steps=args.steps,
                         seeds=tuple(int(s) for s in args.seeds.split(",")))
    runs, origin = run_realtext(cfg)
    rows = verdicts(runs, origin)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_paths(runs, origin, out / "realtext_paths.png")
    (out / "realtext_table.md").write_text(table(rows) + "\n\n" + overall_verdict(rows) + "\n")
    print(table(rows))
    print(overall_verdict(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
