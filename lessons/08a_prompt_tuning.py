"""Lesson 08a: soft prompts: steer a frozen model with vectors it reads, not weights it changes.

Prompt tuning (Lester et al. 2021) puts n trainable vectors P (n, C), the "virtual tokens", in
front of the input's embeddings and trains only them:

    h0 = [P ; tok_emb(ids) + pos_emb(0..T-1)]      (B, n + T, C)    model frozen

The virtual tokens get no position embedding and the real tokens keep the positions they had in
pretraining (a choice: Hugging Face PEFT on GPT-2 shifts them to n..n+T-1, which would move every
real token onto a position embedding this small base rarely saw, and spend n of the positions
the input could use). Unlike LoRA or an adapter, step 0 is NOT the base model: the real tokens
now attend to n extra vectors. The init decides how natural they look: "random" (uniform in each
embedding dimension's range), "vocab" (copies of n sampled token embeddings) or "text" (the
embeddings of chosen words, e.g. the task's name).

Prefix tuning (Li & Liang 2021) goes deeper: every attention layer gets n learned keys and values
in front of its own, i.e. a KV cache that was learned instead of computed. The paper trained the
prefix through a small MLP (a reparameterisation, for stability) and kept only its output; that
collapse must change nothing, and the lesson checks it does.

"Alternatively keep the input fixed and retrain the embedding weights": ``embedding_only()``
trains the token and position tables themselves (here also the output head, which is tied to
the token table).

A soft prompt cannot *add* a skill the frozen blocks lack; it can only choose among the ones
they have (the project's early probes found exactly that). So the task is a steering task: the
base knows "reverse" under the marker <reverse>; rows here start with <new0>, a marker it never
saw. Can a few trained vectors make <new0> rows get reversed?

    (a) prompt tuning: before/after accuracy for three inits and several lengths, which answer
        positions still fail, and which symbols the learned vectors sit near.
    (b) prefix tuning, reparameterised, then collapsed: identical outputs, fewer numbers saved.
    (c) embedding-only tuning on the same task, and what each method does to the skills the base
        already had (with the adapter switched on).

Then the verdicts. Lesson 08b measures what the extra positions cost at inference; 08c reads
learned prompts through the vocabulary of a language model.

Run:  python lessons/08a_prompt_tuning.py [--quick] [--seed N]
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")  # render to a file; no display needed
import matplotlib.pyplot as plt
import numpy as np  # host-side only: data rows, tables and the figure

from minipeft import backend as bk
from minipeft import lessonkit
from minipeft.autograd import no_grad
from minipeft.base import load_base
from minipeft.data import STOI, VOCAB, TaskMixture, swap_marker
from minipeft.experiment import method_specs
from minipeft.nn import generate
from minipeft.peft import (
    PrefixTuningConfig,
    PromptTuningConfig,
    collapse_prefix,
    embedding_only,
    get_peft_model,
    nearest_tokens,
)
from minipeft.train import TrainConfig, evaluate_lm, train

SKILL, MARKER = "reverse", "new0"       # make the unseen <new0> trigger the base's reverse
INIT_N = 4                              # prompt length for the init comparison
LENGTHS = (1, 4, 16)                    # prompt lengths compared (vocab init)
PREFIX_N, PREFIX_HIDDEN = 4, 64
STEPS, QUICK_STEPS = 300, 25            # optimizer steps per run, the same for every method
BATCH, QUICK_BATCH = 32, 16
EVAL_EXAMPLES, QUICK_EVAL = 300, 64
LR = {"prompt": method_specs()["prompt16"].lr, "prefix": method_specs()["prefix8"].lr,
      "embedding": 1e-2}                # embeddings: bitfit-like 10x full FT's 1e-3
FIGURE = "08a_prompt_tuning.png"


def fit(task, model, lr: float, desc: str):
    """Train ``model`` (a fresh copy of the base, wrapped) on <new0> rows; the TrainResult."""
    cfg = TrainConfig(steps=task.steps, batch_size=task.batch, lr=lr, progress=task.progress,
                      desc=desc)
    return train(model, task.sample, cfg)


def token_accuracy(model, x, y) -> float:
    """Share of answer tokens predicted right (teacher forcing): partial steering shows here."""
    with no_grad():
        pred = bk.to_numpy(model(bk.asarray(x)).data.argmax(axis=-1))
    return float((pred == y)[y != -100].mean())


# --------------------------------------------------------------------------- (a) prompt tuning
def answer_position_accuracy(model, x, y) -> list:
    """Accuracy at each answer position (teacher forcing): where a steered skill still fails."""
    with no_grad():
        pred = bk.to_numpy(model(bk.asarray(x)).data.argmax(axis=-1))
    cols = [j for j in range(y.shape[1]) if (y[:, j] != -100).any()]
    return [float((pred[:, j] == y[:, j])[y[:, j] != -100].mean()) for j in cols]


def match_threshold(E) -> float:
    """Median over rows of E (V, C) of the cosine with the nearest OTHER row: how close two
    distinct tokens typically are. A vector at least this close to a token sits on it."""
    U = E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-30)     # (V, C) unit rows
    sims = U @ U.T                                                          # (V, V)
    np.fill_diagonal(sims, -np.inf)
    return float(np.median(sims.max(axis=1)))


def prompt_tuning(task) -> dict:
    """(a) How well do n trained vectors steer <new0> rows into 'reverse', per init and length?
    Measured: exact match and answer-token accuracy on held-out rows, before and after."""
    base, x_e, y_e = task.base, task.x_e, task.y_e
    before_new = evaluate_lm(base, x_e, y_e)["exact_match"]
    before_tok = token_accuracy(base, x_e, y_e)
    before_own = evaluate_lm(base, *task.mix.eval_set(SKILL, task.n_eval))["exact_match"]
    m_id = STOI[f"<{MARKER}>"]
    ids, sims = nearest_tokens(base.tok_emb.weight.data[m_id:m_id + 1], base.tok_emb.weight.data,
                               5)
    marker_near = [(VOCAB[j], float(c)) for j, c in zip(ids[0], sims[0]) if j != m_id][:4]
    print(f"\n(a) Prompt tuning: <{MARKER}> + letters should be reversed. The base reverses "
          f"<{SKILL}> rows {before_own:.1%}\n    of the time and <{MARKER}> rows "
          f"{before_new:.1%} ({before_tok:.1%} of answer tokens). {task.steps} steps each, lr "
          f"{LR['prompt']:.0e}, batch {task.batch}.")
    print(f"    <{MARKER}> is not a blank token: the tied head pushed every never-seen token's "
          f"row the same way, so its\n    nearest rows are "
          + ", ".join(f"{w} {c:.2f}" for w, c in marker_near)
          + ". The prompt has to override that signal.\n")
    text_ids = (STOI[f"<{SKILL}>"],)                     # "text" init: the skill's own name
    prompt_cfgs = {f"random n={INIT_N}": PromptTuningConfig(INIT_N, "random"),
                   f"vocab n={INIT_N}": PromptTuningConfig(INIT_N, "vocab"),
                   f"text n={INIT_N} (<{SKILL}>)": PromptTuningConfig(INIT_N, "text", text_ids)}
    for n in LENGTHS:
        prompt_cfgs.setdefault(f"vocab n={n}", PromptTuningConfig(n, "vocab"))
    models, rows = {}, {}
    for name, pcfg in prompt_cfgs.items():
        model = get_peft_model(lessonkit.fresh_copy(base), pcfg, seed=task.seed)
        step0 = token_accuracy(model, x_e, y_e)
        result = fit(task, model, LR["prompt"], name)
        final = evaluate_lm(model, x_e, y_e)
        models[name] = model
        rows[name] = {"trainable": model.num_parameters(trainable_only=True),
                      "step0_token_acc": step0, "token_acc": token_accuracy(model, x_e, y_e),
                      "exact_match": final["exact_match"],
                      "loss": final["loss"], "first_loss": float(np.mean(result.losses[:10])),
                      "last_loss": float(np.mean(result.losses[-10:])),
                      "seconds": result.seconds}
    print(f"    {'prompt':<24} {'trainable':>9} {'exact':>7} {'tokens':>7} {'(step 0)':>9} "
          f"{'eval loss':>10} {'train loss':>17}")
    for name, r in rows.items():
        print(f"    {name:<24} {r['trainable']:>9,} {r['exact_match']:>7.1%} {r['token_acc']:>7.1%}"
              f" {r['step0_token_acc']:>9.1%} {r['loss']:>10.3f} {r['first_loss']:>8.3f} -> "
              f"{r['last_loss']:.3f}")
    print("    exact: whole answer right (= greedy decoding); tokens: answer tokens right.")
    best = max(rows, key=lambda n: (rows[n]["token_acc"], rows[n]["exact_match"]))
    per_pos = answer_position_accuracy(models[best], x_e, y_e)
    print(f"\n    best prompt ({best}), accuracy at each answer position: "
          + " ".join(f"{a:.0%}" for a in per_pos))
    P = models[best].base_model.prompt_encoder.adapters.default.embedding.data
    ids, sims = nearest_tokens(P, base.tok_emb.weight.data, 3)
    lists = [", ".join(f"{VOCAB[j]} {c:.2f}" for j, c in zip(r_ids, r_sims))
             for r_ids, r_sims in zip(ids, sims)]
    print("    its virtual tokens' 3 nearest symbols (cosine):")
    cells = [f"{'p' + str(j) + ':':<4} {text:<32}" for j, text in enumerate(lists)]
    for i in range(0, len(cells), 3):
        print("      " + " ".join(cells[i:i + 3]).rstrip())
    skill_near = float(np.mean([STOI[f"<{SKILL}>"] in r for r in ids.tolist()]))
    best_cos = float(sims[:, 0].max())
    best_sym = VOCAB[int(ids[int(np.argmax(sims[:, 0])), 0])]
    task_thr = match_threshold(bk.to_numpy(base.tok_emb.weight.data).astype(np.float64))
    print(f"    <{SKILL}> is among the 3 nearest symbols of {skill_near:.0%} of them; the "
          f"largest cosine with any symbol is {sims[:, 0].max():.2f}.")
    return {"before_new": before_new, "before_tok": before_tok, "before_own": before_own,
            "rows": rows, "models": models, "best": best, "per_position": per_pos,
            "best_cos": best_cos, "best_sym": best_sym, "task_threshold": task_thr}


# --------------------------------------------------------------------------- (b) prefix tuning
def prefix_tuning(task, rows: dict) -> dict:
    """(b) Prefix tuning through an MLP, then collapsed into the table the MLP computes: the
    logits and generated tokens must not change, and far fewer numbers are saved."""
    x_e, y_e = task.x_e, task.y_e
    pre = get_peft_model(lessonkit.fresh_copy(task.base),
                         PrefixTuningConfig(PREFIX_N, reparameterize=True,
                                            hidden=PREFIX_HIDDEN), seed=task.seed)
    trained_n = pre.num_parameters(trainable_only=True)
    fit(task, pre, LR["prefix"], "prefix (MLP)")
    pre_em = evaluate_lm(pre, x_e, y_e)
    pre_em["token_acc"] = token_accuracy(pre, x_e, y_e)
    prompt_in = bk.asarray(x_e[:8, :int(np.argmax(y_e[0] != -100)) + 1])   # up to '='
    new_tokens = int((y_e[0] != -100).sum())
    with tempfile.TemporaryDirectory() as tmp:
        with no_grad():
            logits_mlp = bk.to_numpy(pre(x_e[:64]).data)
        gen_mlp = bk.to_numpy(generate(pre, prompt_in, new_tokens))
        bytes_mlp = pre.save_adapter(Path(tmp) / "mlp")
        collapse_prefix(pre)
        with no_grad():
            logits_table = bk.to_numpy(pre(x_e[:64]).data)
        gen_table = bk.to_numpy(generate(pre, prompt_in, new_tokens))
        bytes_table = pre.save_adapter(Path(tmp) / "table")
    collapse = {"trained": trained_n, "kept": pre.num_parameters(trainable_only=True),
                "bytes_mlp": bytes_mlp, "bytes_table": bytes_table,
                "max_logit_diff": float(np.abs(logits_mlp - logits_table).max()),
                "same_tokens": bool((gen_mlp == gen_table).all()),
                "exact_match": pre_em["exact_match"], "loss": pre_em["loss"]}
    C, n_layer = task.base.config.n_embd, task.base.config.n_layer
    print(f"\n(b) Prefix tuning, n={PREFIX_N} keys and values per layer, trained through an MLP "
          f"(hidden {PREFIX_HIDDEN}), lr {LR['prefix']:.0e}:\n    <{MARKER}> rows reversed "
          f"{pre_em['exact_match']:.1%}, answer tokens {pre_em['token_acc']:.1%} (eval loss "
          f"{pre_em['loss']:.3f}). Collapse the MLP into "
          f"the table it computes:")
    print(f"    {'':<18} {'numbers':>8} {'file':>10}\n"
          f"    {'with the MLP':<18} {trained_n:>8,} {bytes_mlp / 1024:>8.1f} KiB\n"
          f"    {'collapsed table':<18} {collapse['kept']:>8,} {bytes_table / 1024:>8.1f} KiB"
          f"   (n x layers x 2 x C = {PREFIX_N * n_layer * 2 * C:,})")
    print(f"    max |logit difference| before/after collapse: {collapse['max_logit_diff']:.1e}; "
          f"generated tokens identical: {collapse['same_tokens']}")
    rows[f"prefix n={PREFIX_N} (collapsed)"] = {"trainable": collapse["kept"],
                                                "exact_match": pre_em["exact_match"],
                                                "token_acc": pre_em["token_acc"],
                                                "loss": pre_em["loss"]}
    return {"model": pre, "scores": pre_em, "collapse": collapse}


# --------------------------------------------------------------------------- (c) embeddings
def skills_kept(model, mix_a, tasks, n) -> dict:
    """Held-out exact match of the base's own skills, with their own markers."""
    return {t: evaluate_lm(model, *mix_a.eval_set(t, n))["exact_match"] for t in tasks}


def embedding_tuning(task, rows: dict, a: dict, prefix: dict) -> dict:
    """(c) Retrain the embedding tables instead, on the same task; then, for every method, the
    base's own skills with the adapter switched on (does steering <new0> cost them?)."""
    x_e, y_e, base, tasks = task.x_e, task.y_e, task.base, task.tasks
    emb = get_peft_model(lessonkit.fresh_copy(base), embedding_only(), seed=task.seed)
    fit(task, emb, LR["embedding"], "embeddings")
    emb_em = evaluate_lm(emb, x_e, y_e)
    rows["embedding-only"] = {"trainable": emb.num_parameters(trainable_only=True),
                              "exact_match": emb_em["exact_match"], "loss": emb_em["loss"],
                              "token_acc": token_accuracy(emb, x_e, y_e)}
    W0 = bk.to_numpy(base.tok_emb.weight.data)
    W1 = bk.to_numpy(emb.base_model.tok_emb.weight.data)
    moved = np.linalg.norm(W1 - W0, axis=1)                       # (V,) how far each row moved
    top = np.argsort(-moved)[:3]
    best = a["best"]
    compare = {f"vocab n={INIT_N}": a["models"][f"vocab n={INIT_N}"], best: a["models"][best],
               f"prefix n={PREFIX_N}": prefix["model"], "embedding-only": emb}
    kept = {"base": skills_kept(base, task.mix_a, tasks, task.n_eval)}
    kept.update({n: skills_kept(m, task.mix_a, tasks, task.n_eval) for n, m in compare.items()})
    print(f"\n(c) Embedding-only tuning (token + position tables; the head is tied to the token "
          f"table), lr {LR['embedding']:.0e}:\n    <{MARKER}> rows reversed "
          f"{emb_em['exact_match']:.1%}. Rows that moved most: "
          + ", ".join(f"{VOCAB[i]} {moved[i]:.2f}" for i in top)
          + f"; <{MARKER}> {moved[STOI[f'<{MARKER}>']]:.2f}; median row "
          f"{np.median(moved):.2f}.\n    (Every row feeds the tied head's softmax, so every row "
          "gets a gradient, and Adam moves each by\n    about lr per coordinate per step, "
          "whatever the gradient's size.)")
    print("\n    The base's own skills, each with its own marker, adapter switched on:\n")
    print(f"    {'method':<24} {'trainable':>9} {'<' + MARKER + '> rev':>10} "
          + " ".join(f"{t:>8}" for t in tasks))
    for name in ["base"] + list(compare):
        tr = "-" if name == "base" else f"{compare[name].num_parameters(trainable_only=True):,}"
        em = (a["before_new"] if name == "base" else
              evaluate_lm(compare[name], x_e, y_e)["exact_match"])
        print(f"    {name:<24} {tr:>9} {em:>10.1%} "
              + " ".join(f"{kept[name][t]:>8.1%}" for t in tasks))
    mean_kept = {n: float(np.mean(list(v.values()))) for n, v in kept.items()}
    broke = [n for n in compare if mean_kept[n] < mean_kept["base"] - 0.1]
    print("    Every input reads the prompt, so a prompt also acts on the markers the base "
          "already knows. Embedding-only\n    could in principle change the <" + MARKER
          + "> row alone, but every row moved.\n    Old skills (mean) fell by more than 10 "
          "points for: " + (", ".join(f"{n} ({mean_kept['base']:.0%} -> {mean_kept[n]:.0%})"
                                 for n in broke) or "none") + ".")
    return {"scores": emb_em, "kept": kept}


# --------------------------------------------------------------------------- verdicts
def verdicts(a: dict, prefix: dict, emb: dict) -> None:
    """Rows 8 and 11 of the article's claims, each chosen by the numbers printed beside it."""
    rows, best = a["rows"], a["best"]
    pre_em, emb_em = prefix["scores"], emb["scores"]
    before_new, before_tok = a["before_new"], a["before_tok"]
    print("\nVerdicts (measured here):")
    best_em, best_tok = rows[best]["exact_match"], rows[best]["token_acc"]
    if best_em >= 0.9:
        how = "the prompt steered the skill."
    elif best_tok - before_tok > 0.2:
        how = ("the prompt steered the skill only partly: most answer tokens, seldom a whole "
               "answer, in this budget.")
    else:
        how = "the prompt did not steer the skill in this budget."
    print(f"  Row 8 'soft prompts: trainable vectors added to the prompt embeddings, model "
          f"frozen; alternatively retrain the embedding weights':\n    <{MARKER}> rows "
          f"reversed (exact / answer tokens): base {before_new:.1%} / {before_tok:.1%}; best "
          f"prompt ({best}) {best_em:.1%} / {best_tok:.1%};\n    prefix "
          f"{pre_em['exact_match']:.1%} / {pre_em['token_acc']:.1%}; embedding-only "
          f"{emb_em['exact_match']:.1%} / {rows['embedding-only']['token_acc']:.1%} "
          f"({rows['embedding-only']['trainable']:,} numbers). Here {how}")
    best_cos, task_thr = a["best_cos"], a["task_threshold"]
    print(f"  Row 11 'learned vectors match no vocabulary token', on the task base: the best "
          f"prompt ({best}) has largest cosine {best_cos:.2f}\n    (with {a['best_sym']}) vs the "
          f"symbols' own nearest-neighbour median {task_thr:.2f}: "
          + ("it sits on a symbol, so the claim did not hold there." if best_cos >= task_thr
             else "it matches no symbol, so the claim held there."))


# --------------------------------------------------------------------------- the figure
def figure(rows: dict):
    fig, ax = plt.subplots(figsize=(7, 5))
    names = list(rows)
    ys = np.arange(len(names))
    ax.barh(ys - 0.2, [rows[n]["exact_match"] for n in names], 0.4, label="exact match")
    ax.barh(ys + 0.2, [rows[n]["token_acc"] for n in names], 0.4, label="answer tokens")
    ax.set_yticks(ys, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"held-out accuracy, <{MARKER}> rows reversed")
    ax.legend(fontsize=8)
    ax.set_title(f"(a-c) Teaching <{MARKER}> to trigger '{SKILL}'")
    return fig


def main(argv=None) -> dict:
    args = lessonkit.arguments(__doc__, quick="the tiny quick base, few steps").parse_args(argv)
    clock = lessonkit.Stopwatch()
    kind = "quick" if args.quick else "default"
    print(f"Lesson 08a: prompt tuning ({kind} base, backend {bk.name}, seed {args.seed})")
    base, info = load_base(kind, seed=args.seed, progress=not args.quick)
    mix = TaskMixture([SKILL], seed=1000 + args.seed, length=info["length"])
    n_eval = QUICK_EVAL if args.quick else EVAL_EXAMPLES
    task = SimpleNamespace(                   # what every part shares: the base and the task
        base=base, seed=args.seed, tasks=list(info["tasks"]), mix=mix, n_eval=n_eval,
        mix_a=TaskMixture(list(info["tasks"]), seed=2000 + args.seed, length=info["length"]),
        sample=lambda b: swap_marker(*mix.sample(b), SKILL, MARKER),  # <new0> rows to reverse
        steps=QUICK_STEPS if args.quick else STEPS, batch=QUICK_BATCH if args.quick else BATCH,
        progress=not args.quick)
    task.x_e, task.y_e = swap_marker(*mix.eval_set(SKILL, n_eval), SKILL, MARKER)
    a = prompt_tuning(task)
    prefix = prefix_tuning(task, a["rows"])
    emb = embedding_tuning(task, a["rows"], a, prefix)
    verdicts(a, prefix, emb)
    path = lessonkit.save_figure(figure(a["rows"]), FIGURE)
    print(f"\n    figure saved to {path}  ({clock.seconds():.0f} s in all)")
    return {"kind": kind, "before_new": a["before_new"], "before_tok": a["before_tok"],
            "before_own": a["before_own"], "rows": a["rows"], "best": a["best"],
            "per_position": a["per_position"], "collapse": prefix["collapse"],
            "kept": emb["kept"], "best_cos": a["best_cos"], "task_threshold": a["task_threshold"],
            "figure": str(path), "seconds": clock.seconds()}


if __name__ == "__main__":
    main()
