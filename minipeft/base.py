"""The pretrained base model every lesson adapts: trained here, once, and cached.

PEFT needs a model that already knows something. Ours learns "task A", a mixture of synthetic
skills (copy, reverse, a substitution cipher, ...) from ``minipeft.data.tasks``, in a few
minutes on a laptop CPU. It is then cached under ``~/.cache/minipeft`` (or ``$MINIPEFT_CACHE``),
keyed by its recipe and seed, so the next lesson loads it in milliseconds.

    model, info = load_base()              # the default base (pretrains on first use)
    model, info = load_base("quick")       # a tiny one for smoke tests, ready in seconds
    model, info = load_base("text")        # a character-level GPT on the synthetic language
    model, info = load_base("shakespeare") # real text: 34 plays in BPE (minipeft.data.domains)

The "shakespeare" base (and its tiny twin "shakespeare_quick") learns real English: the
training plays of :mod:`minipeft.data.corpus` in the byte-level BPE of
:mod:`minipeft.data.domains`; ``info`` holds its held-out losses on plays and code in nats per
token, nats and bits per character, the unigram baseline, three samples and the fraction of
their words found in the plays. It is what ``minipeft finetune --text FILE`` and the real-text
study (:mod:`minipeft.realtext`) adapt. Measured once (seed 0, 2500 steps, 1.07 M parameters):
held-out plays 1.509 nats/char (unigram baseline 2.270), 84% of sampled words in the corpus;
282 s from an empty cache (the BPE included) on a quiet 2-core machine.

The "text" base is the other exception to task A: a character-level GPT over a fixed vocabulary
(``CharTokenizer.ascii()``: newline, printable ASCII, one unknown id), pretrained on the
synthetic language of ``minipeft.data.language`` written out as plain sentences. It is what
``minipeft finetune --text FILE`` adapted before the Shakespeare base. It knows only that
language's lowercase words, capitals at sentence starts, spaces, full stops and newlines.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from minipeft import backend as bk
from minipeft.data import (
    VOCAB,
    CharTokenizer,
    LanguageStream,
    TaskMixture,
    TextDataset,
    WordTokenizer,
    language_text,
)
from minipeft.data.domains import BPE_VOCAB, code_domain, corpus_tokenizer, shakespeare_domain
from minipeft.io import CheckpointError, load_json, load_model, save_json, save_model
from minipeft.nn import GPT, GPTConfig, generate
from minipeft.train import TrainConfig, evaluate_lm, train

RECIPE_VERSION = 2  # bump when the training code changes what a recipe produces
np = bk.np          # host numpy, for the unigram baseline


@dataclass(frozen=True)
class BaseRecipe:
    tasks: tuple            # task A: the skills the base model learns
    length: int             # input length of each task example (minipeft.data.tasks); for
                            # "language" and "text", the width of a training window
    n_layer: int
    n_head: int
    n_embd: int
    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50
    eval_examples: int = 500  # held-out examples per task for the reported exact match
    spare_context: int = 32   # room beyond the task length for soft prompts and prefixes
    bpe_vocab: int = 0        # "shakespeare": the BPE vocabulary (minipeft.data.domains)

    def gpt_config(self) -> GPTConfig:
        if self.tasks == ("language",):
            vocab, block = WordTokenizer().vocab_size, self.length
        elif self.tasks == ("text",):
            vocab, block = CharTokenizer.ascii().vocab_size, self.length
        elif self.tasks == ("shakespeare",):
            vocab, block = self.bpe_vocab, self.length
        else:
            vocab = len(VOCAB)
            block = TaskMixture(list(self.tasks), seed=0, length=self.length).block_size
        return GPTConfig(vocab_size=vocab, block_size=block + self.spare_context,
                         n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd)


RECIPES = {
    "default": BaseRecipe(tasks=("copy", "reverse", "cipher", "count"), length=8, n_layer=2,
                          n_head=4, n_embd=128, steps=1200),
    "quick": BaseRecipe(tasks=("copy", "reverse"), length=4, n_layer=2, n_head=4, n_embd=32,
                        steps=900, lr=5e-3, warmup=20, eval_examples=200),
    # the synthetic language of minipeft.data.language (length = sequence width), whose word
    # categories let the soft-prompt lesson score what learned vectors are near
    "language": BaseRecipe(tasks=("language",), length=24, n_layer=2, n_head=4, n_embd=64,
                           steps=600, eval_examples=256),
    # a character-level GPT (97-token ASCII vocabulary, 64-character windows) pretrained on that
    # language as plain text, for `minipeft finetune --text FILE` (eval_examples = held-out
    # sentences)
    "text": BaseRecipe(tasks=("text",), length=64, n_layer=2, n_head=4, n_embd=64,
                       steps=1000, batch_size=32, eval_examples=1000),
    # Shakespeare's plays in byte-level BPE (minipeft.data.domains; length = window in tokens,
    # eval_examples = held-out windows). The schedule is the probe's (EXPERIMENT-NOTES: warm-up
    # and cosine to 10% beat a constant lr by 0.85 nats/char). Steps: one step took 91-109 ms
    # of CPU time on one core (measured while other jobs shared the machine), so 2500 steps
    # are about 4 minutes of one core, plus ~15 s to train the tokenizer and encode the corpora:
    # within 5 minutes on a quiet 2-core machine.
    "shakespeare": BaseRecipe(tasks=("shakespeare",), length=64, n_layer=4, n_head=4,
                              n_embd=128, steps=2500, batch_size=12, lr=2e-3, warmup=50,
                              eval_examples=400, spare_context=32, bpe_vocab=BPE_VOCAB),
    # the same corpus and tokenizer on a tiny model, for tests and --quick (seconds)
    "shakespeare_quick": BaseRecipe(tasks=("shakespeare",), length=32, n_layer=2, n_head=2,
                                    n_embd=48, steps=300, batch_size=16, lr=4e-3, warmup=20,
                                    eval_examples=64, spare_context=16, bpe_vocab=BPE_VOCAB),
}


def cache_dir() -> Path:
    """Where base models live: ``$MINIPEFT_CACHE`` or ``~/.cache/minipeft``."""
    return Path(os.environ.get("MINIPEFT_CACHE", Path.home() / ".cache" / "minipeft"))


def recipe_key(kind: str, recipe: BaseRecipe, seed: int) -> str:
    fields = asdict(recipe)
    if not fields["bpe_vocab"]:
        del fields["bpe_vocab"]   # recipes from before the field keep their cache keys
    blob = json.dumps({"recipe": fields, "seed": seed, "v": RECIPE_VERSION}, sort_keys=True)
    return f"base-{kind}-s{seed}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def pretrain(recipe: BaseRecipe, seed: int = 0, progress: bool = True) -> tuple[GPT, dict]:
    """Train a base model from scratch on the recipe's data; returns (model, info)."""
    if recipe.tasks == ("language",):
        stream = LanguageStream(seed, recipe.length)
        sample = stream.sample
        evals = {"language": LanguageStream(seed + 10_000, recipe.length)
                 .sample(recipe.eval_examples)}
    elif recipe.tasks == ("text",):
        sample, evals = _text_data(recipe, seed)
    elif recipe.tasks == ("shakespeare",):
        return _pretrain_shakespeare(recipe, seed, progress)
    else:
        mix = TaskMixture(list(recipe.tasks), seed=seed, length=recipe.length)
        sample = mix.sample
        evals = {t: mix.eval_set(t, recipe.eval_examples) for t in recipe.tasks}
    model = GPT(recipe.gpt_config(), seed=seed)
    cfg = TrainConfig(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                      warmup=recipe.warmup, progress=progress, desc="pretraining base")
    result = train(model, sample, cfg)
    scores = {t: evaluate_lm(model, x, y) for t, (x, y) in evals.items()}
    info = {"tasks": list(recipe.tasks), "length": recipe.length, "seed": seed,
            "seconds": round(result.seconds, 1), "final_loss": result.final_loss,
            "steps": recipe.steps, "losses": result.losses,
            # (not for text: a whole 64-character window right is no useful score there)
            "exact_match": {t: s["exact_match"] for t, s in scores.items() if t != "text"},
            "eval_loss": {t: s["loss"] for t, s in scores.items()},
            "num_parameters": model.num_parameters(), "recipe": asdict(recipe)}
    return model, info


def _text_data(recipe: BaseRecipe, seed: int):
    """The "text" recipe's data: random windows of a corpus of ``steps * batch_size`` sentences
    (about 38 characters each, so with 64-character windows training reads each character
    1.7 times on average), and consecutive windows of ``eval_examples`` held-out sentences
    (another seed) as the evaluation set."""
    tok = CharTokenizer.ascii()
    corpus = tok.encode(language_text(recipe.steps * recipe.batch_size, seed))
    held_out = tok.encode(language_text(recipe.eval_examples, seed + 10_000))
    sample = TextDataset(corpus, recipe.length, seed).sample
    return sample, {"text": TextDataset(held_out, recipe.length, seed).windows()}


@lru_cache(maxsize=4)
def real_domains(vocab: int, folder: str):
    """``(tokenizer, Shakespeare domain, code domain)`` for a BPE vocabulary, encoded once per
    process (about 10 s for both corpora)."""
    tok = corpus_tokenizer(vocab, folder)
    return tok, shakespeare_domain(tok), code_domain(tok)


def base_tokenizer(kind: str = "shakespeare"):
    """The BPE tokenizer of a Shakespeare base (trained on first use, cached beside the bases)."""
    return corpus_tokenizer(RECIPES[kind].bpe_vocab, cache_dir())


def base_domains(kind: str = "shakespeare"):
    """``(tokenizer, Shakespeare domain, code domain)`` in the tokenizer of base ``kind``."""
    return real_domains(RECIPES[kind].bpe_vocab, str(cache_dir()))


def _pretrain_shakespeare(recipe: BaseRecipe, seed: int, progress: bool) -> tuple[GPT, dict]:
    """Pretrain on the Shakespeare training plays (random windows of ``length`` BPE tokens) and
    measure: held-out plays and held-out code in nats per token and per character, the unigram
    baseline, three samples and the fraction of their words that occur in the corpus."""
    tok, plays, code = real_domains(recipe.bpe_vocab, str(cache_dir()))
    model = GPT(recipe.gpt_config(), seed=seed)
    cfg = TrainConfig(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                      warmup=recipe.warmup, progress=progress, desc="pretraining base")
    result = train(model, plays.sampler(recipe.length, seed), cfg)
    info = {"tasks": list(recipe.tasks), "length": recipe.length, "seed": seed,
            "seconds": round(result.seconds, 1), "final_loss": result.final_loss,
            "steps": recipe.steps, "losses": result.losses, "exact_match": {},
            "eval_loss": {}, "nats_per_char": {}, "bits_per_char": {}, "chars_per_token": {},
            "num_parameters": model.num_parameters(), "recipe": asdict(recipe)}
    for dom in (plays, code):
        ev = dom.eval_set(recipe.eval_examples, recipe.length)
        loss = evaluate_lm(model, ev.x, ev.y)["loss"]
        info["eval_loss"][dom.name] = loss
        info["bits_per_char"][dom.name] = ev.bits_per_char(loss)
        info["nats_per_char"][dom.name] = ev.bits_per_char(loss) * math.log(2)
        info["chars_per_token"][dom.name] = dom.chars_per_token
    # the unigram baseline: each token's training frequency (add-one), no context at all
    ev = plays.eval_set(recipe.eval_examples, recipe.length)
    counts = np.bincount(plays.train_ids, minlength=recipe.bpe_vocab) + 1.0
    logp = np.log(counts / counts.sum())
    info["unigram_nats_per_char"] = float(-logp[np.asarray(ev.y)].sum() / ev.chars)
    info["samples"] = shakespeare_samples(model, tok, seed)
    words = set(re.findall(r"[A-Za-z']+", tok.decode(plays.train_ids)))
    gen = re.findall(r"[A-Za-z']+", " ".join(info["samples"]))
    info["sample_words_in_corpus"] = sum(w in words for w in gen) / max(len(gen), 1)
    return model, info


def shakespeare_samples(model, tok, seed: int, n: int = 3, tokens: int = 60) -> list[str]:
    """``n`` samples of ``tokens`` BPE tokens (temperature 0.8, top 40), each from a newline
    (at most what fits the context: generation here does not slide a window)."""
    tokens = min(tokens, model.config.block_size - 1)
    prompt = bk.asarray(np.repeat(tok.encode("\n")[None, :], n, axis=0))   # (n, 1)
    out = generate(model, prompt, tokens, temperature=0.8, top_k=40, seed=seed)
    return [tok.decode(row[1:]) for row in bk.to_numpy(out)]


def _scores(info: dict) -> str:
    """'copy exact match 99.0%, loss 0.012; ...' from a base's info."""
    if "bits_per_char" in info:
        return "; ".join(f"{d} {info['nats_per_char'][d]:.3f} nats/char "
                         f"({info['bits_per_char'][d]:.3f} bits/char)"
                         for d in info["bits_per_char"])
    return "; ".join(f"{t} " + (f"exact match {info['exact_match'][t]:.1%}, "
                                if t in info["exact_match"] else "") + f"loss {loss:.3f}"
                     for t, loss in info["eval_loss"].items())


def load_base(kind: str = "default", seed: int = 0, progress: bool = True,
              retrain: bool = False) -> tuple[GPT, dict]:
    """The cached base model ``kind`` ("default", "quick", "language" or "text"), pretraining it
    on first use. ``info`` holds the recipe, the loss curve and held-out scores per task."""
    if kind not in RECIPES:
        raise ValueError(f"load_base: unknown base {kind!r}; choose from {sorted(RECIPES)}")
    recipe = RECIPES[kind]
    folder = cache_dir() / recipe_key(kind, recipe, seed)
    info_path = folder / "info.json"
    if info_path.exists() and not retrain:
        try:
            return load_model(folder, seed=seed), load_json(info_path)
        except (CheckpointError, ValueError) as exc:
            print(f"minipeft: cached base in {folder} is unreadable ({exc}); retraining",
                  file=sys.stderr)
    print(f"minipeft: pretraining the {kind!r} base model on {', '.join(recipe.tasks)} "
          f"({recipe.steps} steps; first use only, cached in {folder})", file=sys.stderr)
    start = time.perf_counter()
    model, info = pretrain(recipe, seed, progress)
    save_model(model, folder)
    save_json(info_path, info)  # written last: its presence marks a complete cache entry
    print(f"minipeft: base ready in {time.perf_counter() - start:.0f} s; held-out "
          f"{_scores(info)}", file=sys.stderr)
    return model, info
