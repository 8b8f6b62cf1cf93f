"""Prompt tuning, prefix tuning and the soft-prompt analysis, proved against independent
computation.

The strongest check builds, by hand, a plain GPT whose *token* input reproduces what the method
claims to do: prompt vectors without positions and real tokens at positions 0..T-1; a prefix
equal to the keys and values of real text. Then: gradients match finite differences, only the
method's tensors get gradients, the base stays bit-identical, KV-cached generation equals
uncached, the context budget is enforced with a clear message, collapse keeps outputs, save/load
round trips, each method learns, and nearest-neighbour analysis matches a brute-force loop.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft import backend as bk
from minipeft.autograd import counters, gradcheck
from minipeft.data import CATEGORIES, VOCAB, TaskMixture, WordTokenizer
from minipeft.io import load_tensors
from minipeft.nn import GPT, GPTConfig, generate
from minipeft.peft import (
    PrefixMLP,
    PrefixTable,
    PrefixTuningConfig,
    PromptTuningConfig,
    collapse_prefix,
    get_peft_model,
    nearest_tokens,
    neighbour_purity,
    random_baseline,
)
from minipeft.peft.core import ADAPTER_WEIGHTS
from minipeft.train import TrainConfig, evaluate_lm, train

TINY = GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16)
METHODS = {
    "prompt": PromptTuningConfig(num_virtual_tokens=4, init="random"),
    "prefix": PrefixTuningConfig(num_virtual_tokens=4, init="vocab"),
    "prefix_mlp": PrefixTuningConfig(num_virtual_tokens=4, reparameterize=True, hidden=8),
}


def host(a) -> np.ndarray:
    return bk.to_numpy(a)


def ids_for(cfg=TINY, B=3, T=6, seed=0):
    return bk.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T)))


def randomize(pm, seed=0, scale=0.5):
    """Random values in every trainable tensor, as if trained."""
    rng = np.random.default_rng(seed)
    for p in pm.trainable_parameters():
        p.data = bk.asarray(rng.normal(0, scale, p.shape), dtype=p.dtype)


# --------------------------------------------------------------------------- configs
def test_configs_validate():
    for n in (0, -2, True, 1.5):
        with pytest.raises((TypeError, ValueError), match="num_virtual_tokens"):
            PromptTuningConfig(num_virtual_tokens=n)
        with pytest.raises((TypeError, ValueError), match="num_virtual_tokens"):
            PrefixTuningConfig(num_virtual_tokens=n)
    with pytest.raises(ValueError, match="init_token_ids"):
        PromptTuningConfig(init="text")
    with pytest.raises(ValueError, match="init"):
        PromptTuningConfig(init="zeros")
    with pytest.raises(ValueError, match="reparameterize=False"):
        PrefixTuningConfig(reparameterize=True, init="vocab")
    with pytest.raises(ValueError, match="no room"):
        get_peft_model(GPT(TINY), PromptTuningConfig(num_virtual_tokens=16))
    with pytest.raises(ValueError, match=r"init_token_ids must lie in \[0, 20\)"):
        get_peft_model(GPT(TINY), PromptTuningConfig(init="text", init_token_ids=(3, 20)))


def test_prompt_inits_come_from_the_embedding():
    base = GPT(TINY, seed=1)
    W = host(base.tok_emb.weight.data)
    pm = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=7, init="text",
                                                 init_token_ids=(3, 5)), "text")
    P = host(base.prompt_encoder.adapters.text.embedding.data)
    np.testing.assert_array_equal(P, W[[3, 5, 3, 5, 3, 5, 3]])        # repeated to n
    pm.add_adapter("vocab", PromptTuningConfig(num_virtual_tokens=5, init="vocab"))
    P = host(base.prompt_encoder.adapters.vocab.embedding.data)
    assert all((W == row).all(axis=1).any() for row in P)              # each row is a token's
    pm.add_adapter("random", PromptTuningConfig(num_virtual_tokens=15, init="random"))
    P = host(base.prompt_encoder.adapters.random.embedding.data)
    assert (P >= W.min(axis=0)).all() and (P <= W.max(axis=0)).all()  # per-dimension range


# --------------------------------------------------------------------------- semantics
def _twin(base, pos_rows):
    """A plain GPT equal to ``base`` except for its position table (rows given)."""
    twin = GPT(base.config)
    twin.load_state_dict(base.state_dict(), strict=False)
    twin.pos_emb.weight.data = bk.asarray(pos_rows, dtype=twin.pos_emb.weight.dtype)
    return twin


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_act_like_real_text_at_the_documented_positions(backend, method):
    """init='text' with token ids t, n = len(t). Prompt: vectors tok_emb[t] with no position,
    real tokens at 0..T-1. Prefix: keys/values of t read at positions 0..n-1, real tokens at
    0..T-1. A plain GPT fed [t ; ids] with the position table rearranged to match must agree."""
    base = GPT(TINY, seed=2)
    t = (4, 9, 1)
    n = len(t)
    ids = ids_for(T=6)
    pos = host(base.pos_emb.weight.data)
    rows = pos.copy()                               # twin positions 0..n-1 | n..n+T-1
    rows[:n] = 0.0 if method == "prompt" else pos[:n]
    rows[n:n + 6] = pos[:6]                         # real tokens see their pretrained positions
    twin = _twin(base, rows)
    full = bk.xp.concatenate([bk.xp.broadcast_to(bk.asarray(t), (3, n)), ids], axis=1)
    want = host(twin(full).data)[:, n:]
    cls = PromptTuningConfig if method == "prompt" else PrefixTuningConfig
    pm = get_peft_model(base, cls(num_virtual_tokens=n, init="text", init_token_ids=t))
    np.testing.assert_allclose(host(pm(ids).data), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_disable_gives_the_base_and_step0_is_not_the_base(backend, method):
    """Documented: no finite prompt/prefix is a no-op (softmax gives it weight)."""
    base = GPT(TINY, seed=3)
    ids = ids_for()
    ref = host(base(ids).data)
    pm = get_peft_model(base, METHODS[method])
    assert not np.allclose(host(pm(ids).data), ref, atol=1e-6)
    with pm.disable_adapter():
        np.testing.assert_array_equal(host(pm(ids).data), ref)


@pytest.mark.parametrize("method", list(METHODS))
def test_kv_cache_generation_equals_no_cache(backend, method):
    pm = get_peft_model(GPT(TINY, seed=4), METHODS[method])
    randomize(pm, seed=1)
    ids = ids_for(B=2, T=3)
    cached = generate(pm, ids, 8, use_cache=True)
    plain = generate(pm, ids, 8, use_cache=False)
    np.testing.assert_array_equal(host(cached), host(plain))
    assert cached.shape == (2, 11)                  # 4 virtual + 11 real = 15 <= 16


@pytest.mark.parametrize("method", list(METHODS))
def test_context_overflow_raises_a_clear_error(method):
    pm = get_peft_model(GPT(TINY), METHODS[method])
    pm(ids_for(T=12))                               # 4 + 12 = 16 fits exactly
    with pytest.raises(ValueError, match=r"4 virtual tokens \+ 13 input tokens = 17 exceed the "
                                         r"model's block_size=16"):
        pm(ids_for(T=13))


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_only_the_virtual_tokens_get_gradients(method):
    pm = get_peft_model(GPT(TINY, seed=5), METHODS[method])
    ids = ids_for()
    counters.clear()
    pm.loss(ids, ids).backward()
    assert counters["weight_grad_matmul"] == 0      # no frozen weight cost a gradient product
    for name, p in pm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and np.abs(host(p.grad)).sum() > 0, name
        else:
            assert p.grad is None, name
    assert pm.num_parameters(trainable_only=True) == (
        4 * TINY.n_embd if method == "prompt" else 4 * TINY.n_layer * 2 * TINY.n_embd)


@pytest.mark.parametrize("method", list(METHODS))
def test_gradients_through_the_whole_model(float64, method):
    cfg = GPTConfig(vocab_size=9, block_size=8, n_layer=2, n_head=2, n_embd=4)
    method_cfg = {"prompt": PromptTuningConfig(num_virtual_tokens=2),
                  "prefix": PrefixTuningConfig(num_virtual_tokens=2),
                  "prefix_mlp": PrefixTuningConfig(num_virtual_tokens=2, reparameterize=True,
                                                   hidden=3)}[method]
    pm = get_peft_model(GPT(cfg, seed=0), method_cfg)
    randomize(pm, seed=2)
    params = pm.trainable_parameters()
    assert all(p.dtype == np.float64 for p in params)
    ids = ids_for(cfg, B=2, T=4)
    gradcheck(lambda *ps: pm(ids), params, max_elements=24)


@pytest.mark.parametrize("method", list(METHODS))
def test_frozen_base_bit_identical_after_adamw_with_weight_decay(method):
    base = GPT(TINY, seed=0)
    before = {n: (p, host(p.data).copy()) for n, p in base.named_parameters()}
    pm = get_peft_model(base, METHODS[method])
    start = [host(p.data).copy() for p in pm.trainable_parameters()]
    rng = np.random.default_rng(0)
    batch = lambda B: (rng.integers(0, 20, (B, 8)), rng.integers(0, 20, (B, 8)))
    train(pm, batch, TrainConfig(steps=4, batch_size=4, lr=1e-2, weight_decay=0.1, warmup=0,
                                 progress=False))
    for n, (p, old) in before.items():
        np.testing.assert_array_equal(host(p.data), old, err_msg=n)
        assert p.grad is None and not p.requires_grad, n
    assert all(not np.array_equal(host(p.data), s)
               for p, s in zip(pm.trainable_parameters(), start))


# --------------------------------------------------------------------------- prefix collapse
def test_collapse_keeps_outputs_and_saves_a_plain_table(backend, tmp_path):
    pm = get_peft_model(GPT(TINY, seed=6), METHODS["prefix_mlp"])
    randomize(pm, seed=3)
    ids = ids_for()
    want = host(pm(ids).data)
    assert isinstance(pm.base_model.prefix_encoder.adapters.default, PrefixMLP)
    collapse_prefix(pm)
    assert isinstance(pm.base_model.prefix_encoder.adapters.default, PrefixTable)
    np.testing.assert_allclose(host(pm(ids).data), want, rtol=1e-6, atol=1e-7)
    assert pm.num_parameters(trainable_only=True) == 4 * TINY.n_layer * 2 * TINY.n_embd
    assert not pm.peft_configs["default"].reparameterize
    pm.save_adapter(tmp_path / "p")
    other = get_peft_model(GPT(TINY, seed=6), PrefixTuningConfig(num_virtual_tokens=4))
    other.load_adapter(tmp_path / "p", name="loaded")
    np.testing.assert_allclose(host(other(ids).data), want, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_round_trip_holds_only_the_method_tensors(tmp_path, method):
    cfg = METHODS[method]
    pm = get_peft_model(GPT(TINY, seed=0), cfg)
    randomize(pm, seed=4)
    ids = ids_for()
    want = host(pm(ids).data)
    pm.save_adapter(tmp_path / "ad")
    tensors, _ = load_tensors(tmp_path / "ad" / ADAPTER_WEIGHTS)
    assert set(tensors) == set(pm._tensors("default"))
    encoder = "prompt_encoder" if method == "prompt" else "prefix_encoder"
    assert all(k.startswith(f"{encoder}.") for k in tensors)
    assert sum(t.size for t in tensors.values()) == pm.num_parameters(trainable_only=True)
    other = get_peft_model(GPT(TINY, seed=0), cfg, seed=99)
    other.load_adapter(tmp_path / "ad", name="loaded")
    np.testing.assert_allclose(host(other(ids).data), want, rtol=1e-6, atol=1e-7)


def test_several_prompts_switch():
    base = GPT(TINY, seed=7)
    ids = ids_for()
    pm = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=2), "a")
    out_a = host(pm(ids).data)
    pm.add_adapter("b", PromptTuningConfig(num_virtual_tokens=5, init="random"), seed=1)
    out_b = host(pm(ids).data)
    assert not np.allclose(out_a, out_b)
    pm.set_adapter("a")
    np.testing.assert_array_equal(host(pm(ids).data), out_a)
    with pytest.raises(ValueError, match="12 input tokens"):       # a's budget: 2 + 12 fits
        pm.set_adapter("b")
        pm(ids_for(T=12))


# --------------------------------------------------------------------------- learning
LEARN = GPTConfig(vocab_size=len(VOCAB), block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def pretrained():
    """A base that knows copy and sort (about a second of full training), and a reverse task."""
    base = GPT(LEARN, seed=0)
    train(base, TaskMixture(["copy", "sort"], seed=0, length=4).sample,
          TrainConfig(steps=150, batch_size=32, lr=1e-2, warmup=10, progress=False))
    data = TaskMixture(["reverse"], seed=1, length=4)
    return base.state_dict(), data, data.eval_set("reverse", 64)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_beats_its_step0_loss(pretrained, method):
    state, data, (x, y) = pretrained
    base = GPT(LEARN)
    base.load_state_dict(state)
    pm = get_peft_model(base, METHODS[method])
    before = evaluate_lm(pm, x, y)["loss"]
    lr = 1e-2 if method == "prefix_mlp" else 3e-2
    train(pm, data.sample, TrainConfig(steps=30, batch_size=16, lr=lr, warmup=0, progress=False))
    after = evaluate_lm(pm, x, y)["loss"]
    assert after < before - 0.1, (before, after)


# --------------------------------------------------------------------------- analysis
@given(st.integers(1, 6), st.integers(2, 30), st.integers(1, 8), st.data())
def test_nearest_tokens_match_a_brute_force_loop(n, V, C, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    k = data.draw(st.integers(1, V))
    P, E = rng.normal(size=(n, C)), rng.normal(size=(V, C))
    ids, sims = nearest_tokens(P, E, k)
    assert ids.shape == sims.shape == (n, k)
    for i in range(n):
        cos = [float(P[i] @ E[v]) / (np.linalg.norm(P[i]) * np.linalg.norm(E[v]))
               for v in range(V)]
        order = sorted(range(V), key=lambda v: (-cos[v], v))[:k]
        np.testing.assert_allclose(sims[i], [cos[v] for v in order], rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(ids[i], order)


def test_nearest_tokens_finds_a_token_itself_and_checks_shapes(backend):
    E = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
    ids, sims = nearest_tokens(bk.asarray(3.0 * E[[7, 2]]), bk.asarray(E), 1)
    np.testing.assert_array_equal(ids[:, 0], [7, 2])
    np.testing.assert_allclose(sims[:, 0], 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="dimensions"):
        nearest_tokens(E[:, :4], E, 2)
    with pytest.raises(ValueError, match="k must be"):
        nearest_tokens(E, E, 13)


def _clustered_embedding(seed=0, C=16):
    """Each category's words = its centroid + small noise; other tokens random."""
    tok = WordTokenizer()
    rng = np.random.default_rng(seed)
    E = rng.normal(size=(tok.vocab_size, C))
    for cat in CATEGORIES:
        centre = 4.0 * rng.normal(size=C)
        for i in tok.ids_of(cat):
            E[i] = centre + 0.1 * rng.normal(size=C)
    return tok, E


def test_purity_of_same_category_word_embeddings_is_one():
    tok, E = _clustered_embedding()
    for cat in ("colour", "animal", "place"):
        ids = tok.ids_of(cat)
        assert neighbour_purity(E[ids], E, tok, k=5) == 1.0
        assert neighbour_purity(E[ids], E, tok, k=5, exclude=ids) == 1.0


def test_random_baseline_is_reproducible_and_below_one_on_an_unstructured_embedding():
    tok = WordTokenizer()
    E = np.random.default_rng(1).normal(size=(tok.vocab_size, 16))
    base = random_baseline(E, n=20, k=5, seeds=(0, 1, 2), tokenizer=tok)
    assert base == random_baseline(E, n=20, k=5, seeds=(0, 1, 2), tokenizer=tok)
    assert len(base["purities"]) == 3
    assert 0 < base["min"] <= base["mean"] <= base["max"] < 1.0


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_real_tokens_read_positions_0_to_T_minus_1_never_the_shifted_ones(method):
    """The documented choice (``virtual_tokens.py``): real tokens keep positions 0..T-1. Poison
    every position row from T on: the logits do not change. Under the other convention
    (Hugging Face PEFT on GPT-2: real tokens at n..n+T-1) they would read the poisoned rows."""
    base = GPT(TINY, seed=3)
    cfg = PromptTuningConfig(num_virtual_tokens=3) if method == "prompt" else \
        PrefixTuningConfig(num_virtual_tokens=3)
    pm = get_peft_model(base, cfg)
    ids = bk.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 5)))
    want = host(pm(ids).data)
    w = host(base.pos_emb.weight.data).copy()
    w[5:] = 1e6                                                     # positions 5.. poisoned
    base.pos_emb.weight.data = bk.asarray(w)
    np.testing.assert_array_equal(host(pm(ids).data), want)
