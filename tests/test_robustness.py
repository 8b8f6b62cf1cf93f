"""Bad input to the public API: each gets a clear, specific error, and a failing call changes
nothing.

Every test feeds one kind of bad input: wrong shapes and dtypes, token ids out of range,
sequences longer than the context, NaN and inf (in inputs, in training, in adapters being
merged), configs that cannot work, adapter files that are damaged, foreign or half written, and
files that try to run code. It asserts the exception type, that the message names the bad thing,
and, wherever the call could have changed the model, that every parameter is bit-identical
afterwards (with its trainability flag, its mask, and the module tree around it).

Tiny models built directly (never the pretrained base), so the whole module runs in seconds.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
from conftest import Interrupted, leftovers
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft import backend as bk
from minipeft.autograd import Tensor, matmul, no_grad
from minipeft.autograd import functional as F
from minipeft.io import CheckpointError, load_tensors, save_tensors
from minipeft.nn import GPT, GPTConfig, generate
from minipeft.optim import SGD, AdamW
from minipeft.peft import (
    AdapterConfig,
    IA3Config,
    LoraConfig,
    MergedAdapterError,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    SelectiveConfig,
    add_weighted_adapter,
    get_peft_model,
    load_peft_model,
    read_adapter,
)
from minipeft.peft.core import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_layers
from minipeft.train import TrainConfig, TrainingDivergedError, train

V, BLOCK = 20, 16
CFG = GPTConfig(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16)
FEW = settings(max_examples=12, deadline=None)
host = bk.to_numpy


def ids_for(B=2, T=6, seed=0):
    return bk.asarray(np.random.default_rng(seed).integers(0, V, (B, T)))


def randomize(pm, seed=0, std=0.3):
    """Random values in every trainable tensor, as if trained (zero inits hide mistakes)."""
    rng = np.random.default_rng(seed)
    for p in pm.trainable_parameters():
        p.data = bk.asarray(rng.normal(0, std, p.shape), dtype=p.dtype)
    return pm


def state(model):
    """All that a failing call must leave alone: each parameter's bits, flag and mask, the
    module tree (no wrapper left behind) and, for a PeftModel, its adapters and the active one."""
    params = {n: (host(p.data).tobytes(), p.data.dtype.str, p.shape, p.requires_grad,
                  None if p.mask is None else host(p.mask).tobytes())
              for n, p in model.named_parameters()}
    tree = [(n, type(m).__name__) for n, m in model.named_modules()]
    extra = None
    if isinstance(model, PeftModel):
        extra = (dict(model.peft_configs), model.active_adapter,
                 [(n, m.active, m.adapter_names()) for n, m in peft_layers(model.base_model)])
    return params, tree, extra


def assert_unchanged(before, model):
    params, tree, extra = state(model)
    assert tree == before[1], "the module tree changed"
    assert list(params) == list(before[0]), set(params) ^ set(before[0])
    for name, old in before[0].items():
        assert params[name] == old, f"{name} changed"
    assert extra == before[2], "the adapters or the active adapter changed"


def logits(model, ids, **kw):
    with no_grad():
        return host(model(ids, **kw).data)


# ============================================================================ shapes and dtypes
@pytest.fixture(scope="module")
def models():
    """One plain GPT and one model per kind of input surgery, shared by the read-only tests."""
    return {
        "gpt": GPT(CFG),
        "lora_emb": get_peft_model(GPT(CFG), LoraConfig(r=2, target_embedding=True)),
        "prompt": get_peft_model(GPT(CFG), PromptTuningConfig(num_virtual_tokens=4)),
        "prefix": get_peft_model(GPT(CFG), PrefixTuningConfig(num_virtual_tokens=4)),
    }


BAD_IDS = st.one_of(
    st.tuples(st.sampled_from([1, 3, 4]), st.sampled_from(["int64", "int32"])),  # wrong rank
    st.tuples(st.just(2), st.sampled_from(["float32", "float64", "bool", "complex64"])),
)


@FEW
@given(kind=st.sampled_from(["gpt", "lora_emb", "prompt", "prefix"]), bad=BAD_IDS,
       data=st.data())
def test_ids_of_wrong_rank_or_dtype_are_named_with_their_shape_and_dtype(models, kind, bad,
                                                                         data):
    ndim, dtype = bad
    shape = tuple(data.draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim)))
    ids = np.random.default_rng(0).integers(0, V, shape).astype(dtype)
    if dtype.startswith("float"):
        ids.flat[0] = data.draw(st.sampled_from([np.nan, np.inf, 1.5, 3.0]))  # NaN ids too
    model = models[kind]
    before = state(model)
    with pytest.raises(ValueError, match=re.escape(f"ids must be a 2-D integer array (B, T), got "
                                                   f"shape {shape} and dtype {dtype}")):
        model(bk.asarray(ids))
    assert_unchanged(before, model)


@FEW
@given(kind=st.sampled_from(["gpt", "lora_emb", "prompt", "prefix"]),
       B=st.integers(1, 3), T=st.integers(1, 8),
       bad=st.one_of(st.integers(-10**6, -1), st.integers(V, 10**9)), data=st.data())
def test_out_of_range_ids_name_vocab_size_and_the_values_seen(models, kind, B, T, bad, data):
    ids = np.random.default_rng(T).integers(0, V, (B, T))
    ids[data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, T - 1))] = bad
    lo, hi = int(ids.min()), int(ids.max())
    with pytest.raises(ValueError, match=re.escape(f"must lie in [0, {V}) (vocab_size), got "
                                                   f"values in [{lo}, {hi}]")):
        models[kind](bk.asarray(ids))


def test_an_empty_sequence_is_refused_by_name_not_by_a_reduction_error(models):
    for kind in ("gpt", "prompt"):
        with pytest.raises(ValueError, match=r"at least one token per row, got shape \(2, 0\)"):
            models[kind](bk.asarray(np.zeros((2, 0), dtype=np.int64)))


def test_nested_list_ids_work_through_peft_models_as_through_gpt(models):
    ids = [[1, 2, 3], [4, 5, 6]]
    for kind in models:                     # prompt/prefix read ids.shape before the GPT does
        np.testing.assert_array_equal(logits(models[kind], ids),
                                      logits(models[kind], bk.asarray(ids)))


def test_prompt_start_pos_and_mask_of_the_wrong_kind_are_named(models):
    gpt, ids = models["gpt"], ids_for(B=2, T=5)
    cases = [
        (dict(prompt=Tensor(np.zeros((3, 8), np.float32))), r"prompt must have shape \(P, 16\) "
                                                             r"or \(2, P, 16\).*got \(3, 8\)"),
        (dict(prompt=Tensor(np.zeros((3, 3, 16), np.float32))), r"prompt .*got \(3, 3, 16\)"),
        (dict(prompt=Tensor(np.zeros((1, 2, 3, 16), np.float32))), r"prompt .*\(1, 2, 3, 16\)"),
        (dict(start_pos=-1), r"start_pos must be an int >= 0, got -1"),
        (dict(start_pos=1.5), r"start_pos must be an int >= 0, got 1.5"),
        (dict(mask=np.ones((2, 2), bool)),
         r"mask must be a boolean array that broadcasts to \(B, H, Tq, Tk\) = \(2, 2, 5, 5\), "
         r"got shape \(2, 2\)"),
        (dict(mask=np.ones((5, 5), np.float32)), r"mask .*dtype float32"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            gpt(ids, **kwargs)
    causal = np.tril(np.ones((5, 5), bool))                 # a mask that fits still works
    np.testing.assert_array_equal(logits(gpt, ids, mask=causal), logits(gpt, ids))
    np.testing.assert_array_equal(logits(gpt, ids, start_pos=np.int64(0)), logits(gpt, ids))


SHAPE = st.lists(st.integers(1, 4), min_size=2, max_size=3).map(tuple)


@FEW
@given(a=SHAPE, b=SHAPE)
def test_matmul_of_mismatched_shapes_names_both_shapes(a, b):
    try:
        np.matmul(np.zeros(a), np.zeros(b))
    except ValueError:
        with pytest.raises(ValueError, match=re.escape(f"matmul: shapes {a} and {b}") +
                           "|" + re.escape(f"batch dimensions of {a} and {b}")):
            matmul(Tensor(np.zeros(a)), Tensor(np.zeros(b)))
    else:                                   # NumPy accepts it: so must matmul, same shape
        assert matmul(Tensor(np.zeros(a)), Tensor(np.zeros(b))).shape == \
            np.matmul(np.zeros(a), np.zeros(b)).shape
    with pytest.raises(ValueError, match=re.escape(f"shapes {a} and (3,)")):
        matmul(Tensor(np.zeros(a)), Tensor(np.zeros(3)))        # 1-D is refused, not guessed


@FEW
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple),
       targets=st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple))
def test_cross_entropy_targets_of_the_wrong_shape_name_both_shapes(lead, targets):
    logits_ = Tensor(np.zeros(lead + (5,), np.float32))
    if targets == lead:
        targets = targets + (1,)
    with pytest.raises(ValueError, match=re.escape(f"logits of shape {lead + (5,)} need targets "
                                                   f"of shape {lead}, got {targets}")):
        F.cross_entropy(logits_, np.zeros(targets, np.int64))


def test_cross_entropy_targets_of_the_wrong_kind_and_other_ops():
    logits_ = Tensor(np.zeros((2, 3, 5), np.float32))
    with pytest.raises(TypeError, match="targets must be integer class ids, got float64"):
        F.cross_entropy(logits_, np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 5\) or equal "
                                         r"ignore_index=-100"):
        F.cross_entropy(logits_, np.full((2, 3), 5))
    assert np.isfinite(F.cross_entropy(logits_, np.full((2, 3), -100)).item())  # all ignored
    W = Tensor(np.zeros((7, 4), np.float32))
    with pytest.raises(TypeError, match="token ids must be integers, got float32"):
        F.embedding(W, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 7\), got values in "
                                         r"\[0, 7\]"):
        F.embedding(W, np.array([[0, 7]]))
    q = Tensor(np.zeros((1, 2, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"attention: expected q \(B, H, Tq, D\).*\(1, 2, 3, 5\)"):
        F.attention(q, Tensor(np.zeros((1, 2, 3, 5), np.float32)),
                    Tensor(np.zeros((1, 2, 3, 5), np.float32)))


def test_model_loss_names_targets_of_the_wrong_shape_dtype_or_range(models):
    gpt, ids = models["gpt"], ids_for(B=2, T=3)
    with pytest.raises(ValueError, match=r"need targets of shape \(2, 3\), got \(2, 4\)"):
        gpt.loss(ids, np.zeros((2, 4), np.int64))
    with pytest.raises(TypeError, match="targets must be integer"):
        gpt.loss(ids, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, {V}\)"):
        gpt.loss(ids, np.full((2, 3), V))


# ============================================================================ the context budget
@FEW
@given(kind=st.sampled_from(["gpt", "prompt", "prefix"]), T=st.integers(1, BLOCK + 4))
def test_sequences_longer_than_the_context_are_refused_by_budget(models, kind, T):
    n = 0 if kind == "gpt" else 4                  # soft prompts spend context too
    ids = ids_for(B=1, T=T)
    if n + T <= BLOCK:
        assert logits(models[kind], ids).shape == (1, T, V)    # up to the limit it works
        return
    if kind == "gpt":
        msg = rf"too long for block_size={BLOCK}: {T} tokens"
    else:
        msg = (rf"{n} virtual tokens \+ {T} input tokens = {n + T} exceed the model's "
               rf"block_size={BLOCK}; give at most {BLOCK - n} input tokens")
    with pytest.raises(ValueError, match=msg):
        models[kind](ids)


@pytest.mark.parametrize("kind", ["gpt", "prompt", "prefix"])
def test_generation_past_the_context_is_refused_and_restores_the_mode(models, kind):
    model = models[kind]
    n = 0 if kind == "gpt" else 4
    model.train()
    before = state(model)
    ids = ids_for(B=1, T=6)
    room = BLOCK - n - 6 + 1               # the last new token is predicted, never fed back
    assert generate(model, ids, room).shape == (1, 6 + room)
    with pytest.raises(ValueError, match=f"block_size={BLOCK}"):
        generate(model, ids, room + 1)
    assert model.training and all(m.training for _, m in model.named_modules())
    assert_unchanged(before, model)
    model.eval()


def test_generate_names_bad_ids_temperature_and_accepts_any_top_k(models):
    gpt = models["gpt"]
    with pytest.raises(ValueError, match=r"generate: ids must be a 2-D integer array \(B, T\), "
                                         r"got shape \(3,\)"):
        generate(gpt, bk.asarray([1, 2, 3]), 2)
    with pytest.raises(ValueError, match="generate: temperature must be >= 0, got nan"):
        generate(gpt, ids_for(B=1, T=2), 2, temperature=float("nan"))
    with pytest.raises(ValueError, match="generate: top_k must be positive, got 0"):
        generate(gpt, ids_for(B=1, T=2), 2, temperature=1.0, top_k=0)
    # top_k beyond the vocabulary keeps every token: the same draws as no top_k at all
    a = generate(gpt, ids_for(B=2, T=2), 4, temperature=1.0, top_k=10 * V, seed=3)
    b = generate(gpt, ids_for(B=2, T=2), 4, temperature=1.0, top_k=None, seed=3)
    np.testing.assert_array_equal(host(a), host(b))


# ============================================================================ NaN and inf: training
def _batches(seed=0, T=8):
    rng = np.random.default_rng(seed)

    def next_batch(B):
        x = rng.integers(0, V, (B, T))
        return x, np.roll(x, -1, axis=1)
    return next_batch


@settings(max_examples=6, deadline=None)
@given(bad_step=st.integers(0, 3), kind=st.sampled_from(["nan-loss", "inf-loss", "nan-grad"]))
def test_training_stops_at_the_bad_step_and_keeps_the_last_good_state(bad_step, kind):
    """What train() guarantees: a step whose loss or gradient is not finite is not applied.
    So the weights, the optimizer's moments and its step count are those after the last good
    step, no gradient is left behind, no checkpoint is written for the bad step, and training
    can go on from there."""
    pm = get_peft_model(GPT(CFG, seed=0), LoraConfig(r=2, target_modules=("q_proj", "fc_in")))
    opt = AdamW(pm.trainable_parameters(), lr=1e-2)
    draw, seen, saved = _batches(), [], []

    def next_batch(B):                                      # state after the previous step
        moments = [(host(s["m"]).copy(), host(s["v"]).copy()) for s in opt.state]
        seen.append((state(pm), opt.t, moments))
        return draw(B)

    def loss(x, y, **kw):
        out = PeftModel.loss(pm, x, y, **kw)
        if len(seen) - 1 != bad_step:
            return out
        if kind == "nan-loss":
            return out * float("nan")
        if kind == "inf-loss":
            return out * float("inf")
        A = opt.params[0]                                   # + |A - A| = 0: finite loss,
        return out + ((A - Tensor(A.data.copy())) ** 2).sum().sqrt()  # 0/0 gradient

    pm.loss = loss
    cfg = TrainConfig(steps=6, batch_size=4, warmup=0, progress=False, checkpoint_every=1)
    msg = rf"diverged at step {bad_step}: loss=" + (r"\d.*gradient norm=nan" if kind ==
                                                     "nan-grad" else "")
    with np.errstate(all="ignore"), pytest.raises(TrainingDivergedError, match=msg):
        train(pm, next_batch, cfg, optimizer=opt, checkpoint=saved.append)
    good_state, good_t, good_moments = seen[bad_step]
    assert_unchanged(good_state, pm)
    assert opt.t == good_t == bad_step
    for s, (m, v) in zip(opt.state, good_moments):
        assert np.array_equal(host(s["m"]), m) and np.array_equal(host(s["v"]), v)
    assert all(p.grad is None for p in pm.parameters())
    assert saved == list(range(1, bad_step + 1))
    result = train(pm, next_batch, TrainConfig(steps=2, batch_size=4, warmup=0, progress=False),
                   optimizer=opt)                           # the next steps are fine again
    assert np.isfinite(result.losses).all() and opt.t == bad_step + 2


def test_a_bad_batch_mid_training_changes_nothing():
    """Float token ids from the data pipeline at step 3: a named error, and the weights are
    those after step 2 (the forward pass fails before any update)."""
    model = GPT(CFG, seed=0)
    draw, seen = _batches(), []

    def next_batch(B):
        seen.append(state(model))
        x, y = draw(B)
        return (x.astype(np.float32), y) if len(seen) == 4 else (x, y)

    with pytest.raises(ValueError, match=r"ids must be a 2-D integer array.*dtype float32"):
        train(model, next_batch, TrainConfig(steps=6, batch_size=2, progress=False))
    assert_unchanged(seen[3], model)


BAD_HYPER = {   # lr=inf: step 0's update is inf * 0 = NaN wherever a gradient is 0, and nothing
               # stops it before step 1; eps=0: m / sqrt(v) = 0 / 0 there
    "lr=inf": (lambda: TrainConfig(lr=float("inf")), r"TrainConfig.lr must be > 0 and finite, "
                                                     r"got inf"),
    "lr=nan": (lambda: TrainConfig(lr=float("nan")), r"TrainConfig.lr must be > 0 and finite"),
    "lr=0": (lambda: TrainConfig(lr=0.0), r"TrainConfig.lr must be > 0"),
    "clip<0": (lambda: TrainConfig(grad_clip=-1.0), r"grad_clip must be >= 0 \(0 = off\)"),
    "clip=nan": (lambda: TrainConfig(grad_clip=float("nan")), r"TrainConfig.grad_clip must be"),
    "wd=nan": (lambda: TrainConfig(weight_decay=float("nan")), r"TrainConfig.weight_decay must"),
    "warmup<0": (lambda: TrainConfig(warmup=-1), r"TrainConfig.warmup must be >= 0, got -1"),
    "optimizer": (lambda: TrainConfig(optimizer="adam"), r"optimizer must be 'adamw' or 'sgd'"),
    "adamw-lr": (lambda: AdamW(GPT(CFG).parameters(), lr=float("inf")), r"AdamW: lr must be > 0"),
    "adamw-eps": (lambda: AdamW(GPT(CFG).parameters(), eps=0.0), r"AdamW: eps must be > 0, got "),
    "adamw-wd": (lambda: AdamW(GPT(CFG).parameters(), weight_decay=-0.1), r"AdamW: weight_decay"),
    "sgd-wd": (lambda: SGD(GPT(CFG).parameters(), weight_decay=float("inf")), r"SGD: weight_dec"),
}


@pytest.mark.parametrize("case", list(BAD_HYPER))
def test_training_hyperparameters_that_would_poison_the_weights_are_refused(case):
    make, msg = BAD_HYPER[case]
    with pytest.raises(ValueError, match=msg):
        make()


# ============================================================================ NaN and inf: merging
def _weights(pm):
    return {n: host(p.data).tobytes() for n, p in pm.named_parameters()}


@FEW
@given(layer=st.integers(0, 3), factor=st.sampled_from(["A", "B"]),
       value=st.sampled_from([np.nan, np.inf, -np.inf]), data=st.data())
def test_lora_merge_refuses_non_finite_factors_in_any_layer_and_changes_nothing(layer, factor,
                                                                               value, data):
    pm = randomize(get_peft_model(GPT(CFG), LoraConfig(r=2)))      # 4 layers: q, v x 2 blocks
    f = peft_layers(pm.base_model)[layer][1].factors("default")
    t = getattr(f, factor)
    arr = host(t.data).copy()
    arr.flat[data.draw(st.integers(0, arr.size - 1))] = value
    t.data = bk.asarray(arr)
    before = state(pm)
    with pytest.raises(ValueError, match=f"adapter 'default' has non-finite values in {factor}; "
                                         "the base weights were left unchanged"):
        pm.merge()
    assert_unchanged(before, pm)
    assert not any(m.merged for _, m in peft_layers(pm.base_model))


def test_lora_merge_that_overflows_in_the_last_layer_merges_no_layer():
    pm = randomize(get_peft_model(GPT(CFG), LoraConfig(r=2)))
    f = peft_layers(pm.base_model)[-1][1].factors("default")
    f.A.data = bk.xp.full(f.A.shape, 1e30, dtype=f.A.dtype)           # finite factors ...
    f.B.data = bk.xp.full(f.B.shape, 1e30, dtype=f.B.dtype)           # ... whose product is not
    before = _weights(pm)
    with np.errstate(over="ignore"), pytest.raises(ValueError, match="overflows"):
        pm.merge()
    assert not any(m.merged for _, m in peft_layers(pm.base_model))
    assert _weights(pm) == before


def test_ia3_merge_that_overflows_in_the_last_layer_merges_no_layer():
    base = GPT(CFG)
    pm = get_peft_model(base, IA3Config())
    rng = np.random.default_rng(0)
    for p in pm.trainable_parameters():                             # not ones: W * l != W
        p.data = bk.asarray(rng.uniform(0.5, 1.5, p.shape), dtype=p.dtype)
    last = peft_layers(base)[-1][1]                                 # blocks.1.mlp.fc_out
    last.base.weight.data = last.base.weight.data + 10.0
    last.adapters.default.l.data = bk.xp.full(last.adapters.default.l.shape, 1e38,
                                              dtype=last.base.weight.dtype)
    before = state(pm)
    with np.errstate(over="ignore"), pytest.raises(ValueError, match="IA3 merge: W \\* l "
                                                   "overflows; the base weights were left"):
        pm.merge()
    assert_unchanged(before, pm)
    assert not any(m.merged for _, m in peft_layers(base))


# ============================================================================ bad configs
@FEW
@given(r=st.one_of(st.integers(-5, 0), st.floats(allow_nan=True), st.booleans(), st.text()))
def test_lora_rank_must_be_a_positive_int_and_the_message_shows_it(r):
    with pytest.raises((TypeError, ValueError), match=r"^LoraConfig\.r must be ") as e:
        LoraConfig(r=r)
    assert repr(r)[:57] in str(e.value)
    assert e.type is (ValueError if type(r) is int else TypeError)


@FEW
@given(alpha=st.one_of(st.floats(max_value=0.0), st.just(float("nan"))))
def test_lora_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match=r"LoraConfig\.alpha must be (> 0\.0|finite), got " +
                       re.escape(repr(float(alpha)))):
        LoraConfig(alpha=alpha)


def test_lora_alpha_must_be_finite():
    with pytest.raises(ValueError, match="LoraConfig.alpha"):
        LoraConfig(alpha=float("inf"))


BAD_CONFIGS = {
    "bottleneck=0": (lambda: AdapterConfig(bottleneck=0),
                     r"AdapterConfig.bottleneck must be >= 1, got 0"),
    "reduction=0": (lambda: AdapterConfig(reduction_factor=0),
                    r"AdapterConfig.reduction_factor must be >= 1, got 0"),
    "scale=inf": (lambda: AdapterConfig(scale=float("inf"), placement="parallel"),
                  r"AdapterConfig.scale must be finite, got inf"),
    "scale=nan": (lambda: AdapterConfig(scale=float("nan")), r"scale must be finite"),
    "prompt=0": (lambda: PromptTuningConfig(num_virtual_tokens=0),
                 r"PromptTuningConfig.num_virtual_tokens must be >= 1, got 0"),
    "prefix=0": (lambda: PrefixTuningConfig(num_virtual_tokens=0),
                 r"PrefixTuningConfig.num_virtual_tokens must be >= 1, got 0"),
    "ia3-target": (lambda: IA3Config(target_modules=("kproj",)),
                   r"unknown \['kproj'\]; choose from .*'k_proj'"),
    "components": (lambda: SelectiveConfig(components=("attn",)),
                   r"unknown \['attn'\]; choose from .*'attention'"),
    "last_k=1.5": (lambda: SelectiveConfig(last_k=1.5),
                   r"SelectiveConfig.last_k must be an integer, got 1.5"),
    "fraction=0": (lambda: SelectiveConfig(mask="random", mask_fraction=0.0),
                   r"mask_fraction must be > 0.0, got 0.0"),
    # issue 15, class 6: the type and range of every field, named
    "alpha-str": (lambda: LoraConfig(alpha="16"), r"LoraConfig.alpha must be a number, got '16'"),
    "lora-layers-int": (lambda: LoraConfig(layers=1),
                        r"LoraConfig.layers must be a list or tuple of integers, got 1"),
    "adapter-layers-float": (lambda: AdapterConfig(layers=(1.7,)),
                             r"AdapterConfig.layers\[0\] must be an integer, got 1.7"),
    "ia3-layers-str": (lambda: IA3Config(layers=("0",)),
                       r"IA3Config.layers\[0\] must be an integer, got '0'"),
    "ia3-layers-neg": (lambda: IA3Config(layers=(-1,)), r"IA3Config.layers\[0\] must be >= 0"),
    "layers-nested": (lambda: SelectiveConfig(layers=([0],)),
                      r"SelectiveConfig.layers\[0\] must be an integer, got \[0\]"),
    "layers-empty": (lambda: LoraConfig(layers=()), r"LoraConfig.layers must not be empty"),
    "rslora-int": (lambda: LoraConfig(use_rslora=1), r"LoraConfig.use_rslora must be True or"),
    "dropout-1": (lambda: LoraConfig(dropout=1.0), r"LoraConfig.dropout must be < 1.0"),
    "regex-target": (lambda: LoraConfig(target_modules=("(.*.*)*X",)),
                     r"is not a module name or glob .* regular expressions are not accepted"),
    "long-target": (lambda: LoraConfig(target_modules=("a" * 201,)), r"at most 200 characters"),
    "tokens-float": (lambda: LoraConfig(trainable_token_indices=(1.0,)),
                     r"LoraConfig.trainable_token_indices\[0\] must be an integer"),
    "tokens-repeat": (lambda: IA3Config(trainable_token_indices=(3, 3)),
                      r"IA3Config.trainable_token_indices has repeated entries"),
    "prompt-ids": (lambda: PromptTuningConfig(init="text", init_token_ids=("1",)),
                   r"PromptTuningConfig.init_token_ids\[0\] must be an integer"),
    "prefix-bool": (lambda: PrefixTuningConfig(reparameterize="yes"),
                    r"PrefixTuningConfig.reparameterize must be True or False"),
    "mask-name": (lambda: SelectiveConfig(mask="top"), r"SelectiveConfig.mask must be one of"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_method_configs_name_the_bad_field_and_value(case):
    make, msg = BAD_CONFIGS[case]
    with pytest.raises((TypeError, ValueError), match=msg):
        make()


def test_a_single_name_is_one_target_not_a_string_of_characters():
    # ("k_proj") is a str, not a tuple: one target, as LoraConfig reads it, not six letters
    assert IA3Config(target_modules="k_proj").target_modules == ("k_proj",)
    assert SelectiveConfig(components="norms") == SelectiveConfig(components=("norms",))
    assert SelectiveConfig(param_types="bias") == SelectiveConfig(param_types=("bias",))
    bias = get_peft_model(GPT(CFG), SelectiveConfig(param_types="bias"))
    assert {n.rpartition(".")[2] for n, p in bias.named_parameters() if p.requires_grad} == \
        {"bias"}


# configs that need the model to be judged: the error comes from apply, before any surgery
NEEDS_MODEL = {
    "lora-unknown-target": (LoraConfig(target_modules=("q_proj", "qkv")),
                            r"'qkv' matches no Linear module; available Linear names: \['fc_in', "
                            r"'fc_out', 'k_proj', 'o_proj', 'q_proj', 'v_proj'\]"),
    "lora-layer": (LoraConfig(layers=(0, 2)), r"LoraConfig.layers must be block indices in "
                                              r"\[0, 2\), got \[2\]"),
    "lora-rank-too-big": (LoraConfig(r=2**40), r"LoraConfig.r=1099511627776 exceeds in \+ out"),
    "adapter-too-wide": (AdapterConfig(bottleneck=17), r"bottleneck=17 is wider than the model"),
    "selective-last-k": (SelectiveConfig(last_k=3), r"last_k=3 exceeds the model's 2 blocks"),
    "tokens-out-of-vocab": (LoraConfig(trainable_token_indices=(0, V)),
                            rf"trainable_token_indices must lie in \[0, {V}\)"),
    "lora-pissa-rank": (LoraConfig(r=17, init="pissa"), r"r=17 exceeds the smaller side"),
    "adapter-zero-width": (AdapterConfig(reduction_factor=32),
                           r"reduction_factor=32 gives a zero-width bottleneck for n_embd=16"),
    "adapter-layer": (AdapterConfig(bottleneck=2, layers=(3,)),
                      r"AdapterConfig.layers must be block indices in \[0, 2\), got \[3\]"),
    "ia3-layer": (IA3Config(layers=(2,)), r"IA3Config.layers must be block indices in \[0, 2\)"),
    "prompt-too-long": (PromptTuningConfig(num_virtual_tokens=BLOCK),
                        rf"num_virtual_tokens={BLOCK} leaves no room for real tokens in "
                        rf"block_size={BLOCK}"),
    "prefix-too-long": (PrefixTuningConfig(num_virtual_tokens=BLOCK + 3), r"leaves no room"),
    "prompt-text-ids": (PromptTuningConfig(init="text", init_token_ids=(1, V)),
                        rf"init_token_ids must lie in \[0, {V}\), got \[{V}\]"),
    "selective-layer": (SelectiveConfig(layers=(7,)),
                        r"SelectiveConfig.layers must be block indices in \[0, 2\), got \[7\]"),
    "selective-empty": (SelectiveConfig(components=("head",)), r"selects no parameter"),
    "selective-gradient": (SelectiveConfig(mask="gradient"), r"needs calibration batches"),
}


FIRST = {"lora": LoraConfig(r=2), "adapter": AdapterConfig(bottleneck=2), "ia3": IA3Config(),
         "prompt": PromptTuningConfig(num_virtual_tokens=2),
         "prefix": PrefixTuningConfig(num_virtual_tokens=2)}


@pytest.mark.parametrize("case", list(NEEDS_MODEL))
def test_a_config_that_does_not_fit_the_model_changes_nothing(case):
    config, msg = NEEDS_MODEL[case]
    model = GPT(CFG)                          # tied head: "head" alone selects nothing
    before = state(model)
    with pytest.raises(ValueError, match=msg):
        get_peft_model(model, config)
    assert_unchanged(before, model)
    if config.method == "selective":
        return                                # a selective model takes no second adapter
    pm = randomize(get_peft_model(model, FIRST[config.method], adapter_name="first"))
    before = state(pm)
    with pytest.raises(ValueError, match=msg):
        pm.add_adapter("second", config)
    assert_unchanged(before, pm)


def test_wrong_objects_as_model_config_or_adapter_name_are_named():
    with pytest.raises(TypeError, match="needs a model .* got str"):
        get_peft_model("gpt2", LoraConfig())
    with pytest.raises(TypeError, match="needs a PEFT config .* got dict"):
        get_peft_model(GPT(CFG), {"r": 8})
    pm = get_peft_model(GPT(CFG), LoraConfig(r=2))
    before = state(pm)
    with pytest.raises(TypeError, match="needs a PEFT config .* got dict"):
        pm.add_adapter("b", {"r": 8})
    with pytest.raises(ValueError, match="adapter name must be an ASCII identifier .*got 'a b'"):
        pm.add_adapter("a b", LoraConfig(r=2))
    with pytest.raises(ValueError, match="holds lora adapters; cannot add a prompt adapter"):
        pm.add_adapter("p", PromptTuningConfig())
    with pytest.raises(ValueError, match=r"no adapter named 'zz'; have \['default'\]"):
        pm.set_adapter("zz")
    with pytest.raises(ValueError, match=r"no adapter named 'zz'; have \['default'\]"):
        pm.save_adapter("unused", name="zz")
    with pytest.raises(ValueError, match="the prompt method cannot fold its adapters"):
        get_peft_model(GPT(CFG), PromptTuningConfig()).merge()
    assert_unchanged(before, pm)
    assert not os.path.exists("unused")


# ============================================================================ adapter files
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained-looking LoRA adapter on disk, and the logits it gives."""
    folder = tmp_path_factory.mktemp("adapters") / "lora"
    pm = randomize(get_peft_model(GPT(CFG), LoraConfig(r=2, target_modules=("q_proj", "fc_in"))))
    pm.save_adapter(folder)
    return folder, logits(pm, ids_for())


def _copy(src, tmp_path, name="ad"):
    dst = tmp_path / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder, meta=None, tensors=None):
    """Write a *consistent* adapter (config file = metadata in the weights), with changes."""
    old_tensors, old_meta = load_tensors(folder / ADAPTER_WEIGHTS)
    meta = old_meta if meta is None else meta
    save_tensors(folder / ADAPTER_WEIGHTS, old_tensors if tensors is None else tensors, meta)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta))


def _targets():
    """A plain base (for load_peft_model) and a LoRA model with two adapters, 'b' active and
    on other modules than the file's (for load_adapter), with their states."""
    base = GPT(CFG, seed=1)
    pm = get_peft_model(GPT(CFG, seed=2), LoraConfig(r=3, target_modules=("v_proj",)), "a")
    pm.add_adapter("b", LoraConfig(r=2, target_modules=("k_proj",)), seed=1)
    randomize(pm, seed=4)
    pm.set_adapter("b")
    return (base, state(base)), (pm, state(pm))


def _refused(folder, msg, exc=CheckpointError):
    """Both ways of loading raise ``exc`` matching ``msg`` and leave their model unchanged."""
    (base, b_state), (pm, p_state) = _targets()
    with pytest.raises(exc, match=msg):
        load_peft_model(base, folder)
    assert_unchanged(b_state, base)
    with pytest.raises(exc, match=msg):
        pm.load_adapter(folder, name="c")
    assert_unchanged(p_state, pm)


@settings(max_examples=8, deadline=None)
@given(cut=st.floats(0.0, 0.999), noise=st.binary(min_size=0, max_size=300),
       which=st.sampled_from(["truncated", "random bytes"]))
def test_a_truncated_or_random_weights_file_is_refused_by_name(saved, tmp_path, cut, noise,
                                                               which):
    folder = _copy(saved[0], tmp_path)
    path = folder / ADAPTER_WEIGHTS
    raw = path.read_bytes()
    path.write_bytes(raw[:int(cut * len(raw))] if which == "truncated" else noise)
    _refused(folder, re.escape(ADAPTER_WEIGHTS) + r" is not a valid safetensors file "
                                                  r"\(truncated or corrupted\?\)")


@settings(max_examples=8, deadline=None)
@given(content=st.one_of(st.binary(max_size=100), st.sampled_from(
    [b"", b"[]", b"{}", b"42", b'"lora"', b'{"method": "lora"}', b'{"config": 3}',
     b'{"method": "lora", "config": {}, "base_config": [1]}'])))
def test_a_damaged_config_file_is_refused_by_name(saved, tmp_path, content):
    folder = _copy(saved[0], tmp_path)
    (folder / ADAPTER_CONFIG).write_bytes(content)
    _refused(folder, re.escape(ADAPTER_CONFIG) + " (is not valid JSON|is not an adapter config)")


def test_a_config_file_from_another_save_is_refused(saved, tmp_path):
    folder = _copy(saved[0], tmp_path)
    other = get_peft_model(GPT(CFG), LoraConfig(r=3, target_modules=("q_proj", "fc_in")))
    other.save_adapter(tmp_path / "other")
    shutil.copy(tmp_path / "other" / ADAPTER_CONFIG, folder / ADAPTER_CONFIG)
    _refused(folder, f"{ADAPTER_CONFIG} does not match the weights file")


@pytest.mark.parametrize("field,value", [("n_embd", 8), ("vocab_size", 21), ("n_layer", 1),
                                         ("tie_weights", False)])
def test_an_adapter_for_another_base_names_the_difference(saved, field, value):
    other = GPTConfig(**{**CFG.to_dict(), field: value})
    for model in (GPT(other), get_peft_model(GPT(other), LoraConfig(r=2))):
        before = state(model)
        msg = rf"another base model; differences \(this base, adapter's base\): " \
              rf"\{{'{field}': \({value!r}, {getattr(CFG, field)!r}\)\}}"
        with pytest.raises(CheckpointError, match=msg):
            if isinstance(model, PeftModel):
                model.load_adapter(saved[0], name="c")
            else:
                load_peft_model(model, saved[0])
        assert_unchanged(before, model)


def test_an_adapter_of_another_method_is_refused(saved, tmp_path):
    for config in (PromptTuningConfig(num_virtual_tokens=2), IA3Config()):
        pm = get_peft_model(GPT(CFG), config)
        before = state(pm)
        with pytest.raises(CheckpointError, match=f"holds a 'lora' adapter but this model uses "
                                                  f"'{config.method}'"):
            pm.load_adapter(saved[0], name="c")
        assert_unchanged(before, pm)
    # a LoRA folder relabelled as a prompt, consistently in both files: its fields give it away
    folder = _copy(saved[0], tmp_path)
    _, meta = load_tensors(folder / ADAPTER_WEIGHTS)
    _rewrite(folder, meta={**meta, "method": "prompt"})
    _refused(folder, r"holds no valid prompt config: PromptTuningConfig: unknown fields "
                     r"\['alpha', 'dropout'")
    _rewrite(folder, meta={**meta, "method": "dora"})
    _refused(folder, r"unknown PEFT method 'dora'; known: \['adapter', 'ia3', 'lora', 'prefix', "
                     r"'prompt', 'selective'\]")
    _rewrite(folder, meta={**meta, "method": ["lora"]})
    _refused(folder, r"unknown PEFT method \['lora'\]")


@pytest.mark.parametrize("damage", ["extra", "missing", "mis-shaped", "int dtype"])
def test_extra_missing_or_mis_shaped_tensors_are_listed_and_change_nothing(saved, tmp_path,
                                                                           damage):
    folder = _copy(saved[0], tmp_path)
    tensors, _ = load_tensors(folder / ADAPTER_WEIGHTS)
    key = "blocks.1.mlp.fc_in.A"
    if damage == "extra":
        tensors["blocks.1.mlp.fc_out.A"] = np.zeros((2, 64), np.float32)
        msg = r"tensors do not fit: missing \[\], unexpected \['blocks.1.mlp.fc_out.A'\]"
    elif damage == "missing":
        del tensors[key]
        msg = rf"tensors do not fit: missing \['{key}'\], unexpected \[\]"
    elif damage == "mis-shaped":
        tensors[key] = np.zeros((3, 16), np.float32)
        msg = rf"tensors do not fit: {key}: expected \(2, 16\), file \(3, 16\)"
    else:                                   # an int copy of the same values still loads
        tensors = {k: np.round(v * 100).astype(np.int32) for k, v in tensors.items()}
        msg = None
    _rewrite(folder, tensors=tensors)
    if msg is None:
        assert load_peft_model(GPT(CFG), folder).active_adapter == "default"
        return
    _refused(folder, msg)


def test_a_failed_pissa_load_puts_the_original_base_weights_back(tmp_path):
    # PiSSA replaces each targeted base weight by a residual before the tensors are filled in,
    # so a failure after that point must restore the weight, not only unwrap the layer
    pm = get_peft_model(GPT(CFG), LoraConfig(r=2, init="pissa", target_modules=("fc_in",)))
    pm.save_adapter(tmp_path / "p")
    tensors, _ = load_tensors(tmp_path / "p" / ADAPTER_WEIGHTS)
    del tensors["blocks.1.mlp.fc_in.B"]
    _rewrite(tmp_path / "p", tensors=tensors)
    _refused(tmp_path / "p", r"missing \['blocks.1.mlp.fc_in.B'\]")


def test_a_selective_file_with_out_of_range_indices_changes_nothing(tmp_path):
    cfg = SelectiveConfig(components=("norms",), mask="random", mask_fraction=0.5)
    pm = get_peft_model(GPT(CFG), cfg)
    pm.save_adapter(tmp_path / "s")
    tensors, _ = load_tensors(tmp_path / "s" / ADAPTER_WEIGHTS)
    tensors["ln_f.bias::indices"] = tensors["ln_f.bias::indices"] + 16   # past the 16 entries
    _rewrite(tmp_path / "s", tensors=tensors)
    for model in (GPT(CFG), get_peft_model(GPT(CFG), cfg)):
        before = state(model)
        with pytest.raises(CheckpointError, match=r"ln_f.bias: sparse indices/values do not fit "
                                                  r"shape \(16,\)"):
            if isinstance(model, PeftModel):
                model.load_adapter(tmp_path / "s", name="other")
            else:
                load_peft_model(model, tmp_path / "s")
        assert_unchanged(before, model)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_an_adapter_file_holding_nan_or_inf_is_refused(saved, tmp_path, bad):
    folder = _copy(saved[0], tmp_path)
    tensors, _ = load_tensors(folder / ADAPTER_WEIGHTS)
    tensors["blocks.0.attn.q_proj.B"] = tensors["blocks.0.attn.q_proj.B"].copy()
    tensors["blocks.0.attn.q_proj.B"][1, 1] = bad
    _rewrite(folder, tensors=tensors)
    _refused(folder, r"tensors \['blocks.0.attn.q_proj.B'\] hold NaN or inf values")


def test_invalid_values_in_a_consistent_config_are_a_checkpoint_error(saved, tmp_path):
    folder = _copy(saved[0], tmp_path)
    _, meta = load_tensors(folder / ADAPTER_WEIGHTS)
    _rewrite(folder, meta={**meta, "config": {**meta["config"], "r": 0}})
    _refused(folder, re.escape(f"{folder}: {ADAPTER_CONFIG} holds no valid lora config: "
                               "LoraConfig.r must be >= 1, got 0"))
    with pytest.raises(CheckpointError, match=f"no such file: .*{ADAPTER_CONFIG}"):
        read_adapter(tmp_path / "nowhere", GPT(CFG))


def test_a_good_file_still_loads_both_ways(saved):
    # the checks above refuse damage, not adapters: the untouched folder reproduces the logits
    folder, want = saved
    np.testing.assert_array_equal(logits(load_peft_model(GPT(CFG), folder), ids_for()), want)
    pm = get_peft_model(GPT(CFG), LoraConfig(r=2), "scratch")
    pm.load_adapter(folder, name="task")
    np.testing.assert_array_equal(logits(pm, ids_for()), want)


# ============================================================================ interrupted saves
@pytest.mark.parametrize("where", ["serialise", "write", "fsync", "rename"])
def test_an_interrupted_adapter_save_keeps_the_previous_adapter(tmp_path, monkeypatch,
                                                                interrupt_save, where):
    old = randomize(get_peft_model(GPT(CFG), LoraConfig(r=2)), seed=1)
    old.save_adapter(tmp_path / "ad")
    files = {f: (tmp_path / "ad" / f).read_bytes() for f in os.listdir(tmp_path / "ad")}
    new = randomize(get_peft_model(GPT(CFG), LoraConfig(r=2)), seed=2)
    interrupt_save(where)
    with pytest.raises((Interrupted, KeyboardInterrupt)):
        new.save_adapter(tmp_path / "ad")
    monkeypatch.undo()
    assert leftovers(tmp_path / "ad") == []              # io promises: no temp file remains
    assert {f: (tmp_path / "ad" / f).read_bytes() for f in os.listdir(tmp_path / "ad")} == files
    np.testing.assert_array_equal(logits(load_peft_model(GPT(CFG), tmp_path / "ad"), ids_for()),
                                  logits(old, ids_for()))


@pytest.mark.parametrize("cut", range(8))   # a save makes 7 such calls: every one is cut
def test_a_save_cut_at_any_file_operation_leaves_the_old_or_the_new_adapter(tmp_path, cut):
    """Issue 15, class 5: the folder switches as a whole. Every rename, link and delete a save
    makes is a place where the power may go; after a cut at any of them the folder loads as
    the old adapter or as the new one (never a mix, never nothing), and the next save works."""
    import minipeft.peft.files as core_mod
    same_config = cut % 2 == 0
    old = randomize(get_peft_model(GPT(CFG), LoraConfig(r=2)), seed=1)
    old.save_adapter(tmp_path / "ad")
    (tmp_path / "ad" / "notes.txt").write_text("kept")      # a user's file beside the adapter
    new = randomize(get_peft_model(GPT(CFG), LoraConfig(r=2 if same_config else 3)), seed=2)
    calls = []

    def cut_here(real):
        def op(*args, **kwargs):
            calls.append(real.__name__)
            if len(calls) == cut + 1:
                raise Interrupted("power cut")
            return real(*args, **kwargs)
        return op

    with pytest.MonkeyPatch.context() as mp:
        for name in ("rename", "replace", "link"):
            mp.setattr(core_mod.os, name, cut_here(getattr(os, name)))
        mp.setattr(core_mod.shutil, "rmtree", cut_here(shutil.rmtree))
        try:
            new.save_adapter(tmp_path / "ad")
            finished = True
        except Interrupted:
            finished = False
    got = logits(load_peft_model(GPT(CFG), tmp_path / "ad"), ids_for())
    matches = [np.array_equal(got, logits(m, ids_for())) for m in (old, new)]
    assert any(matches), "the folder loads as neither the old nor the new adapter"
    if finished:
        assert matches[1] and cut == 7
    new.save_adapter(tmp_path / "ad")                        # a later save finishes the job
    np.testing.assert_array_equal(logits(load_peft_model(GPT(CFG), tmp_path / "ad"), ids_for()),
                                  logits(new, ids_for()))
    assert (tmp_path / "ad" / "notes.txt").read_text() == "kept"
    assert sorted(os.listdir(tmp_path)) == ["ad"]            # no copies left beside it


def test_save_adapter_refuses_a_file_or_a_folder_with_subfolders(tmp_path):
    pm = get_peft_model(GPT(CFG), LoraConfig(r=2))
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        pm.save_adapter(tmp_path / "f")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds folders or links \(\['sub'\]\)"):
        pm.save_adapter(tmp_path / "d")
    assert sorted(os.listdir(tmp_path)) == ["d", "f"] and os.listdir(tmp_path / "d") == ["sub"]


# ============================================================================ no code from files
class _Payload:
    """Unpickling this runs os.mkdir(marker): the marker's existence proves code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_in_place_of_the_weights_is_refused_and_never_run(saved, tmp_path):
    marker = tmp_path / "payload-ran"
    folder = _copy(saved[0], tmp_path)
    (folder / ADAPTER_WEIGHTS).write_bytes(pickle.dumps({"blocks.0.attn.q_proj.A":
                                                         _Payload(marker)}))
    _refused(folder, "not a valid safetensors file")
    # a pickled adapter beside a missing safetensors file is not a fallback either
    (folder / ADAPTER_WEIGHTS).unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    _refused(folder, f"no such file: .*{ADAPTER_WEIGHTS}")
    assert not marker.exists()


def test_config_values_are_data_never_code(saved, tmp_path):
    marker = tmp_path / "code-ran"
    code = f"__import__('os').mkdir({str(marker)!r})"
    folder = _copy(saved[0], tmp_path)
    _, meta = load_tensors(folder / ADAPTER_WEIGHTS)
    _rewrite(folder, meta={**meta, "config": {**meta["config"], "init": code}})
    _refused(folder, r"LoraConfig.init must be one of \['kaiming', 'gaussian', 'pissa'\], got "
                     r"\"__import__")
    _rewrite(folder, meta={**meta, "method": code})
    _refused(folder, r"unknown PEFT method \"__import__")
    _rewrite(folder, meta={**meta, "config": {**meta["config"], "__reduce__": code}})
    _refused(folder, r"unknown fields \['__reduce__'\]")
    assert not marker.exists()


def test_loading_an_adapter_touches_no_unpickling_path(saved, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("adapter loading used an unpickling path")

    for mod, attr in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (np, "load")):
        monkeypatch.setattr(mod, attr, forbidden)
    assert isinstance(load_peft_model(GPT(CFG), saved[0]), PeftModel)
    get_peft_model(GPT(CFG), LoraConfig(r=2), "x").load_adapter(saved[0], name="y")


# ============================================================================ issue 15: state
def _two_lora(seed=0):
    pm = get_peft_model(GPT(CFG), LoraConfig(r=2), "a")
    pm.add_adapter("b", LoraConfig(r=2, target_modules=("k_proj",)), seed=1)
    return randomize(pm, seed=seed)


def _expected(pm):
    """Logits of each adapter (and None) computed unmerged, one by one: the oracle."""
    out = {}
    for n in (None, *pm.peft_configs):
        pm.set_adapter(n)
        out[n] = logits(pm, ids_for())
    return out


@pytest.mark.parametrize("call", ["set_adapter b", "set_adapter None", "add_adapter",
                                  "delete_adapter", "disable_adapter", "mixed batch"])
def test_a_call_that_would_leave_a_merged_adapter_computing_is_refused(call):
    # class 1: after merge(), every call that changes the active adapter is refused by name
    # and changes nothing; forward still equals the merged adapter's own output
    pm = _two_lora()
    want = _expected(pm)
    pm.set_adapter("a")
    pm.merge()
    before = state(pm)
    acts = {"set_adapter b": lambda: pm.set_adapter("b"),
            "set_adapter None": lambda: pm.set_adapter(None),
            "add_adapter": lambda: pm.add_adapter("c", LoraConfig(r=2)),
            "delete_adapter": lambda: pm.delete_adapter("a"),
            "disable_adapter": lambda: pm.disable_adapter().__enter__(),
            "mixed batch": lambda: pm(ids_for(), adapter_names=["a", "b"])}
    with pytest.raises(MergedAdapterError, match="'a' is folded into the base weights by "
                                                 r"merge\(\); call unmerge\(\) first"):
        acts[call]()
    assert_unchanged(before, pm)
    np.testing.assert_allclose(logits(pm, ids_for()), want["a"], atol=1e-5)
    pm.set_adapter("a")                                     # the merged one itself: allowed
    pm.unmerge()
    for n in want:                                           # then everything works again
        pm.set_adapter(n)
        np.testing.assert_allclose(logits(pm, ids_for()), want[n], atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(ops=st.lists(st.sampled_from(["a", "b", None, "merge", "unmerge"]), max_size=8))
def test_after_any_sequence_of_calls_forward_is_what_the_active_name_says(ops):
    pm = _two_lora()
    want = _expected(pm)
    for op in ops:
        try:
            if op in ("merge", "unmerge"):
                getattr(pm, op)()
            else:
                pm.set_adapter(op)
        except (MergedAdapterError, ValueError):
            pass                                             # refused: nothing changed
        np.testing.assert_allclose(logits(pm, ids_for()), want[pm.active_adapter], atol=1e-5)


def test_deleting_the_only_adapter_leaves_a_working_model():
    base = GPT(CFG)
    want = logits(base, ids_for())
    pm = randomize(get_peft_model(base, LoraConfig(r=2)))
    pm.delete_adapter("default")
    assert "adapters=[]" in repr(pm) and pm.active_adapter is None
    pm.set_adapter(None)
    pm.unmerge()                                             # nothing to unmerge: no claim
    np.testing.assert_array_equal(logits(pm, ids_for()), want)
    assert [n for n, _ in base.named_modules()] == [n for n, _ in GPT(CFG).named_modules()]
    with pytest.raises(ValueError, match="merge\\(\\): no active adapter"):
        pm.merge()


def test_selective_adapters_switch_and_disable_to_the_exact_base():
    # class 4: a BitFit model given a full fine-tune's folder gets a second adapter; the base
    # stays reachable bit for bit (it used to be overwritten)
    base_bits = state(GPT(CFG))[0]
    full = randomize(get_peft_model(GPT(CFG), SelectiveConfig(label="full")), seed=3)
    want_full = logits(full, ids_for())
    bitfit = randomize(get_peft_model(GPT(CFG), SelectiveConfig(param_types=("bias",))))
    want_bitfit = logits(bitfit, ids_for())
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        full.save_adapter(tmp + "/full")
        bitfit.load_adapter(tmp + "/full", name="full")
    np.testing.assert_array_equal(logits(bitfit, ids_for()), want_full)
    with bitfit.disable_adapter():
        assert state(bitfit.base_model)[0] == \
            {n: (*v[:3], False, None) for n, v in base_bits.items()}
    bitfit.set_adapter("default")
    np.testing.assert_array_equal(logits(bitfit, ids_for()), want_bitfit)
    bitfit.delete_adapter("full")
    plain = bitfit.unload()
    assert state(plain)[0] == {n: (*v[:3], False, None) for n, v in base_bits.items()}


@pytest.mark.parametrize("mask", ["random", "gradient"])
def test_masked_selective_adapters_round_trip_without_seed_or_calibration(tmp_path, mask):
    x, y = ids_for(seed=5), ids_for(seed=6)
    cfg = SelectiveConfig(components=("attention",), mask=mask, mask_fraction=0.3,
                          calibration=((x, y),) if mask == "gradient" else ())
    pm = get_peft_model(GPT(CFG), cfg, seed=4)
    rng = np.random.default_rng(0)
    for p in pm.trainable_parameters():                     # trained: only where the mask is
        p.data = bk.xp.where(p.mask, bk.asarray(rng.normal(0, 0.3, p.shape), dtype=p.dtype),
                             p.data)
    pm.save_adapter(tmp_path / "a")
    loaded = load_peft_model(GPT(CFG), tmp_path / "a")     # another seed would pick other rows
    np.testing.assert_array_equal(logits(loaded, ids_for()), logits(pm, ids_for()))
    masks = {n: host(p.mask).tobytes() for n, p in pm.named_parameters() if p.mask is not None}
    assert masks and masks == {n: host(p.mask).tobytes() for n, p in loaded.named_parameters()
                               if p.mask is not None}
    loaded.save_adapter(tmp_path / "b")                     # and again: the same file content
    a, _ = load_tensors(tmp_path / "a" / ADAPTER_WEIGHTS)
    b, _ = load_tensors(tmp_path / "b" / ADAPTER_WEIGHTS)
    assert {k: v.tobytes() for k, v in a.items()} == {k: v.tobytes() for k, v in b.items()}


@pytest.mark.parametrize("case", [
    ("layers", [[0]], r"LoraConfig.layers\[0\] must be an integer, got \[0\]"),
    ("layers", ["0", "1"], r"LoraConfig.layers\[0\] must be an integer, got '0'"),
    ("layers", [0.9, 1.2], r"LoraConfig.layers\[0\] must be an integer, got 0.9"),
    ("r", 2.0, r"LoraConfig.r must be an integer, got 2.0"),
    ("target_modules", ["(.*.*)*X"], r"regular expressions are not accepted"),
    ("trainable_token_indices", ["1"], r"trainable_token_indices\[0\] must be an integer"),
    ("use_rslora", "false", r"LoraConfig.use_rslora must be True or False"),
])
def test_every_config_field_read_from_a_file_is_type_checked(saved, tmp_path, case):
    field, value, msg = case
    folder = _copy(saved[0], tmp_path)
    _, meta = load_tensors(folder / ADAPTER_WEIGHTS)
    _rewrite(folder, meta={**meta, "config": {**meta["config"], field: value}})
    _refused(folder, msg)


def test_sizes_from_a_file_are_bounded_before_any_surgery(saved, tmp_path):
    folder = _copy(saved[0], tmp_path)
    _, meta = load_tensors(folder / ADAPTER_WEIGHTS)
    _rewrite(folder, meta={**meta, "config": {**meta["config"], "r": 2**40}})
    _refused(folder, r"LoraConfig.r=1099511627776 exceeds in \+ out = 32", exc=ValueError)


# ============================================================================ issue 15: merges
def test_a_merge_that_unmerge_could_not_undo_is_refused_and_changes_nothing():
    # class 2: IA3 with a vector of 1e-44 (W * l underflows to 0) and LoRA with factors of 1e4
    # (s B A swamps W in float32) merged before and left the base off by 100% after unmerge
    ia3 = get_peft_model(GPT(CFG), IA3Config())
    last = peft_layers(ia3.base_model)[-1][1]
    last.adapters.default.l.data = bk.xp.full(last.adapters.default.l.shape, 1e-44,
                                              dtype=last.base.weight.dtype)
    lora = randomize(get_peft_model(GPT(CFG), LoraConfig(r=2)))
    f = peft_layers(lora.base_model)[1][1].factors("default")
    f.A.data = bk.xp.full(f.A.shape, 1e4, dtype=f.A.dtype)
    f.B.data = bk.xp.full(f.B.shape, 1e4, dtype=f.B.dtype)
    for pm in (ia3, lora):
        before = state(pm)
        with pytest.raises(ValueError, match="unmerging would not give the base weights back"):
            pm.merge()
        assert_unchanged(before, pm)
        assert not any(m.merged for _, m in peft_layers(pm.base_model))


@settings(max_examples=10, deadline=None)
@given(scale=st.floats(1e-3, 30.0))
def test_an_allowed_merge_unmerges_to_the_base_within_the_tolerance_it_promised(scale):
    pm = randomize(get_peft_model(GPT(CFG), LoraConfig(r=2)), std=scale)
    W0 = {n: host(p.data).copy() for n, p in pm.named_parameters() if not p.requires_grad}
    before = state(pm)
    try:
        pm.merge()
    except ValueError as exc:                              # refused: said why, changed nothing
        assert "unmerging would not give the base weights back" in str(exc)
        assert_unchanged(before, pm)
        return
    pm.unmerge()
    for n, w in W0.items():
        now = host(dict(pm.named_parameters())[n].data)
        assert np.all(np.abs(now - w) <= 1e-5 * np.abs(w) + 1e-4 * np.abs(w).max()), n


# ========================================================================= issue 15: names, calls
@pytest.mark.parametrize("name", ["training", "named_modules", "forward", "adapters", "base",
                                  "_x", "class", "a-b", "2a", "ä"])
def test_adapter_names_that_would_shadow_the_module_classes_are_refused(name):
    pm = get_peft_model(GPT(CFG), LoraConfig(r=2))
    before = state(pm)
    with pytest.raises(ValueError, match=r"adapter name (must be an ASCII identifier|.* is "
                                         r"reserved)"):
        pm.add_adapter(name, LoraConfig(r=2))
    assert_unchanged(before, pm)
    with pytest.raises(ValueError, match="adapter name"):
        get_peft_model(GPT(CFG), LoraConfig(r=2), adapter_name=name)


def test_calls_check_their_arguments_before_any_work():
    pm = _two_lora()
    before = state(pm)
    cases = [
        (lambda: get_peft_model(pm, LoraConfig()), TypeError, "already a PeftModel"),
        (lambda: get_peft_model(pm.base_model, LoraConfig()), TypeError, "already holds PEFT"),
        (lambda: get_peft_model(GPT(CFG), LoraConfig(), seed=-1), ValueError, "seed must be >="),
        (lambda: pm.add_adapter("c", LoraConfig(), seed=1.5), TypeError, "seed must be an int"),
        (lambda: pm.set_adapter(["a"]), TypeError, "an adapter name is a string, got list"),
        (lambda: pm(ids_for(), adapter_names=(n for n in "ab")), TypeError, "list or tuple"),
        (lambda: pm(ids_for(), adapter_names=[["a"], "b"]), TypeError, r"got \['a'\]"),
        (lambda: add_weighted_adapter(pm, ["a", "b"], [1.0, float("nan")], "c"), ValueError,
         r"weights\[1\] must be finite"),
        (lambda: add_weighted_adapter(pm, ["a", "b"], [1.0, "2"], "c"), TypeError,
         r"weights\[1\] must be a number"),
        (lambda: add_weighted_adapter(pm, "ab", [1.0], "c"), TypeError, "names must be a list"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()
        assert_unchanged(before, pm)


@pytest.mark.parametrize("kind", ["float64 beyond float32", "complex", "bool"])
def test_adapter_tensors_that_cannot_become_float32_unchanged_are_refused(saved, tmp_path, kind):
    # class 4: a float64 of 1e300 used to become inf silently; complex lost its imaginary part
    folder = _copy(saved[0], tmp_path)
    tensors, _ = load_tensors(folder / ADAPTER_WEIGHTS)
    key = "blocks.0.attn.q_proj.B"
    arr = tensors[key].astype(np.float64)
    if kind == "complex":
        tensors[key] = arr.astype(np.complex64) + 1j
        msg = rf"{key}: dtype complex64 is not a real number"
    elif kind == "bool":
        tensors[key] = arr > 0
        msg = rf"{key}: dtype bool is not a real number"
    else:
        arr[0, 0] = 1e300
        tensors[key] = arr
        msg = rf"{key}: values up to 1e\+300 exceed the range of float32"
    _rewrite(folder, tensors=tensors)
    _refused(folder, msg)
