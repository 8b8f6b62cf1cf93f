"""Proofs for minipeft.peft.vera against independent computation: the shared pair regenerated
here from the seed with NumPy (kaiming-uniform bounds written out), the layer as the formula
x W0ᵀ + bias + b ⊙ (B_l (d ⊙ (A_l x))), gradients by finite differences, counts by hand."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from minipeft import backend as bk
from minipeft.autograd import Tensor, gradcheck, no_grad
from minipeft.nn import GPT, GPTConfig
from minipeft.optim import SGD
from minipeft.params import PRESETS, lora_parameter_count, spec_from_config, vera_parameter_count
from minipeft.peft import VeraConfig, VeRALinear, get_peft_model, load_peft_model
from minipeft.peft.core import ADAPTER_WEIGHTS

CFG = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16)
TARGETS = ("q_proj", "fc_in", "fc_out")           # shapes (16, 16), (64, 16), (16, 64)
host = bk.to_numpy


def ids_batch(seed=0, B=3, T=8):
    return bk.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T)))


def logits(model, ids):
    with no_grad():
        return host(model(ids).data).astype(np.float64)


def pair(r, in_max, out_max, seed):
    """The paper's kaiming-uniform pair, written out: A first, then B, from one generator."""
    rng = np.random.default_rng(seed)
    A = rng.uniform(-1 / np.sqrt(in_max), 1 / np.sqrt(in_max), (r, in_max))
    B = rng.uniform(-1 / np.sqrt(r), 1 / np.sqrt(r), (out_max, r))
    return A, B


def vera_layers(pm):
    return [(p, m) for p, m in pm.base_model.named_modules() if isinstance(m, VeRALinear)]


def trained(r=4, seed=7, **kw):
    pm = get_peft_model(GPT(CFG), VeraConfig(r=r, target_modules=TARGETS, **kw))
    rng = np.random.default_rng(seed)
    for _, layer in vera_layers(pm):
        v = layer.adapters.default
        v.d.data = bk.asarray(rng.normal(0, 1, v.d.shape), dtype=np.float32)
        v.b.data = bk.asarray(rng.normal(0, 0.5, v.b.shape), dtype=np.float32)
    return pm


@settings(max_examples=6)
@given(st.integers(1, 4), st.integers(0, 1000))
def test_each_layer_is_the_formula_on_its_slice_of_the_seeded_pair_and_its_gradient(
        float64, r, pseed):
    # the faults caught: a pair not regenerated from the seed, the wrong corner sliced, d and
    # b swapped or applied on the wrong side, a wrong backward
    pm = get_peft_model(GPT(CFG), VeraConfig(r=r, target_modules=TARGETS, projection_seed=pseed))
    A, B = pair(r, 64, 64, pseed)                 # in_max = 64 (fc_out), out_max = 64 (fc_in)
    rng = np.random.default_rng(pseed + 1)
    for path, layer in vera_layers(pm):
        v = layer.adapters.default
        v.d.data = bk.asarray(rng.normal(0, 1, v.d.shape))
        v.b.data = bk.asarray(rng.normal(0, 1, v.b.shape))
        out_f, in_f = layer.base.weight.shape
        x = Tensor(rng.normal(0, 1, (2, in_f)), requires_grad=True)
        W0, b0 = host(layer.base.weight.data), host(layer.base.bias.data)
        d, b = host(v.d.data), host(v.b.data)
        want = host(x.data) @ W0.T + b0 + b * ((d * (host(x.data) @ A[:, :in_f].T))
                                               @ B[:out_f].T)
        np.testing.assert_allclose(host(layer(x).data), want, rtol=1e-10, atol=1e-12,
                                   err_msg=path)
        gradcheck(lambda x, *_, layer=layer: layer(x), [x, v.d, v.b])


def test_one_frozen_pair_shared_by_every_layer_and_step_zero_is_the_base():
    # the faults caught: a pair per layer (VeRA's saving is that there is one), b not zero
    ids = ids_batch()
    base = GPT(CFG)
    want = logits(base, ids)
    pm = get_peft_model(base, VeraConfig(r=4, target_modules=TARGETS))
    np.testing.assert_array_equal(logits(pm, ids), want)
    pairs = {(id(layer.projections["default"][0]), id(layer.projections["default"][1]))
             for _, layer in vera_layers(pm)}
    assert len(pairs) == 1 and len(vera_layers(pm)) == 6
    for _, layer in vera_layers(pm):
        v = layer.adapters.default
        assert np.all(host(v.b.data) == 0) and np.all(host(v.d.data) == np.float32(0.1))
    # training moves b (its gradient is not zero, since d is not) and never the pair
    A0 = host(vera_layers(pm)[0][1].projections["default"][0]).copy()
    opt = SGD(pm.trainable_parameters(), lr=0.1)
    loss = pm.loss(ids, bk.asarray(np.roll(host(ids), 1, axis=1)))
    loss.backward()
    opt.step()
    assert all(np.abs(host(m.adapters.default.b.data)).max() > 0
               for _, m in vera_layers(pm))
    np.testing.assert_array_equal(host(vera_layers(pm)[0][1].projections["default"][0]), A0)
    assert not any(p.requires_grad for n, p in pm.named_parameters() if ".adapters." not in n)


def test_merge_is_w_plus_the_update_and_unmerge_gives_the_base_back():
    # the faults caught: a merged weight that is not W + diag(b) B_l diag(d) A_l; an unmerge
    # that does not subtract it
    ids = ids_batch(1)
    pm = trained()
    before = {n: host(p.data).copy() for n, p in pm.base_model.named_parameters()}
    out = logits(pm, ids)
    pm.merge()
    np.testing.assert_allclose(logits(pm, ids), out, rtol=1e-4, atol=1e-5)
    A, B = pair(4, 64, 64, 0)
    layer = pm.base_model.blocks[1].mlp.fc_in                       # (64, 16)
    v = layer.adapters.default
    W0 = before["blocks.1.mlp.fc_in.base.weight"].astype(np.float64)
    want = W0 + (host(v.b.data)[:, None] * B[:64]) @ (host(v.d.data)[:, None] * A[:, :16])
    np.testing.assert_allclose(host(layer.base.weight.data), want, rtol=1e-5, atol=1e-6)
    pm.unmerge()
    for n, p in pm.base_model.named_parameters():
        np.testing.assert_allclose(host(p.data), before[n], rtol=1e-5, atol=1e-6, err_msg=n)


def test_the_file_holds_only_the_vectors_and_reloads_from_the_seed(tmp_path):
    # the faults caught: the shared pair written to the file; a reload that draws another pair
    ids = ids_batch(2)
    pm = trained(projection_seed=11)
    pm.save_adapter(tmp_path / "v")
    keys = load_file(str(tmp_path / "v" / ADAPTER_WEIGHTS))
    assert sorted(keys) == sorted(f"blocks.{i}.{p}.{t}" for i in range(2)
                                  for p in ("attn.q_proj", "mlp.fc_in", "mlp.fc_out")
                                  for t in "db")
    np.testing.assert_array_equal(logits(load_peft_model(GPT(CFG), tmp_path / "v"), ids),
                                  logits(pm, ids))


def test_a_rank_beyond_a_layer_and_bad_fields_are_named_and_change_nothing():
    # the fault caught: a shared rank larger than a layer's smaller side accepted
    model = GPT(CFG)
    before = {n: host(p.data).copy() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"VeraConfig.r=20 exceeds .*fc_in.*\(64, 16\)"):
        get_peft_model(model, VeraConfig(r=20, target_modules=("fc_in",)))   # r <= 64, > 16
    assert not any(isinstance(m, VeRALinear) for _, m in model.named_modules())
    assert all(np.array_equal(host(p.data), before[n]) for n, p in model.named_parameters())
    for kw, field in (({"r": 0}, "r"), ({"d_initial": 0.0}, "d_initial"),
                      ({"projection_seed": -1}, "projection_seed"),
                      ({"d_initial": float("nan")}, "d_initial")):
        with pytest.raises((TypeError, ValueError), match=field):
            VeraConfig(**kw)


def test_counts_by_hand_on_our_model_and_on_llama():
    # the fault caught: a count that includes the frozen pair, or uses in instead of out
    pm = get_peft_model(GPT(CFG), VeraConfig(r=4, target_modules=TARGETS))
    by_hand = 2 * ((4 + 16) + (4 + 64) + (4 + 16))                 # r + out per layer
    assert pm.num_parameters(trainable_only=True) == by_hand == \
        vera_parameter_count(spec_from_config(CFG), 4, TARGETS)
    llama = PRESETS["llama2-7b"]
    assert vera_parameter_count(llama, 256) == 32 * 2 * (256 + 4096) == 278_528
    assert lora_parameter_count(llama, 8) == 4_194_304              # LoRA r=8: 15x more
    assert vera_parameter_count(llama, 256, ("fc_in",), layers=range(4)) == 4 * (256 + 11008)
