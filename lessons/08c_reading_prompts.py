"""Lesson 08c: what do learned soft prompts mean? Reading them through the vocabulary.

A soft prompt (Lester et al. 2021; lesson 08a) is n trained vectors P (n, C) placed in front of
the input's embeddings of a frozen model. They live in the same space as the token embeddings
E (V, C), so one can ask which words they sit near::

    cos(p, e_w) = p · e_w / (|p| |e_w|)      nearest words of p = the top k over w

The article claims two things about them (rows 11 of the claims): the learned vectors match no
vocabulary token, yet their nearest neighbours form tight, task-related clusters. Both need a
reference. "Match": a vector at least as close to a word as words are to each other (the median
cosine between a word and its nearest other word, measured on this embedding). "Cluster": the
category purity of the k nearest content words, against random vectors drawn with the
embedding's own mean and spread (which already land among one category more often than one
would guess), and the share of the task's own category among the neighbours.

The task needs words with meanings, so this lesson uses the "language" base: a GPT pretrained on
a synthetic language whose words have known categories (animals, foods, times, ...).

    (e1) steer: train a prompt (random and vocab init, several seeds) on sentences that mention
         a time ("in the morning"), and measure how often free generation then mentions one.
    (e2) read: the learned vectors' nearest words, their purity, largest cosine and time-word
         share, next to random vectors and to the vectors they started from.

Then the verdicts, each against the random vectors' level and the seeds' spread.

Run:  python lessons/08c_reading_prompts.py [--quick] [--seed N]
(--seed N shifts the prompts' seeds to N + LANG_SEEDS; the language base is always the cached
seed-0 one.)
"""

from __future__ import annotations

import dataclasses

import matplotlib

matplotlib.use("Agg")  # render to a file; no display needed
import matplotlib.pyplot as plt
import numpy as np  # host-side only: data rows, tables and the figure

from minipeft import backend as bk
from minipeft import lessonkit
from minipeft.base import RECIPES, load_base, pretrain
from minipeft.data import (
    CATEGORIES,
    TEMPLATES,
    WordTokenizer,
    cluster_purity,
    generate_corpus,
)
from minipeft.data.language import MAX_SENTENCE_TOKENS
from minipeft.experiment import method_specs
from minipeft.nn import generate
from minipeft.peft import (
    PromptTuningConfig,
    get_peft_model,
    nearest_tokens,
    neighbour_purity,
    random_baseline,
)
from minipeft.train import TrainConfig, train

CATEGORY = "time"                       # steer the language model toward this category
LANG_N, LANG_INITS = 8, ("random", "vocab")
LANG_SEEDS, QUICK_LANG_SEEDS = (0, 1, 2), (0,)
LANG_STEPS, QUICK_LANG_STEPS = 300, 20
BATCH, QUICK_BATCH = 32, 16
LR = method_specs()["prompt16"].lr
LANG_SAMPLES, QUICK_LANG_SAMPLES = 300, 40   # sentences sampled to score steering
# --quick: a small language model pretrained on the spot (~3 s) instead of the cached base
QUICK_LANGUAGE = dataclasses.replace(RECIPES["language"], n_embd=32, steps=150, batch_size=32,
                                     eval_examples=32)
K = 5                                   # nearest words per virtual token
# A vector "matches" a token when it is closer to it than tokens are to each other: its cosine
# reaches the median, over the vocabulary, of each row's cosine with its nearest other row
# (``match_threshold``), measured on each embedding rather than fixed.
RANDOM_SEEDS = (0, 1, 2, 3, 4)          # random vectors for the chance level
FIGURE = "08c_reading_prompts.png"


# --------------------------------------------------------------------------- (e1) steer
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


def spread(values, pct: bool = False) -> str:
    """mean ± standard deviation over seeds (just the mean for one seed)."""
    v = np.asarray(values, dtype=float)
    f = (lambda a: f"{a:.1%}") if pct else (lambda a: f"{a:.2f}")
    return f"{f(v.mean())} ± {f(v.std())}" if len(v) > 1 else f(v.mean())


def steer(lang: dict, seeds, steps: int, batch: int, n_samples: int,
          progress: bool) -> list:
    """(e1) Train a prompt per init and seed on sentences that mention a time; how often do
    sampled sentences mention one afterwards, and are they still grammatical?"""
    base, tok = lang["base"], lang["tok"]
    words = set(CATEGORIES[CATEGORY])
    before = steering_scores(base, tok, n_samples, seed=0)
    runs = []
    for init in LANG_INITS:
        for seed in seeds:
            corpus = [s for s in generate_corpus(20_000, 100 + seed) if words & set(s.split())]
            X, Y = sentence_rows(corpus, tok)
            rng = bk.host_rng([seed, 7])

            def sample(b, X=X, Y=Y, rng=rng):
                i = rng.integers(0, len(X), size=b)
                return X[i], Y[i]

            model = get_peft_model(lessonkit.fresh_copy(base), PromptTuningConfig(LANG_N, init),
                                   seed=seed)
            P0 = bk.to_numpy(model.base_model.prompt_encoder.adapters.default.embedding.data)
            P0 = P0.copy()
            cfg = TrainConfig(steps=steps, batch_size=batch, lr=LR, progress=progress,
                              desc=f"{CATEGORY} prompt {init} s{seed}")
            result = train(model, sample, cfg)
            P = bk.to_numpy(model.base_model.prompt_encoder.adapters.default.embedding.data)
            runs.append({"init": init, "seed": seed, "loss": result.losses,
                         "after": steering_scores(model, tok, n_samples, seed=0),
                         "P": P, "P0": P0,                   # read in part (e2)
                         "moved": float(np.linalg.norm(P - P0, axis=1).mean()),
                         "norm": float(np.linalg.norm(P, axis=1).mean())})
    which = " (quick: a small one pretrained here)" if lang["quick"] else ""
    print(f"\n(e) The language base{which}: steer free generation toward '{CATEGORY}' words "
          f"({', '.join(CATEGORIES[CATEGORY])})")
    print(f"    Every template names an animal, so 'mention an animal' could not be steered: "
          f"only {sum('{time}' in t for t in TEMPLATES)} of {len(TEMPLATES)}\n    templates "
          f"hold a {CATEGORY} word. The prompt ({LANG_N} virtual tokens) trains on "
          f"{len(corpus):,} sentences that contain one.\n")
    print(f"    {'model':<22} {'mentions ' + CATEGORY:>14} {'grammatical':>12}   sample "
          "(temperature 1)")
    print(f"    {'base, no prompt':<22} {before['mention']:>14.1%} "
          f"{before['grammatical']:>12.1%}   {before['examples'][0]}")
    for init in LANG_INITS:
        rs = [r for r in runs if r["init"] == init]
        print(f"    {'prompt, ' + init + ' init':<22} "
              f"{spread([r['after']['mention'] for r in rs], True):>14} "
              f"{spread([r['after']['grammatical'] for r in rs], True):>12}   "
              f"{rs[0]['after']['examples'][0]}")
    lang.update(before=before, runs=runs, corpus_size=len(corpus))
    return runs


# --------------------------------------------------------------------------- (e2) read
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


def chance_level(E, tok) -> dict:
    """What random vectors (drawn with the embedding's own mean and spread per dimension) score
    on every reading: the level a learned prompt must beat."""
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
    return chance


def read(lang: dict) -> dict:
    """(e2) The learned vectors through the vocabulary: the first run's nearest words, then
    purity, largest cosine and time-word share per init (mean ± spread over seeds), beside
    random vectors and the init. Returns the per-init summary the verdicts read."""
    runs, tok, E = lang["runs"], lang["tok"], lang["E"]
    chance = lang["chance"] = chance_level(E, tok)
    for r in runs:
        r["learned"], r["initial"] = read_vectors(r["P"], E, tok), read_vectors(r["P0"], E, tok)
    summary = {init: {"mention": [r["after"]["mention"] for r in runs if r["init"] == init],
                      "grammatical": [r["after"]["grammatical"] for r in runs
                                      if r["init"] == init]} for init in LANG_INITS}
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


# --------------------------------------------------------------------------- verdicts
def verdicts(lang: dict, summary: dict) -> dict:
    """Row 8 on the language base, and both halves of row 11, each chosen by the numbers
    printed beside it: random vectors' level, two standard deviations, the seeds' spread."""
    chance = lang["chance"]
    print("\nVerdicts (measured here):")
    steer = {i: np.mean(s["mention"]) for i, s in summary.items()}
    print(f"  Row 8 'soft prompts: trainable vectors added to the prompt embeddings, model "
          f"frozen':\n    On the language base the prompt raised '{CATEGORY}' mentions from "
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
    return {"none_match": none_match, "related": related, "above_chance": above}


# --------------------------------------------------------------------------- the figure
def figure(summary: dict, chance: dict):
    fig, ax = plt.subplots(figsize=(7, 5))
    groups = [("random\nvectors", [chance["mean"]], chance["std"])]
    for init, s in summary.items():
        groups.append((f"{init} init\n(before)", s["init_purity"], np.std(s["init_purity"])))
        groups.append((f"{init} init\n(learned)", s["purity"], np.std(s["purity"])))
    ax.bar(range(len(groups)), [np.mean(g[1]) for g in groups],
           yerr=[g[2] for g in groups], capsize=4,
           color=["tab:gray"] + ["tab:blue", "tab:green"] * len(summary))
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"neighbour purity (k={K})")
    ax.set_title(f"(e) Do learned vectors' nearest words cluster\nby category? "
                 f"('{CATEGORY}' prompt, mean ± spread)")
    return fig


def main(argv=None) -> dict:
    args = lessonkit.arguments(__doc__, quick="a small language model, few steps and seeds")
    args = args.parse_args(argv)
    clock = lessonkit.Stopwatch()
    kind = "quick" if args.quick else "default"
    print(f"Lesson 08c: reading soft prompts ({kind} base, backend {bk.name}, seed {args.seed})")
    if args.quick:
        base, _ = pretrain(QUICK_LANGUAGE, seed=0, progress=False)
    else:
        base, _ = load_base("language", progress=True)
    E = bk.to_numpy(base.tok_emb.weight.data).copy()                # (V, C) frozen vocabulary
    lang = {"base": base, "tok": WordTokenizer(), "E": E, "quick": args.quick,
            "word_norm": float(np.linalg.norm(E, axis=1).mean())}
    steer(lang, tuple(args.seed + s for s in (QUICK_LANG_SEEDS if args.quick else LANG_SEEDS)),
          QUICK_LANG_STEPS if args.quick else LANG_STEPS, QUICK_BATCH if args.quick else BATCH,
          QUICK_LANG_SAMPLES if args.quick else LANG_SAMPLES, not args.quick)
    summary = read(lang)
    found = verdicts(lang, summary)
    path = lessonkit.save_figure(figure(summary, lang["chance"]), FIGURE)
    print(f"\n    figure saved to {path}  ({clock.seconds():.0f} s in all)")
    keep = ("before", "chance", "word_norm", "corpus_size", "quick")
    language = {k: lang[k] for k in keep} | {"runs": [
        {k: v for k, v in r.items() if k not in ("P", "P0")} | {
            key: {k: v for k, v in r[key].items() if k not in ("ids", "sims")}
            for key in ("learned", "initial")} for r in lang["runs"]]}
    return {"kind": kind, "language": language, **found, "summary": summary,
            "figure": str(path), "seconds": clock.seconds()}


if __name__ == "__main__":
    main()
