"""Lesson 02: the tiny transformer every later lesson adapts, and where its parameters live.

PEFT changes a pretrained model without retraining it. Before choosing *which* weights to train,
we need the model in front of us: its shapes, its pieces, and how many numbers each piece holds.

1. Shapes.  B sequences of T token ids enter as ids (B, T). Two tables turn them into vectors of
   width C: the token embedding W_E (V, C) gives "what", the position embedding W_P
   (block_size, C) gives "where", and their sum is the residual stream h (B, T, C). Every block
   reads h and *adds* its result back; nothing else ever writes to it.

2. A pre-LN block.  Each of the n_layer blocks does

       h = h + Attn(LN_1(h))        h = h + MLP(LN_2(h))

   The LayerNorm sits at the *entrance* of each branch (pre-LN, as in GPT-2), not on the stream
   itself, so the path from the embeddings to the output is a plain sum: gradients reach the
   first layer undiminished, and training is stable without long warm-up tricks.

3. Attention.  x = LN_1(h) is projected to queries, keys and values, q = x W_q^T (+ b_q) and
   likewise k, v, each (B, T, C), then split into H heads of size D = C / H: (B, H, T, D). Scores
   S = q k^T / sqrt(D) are (B, H, T, T): how much position i wants to read position j. The
   *causal mask* adds -inf to S[i, j] for j > i, so softmax gives those keys weight exactly 0 and
   position i sees only positions <= i. That is what lets one forward pass train T next-token
   predictions at once (no position can peek at its own target), and what makes a KV cache
   valid during generation (old positions never change when new ones arrive). The heads' outputs
   softmax(S) v are joined back to (B, T, C) and mixed by o_proj.

4. MLP.  Per position, independently: C -> 4C -> GELU -> C (fc_in, fc_out).

5. Tied head.  After a final LayerNorm, logits = h W_E^T (B, T, V): the matrix that turned token
   ids into vectors also turns vectors back into scores for each token (GPT-2 does this). It
   saves V x C parameters and means "which token is this vector like?" uses one geometry.

6. Counting.  Per block, with width C: attention has four C x C matrices, 4 C^2 (+ 4C biases);
   the MLP has C x 4C and 4C x C, 8 C^2 (+ 5C biases); the two LayerNorms 4C. So the MLP holds
   *twice* attention's weights, whatever C is. The article says LoRA targets attention "since
   most parameters are in attention"; the table at the end measures that on GPT-2, LLaMA-2-7B and
   GPT-3 175B, and it does not hold. (The LoRA paper itself, Hu et al. 2021, Sec. 4.2, adapts only
   attention "for simplicity and parameter-efficiency", not because attention is the larger part.)

The parts: (a) the model's shapes, parameter by parameter and through one forward pass; (b) a
parameter table per component, counted on the model and by the calculator; (c) the base model
that later lessons fine-tune, pretrained once and cached, and a fresh run's training-loss curve;
(d) held-out exact match per skill; (e) a few greedy samples; (f) one attention map, recomputed
by hand; (g) where the parameters are in real transformers.

Run:  python lessons/02_tiny_transformer.py [--quick] [--seed N]
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # render to a file; no display needed
import matplotlib.pyplot as plt
import numpy as np  # host-side only: tables and the figure

from minipeft import backend as bk
from minipeft import lessonkit
from minipeft.autograd import Tensor, no_grad, softmax
from minipeft.autograd.functional import causal_bias
from minipeft.base import RECIPES, load_base
from minipeft.data import TaskMixture, decode, make_examples
from minipeft.nn import GPT, generate
from minipeft.params import PRESETS, count_parameters, spec_from_config
from minipeft.peft.selective import component_of
from minipeft.train import TrainConfig, evaluate_lm, train

CURVE_STEPS = 200          # steps of the fresh run whose loss curve is plotted
QUICK_CURVE_STEPS = 60
SAMPLES_PER_TASK = 2       # greedy samples printed per skill
ATTENTION_TASK = "reverse"  # the skill whose attention map is drawn (a base skill)
COMPONENTS = ("embeddings", "attention", "mlp", "norms", "head")   # the order of the tables
REAL_MODELS = ("gpt2-124m", "llama2-7b", "gpt3-175b")
OUT_NAME = "02_tiny_transformer.png"


# --------------------------------------------------------------------------- (a) shapes
def print_shapes(model: GPT) -> None:
    """What is in the model? Every parameter's shape, and the shapes one forward pass makes."""
    cfg = model.config
    C, H = cfg.n_embd, cfg.n_head
    B, T, D = 2, cfg.block_size, C // H
    print(f"\n(a) The model: V={cfg.vocab_size} tokens, block_size={cfg.block_size}, "
          f"n_layer={cfg.n_layer}, H={H} heads of D={D}, C={C}, tied head: {cfg.tie_weights}\n")
    print(f"    {'parameter':<28} shape")
    for name, p in model.named_parameters():
        if name.startswith("blocks.") and not name.startswith("blocks.0."):
            continue                                                # every block is alike
        print(f"    {name:<28} {p.shape}")
    if cfg.n_layer > 1:
        others = "blocks.1" + (f" .. blocks.{cfg.n_layer - 1}" if cfg.n_layer > 2 else "")
        print(f"    ({others}: the same shapes as blocks.0)")
    walk = [("ids", (B, T)), ("tok_emb(ids) + pos_emb(0..T-1) = h", (B, T, C)),
            ("q, k, v = q_proj(ln_1(h)), ... split into heads", (B, H, T, D)),
            ("scores q k^T / sqrt(D) + causal mask", (B, H, T, T)),
            ("softmax(scores) v, heads joined, o_proj", (B, T, C)),
            ("mlp: fc_in, GELU", (B, T, 4 * C)), ("fc_out", (B, T, C)),
            ("ln_f(h) @ tok_emb.weight^T = logits", (B, T, cfg.vocab_size))]
    print(f"\n    one forward pass, B={B}, T={T}:")
    for what, shape in walk:
        print(f"    {what:<50} {shape}")


# --------------------------------------------------------------------------- (b) counting
def print_components(model: GPT) -> tuple[dict, dict]:
    """Where are our model's parameters? Each parameter credited to its component by name
    (``component_of``, the function selective fine-tuning uses), beside the calculator."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():
        counts[component_of(name)] += p.size
    calc = count_parameters(spec_from_config(model.config))
    total = model.num_parameters()
    print(f"\n(b) Where our model's {total:,} parameters are\n")
    print(f"    {'component':<11} {'counted':>9} {'calculator':>11} {'share':>7}")
    for c in COMPONENTS:
        note = "  (tied: lm_head is tok_emb.weight)" if c == "head" and \
            model.config.tie_weights else ""
        print(f"    {c:<11} {counts[c]:>9,} {calc[c]:>11,} {counts[c] / total:>7.1%}{note}")
    print(f"    {'total':<11} {sum(counts.values()):>9,} {calc['total']:>11,}")
    print(f"    MLP / attention = {counts['mlp'] / counts['attention']:.2f}")
    return counts, calc


# --------------------------------------------------------------------------- (c) the base
def loss_curve(recipe, seed: int, steps: int, progress: bool) -> tuple[GPT, list, float]:
    """A fresh model of the base's config, trained with the base recipe's settings for
    ``steps`` steps (cosine schedule over those steps): its per-step training loss."""
    mix = TaskMixture(list(recipe.tasks), seed=seed, length=recipe.length)
    model = GPT(recipe.gpt_config(), seed=seed)
    cfg = TrainConfig(steps=steps, batch_size=recipe.batch_size, lr=recipe.lr,
                      warmup=min(recipe.warmup, steps // 5), progress=progress,
                      desc="loss curve")
    result = train(model, mix.sample, cfg)
    return model, result.losses, result.seconds


def the_base(recipe, kind: str, seed: int, quick: bool) -> tuple:
    """Does pretraining work? The cached base's last loss, and a fresh model of the same config
    trained a few steps with the same recipe, since the cache keeps weights, not a curve."""
    print(f"\n(c) The base model (load_base({kind!r}): pretrained once, then cached)")
    base, info = load_base(kind, seed=seed, progress=not quick)
    print(f"    {info['steps']} steps, final training loss {info['final_loss']:.4f}")
    steps = QUICK_CURVE_STEPS if quick else CURVE_STEPS
    print(f"    The cache keeps weights, not a loss curve, so a fresh model of the same config "
          f"is trained\n    for {steps} steps with the same recipe to show how the loss falls.")
    fresh, losses, secs = loss_curve(recipe, seed, steps, progress=not quick)
    print(f"    fresh run: loss {np.mean(losses[:10]):.3f} (first 10 steps) -> "
          f"{np.mean(losses[-10:]):.3f} (last 10) in {secs:.0f} s")
    return base, info, fresh, losses, steps


# --------------------------------------------------------------------------- (d) held out
def held_out(base: GPT, fresh: GPT, recipe, info: dict, steps: int, seed: int) -> tuple:
    """Did the models learn the skills, or the training rows? Exact match on inputs never
    trained on, per skill, for the cached base and the short fresh run."""
    mix = TaskMixture(list(recipe.tasks), seed=seed, length=recipe.length)
    n = recipe.eval_examples
    base_em, fresh_em = ({t: evaluate_lm(m, *mix.eval_set(t, n))["exact_match"]
                          for t in recipe.tasks} for m in (base, fresh))
    print(f"\n(d) Held-out exact match ({n} inputs per skill never trained "
          "on; a row counts only if every answer token is right)\n")
    print(f"    {'skill':<9} {'base (' + str(info['steps']) + ' steps)':>18} "
          f"{'fresh (' + str(steps) + ' steps)':>18}")
    for t in recipe.tasks:
        print(f"    {t:<9} {base_em[t]:>18.1%} {fresh_em[t]:>18.1%}")
    return base_em, fresh_em


# --------------------------------------------------------------------------- (e) samples
def greedy_samples(model: GPT, recipe, seed: int, per_task: int) -> list:
    """Held-out prompts ``<task> input =``, continued greedily for the answer's length."""
    print("\n(e) Greedy samples on held-out inputs\n")
    print(f"    {'prompt':<24} {'expected':<12} {'model':<12}")
    rows = []
    for task in recipe.tasks:
        d = make_examples(task, per_task, seed, length=recipe.length, split="eval")
        for tokens, mask in zip(d.tokens, d.answer_mask):
            start = int(np.argmax(mask))                            # first answer position
            n = int(mask.sum())
            out = generate(model, bk.asarray(tokens[None, :start]), max_new_tokens=n)
            prompt, want = decode(tokens[:start]), decode(tokens[start:start + n])
            got = decode(bk.to_numpy(out)[0, start:])
            rows.append({"task": task, "prompt": prompt, "expected": want, "got": got})
            print(f"    {prompt:<24} {want:<12} {got:<12} {'ok' if got == want else 'WRONG'}")
    return rows


# --------------------------------------------------------------------------- (f) attention map
def attention_maps(model: GPT, tokens) -> tuple[list, dict]:
    """Each layer's attention probabilities (H, T, T) for one row, recomputed by hand from
    q_proj and k_proj, and a check that they are what the model really uses."""
    cfg = model.config
    T, C, H = len(tokens), cfg.n_embd, cfg.n_head
    D = C // H
    ids = bk.asarray(np.asarray(tokens)[None])                      # (1, T)
    maps, worst = [], {"upper_max": 0.0, "row_sum_err": 0.0, "recompute_diff": 0.0}
    model.eval()
    with no_grad():
        h = model.tok_emb(ids) + model.pos_emb(bk.xp.arange(T))     # (1, T, C)
        for block in model.blocks:
            x = block.ln_1(h)
            q = block.attn.q_proj(x).reshape(1, T, H, D).transpose(0, 2, 1, 3)  # (1, H, T, D)
            k = block.attn.k_proj(x).reshape(1, T, H, D).transpose(0, 2, 1, 3)
            v = block.attn.v_proj(x).reshape(1, T, H, D).transpose(0, 2, 1, 3)
            scores = q @ k.transpose(0, 1, 3, 2) * (1.0 / math.sqrt(D))  # (1, H, T, T)
            probs = softmax(scores + Tensor(causal_bias(T, T, scores.dtype)), axis=-1)
            mine = block.attn.o_proj((probs @ v).transpose(0, 2, 1, 3).reshape(1, T, C))
            theirs, _ = block.attn(x)
            p = bk.to_numpy(probs.data)[0]                          # (H, T, T)
            worst["upper_max"] = max(worst["upper_max"], float(np.triu(p, 1).max()))
            worst["row_sum_err"] = max(worst["row_sum_err"], float(np.abs(p.sum(-1) - 1).max()))
            worst["recompute_diff"] = max(worst["recompute_diff"], float(np.abs(
                bk.to_numpy(mine.data) - bk.to_numpy(theirs.data)).max()))
            maps.append(p)
            h, _ = block(h)
    return maps, worst


def mirror_head(maps: list, eq: int) -> dict:
    """Which head reads the letter a 'reverse' answer must output next?

    Row ``marker p_1 .. p_L = a_1 .. a_L`` with '=' at position eq = L + 1: the query at
    position eq - 1 + j predicts a_j = p_(L + 1 - j), found at position 2 eq - 1 - query. The
    score of a head is the mean attention weight its answer-predicting queries put there
    (chance: 1 / (query + 1), uniform over the visible keys)."""
    T = maps[0].shape[-1]
    queries = np.arange(eq, T - 1)                                  # predict a_1 .. a_L
    sources = 2 * eq - 1 - queries
    best = {"score": -1.0}
    for layer, p in enumerate(maps):
        for head in range(p.shape[0]):
            score = float(p[head, queries, sources].mean())
            if score > best["score"]:
                best = {"layer": layer, "head": head, "score": score}
    best["chance"] = float(np.mean(1.0 / (queries + 1)))
    return best


def attention_part(base: GPT, recipe, seed: int) -> tuple:
    """Is the attention what the formula says, and does a head do something readable? One held-out
    row of ATTENTION_TASK through the base, the maps recomputed by hand."""
    example = make_examples(ATTENTION_TASK, 1, seed, length=recipe.length, split="eval")
    row = example.tokens[0, :int(np.argmax(example.answer_mask[0])) + int(
        example.answer_mask[0].sum())]                             # drop the padding
    maps, attn = attention_maps(base, row.tolist())
    best = mirror_head(maps, eq=int(np.argmax(example.answer_mask[0])) - 1)
    print(f"\n(f) Attention recomputed by hand from q_proj and k_proj: largest weight above the "
          f"diagonal {attn['upper_max']:.1e}\n    (the causal mask), rows sum to 1 within "
          f"{attn['row_sum_err']:.0e}, and P v through o_proj equals the model's own\n    "
          f"attention output within {attn['recompute_diff']:.0e}. On a '{ATTENTION_TASK}' row, "
          f"layer {best['layer']} head {best['head']} puts {best['score']:.0%} of each\n    "
          f"answer position's attention on the prompt letter it must output next "
          f"(chance: {best['chance']:.0%}).")
    return maps, attn, best, row.tolist()


# --------------------------------------------------------------------------- (g) real models
def real_models() -> dict:
    """Is 'most parameters are in attention' true of real transformers? The calculator on
    GPT-2, LLaMA-2-7B and GPT-3 175B, from their architectures alone."""
    print("\n(g) Where are the parameters in real transformers? (from the architecture alone)\n")
    print(f"    {'model':<12} {'total':>8} {'embed':>7} {'attention':>10} {'MLP':>7} "
          f"{'norms':>6} {'head':>6} {'MLP/attn':>9}")
    out = {}
    for key in REAL_MODELS:
        spec = PRESETS[key]
        c = count_parameters(spec)
        share = {k: c[k] / c["total"] for k in COMPONENTS}
        ratio = c["mlp"] / c["attention"]
        out[key] = {**c, "share": share, "mlp_over_attention": ratio,
                    "attention_is_majority": c["attention"] > c["total"] / 2}
        print(f"    {spec.name:<12} {c['total'] / 1e9:>7.3f}B {share['embeddings']:>7.1%} "
              f"{share['attention']:>10.1%} {share['mlp']:>7.1%} {share['norms']:>6.2%} "
              f"{share['head']:>6.1%} {ratio:>9.2f}")
    biggest = max(out[k]["share"]["attention"] for k in out)
    print(f"\n    The claim 'most parameters are in attention' does not hold: attention holds at "
          f"most {biggest:.0%}\n    of any of these models, and the MLP about twice as much as "
          "attention in every one.\n    Applying LoRA to attention only is a design choice; "
          "it is not where most of the weights are.")
    return out


# --------------------------------------------------------------------------- the figure
def figure(counts, real, losses, curve_steps, base_info, maps, best, tokens):
    """Our components, real models' shares, the loss curve, and one attention map."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    ax = axes[0, 0]
    ax.bar(COMPONENTS, [counts[c] for c in COMPONENTS], color="tab:blue")
    for i, c in enumerate(COMPONENTS):
        ax.text(i, counts[c], f"{counts[c]:,}", ha="center", va="bottom")
    ax.set_ylabel("parameters")
    ax.set_title(f"Our base model: {sum(counts.values()):,} parameters by component")

    ax = axes[0, 1]
    names = [PRESETS[k].name for k in real]
    left = np.zeros(len(real))
    for c, color in zip(COMPONENTS, ("tab:gray", "tab:orange", "tab:green", "tab:purple",
                                     "tab:brown")):
        share = np.array([real[k]["share"][c] for k in real])
        ax.barh(names, share, left=left, color=color, label=c)
        left += share
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("share of all parameters")
    ax.set_title("Real models: the MLP holds ~2x the attention weights")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=5, fontsize=8)

    ax = axes[1, 0]
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=1, label="training loss (fresh run)")
    window = max(len(losses) // 20, 1)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(np.arange(window, len(losses) + 1), smooth, lw=2, label=f"mean of {window} steps")
    ax.axhline(base_info["final_loss"], color="k", ls="--", lw=1,
               label=f"cached base: last-step loss after {base_info['steps']} steps")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on answer tokens (nats)")
    ax.set_title(f"Pretraining loss, first {curve_steps} steps of a fresh model")
    ax.legend()

    ax = axes[1, 1]
    ax.imshow(maps[best["layer"]][best["head"]], cmap="viridis", vmin=0, vmax=1)
    labels = [decode([t], skip_pad=False) for t in tokens]
    ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(tokens)), labels, fontsize=7)
    ax.set_xlabel("key position (read)")
    ax.set_ylabel("query position (reading)")
    ax.set_title(f"Layer {best['layer']}, head {best['head']}, one '{ATTENTION_TASK}' row: "
                 f"answers read the mirrored\nletter ({best['score']:.0%} of their attention); "
                 "causal: 0 above the diagonal", fontsize=10)
    return fig


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = lessonkit.arguments(__doc__, quick="the tiny quick base, short curve").parse_args(argv)
    clock = lessonkit.Stopwatch()
    kind = "quick" if args.quick else "default"
    recipe = RECIPES[kind]
    print(f"Lesson 02: the tiny transformer ({kind} base, backend: {bk.name}, seed {args.seed})")

    shape_model = GPT(recipe.gpt_config(), seed=args.seed)
    print_shapes(shape_model)
    counts, calc = print_components(shape_model)
    base, info, fresh, losses, steps = the_base(recipe, kind, args.seed, args.quick)
    base_em, fresh_em = held_out(base, fresh, recipe, info, steps, args.seed)
    samples = greedy_samples(base, recipe, args.seed, SAMPLES_PER_TASK)
    maps, attn, best, row = attention_part(base, recipe, args.seed)
    real = real_models()

    path = lessonkit.save_figure(figure(counts, real, losses, steps, info, maps, best, row),
                                 OUT_NAME)
    seconds = clock.seconds()
    print(f"\n    figure saved to {path}  ({seconds:.0f} s in all)")
    return {"kind": kind, "config": shape_model.config.to_dict(), "components": counts,
            "num_parameters": shape_model.num_parameters(), "calculator": calc,
            "mlp_over_attention": counts["mlp"] / counts["attention"],
            "base_info": info, "base_exact_match": base_em, "fresh_exact_match": fresh_em,
            "losses": losses, "samples": samples, "attention": {**attn, "mirror_head": best},
            "real_models": real,
            "figure": str(path), "seconds": seconds}


if __name__ == "__main__":
    main()
