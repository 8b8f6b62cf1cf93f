"""Proofs for minipeft.nn: the whole GPT's gradients, its masks, its cache, its inputs, its files.

Every claim is checked against an independent path: finite differences for gradients, a model
run without the cache for the cache, a second model with shifted position embeddings for the
``prompt=``/``past=`` inputs, byte comparisons for interrupted saves.
"""

import os
import pickle

import numpy as np
import pytest
from conftest import Interrupted, leftovers

from minipeft import backend as bk
from minipeft.autograd import Tensor, gradcheck, no_grad
from minipeft.autograd import functional as F
from minipeft.io import CheckpointError, load_model, save_model
from minipeft.nn import GPT, GPTConfig, StateDictError, generate

host = bk.to_numpy


def randomize(model, seed=0, std=0.4):
    """Replace every weight by a draw of a larger scale than the init (std 0.02), so that no
    gradient is so small that a wrong one could hide under the finite-difference tolerance.
    LayerNorm gains stay near 1; biases become nonzero."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        base = 1.0 if (".ln_" in f".{name}" and name.endswith("weight")) else 0.0
        p.data = bk.asarray(base + rng.normal(0.0, std, p.shape), dtype=p.dtype)
    return model


def ids_batch(V, B=2, T=5, seed=0):
    return bk.asarray(np.random.default_rng(seed).integers(0, V, (B, T)))


def logits_of(model, ids, **kw):
    with no_grad():
        return host(model(ids, **kw).data)


# --------------------------------------------------------------------------- gradients
GRAD_CONFIGS = {
    "causal-tied-bias": dict(causal=True, tie_weights=True, bias=True),
    "causal-untied-nobias": dict(causal=True, tie_weights=False, bias=False),
    "encoder-tied-bias-mean": dict(causal=False, tie_weights=True, bias=True, n_classes=3),
    "encoder-untied-nobias-first": dict(causal=False, tie_weights=False, bias=False, n_classes=3,
                                        pool="first"),
}


@pytest.mark.parametrize("variant", list(GRAD_CONFIGS))
def test_whole_model_gradient_matches_finite_differences(float64, backend, variant):
    cfg = GPTConfig(vocab_size=7, block_size=6, n_layer=2, n_head=2, n_embd=4,
                    **GRAD_CONFIGS[variant])
    model = randomize(GPT(cfg, seed=1), seed=2)
    params = dict(model.named_parameters())
    assert all(p.dtype == np.float64 for p in params.values())
    # the parameter list is the one a reader expects from the docstring, heads included
    assert ("lm_head.weight" in params) == (not cfg.tie_weights)
    assert ("cls_head.weight" in params) == bool(cfg.n_classes)
    assert ("blocks.1.attn.q_proj.bias" in params) == cfg.bias
    assert ("blocks.0.ln_1.bias" in params) == cfg.bias

    rng = np.random.default_rng(3)
    ids = ids_batch(cfg.vocab_size, B=2, T=5, seed=4)
    targets = rng.integers(0, cfg.vocab_size, (2, 5))
    targets[0, 1] = -100                                            # an ignored position
    targets = bk.asarray(targets)
    labels = bk.asarray(rng.integers(0, 3, 2))

    def loss(*_params):
        L = model.loss(ids, targets)
        if cfg.n_classes:                                           # the encoder's two heads
            L = L + F.cross_entropy(model.classify(ids), labels)
        return L

    res = gradcheck(loss, list(params.values()), eps=1e-6, atol=1e-8, rtol=1e-5,
                    max_elements=5, seed=5)
    assert res.ok and res.checked == sum(min(p.size, 5) for p in params.values())
    # not vacuous: every parameter got a real, sizeable gradient, except the key bias: q . b_k
    # adds one constant to all of a query's scores, which softmax ignores, so dL/db_k = 0 exactly
    for name, p in params.items():
        assert p.grad is not None, f"{name} got no gradient"
        biggest = np.abs(host(p.grad)).max()
        if name.endswith("k_proj.bias"):
            assert biggest < 1e-12, f"{name}: softmax is shift-invariant, gradient must be 0"
        else:
            assert biggest > 1e-4, f"{name}'s gradient is suspiciously small"


def test_gradient_through_prompt_and_past(float64):
    """What prompt and prefix tuning train: vectors fed through ``prompt=`` and ``past=``."""
    cfg = GPTConfig(vocab_size=7, block_size=8, n_layer=2, n_head=2, n_embd=4)
    model = randomize(GPT(cfg, seed=1), seed=2).requires_grad_(False)
    rng = np.random.default_rng(0)
    B, P, Tp, T, H, D = 2, 2, 2, 3, 2, 2
    prompt = Tensor(rng.normal(size=(P, 4)), requires_grad=True)
    past = [(Tensor(rng.normal(size=(B, H, Tp, D)), requires_grad=True),
             Tensor(rng.normal(size=(B, H, Tp, D)), requires_grad=True)) for _ in range(2)]
    ids = ids_batch(7, B, T, seed=1)
    leaves = [prompt] + [t for kv in past for t in kv]
    gradcheck(lambda *_: model(ids, prompt=prompt, past=past), leaves, atol=1e-8, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())          # frozen: no weight grads


# --------------------------------------------------------------------------- masks
def test_causal_model_never_looks_ahead(float64, backend):
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    model = randomize(GPT(cfg, seed=0), seed=1, std=0.3)
    ids = ids_batch(11, B=2, T=8, seed=2)
    base = logits_of(model, ids)
    for t in range(8):
        changed = host(ids).copy()
        changed[:, t] = (changed[:, t] + 1 + t) % 11
        out = logits_of(model, bk.asarray(changed))
        np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=0, atol=1e-12,
                                   err_msg=f"changing token {t} changed an earlier position")
        assert np.abs(out[:, t] - base[:, t]).max() > 1e-6         # its own position does see it


def test_encoder_looks_both_ways(float64):
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, causal=False,
                    n_classes=2)
    model = randomize(GPT(cfg, seed=0), seed=1, std=0.3)
    ids = ids_batch(11, B=2, T=8, seed=2)
    changed = host(ids).copy()
    changed[:, -1] = (changed[:, -1] + 3) % 11
    base, out = logits_of(model, ids), logits_of(model, bk.asarray(changed))
    assert (np.abs(out - base).max(axis=-1) > 1e-6).all()           # every position saw it
    with no_grad():
        c0, c1 = host(model.classify(ids).data), host(model.classify(bk.asarray(changed)).data)
    assert c0.shape == (2, 2) and np.abs(c0 - c1).max() > 1e-6


# --------------------------------------------------------------------------- KV cache
CACHE_CFG = GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=8, dropout=0.1)


def test_cached_forward_equals_full_forward(backend):
    model = randomize(GPT(CACHE_CFG, seed=0), seed=1, std=0.3).eval()
    ids = ids_batch(13, B=3, T=10, seed=2)
    full = logits_of(model, ids)
    # feed the sequence in chunks of 3, 1, 4, 2 tokens through the cache
    pieces, past, pos = [], None, 0
    with no_grad():
        for n in (3, 1, 4, 2):
            out, past = model(ids[:, pos:pos + n], past=past, start_pos=pos, use_cache=True)
            pieces.append(host(out.data))
            pos += n
    assert [kv[0].shape for kv in past] == [(3, 2, 10, 4)] * 2     # (B, H, T, D) per layer
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.8, 5)])
def test_generation_with_cache_equals_without(backend, temperature, top_k):
    model = randomize(GPT(CACHE_CFG, seed=0), seed=1, std=0.3)
    model.train()                                                   # generate must switch to eval
    prompt = ids_batch(13, B=3, T=4, seed=2)
    kw = dict(max_new_tokens=12, temperature=temperature, top_k=top_k, seed=7)
    cached = host(generate(model, prompt, use_cache=True, **kw))
    plain = host(generate(model, prompt, use_cache=False, **kw))
    np.testing.assert_array_equal(cached, plain)
    assert cached.shape == (3, 16) and (cached[:, :4] == host(prompt)).all()
    assert model.training                                           # mode restored afterwards
    if temperature:                                                 # the sampler really samples
        other = host(generate(model, prompt, use_cache=True, **{**kw, "seed": 8}))
        assert (other != cached).any()
        if top_k:                                                   # only top-k tokens drawn
            model.eval()
            for t in range(4, 16):
                lg = logits_of(model, bk.asarray(cached[:, :t]))[:, -1]
                allowed = np.argsort(lg, axis=-1)[:, -top_k:]
                assert all(cached[b, t] in allowed[b] for b in range(3))


def test_greedy_generation_is_the_argmax_chain(backend):
    """Independent of generate(): extend by argmax of a fresh full forward, step by step."""
    model = randomize(GPT(CACHE_CFG, seed=0), seed=1, std=0.3).eval()
    seq = host(ids_batch(13, B=2, T=3, seed=4))
    out = host(generate(model, bk.asarray(seq), max_new_tokens=6))
    for _ in range(6):
        nxt = logits_of(model, bk.asarray(seq))[:, -1].argmax(axis=-1)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(out, seq)


def test_generation_past_the_context_is_refused():
    """The last new token is predicted, never fed: a context of 16 yields up to 17 tokens."""
    model = GPT(CACHE_CFG, seed=0)
    for use_cache in (True, False):
        out = generate(model, ids_batch(13, B=1, T=10), max_new_tokens=7, use_cache=use_cache)
        assert out.shape == (1, 17)
        with pytest.raises(ValueError, match="block_size=16"):
            generate(model, ids_batch(13, B=1, T=10), max_new_tokens=8, use_cache=use_cache)


def test_sampling_float32_logits_draws_from_their_softmax():
    """float32 probabilities must be renormalised in float64 before Generator.choice."""
    from minipeft.nn.generate import sample_next

    rng = np.random.default_rng(0)
    row = rng.normal(0.0, 2.0, 13).astype(np.float32)
    logits = bk.asarray(np.tile(row, (4000, 1)))                   # one row, 4000 draws
    draws = host(sample_next(logits, 1.0, None, np.random.default_rng(1)))
    p = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    freq = np.bincount(draws, minlength=13) / len(draws)
    assert np.abs(freq - p).max() < 0.03                           # ~4 standard errors
    top3 = host(sample_next(logits[:50], 1.0, 3, np.random.default_rng(1)))
    assert set(top3.tolist()) <= set(np.argsort(row)[-3:].tolist())


# --------------------------------------------------------------------------- prompt= and past=
def shifted_twin(model, P, rng):
    """A model that reads ``P`` extra real tokens in front, at positions 0..P-1 of its own, and
    the original tokens at positions P.. with the *original* position vectors 0...

    Its first P position vectors are chosen so that token ``a_i`` at position i has embedding
    exactly ``prompt_i``. If GPT treats ``prompt=`` as documented (no position embedding for the
    prompt, real tokens at 0..T-1), ``model(ids, prompt=prompt)`` equals the twin's logits on
    ``[a, ids]`` from position P on. Returns (twin, prompt vectors (P, C), a ids (P,))."""
    cfg = model.config
    twin_cfg = GPTConfig(**{**cfg.to_dict(), "block_size": cfg.block_size + P})
    twin = GPT(twin_cfg)
    state = {k: host(v) for k, v in model.state_dict().items()}
    a = rng.integers(0, cfg.vocab_size, P)
    prompt = rng.normal(0.0, 1.0, (P, cfg.n_embd))
    lead = prompt - state["tok_emb.weight"][a]                      # twin's positions 0..P-1
    state["pos_emb.weight"] = np.concatenate([lead, state["pos_emb.weight"]])
    twin.load_state_dict(state)
    return twin, prompt, a


@pytest.mark.parametrize("causal", [True, False])
def test_prompt_vectors_get_no_position_and_tokens_keep_theirs(float64, causal):
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, causal=causal)
    model = randomize(GPT(cfg, seed=0), seed=1, std=0.3)
    rng = np.random.default_rng(5)
    P, B, T = 3, 2, 5
    twin, prompt, a = shifted_twin(model, P, rng)
    ids = host(ids_batch(11, B, T, seed=6))
    joined = np.concatenate([np.tile(a, (B, 1)), ids], axis=1)      # (B, P + T) real tokens
    expect = logits_of(twin, bk.asarray(joined))[:, P:]
    got = logits_of(model, bk.asarray(ids), prompt=Tensor(prompt))
    assert got.shape == (B, T, 11)                                  # virtual tokens dropped
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-10)
    # a (B, P, C) prompt: row b behaves as that row alone with its own (P, C) prompt
    batched = rng.normal(size=(B, P, 8))
    got_b = logits_of(model, bk.asarray(ids), prompt=Tensor(batched))
    for b in range(B):
        row = logits_of(model, bk.asarray(ids[b:b + 1]), prompt=Tensor(batched[b]))
        np.testing.assert_allclose(got_b[b:b + 1], row, rtol=0, atol=1e-10)


def test_past_is_a_prefix_of_keys_and_values_and_tokens_keep_positions(float64):
    """Prefix tuning's use of ``past=``: keys/values of P vectors in front, tokens at 0..T-1."""
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    model = randomize(GPT(cfg, seed=0), seed=1, std=0.3)
    rng = np.random.default_rng(7)
    P, B, T = 3, 2, 5
    twin, _, a = shifted_twin(model, P, rng)
    ids = host(ids_batch(11, B, T, seed=8))
    joined = np.concatenate([np.tile(a, (B, 1)), ids], axis=1)
    expect = logits_of(twin, bk.asarray(joined))[:, P:]
    with no_grad():
        _, past = twin(bk.asarray(joined[:, :P]), use_cache=True)   # the P prefix positions
    got = logits_of(model, bk.asarray(ids), past=past, start_pos=0)
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-10)


def test_context_overflow_is_a_clear_error():
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    model = GPT(cfg)
    rng = np.random.default_rng(0)
    with no_grad():
        _, past = model(ids_batch(11, B=1, T=3), use_cache=True)
    prompt = Tensor(rng.normal(size=(3, 8)))
    cases = {
        "too many tokens": dict(ids=ids_batch(11, B=1, T=9)),
        "start_pos + T": dict(ids=ids_batch(11, B=1, T=4), start_pos=5),
        "prompt + T": dict(ids=ids_batch(11, B=1, T=6), prompt=prompt),
        "past + T": dict(ids=ids_batch(11, B=1, T=6), past=past, start_pos=0),
    }
    for why, kw in cases.items():
        try:
            model(**kw)
        except ValueError as exc:
            assert "block_size=8" in str(exc), f"{why}: unclear message {exc}"
        else:
            pytest.fail(f"{why}: no error")
    with pytest.raises(ValueError, match="one \\(k, v\\) per layer"):
        model(ids_batch(11, B=1, T=2), past=past[:1], start_pos=3)
    model(ids_batch(11, B=1, T=8))                                  # exactly full is fine
    model(ids_batch(11, B=1, T=5), prompt=prompt)


# --------------------------------------------------------------------------- state and files
SMALL = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, tie_weights=False)


def snapshot(model):
    return {k: host(v).copy() for k, v in model.state_dict().items()}


def test_save_load_round_trip_gives_identical_logits(tmp_path, backend):
    model = randomize(GPT(SMALL, seed=0), seed=1)
    save_model(model, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "m", seed=99)                    # another init, overwritten
    assert loaded.config == model.config
    ids = ids_batch(11, B=2, T=8)
    np.testing.assert_array_equal(logits_of(loaded, ids), logits_of(model, ids))
    a, b = snapshot(model), snapshot(loaded)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_load_state_dict_names_every_problem_and_changes_nothing():
    model = GPT(SMALL, seed=0)
    before = snapshot(model)
    state = {k: v + 1.0 for k, v in before.items()}                 # otherwise valid new values
    del state["blocks.1.mlp.fc_in.bias"]                            # missing
    state["blocks.0.attn.qkv.weight"] = np.zeros((3, 3))            # unexpected
    state["lm_head.weight"] = np.zeros((11, 9))                     # mis-shaped
    with pytest.raises(StateDictError) as err:
        model.load_state_dict(state)
    msg = str(err.value)
    for name in ("blocks.1.mlp.fc_in.bias", "blocks.0.attn.qkv.weight", "lm_head.weight",
                 "(11, 8)", "(11, 9)"):
        assert name in msg
    after = snapshot(model)
    assert all((before[k] == after[k]).all() for k in before)       # nothing was copied
    # each problem alone is reported too
    for bad in ({k: v for k, v in before.items() if k != "ln_f.bias"},
                {**before, "extra": np.zeros(1)},
                {**before, "tok_emb.weight": np.zeros((8, 11))}):
        with pytest.raises(StateDictError):
            model.load_state_dict(bad)
    assert all((before[k] == snapshot(model)[k]).all() for k in before)


@pytest.mark.parametrize("damage", ["truncated", "header-cut", "garbage", "empty", "bad-json",
                                    "huge-header", "extra-bytes"])
def test_damaged_safetensors_file_is_a_checkpoint_error(tmp_path, damage):
    save_model(GPT(SMALL), tmp_path)
    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes({
        "truncated": raw[:len(raw) - 100],
        "header-cut": raw[:40],
        "garbage": os.urandom(500),
        "empty": b"",
        "bad-json": raw[:8] + b"#" + raw[9:],
        "huge-header": (2 ** 40).to_bytes(8, "little") + raw[8:],
        "extra-bytes": raw + b"\x00" * 16,
    }[damage])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path)


def test_damaged_or_foreign_config_is_a_checkpoint_error(tmp_path):
    save_model(GPT(SMALL), tmp_path)
    cfg_path = tmp_path / "config.json"
    good = cfg_path.read_text()
    cfg_path.write_text(good[:len(good) // 2])                      # truncated JSON
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)
    cfg_path.write_text(good.replace('"n_embd": 8', '"n_embd": 8, "n_inner": 3'))
    with pytest.raises(CheckpointError, match="not a GPTConfig"):
        load_model(tmp_path)
    cfg_path.write_text(good.replace('"n_embd": 8', '"n_embd": -8'))  # parses, but invalid
    with pytest.raises(CheckpointError, match="n_embd"):
        load_model(tmp_path)
    # weights and config from two different models: refused, not half-loaded
    save_model(GPT(GPTConfig(**{**SMALL.to_dict(), "n_layer": 1})), tmp_path / "other")
    cfg_path.write_text((tmp_path / "other" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nowhere")


@pytest.mark.parametrize("where", ["write", "fsync", "rename"])
def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch, interrupt_save, where):
    old_model = randomize(GPT(SMALL, seed=0), seed=1)
    save_model(old_model, tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    interrupt_save(where)
    with pytest.raises((Interrupted, KeyboardInterrupt)):
        save_model(randomize(GPT(SMALL, seed=0), seed=2), tmp_path)
    monkeypatch.undo()
    assert leftovers(tmp_path) == []
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before
    ids = ids_batch(11)
    np.testing.assert_array_equal(logits_of(load_model(tmp_path), ids), logits_of(old_model, ids))


def test_loading_never_unpickles(tmp_path, monkeypatch):
    # 1. a pickle posing as weights is refused, and its payload never runs
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    save_model(GPT(SMALL), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "m")
    assert not marker.exists()
    # 2. a normal load touches neither pickle nor np.load
    save_model(GPT(SMALL), tmp_path / "ok")

    def forbidden(*a, **k):
        raise AssertionError("loading used an unpickling path")

    for mod, attr in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (np, "load")):
        monkeypatch.setattr(mod, attr, forbidden)
    load_model(tmp_path / "ok")


# --------------------------------------------------------------------------- bad input
def test_bad_ids_are_clear_errors():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    cases = [
        (bk.asarray([[1, 2, 11]]), r"\[0, 11\).*\[1, 11\]"),        # one past the vocab
        (bk.asarray([[-1, 2, 3]]), r"\[0, 11\).*\[-1, 3\]"),        # negative
        (bk.asarray([[1.0, 2.0]]), "integer.*float64"),             # float ids
        (bk.asarray([1, 2, 3]), r"2-D.*\(3,\)"),                     # 1-D ids
        (bk.asarray(np.zeros((1, 2, 3), dtype=np.int64)), r"2-D.*\(1, 2, 3\)"),
    ]
    for ids, msg in cases:
        with pytest.raises(ValueError, match=msg):
            model(ids)
    with pytest.raises(ValueError, match="integer"):
        model.loss(bk.asarray([[0.5, 1.5]]), bk.asarray([[1, 2]]))


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(n_embd=30, n_head=4), ValueError, "n_embd=30 must be divisible by n_head=4"),
    (dict(n_layer=-1), ValueError, "GPTConfig.n_layer must be >= 1, got -1"),
    (dict(vocab_size=0), ValueError, "GPTConfig.vocab_size must be >= 1, got 0"),
    (dict(block_size=8.0), TypeError, "GPTConfig.block_size must be an integer, got 8.0"),
    (dict(n_head=-2), ValueError, "GPTConfig.n_head must be >= 1"),
    (dict(dropout=1.0), ValueError, r"GPTConfig.dropout must be < 1.0, got 1.0"),
    (dict(dropout=-0.1), ValueError, r"GPTConfig.dropout must be >= 0.0"),
    (dict(dropout=float("nan")), ValueError, r"GPTConfig.dropout must be finite"),
    (dict(dropout="0.1"), TypeError, r"GPTConfig.dropout must be a number"),
    (dict(n_classes=-1), ValueError, "GPTConfig.n_classes must be >= 0"),
    (dict(pool="max"), ValueError, r"GPTConfig.pool must be one of \['mean', 'first'\]"),
    (dict(bias="no"), TypeError, "GPTConfig.bias must be True or False, got 'no'"),
    (dict(tie_weights=1), TypeError, "GPTConfig.tie_weights must be True or False"),
    (dict(causal=None), TypeError, "GPTConfig.causal must be True or False"),
])
def test_config_validation_messages(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        GPTConfig(**kwargs)


def test_model_needs_a_config_and_classify_needs_classes():
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT({"vocab_size": 11})
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    with pytest.raises(ValueError, match="n_classes > 0"):
        model.classify(ids_batch(11))
