"""Issue 15, the non-PEFT classes: every bad input is refused with an error that names it,
*before any work*, and leaves the model and the files exactly as they were.

* class 6: GPTConfig, TrainConfig, ``train`` (ragged or empty batches), ``generate`` and the
  KV cache ``past``: each field by name, kind and range;
* class 7: the CLI checks every argument and everything it will write before it trains;
* class 4 (the base model's file): dtypes a safetensors file may hold get a named decision,
  and NaN/inf in a base model is refused.

Each test asserts the exception (type and the name in its message) *and* that every parameter
is bit-for-bit what it was (``fingerprint``). Tiny models, so the file runs in seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from minipeft import backend as bk
from minipeft.autograd import no_grad
from minipeft.nn import GPT, GPTConfig, generate
from minipeft.train import TrainConfig, evaluate_lm, train

V, BLOCK = 13, 12
CFG = GPTConfig(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=2, n_embd=8)


def fingerprint(model) -> dict:
    """Every parameter's bytes, dtype, shape and trainability: what a refused call must keep."""
    return {n: (bk.to_numpy(p.data).tobytes(), p.data.dtype.str, p.shape, p.requires_grad)
            for n, p in model.named_parameters()}


def batches(T=6, seed=0):
    rng = np.random.default_rng(seed)

    def next_batch(B):
        x = rng.integers(0, V, (B, T))
        return x, np.roll(x, -1, axis=1)
    return next_batch


# ============================================================================ class 6: configs
BAD_GPT = [   # (field=value, error, the words the message must hold)
    (dict(bias="no"), TypeError, "GPTConfig.bias must be True or False, got 'no'"),
    (dict(causal="yes"), TypeError, "GPTConfig.causal must be True or False"),
    (dict(n_embd=8.0), TypeError, "GPTConfig.n_embd must be an integer"),
    (dict(n_layer=True), TypeError, "GPTConfig.n_layer must be an integer"),
    (dict(dropout=float("nan")), ValueError, "GPTConfig.dropout must be finite"),
    (dict(n_classes=1.5), TypeError, "GPTConfig.n_classes must be an integer"),
    (dict(pool=None), ValueError, "GPTConfig.pool must be one of"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD_GPT)
def test_gpt_config_names_each_bad_field(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        GPTConfig(**kwargs)


BAD_TRAIN = [
    (dict(min_lr_ratio=float("nan")), ValueError, "TrainConfig.min_lr_ratio must be finite"),
    (dict(min_lr_ratio=-0.5), ValueError, "TrainConfig.min_lr_ratio must be >= 0"),
    (dict(min_lr_ratio=2.0), ValueError, "TrainConfig.min_lr_ratio must be <= 1"),
    (dict(steps=2.5), TypeError, "TrainConfig.steps must be an integer, got 2.5"),
    (dict(batch_size=4.0), TypeError, "TrainConfig.batch_size must be an integer"),
    (dict(batch_size=0), ValueError, "TrainConfig.batch_size must be >= 1"),
    (dict(log_every=0), ValueError, "TrainConfig.log_every must be >= 1, got 0"),
    (dict(lr="3e-3"), TypeError, "TrainConfig.lr must be a number"),
    (dict(lr=0.0), ValueError, "TrainConfig.lr must be > 0"),
    (dict(warmup=1.5), TypeError, "TrainConfig.warmup must be an integer"),
    (dict(eval_every=-1), ValueError, "TrainConfig.eval_every must be >= 0"),
    (dict(checkpoint_every=0.5), TypeError, "TrainConfig.checkpoint_every must be an integer"),
    (dict(progress="no"), TypeError, "TrainConfig.progress must be True or False"),
    (dict(log_path=3), TypeError, "TrainConfig.log_path must be None or a path"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD_TRAIN)
def test_train_config_names_each_bad_field(kwargs, exc, msg):
    # these once passed construction and failed later: log_every=0 with ZeroDivisionError
    # *after* step 0 was applied, min_lr_ratio=NaN by turning every weight NaN
    with pytest.raises(exc, match=msg):
        TrainConfig(**kwargs)


# ============================================================================ class 6: batches
def _train_once(model, next_batch):
    cfg = TrainConfig(steps=3, batch_size=2, warmup=0, weight_decay=0.1, progress=False)
    return train(model, next_batch, cfg)


@pytest.mark.parametrize("bad,msg", [
    (([[1, 2, 3], [4, 5]], [[2, 3, 4], [5, 6]]), r"batch x at step 0 must be a rectangular"),
    ((np.zeros((0, 6), np.int64), np.zeros((0, 6), np.int64)), r"empty batch at step 0"),
    ((np.zeros((2, 6), np.int64),), r"next_batch must return a pair \(x, y\)"),
])
def test_train_refuses_a_ragged_or_empty_batch_before_the_step(bad, msg):
    # weight decay 0.1: an applied step changes every weight even when the gradient is 0, so an
    # empty batch that slipped through would show as changed weights
    model = GPT(CFG, seed=1)
    before = fingerprint(model)
    with pytest.raises((ValueError, TypeError), match=msg):
        _train_once(model, lambda B: bad)
    assert fingerprint(model) == before


def test_train_refuses_an_empty_batch_arriving_later_and_keeps_the_good_steps():
    model = GPT(CFG, seed=1)
    good, calls, seen = batches(), [], {}

    def next_batch(B):
        calls.append(B)
        if len(calls) == 3:
            seen["before"] = fingerprint(model)          # after two applied steps
            return np.zeros((0, 6), np.int64), np.zeros((0, 6), np.int64)
        return good(B)
    with pytest.raises(ValueError, match="empty batch at step 2"):
        _train_once(model, next_batch)
    assert fingerprint(model) == seen["before"]


def test_model_refuses_ragged_ids_and_targets_and_empty_batches_by_name():
    model = GPT(CFG)
    before = fingerprint(model)
    with pytest.raises(ValueError, match="GPT: ids must be a rectangular array"):
        model([[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match="GPT.loss: targets must be a rectangular array"):
        model.loss([[1, 2], [3, 4]], [[1, 2], [3]])
    with pytest.raises(ValueError, match=r"at least one row .*got shape \(0, 4\)"):
        model(np.zeros((0, 4), np.int64))
    with pytest.raises(ValueError, match=r"evaluate_lm: x and y must hold the same number"):
        evaluate_lm(model, np.zeros((0, 4), np.int64), np.zeros((0, 4), np.int64))
    assert fingerprint(model) == before


# ============================================================================ class 6: generate
@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(temperature="0.7"), TypeError, "generate: temperature must be a number"),
    (dict(temperature=-1.0), ValueError, "generate: temperature must be >= 0"),
    (dict(temperature=math.inf), ValueError, "generate: temperature must be finite"),
    (dict(max_new_tokens=2.5), TypeError, "generate: max_new_tokens must be an integer"),
    (dict(top_k=1.5, temperature=1.0), TypeError, "generate: top_k must be an integer"),
    (dict(top_k=0, temperature=1.0), ValueError, "generate: top_k must be >= 1"),
    (dict(seed=-3), ValueError, "generate: seed must be >= 0"),
    (dict(use_cache="no"), TypeError, "generate: use_cache must be True or False"),
])
def test_generate_names_each_bad_argument(kwargs, exc, msg):
    model = GPT(CFG)
    before = fingerprint(model)
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(exc, match=msg):
        generate(model, np.ones((1, 2), np.int64), **args)
    assert fingerprint(model) == before


def test_a_vanishing_temperature_samples_the_argmax_instead_of_nan():
    # temperature 1e-45 once gave logits / T = inf, inf - inf = NaN probabilities and an error
    # from the sampler; the limit T -> 0 of softmax(z / T) is the argmax, so it must be greedy.
    model = GPT(CFG, seed=3)
    ids = bk.asarray(np.random.default_rng(0).integers(0, V, (3, 4)))
    with no_grad():
        expect = bk.to_numpy(model(ids).data[:, -1].argmax(axis=-1))  # an independent argmax
    out = generate(model, ids, 1, temperature=1e-45, top_k=5, seed=0)
    np.testing.assert_array_equal(bk.to_numpy(out[:, -1]), expect)


def test_a_wrongly_shaped_past_is_named_before_any_work():
    model = GPT(CFG)
    ids = np.ones((2, 3), np.int64)
    with no_grad():
        _, past = model(ids, use_cache=True)                          # (2, H=2, 3, D=4) each
    k, v = past[0]
    bad = {
        "too few layers": (past[:1], r"one \(k, v\) per layer \(2\), got 1"),
        "not a pair": ([(k,), past[1]], r"past\[0\] must be a pair \(k, v\)"),
        "wrong batch": ([(k[:1], v[:1]), past[1]], r"past\[0\] must be a pair .*\(2, 2, Tp, 4\)"),
        "k and v differ": ([(k, v[:, :, :2]), past[1]], r"past\[0\] must be a pair"),
        "lengths differ": ([past[0], (k[:, :, :2], v[:, :, :2])], r"different lengths Tp"),
        "not a list": (k, r"past must be a list"),
    }
    before = fingerprint(model)
    for why, (p, msg) in bad.items():
        with pytest.raises(ValueError, match=msg), no_grad():
            model(np.ones((2, 1), np.int64), past=p, start_pos=3)
        assert fingerprint(model) == before, why
