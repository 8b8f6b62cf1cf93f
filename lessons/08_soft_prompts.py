"""Lesson 08: soft prompts: steer a frozen model with vectors it reads, not weights it changes.

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
they have (the project's early probes found exactly that). So the tasks are steering tasks:

    (a) the base knows "reverse" under the marker <reverse>. Rows start with <new0>, a marker it
        never saw. Can n virtual tokens make <new0> rows get reversed? Before/after accuracy for
        three inits and several lengths, and which answer positions still fail.
    (b) prefix tuning, reparameterised, then collapsed: identical outputs, fewer numbers saved.
    (c) embedding-only tuning on the same task, and what each method does to the skills the base
        already had (with the adapter switched on).
    (d) the inference cost of a prompt: n more positions in every forward pass and in every
        attention of every generated token; timed with and without.
    (e) the "language" base (a GPT pretrained on a synthetic language whose words have known
        categories): a prompt that steers its free generation toward sentences that mention a
        time ("in the morning"), then the learned vectors read through the vocabulary: their
        nearest words by cosine, how category-pure those lists are (``neighbour_purity``) next
        to random vectors (``random_baseline``) and the init, over several seeds, and the
        largest cosine any of them has with any word (does it "match no word"?).

Run:  python lessons/08_soft_prompts.py [--quick] [--seed N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # render to a file; no display needed
import matplotlib.pyplot as plt
import numpy as np  # host-side only: data rows, tables and the figure

from minipeft import backend as bk
from minipeft.autograd import counters, no_grad
from minipeft.base import RECIPES, load_base, pretrain
from minipeft.data import (
    CATEGORIES,
    STOI,
    TEMPLATES,
    VOCAB,
    TaskMixture,
    WordTokenizer,
    cluster_purity,
    generate_corpus,
    swap_marker,
)
from minipeft.data.language import MAX_SENTENCE_TOKENS
from minipeft.experiment import method_specs
from minipeft.nn import GPT, generate
from minipeft.peft import (
    PrefixTuningConfig,
    PromptTuningConfig,
    collapse_prefix,
    embedding_only,
    get_peft_model,
    nearest_tokens,
    neighbour_purity,
    random_baseline,
)
from minipeft.train import TrainConfig, evaluate_lm, train

SEED = 0
SKILL, MARKER = "reverse", "new0"       # (a): make the unseen <new0> trigger the base's reverse
INIT_N = 4                              # prompt length for the init comparison
LENGTHS = (1, 4, 16)                    # prompt lengths compared (vocab init)
PREFIX_N, PREFIX_HIDDEN = 4, 64
STEPS, QUICK_STEPS = 300, 25            # optimizer steps per run, the same for every method
BATCH, QUICK_BATCH = 32, 16
EVAL_EXAMPLES, QUICK_EVAL = 300, 64
LR = {"prompt": method_specs()["prompt16"].lr, "prefix": method_specs()["prefix8"].lr,
      "embedding": 1e-2}                # embeddings: bitfit-like 10x full FT's 1e-3
GEN_ROUNDS, QUICK_GEN_ROUNDS = 30, 2    # interleaved timing rounds
FORWARD_BATCH = 64                      # rows in the batched (uncached) forward timing
CATEGORY = "time"                       # (e): steer the language model toward this category
LANG_N, LANG_INITS = 8, ("random", "vocab")
LANG_SEEDS, QUICK_LANG_SEEDS = (0, 1, 2), (0,)
LANG_STEPS, QUICK_LANG_STEPS = 300, 20
LANG_SAMPLES, QUICK_LANG_SAMPLES = 300, 40   # sentences sampled to score steering
# --quick: a small language model pretrained on the spot (~3 s) instead of the cached base
QUICK_LANGUAGE = dataclasses.replace(RECIPES["language"], n_embd=32, steps=150, batch_size=32,
                                     eval_examples=32)
K = 5                                   # nearest words per virtual token
# A vector "matches" a token when it is closer to it than tokens are to each other: its cosine
# reaches the median, over the vocabulary, of each row's cosine with its nearest other row
# (``match_threshold``), measured on each embedding rather than fixed.
RANDOM_SEEDS = (0, 1, 2, 3, 4)          # random vectors for the chance level
OUT_NAME = "08_soft_prompts.png"


def fresh(cfg, state, config, seed):
    base = GPT(cfg)
    base.load_state_dict(state)
    return get_peft_model(base, config, seed=seed)


def fit(model, sample, steps, batch, lr, progress, desc):
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=lr, progress=progress, desc=desc)
    return train(model, sample, cfg)


def token_accuracy(model, x, y) -> float:
    """Share of answer tokens predicted right (teacher forcing): partial steering shows here."""
    with no_grad():
        pred = bk.to_numpy(model(bk.asarray(x)).data.argmax(axis=-1))
    return float((pred == y)[y != -100].mean())


def answer_position_accuracy(model, x, y) -> list:
    """Accuracy at each answer position (teacher forcing): where a steered skill still fails."""
    with no_grad():
        pred = bk.to_numpy(model(bk.asarray(x)).data.argmax(axis=-1))
    cols = [j for j in range(y.shape[1]) if (y[:, j] != -100).any()]
    return [float((pred[:, j] == y[:, j])[y[:, j] != -100].mean()) for j in cols]


def skills_kept(model, mix_a, tasks, n) -> dict:
    """Held-out exact match of the base's own skills, with their own markers."""
    return {t: evaluate_lm(model, *mix_a.eval_set(t, n))["exact_match"] for t in tasks}


def interleaved_ms(calls: dict, rounds: int, seed: int) -> tuple:
    """(median, best) ms of each zero-argument call. Every round runs each once, in a fresh
    random order, so machine noise falls on all alike (round 0 warms up and is dropped). Other
    load only adds time, so the best round is the estimate least hurt by it."""
    times = {n: [] for n in calls}
    order = np.random.default_rng(seed)
    for r in range(rounds + 1):
        for name in order.permutation(list(calls)):
            bk.synchronize()
            t = time.perf_counter()
            calls[name]()
            bk.synchronize()
            if r:
                times[name].append((time.perf_counter() - t) * 1e3)
    return ({n: statistics.median(v) for n, v in times.items()},
            {n: min(v) for n, v in times.items()})


def forward_no_grad(model, x):
    with no_grad():
        model(x)


# --------------------------------------------------------------------------- (e) language
def sentence_rows(sentences, tok):
    """One sentence per row, <bos> words <eos>, padded; targets -100 on padding."""
    rows = np.full((len(sentences), MAX_SENTENCE_TOKENS), tok.pad_id, dtype=np.int64)
    for i, s in enumerate(sentences):
        ids = tok.encode(s, add_bos_eos=True)
        rows[i, :len(ids)] = ids
    x, y = rows[:, :-1], rows[:, 1:].copy()
    y[y == tok.pad_id] = -100
    return x, y


def fits_a_template(words) -> bool:
    """Is this word list a sentence of the language (some template, every slot filled right)?"""
    for template in TEMPLATES:
        parts = template.split()
        if len(parts) == len(words) and all(
                w in CATEGORIES[p[1:-1]] if p.startswith("{") else w == p
                for p, w in zip(parts, words)):
            return True
    return False


def sample_sentences(model, tok, n, seed) -> list:
    """n sentences sampled (temperature 1) from <bos>, cut at <eos>."""
    out = bk.to_numpy(generate(model, np.full((n, 1), tok.bos_id), MAX_SENTENCE_TOKENS - 1,
                               temperature=1.0, seed=seed))
    sentences = []
    for row in out[:, 1:].tolist():
        if tok.eos_id in row:
            row = row[:row.index(tok.eos_id)]
        sentences.append(tok.decode(row).split())
    return sentences


def steering_scores(model, tok, n, seed) -> dict:
    sents = sample_sentences(model, tok, n, seed)
    words = set(CATEGORIES[CATEGORY])
    return {"mention": float(np.mean([bool(words & set(s)) for s in sents])),
            "grammatical": float(np.mean([fits_a_template(s) for s in sents])),
            "examples": [" ".join(s) for s in sents[:3]]}


def match_threshold(E) -> float:
    """Median over rows of E (V, C) of the cosine with the nearest OTHER row: how close two
    distinct tokens typically are. A vector at least this close to a token sits on it."""
    U = E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-30)     # (V, C) unit rows
    sims = U @ U.T                                                          # (V, V)
    np.fill_diagonal(sims, -np.inf)
    return float(np.median(sims.max(axis=1)))


def content_purity(vectors, E, tok, k: int = K) -> float:
    """Category purity of each vector's k nearest CONTENT words (words with a category).

    ``neighbour_purity`` lets function words and specials into the list and then drops them, so
    a list with a single categorised word scores 1.0: random vectors reached ~0.9 that way.
    Here every one of the k neighbours is a content word, so chance sits well below 1."""
    content = np.array([i for i in range(tok.vocab_size) if tok.category_of(i) is not None])
    ids, _ = nearest_tokens(vectors, E[content], k)                   # (n, k) into content
    return cluster_purity(content[ids].tolist(), tok)


def read_vectors(vectors, E, tok) -> dict:
    """What the vocabulary says about some vectors: purity, largest cosine, category share."""
    ids, sims = nearest_tokens(vectors, E, K)
    cat = set(tok.ids_of(CATEGORY))
    return {"purity": content_purity(vectors, E, tok, K),
            "purity_any_word": neighbour_purity(vectors, E, tok, K),
            "max_cos": float(sims[:, 0].max()),
            "category_share": float(np.mean([i in cat for i in ids.ravel()])),
            "ids": ids, "sims": sims}


def language_part(seeds, steps, batch, n_samples, progress, quick) -> dict:
    tok = WordTokenizer()
    if quick:
        base, _ = pretrain(QUICK_LANGUAGE, seed=0, progress=False)
    else:
        base, _ = load_base("language", progress=progress)
    cfg, state = base.config, {k: v.copy() for k, v in base.state_dict().items()}
    E = bk.to_numpy(base.tok_emb.weight.data).copy()                # (V, C) frozen vocabulary
    words = set(CATEGORIES[CATEGORY])
    before = steering_scores(base, tok, n_samples, seed=0)
    old = random_baseline(E, LANG_N, K, RANDOM_SEEDS, tok)         # purity with function words
    mu, sd = E.mean(axis=0), E.std(axis=0)                          # the same random vectors
    rand = [read_vectors(bk.host_rng(s).normal(mu, sd, size=(LANG_N, E.shape[1])), E, tok)
            for s in RANDOM_SEEDS]
    pur = np.array([r["purity"] for r in rand])
    chance = {"purities": pur.tolist(), "mean": float(pur.mean()), "std": float(pur.std()),
              "any_word_mean": old["mean"], "match": match_threshold(E)}
    chance["max_cos"] = float(np.mean([r["max_cos"] for r in rand]))
    chance["category_share"] = float(np.mean([r["category_share"] for r in rand]))
    chance["share_sd"] = float(np.std([r["category_share"] for r in rand]))
    runs = []
    for init in LANG_INITS:
        for seed in seeds:
            corpus = [s for s in generate_corpus(20_000, 100 + seed) if words & set(s.split())]
            X, Y = sentence_rows(corpus, tok)
            rng = bk.host_rng([seed, 7])

            def sample(b, X=X, Y=Y, rng=rng):
                i = rng.integers(0, len(X), size=b)
                return X[i], Y[i]

            model = fresh(cfg, state, PromptTuningConfig(LANG_N, init), seed)
            P0 = bk.to_numpy(model.base_model.prompt_encoder.adapters.default.embedding.data)
            P0 = P0.copy()
            result = fit(model, sample, steps, batch, LR["prompt"], progress,
                         f"{CATEGORY} prompt {init} s{seed}")
            P = bk.to_numpy(model.base_model.prompt_encoder.adapters.default.embedding.data)
            runs.append({"init": init, "seed": seed, "loss": result.losses,
                         "after": steering_scores(model, tok, n_samples, seed=0),
                         "learned": read_vectors(P, E, tok), "initial": read_vectors(P0, E, tok),
                         "moved": float(np.linalg.norm(P - P0, axis=1).mean()),
                         "norm": float(np.linalg.norm(P, axis=1).mean())})
    return {"before": before, "chance": chance, "runs": runs, "tok": tok, "quick": quick,
            "word_norm": float(np.linalg.norm(E, axis=1).mean()), "corpus_size": len(corpus)}


def spread(values, pct: bool = False) -> str:
    """mean ± standard deviation over seeds (just the mean for one seed)."""
    v = np.asarray(values, dtype=float)
    f = (lambda a: f"{a:.1%}") if pct else (lambda a: f"{a:.2f}")
    return f"{f(v.mean())} ± {f(v.std())}" if len(v) > 1 else f(v.mean())


def print_language(lang) -> dict:
    b, chance, tok = lang["before"], lang["chance"], lang["tok"]
    which = " (quick: a small one pretrained here)" if lang["quick"] else ""
    print(f"\n(e) The language base{which}: steer free generation toward '{CATEGORY}' words "
          f"({', '.join(CATEGORIES[CATEGORY])})")
    print(f"    Every template names an animal, so 'mention an animal' could not be steered: "
          f"only {sum('{time}' in t for t in TEMPLATES)} of {len(TEMPLATES)}\n    templates "
          f"hold a {CATEGORY} word. The prompt ({LANG_N} virtual tokens) trains on "
          f"{lang['corpus_size']:,} sentences that contain one.\n")
    print(f"    {'model':<22} {'mentions ' + CATEGORY:>14} {'grammatical':>12}   sample "
          "(temperature 1)")
    print(f"    {'base, no prompt':<22} {b['mention']:>14.1%} {b['grammatical']:>12.1%}   "
          f"{b['examples'][0]}")
    summary = {}
    for init in LANG_INITS:
        rs = [r for r in lang["runs"] if r["init"] == init]
        mention = [r["after"]["mention"] for r in rs]
        gram = [r["after"]["grammatical"] for r in rs]
        print(f"    {'prompt, ' + init + ' init':<22} {spread(mention, True):>14} "
              f"{spread(gram, True):>12}   "
              f"{rs[0]['after']['examples'][0]}")
        summary[init] = {"mention": mention, "grammatical": gram}
    r0 = lang["runs"][0]
    print(f"\n    Nearest words (cosine) of each learned virtual token: {r0['init']} init, seed "
          f"{r0['seed']}")
    for i, (ids, sims) in enumerate(zip(r0["learned"]["ids"], r0["learned"]["sims"])):
        near = ", ".join(f"{tok.itos[j]} {s:.2f}" for j, s in zip(ids, sims))
        print(f"      p{i}: {near}")
    print(f"\n    Reading the vectors through the vocabulary (k={K}; mean ± spread over seeds "
          f"{[r['seed'] for r in lang['runs'] if r['init'] == LANG_INITS[0]]})\n")
    print(f"    {'vectors':<26} {'purity':>12} {'max cosine':>12} {CATEGORY + ' share':>12} "
          f"{'|p|':>6}")
    chance_purity = f"{chance['mean']:.2f} ± {chance['std']:.2f}"
    print(f"    {'random (' + str(len(RANDOM_SEEDS)) + ' draws)':<26} "
          f"{chance_purity:>12} {chance['max_cos']:>12.2f} "
          f"{chance['category_share']:>12.2f} {'':>6}")
    for init in LANG_INITS:
        rs = [r for r in lang["runs"] if r["init"] == init]
        for label, key in (("init", "initial"), ("learned", "learned")):
            print(f"    {init + ' init, ' + label:<26} {spread([r[key]['purity'] for r in rs]):>12}"
                  f" {spread([r[key]['max_cos'] for r in rs]):>12}"
                  f" {spread([r[key]['category_share'] for r in rs]):>12}"
                  + (f" {np.mean([r['norm'] for r in rs]):>6.2f}" if key == "learned" else ""))
        summary[init].update({k: [r["learned"][k] for r in rs]
                              for k in ("purity", "max_cos", "category_share")})
        summary[init]["init_purity"] = [r["initial"]["purity"] for r in rs]
        summary[init]["init_max_cos"] = [r["initial"]["max_cos"] for r in rs]
    print(f"    (a word's own embedding has cosine 1.00 with itself; mean word norm "
          f"{lang['word_norm']:.2f}; purity = share of the most common category among the "
          f"{K} nearest content words)")
    return summary


# --------------------------------------------------------------------------- the figure
def save_figure(marker_rows, lat, fwd, lang_summary, chance, path: Path,
                noise: float) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    names = list(marker_rows)
    ys = np.arange(len(names))
    ax.barh(ys - 0.2, [marker_rows[n]["exact_match"] for n in names], 0.4, label="exact match")
    ax.barh(ys + 0.2, [marker_rows[n]["token_acc"] for n in names], 0.4, label="answer tokens")
    ax.set_yticks(ys, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"held-out accuracy, <{MARKER}> rows reversed")
    ax.legend(fontsize=8)
    ax.set_title(f"(a-c) Teaching <{MARKER}> to trigger '{SKILL}'")

    ax = axes[1]
    names = list(lat)
    ys = np.arange(len(names))
    ax.barh(ys - 0.2, [100 * (fwd[n] / fwd["base"] - 1) for n in names], 0.4,
            color="tab:orange", label="batched forward (prefill, training)")
    ax.barh(ys + 0.2, [100 * (lat[n] / lat["base"] - 1) for n in names], 0.4,
            color="tab:purple", label="per generated token (KV cache)")
    ax.axvline(0, color="k", lw=1)
    ax.axvspan(-100 * noise, 100 * noise, color="gray", alpha=0.25,
               label="noise: twice the base-vs-itself gap")
    ax.set_yticks(ys, names)
    ax.invert_yaxis()
    ax.set_xlabel("time vs the base model, % (best of interleaved rounds)")
    inside = sum(abs(lat[n] / lat["base"] - 1) <= noise for n in names)
    ax.set_title(f"(d) The cost of n extra positions\n({inside} of {len(names)} per-token "
                 "times inside the grey noise band)")
    ax.legend(fontsize=8)

    ax = axes[2]
    groups = [("random\nvectors", [chance["mean"]], chance["std"])]
    for init, s in lang_summary.items():
        groups.append((f"{init} init\n(before)", s["init_purity"], np.std(s["init_purity"])))
        groups.append((f"{init} init\n(learned)", s["purity"], np.std(s["purity"])))
    ax.bar(range(len(groups)), [np.mean(g[1]) for g in groups],
           yerr=[g[2] for g in groups], capsize=4,
           color=["tab:gray"] + ["tab:blue", "tab:green"] * len(lang_summary))
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"neighbour purity (k={K})")
    ax.set_title(f"(e) Do learned vectors' nearest words cluster\nby category? "
                 f"('{CATEGORY}' prompt, mean ± spread)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny quick base, few steps")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    quick, seed = args.quick, args.seed
    kind = "quick" if quick else "default"
    steps, batch = (QUICK_STEPS, QUICK_BATCH) if quick else (STEPS, BATCH)
    n_eval = QUICK_EVAL if quick else EVAL_EXAMPLES
    progress = not quick
    print(f"Lesson 08: soft prompts ({kind} base, backend {bk.name}, seed {seed})")
    base, info = load_base(kind, seed=seed, progress=progress)
    cfg, tasks = base.config, list(info["tasks"])
    state = {k: v.copy() for k, v in base.state_dict().items()}
    mix = TaskMixture([SKILL], seed=1000 + seed, length=info["length"])
    mix_a = TaskMixture(tasks, seed=2000 + seed, length=info["length"])
    x_e, y_e = swap_marker(*mix.eval_set(SKILL, n_eval), SKILL, MARKER)

    def sample(b):
        return swap_marker(*mix.sample(b), SKILL, MARKER)

    # ------------------------------------------------------------------ (a) prompt tuning
    before_new = evaluate_lm(base, x_e, y_e)["exact_match"]
    before_tok = token_accuracy(base, x_e, y_e)
    before_own = evaluate_lm(base, *mix.eval_set(SKILL, n_eval))["exact_match"]
    m_id = STOI[f"<{MARKER}>"]
    ids, sims = nearest_tokens(base.tok_emb.weight.data[m_id:m_id + 1], base.tok_emb.weight.data,
                               5)
    marker_near = [(VOCAB[j], float(c)) for j, c in zip(ids[0], sims[0]) if j != m_id][:4]
    print(f"\n(a) Prompt tuning: <{MARKER}> + letters should be reversed. The base reverses "
          f"<{SKILL}> rows {before_own:.1%}\n    of the time and <{MARKER}> rows "
          f"{before_new:.1%} ({before_tok:.1%} of answer tokens). {steps} steps each, lr "
          f"{LR['prompt']:.0e}, batch {batch}.")
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
        model = fresh(cfg, state, pcfg, seed)
        step0 = token_accuracy(model, x_e, y_e)
        result = fit(model, sample, steps, batch, LR["prompt"], progress, name)
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

    # ------------------------------------------------------------------ (b) prefix tuning
    pre = fresh(cfg, state, PrefixTuningConfig(PREFIX_N, reparameterize=True,
                                               hidden=PREFIX_HIDDEN), seed)
    trained_n = pre.num_parameters(trainable_only=True)
    fit(pre, sample, steps, batch, LR["prefix"], progress, "prefix (MLP)")
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
    print(f"\n(b) Prefix tuning, n={PREFIX_N} keys and values per layer, trained through an MLP "
          f"(hidden {PREFIX_HIDDEN}), lr {LR['prefix']:.0e}:\n    <{MARKER}> rows reversed "
          f"{pre_em['exact_match']:.1%}, answer tokens {pre_em['token_acc']:.1%} (eval loss "
          f"{pre_em['loss']:.3f}). Collapse the MLP into "
          f"the table it computes:")
    print(f"    {'':<18} {'numbers':>8} {'file':>10}\n"
          f"    {'with the MLP':<18} {trained_n:>8,} {bytes_mlp / 1024:>8.1f} KiB\n"
          f"    {'collapsed table':<18} {collapse['kept']:>8,} {bytes_table / 1024:>8.1f} KiB"
          f"   (n x layers x 2 x C = {PREFIX_N * cfg.n_layer * 2 * cfg.n_embd:,})")
    print(f"    max |logit difference| before/after collapse: {collapse['max_logit_diff']:.1e}; "
          f"generated tokens identical: {collapse['same_tokens']}")
    rows[f"prefix n={PREFIX_N} (collapsed)"] = {"trainable": collapse["kept"],
                                                "exact_match": pre_em["exact_match"],
                                                "token_acc": pre_em["token_acc"],
                                                "loss": pre_em["loss"]}

    # ------------------------------------------------------------------ (c) embedding only
    emb = fresh(cfg, state, embedding_only(), seed)
    fit(emb, sample, steps, batch, LR["embedding"], progress, "embeddings")
    emb_em = evaluate_lm(emb, x_e, y_e)
    rows["embedding-only"] = {"trainable": emb.num_parameters(trainable_only=True),
                              "exact_match": emb_em["exact_match"], "loss": emb_em["loss"],
                              "token_acc": token_accuracy(emb, x_e, y_e)}
    W0 = state["tok_emb.weight"]
    W1 = bk.to_numpy(emb.base_model.tok_emb.weight.data)
    moved = np.linalg.norm(W1 - W0, axis=1)                       # (V,) how far each row moved
    top = np.argsort(-moved)[:3]
    compare = {f"vocab n={INIT_N}": models[f"vocab n={INIT_N}"], best: models[best],
               f"prefix n={PREFIX_N}": pre, "embedding-only": emb}
    kept = {"base": skills_kept(base, mix_a, tasks, n_eval)}
    kept.update({n: skills_kept(m, mix_a, tasks, n_eval) for n, m in compare.items()})
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
        em = before_new if name == "base" else evaluate_lm(compare[name], x_e, y_e)["exact_match"]
        print(f"    {name:<24} {tr:>9} {em:>10.1%} "
              + " ".join(f"{kept[name][t]:>8.1%}" for t in tasks))
    mean_kept = {n: float(np.mean(list(v.values()))) for n, v in kept.items()}
    broke = [n for n in compare if mean_kept[n] < mean_kept["base"] - 0.1]
    print("    Every input reads the prompt, so a prompt also acts on the markers the base "
          "already knows. Embedding-only\n    could in principle change the <" + MARKER
          + "> row alone, but every row moved.\n    Old skills (mean) fell by more than 10 "
          "points for: " + (", ".join(f"{n} ({mean_kept['base']:.0%} -> {mean_kept[n]:.0%})"
                                 for n in broke) or "none") + ".")

    # ------------------------------------------------------------------ (d) inference cost
    one = bk.asarray(x_e[:1, :int(np.argmax(y_e[0] != -100)) + 1])          # (1, T) up to '='
    batch_x = bk.asarray(x_e[:FORWARD_BATCH])                               # (B, block) rows
    base_again = GPT(cfg)
    base_again.load_state_dict(state)
    timed = {"base": base, "base (again)": base_again, "embedding-only": emb,
             **{f"prompt n={n}": models[f"vocab n={n}"] for n in LENGTHS},
             f"prefix n={PREFIX_N}": pre}
    rounds = QUICK_GEN_ROUNDS if quick else GEN_ROUNDS
    gen_med, gen = interleaved_ms(
        {n: (lambda m=m: generate(m, one, new_tokens)) for n, m in timed.items()}, rounds, seed)
    lat = {n: v / new_tokens for n, v in gen.items()}                       # ms per token
    lat_med = {n: v / new_tokens for n, v in gen_med.items()}
    flops = {}
    for name, m in timed.items():                 # matmul FLOPs of the batched forward, counted
        counters.clear()
        forward_no_grad(m, batch_x)
        flops[name] = counters["matmul_flops"]
    fwd_med, fwd = interleaved_ms(
        {n: (lambda m=m: forward_no_grad(m, batch_x)) for n, m in timed.items()}, rounds, seed)
    noise = max(abs(lat["base (again)"] / lat["base"] - 1), abs(fwd["base (again)"] / fwd["base"]
                                                                 - 1))
    T, Tb = one.shape[1], batch_x.shape[1]
    extra = {n: 0 for n in timed} | {f"prefix n={PREFIX_N}": PREFIX_N} | {
        f"prompt n={n}": n for n in LENGTHS}
    print(f"\n(d) Inference cost of the extra length ({rounds} interleaved rounds; best = "
          f"fastest round, median in brackets).\n    generate: {new_tokens} tokens after a "
          f"{T}-token input, KV cache, batch 1. forward: {FORWARD_BATCH} rows of {Tb} tokens, "
          "no cache.\n")
    print(f"    {'model':<16} {'ms/token':>9} {'vs base':>8} {'(median)':>9} {'forward ms':>11} "
          f"{'vs base':>8} {'(median)':>9} {'MFLOPs':>7} {'positions':>10} {'keys, last':>11} "
          f"{'longest input':>14}")
    for name in timed:
        n = extra[name]
        positions = Tb + (n if name.startswith("prompt") else 0)
        print(f"    {name:<16} {lat[name]:>9.3f} {lat[name] / lat['base'] - 1:>+8.1%} "
              f"{lat_med[name] / lat_med['base'] - 1:>+9.1%} {fwd[name]:>11.2f} "
              f"{fwd[name] / fwd['base'] - 1:>+8.1%} {fwd_med[name] / fwd_med['base'] - 1:>+9.1%}"
              f" {flops[name] / 1e6:>7.1f} {positions:>10} {T + new_tokens - 1 + n:>11} "
              f"{cfg.block_size - n:>14}")
    big = f"prompt n={max(LENGTHS)}"
    gen_cost, fwd_cost = lat[big] / lat["base"] - 1, fwd[big] / fwd["base"] - 1
    print(f"    Measured for {big}: {fwd_cost:+.0%} time and {flops[big] / flops['base'] - 1:+.0%}"
          f" matmul FLOPs in the batched forward (prefill and training pay this);\n    "
          f"{gen_cost:+.1%} per generated token, "
          + ("within the noise: with a KV cache, attending to a few more keys is cheap at this "
             "size." if abs(gen_cost) <= max(2 * noise, 0.03) else "beyond the noise."))
    print(f"    (the base timed twice differs by up to {noise:.1%} (best): that much is noise.)\n"
          "    Prompt vectors run through every layer, like n more input tokens; a prefix is "
          "already keys and values,\n    so it skips that work, but every token still attends "
          "to n more keys, and n positions of the context are spent.")

    # ------------------------------------------------------------------ (e) language base
    lang = language_part(QUICK_LANG_SEEDS if quick else LANG_SEEDS,
                         QUICK_LANG_STEPS if quick else LANG_STEPS, batch,
                         QUICK_LANG_SAMPLES if quick else LANG_SAMPLES, progress, quick)
    summary = print_language(lang)
    chance = lang["chance"]

    # ------------------------------------------------------------------ verdicts
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
    steer = {i: np.mean(s["mention"]) for i, s in summary.items()}
    print(f"    On the language base the prompt raised '{CATEGORY}' mentions from "
          f"{lang['before']['mention']:.0%} to "
          + ", ".join(f"{v:.0%} ({i} init)" for i, v in steer.items())
          + f"; grammatical sentences {lang['before']['grammatical']:.0%} -> "
          + ", ".join(f"{np.mean(s['grammatical']):.0%}" for s in summary.values()) + ".")
    learned_max = {i: max(s["max_cos"]) for i, s in summary.items()}
    init_max = {i: max(s["init_max_cos"]) for i, s in summary.items()}
    purity = {i: np.asarray(s["purity"]) for i, s in summary.items()}
    above = {i: p.mean() > chance["mean"] + 2 * chance["std"] for i, p in purity.items()}
    share = {i: np.mean(s["category_share"]) for i, s in summary.items()}
    thr = chance["match"]
    none_match = {i: m < thr for i, m in learned_max.items()}
    print(f"  Row 11 'learned vectors match no vocabulary token' (a match: cosine >= {thr:.2f}, "
          f"the median cosine\n    between a word and its nearest other word; random vectors "
          f"reach {chance['max_cos']:.2f}): largest cosine of any learned vector with any word: "
          + "; ".join(f"{i} init {m:.2f} (at init {init_max[i]:.2f}), "
                      f"{'held' if none_match[i] else 'did not hold'}"
                      + (", though closer to a word than random vectors come"
                         if m > chance["max_cos"] else "")
                      for i, m in learned_max.items())
          + ".")
    print(f"    Task base, part (a): the best prompt ({best}) has largest cosine {best_cos:.2f} "
          f"(with {best_sym}) vs the symbols'\n    own nearest-neighbour median {task_thr:.2f}: "
          + ("it sits on a symbol, so the claim did not hold there." if best_cos >= task_thr
             else "it matches no symbol, so the claim held there."))
    clustered = chance["mean"] > 0.8
    related = {i: np.mean(s["category_share"]) - np.std(s["category_share"])
               > chance["category_share"] + 2 * chance["share_sd"] for i, s in summary.items()}
    print("  Row 11 'their nearest neighbours cluster (by meaning)': purity among the k nearest "
          "content words "
          + ", ".join(f"{spread(p)} ({i} init; init {spread(summary[i]['init_purity'])})"
                      for i, p in purity.items())
          + f"\n    vs random vectors {chance['mean']:.2f} ± {chance['std']:.2f} (with function "
          f"words allowed in the list, random vectors scored {chance['any_word_mean']:.2f}): "
          + ("above chance (mean > random + 2 sd) for "
             + ", ".join(i for i in above if above[i]) if any(above.values())
             else "NOT above chance for any init")
          + "."
          + (" Random directions already land among one category's words\n    (chance above "
             "0.8): purity alone cannot tell a learned prompt from noise here." if clustered
             else "")
          + f"\n    Task-related? The share of '{CATEGORY}' words among the {K} nearest words is "
          + ", ".join(f"{spread(summary[i]['category_share'])} ({i} init)" for i in share)
          + f" vs {chance['category_share']:.2f} ± {chance['share_sd']:.2f} for random vectors: "
          + (("above chance (mean - sd > random + 2 sd) for "
              + ", ".join(i for i in related if related[i])) if any(related.values())
             else "NOT above chance for any init")
          + ".")

    out_dir = Path(os.environ.get("MINIPEFT_LESSON_OUT") or Path(__file__).resolve().parent / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / OUT_NAME
    save_figure(rows, lat, fwd, summary, chance, path, max(2 * noise, 0.03))
    seconds = time.perf_counter() - start
    print(f"\n    figure saved to {path}  ({seconds:.0f} s in all)")
    lang_out = {k: v for k, v in lang.items() if k != "tok"}
    for r in lang_out["runs"]:
        for key in ("learned", "initial"):
            r[key] = {k: v for k, v in r[key].items() if k not in ("ids", "sims")}
    return {"kind": kind, "before_new": before_new, "before_tok": before_tok,
            "before_own": before_own, "rows": rows,
            "best": best, "per_position": per_pos, "collapse": collapse, "kept": kept,
            "latency_ms": lat, "forward_ms": fwd, "forward_flops": flops,
            "latency_median_ms": lat_med,
            "forward_median_ms": fwd_med, "noise": noise, "language": lang_out,
            "best_cos": best_cos, "task_threshold": task_thr, "none_match": none_match,
            "related": related, "above_chance": above,
            "summary": summary,
            "figure": str(path), "seconds": seconds}


if __name__ == "__main__":
    main()
