"""Proofs for minipeft.peft.lokr against independent computation: the factorisation against a
brute-force search over divisors, the layer against ``np.kron`` in float64, gradients by finite
differences, merge/unmerge, save/load, counts by hand."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft import backend as bk
from minipeft.autograd import Tensor, gradcheck, no_grad
from minipeft.nn import GPT, GPTConfig, Linear
from minipeft.peft import LoKrConfig, LoKrLinear, get_peft_model, load_peft_model

CFG = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16)
TARGETS = ("q_proj", "fc_in", "fc_out")           # (16, 16), (64, 16), (16, 64)
host = bk.to_numpy


def ids_batch(seed=0, B=3, T=8):
    return bk.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T)))


def logits(model, ids):
    with no_grad():
        return host(model(ids).data).astype(np.float64)


def test_factorization_is_the_divisor_pair_with_the_smallest_sum():
    # the fault caught: a rule other than LyCORIS' (closest-to-square divisor pair, m <= n)
    from minipeft.peft.lokr import factorization
    for n in range(1, 400):
        best = min((m + n // m, m) for m in range(1, n + 1) if n % m == 0 and m * m <= n)
        assert factorization(n) == (best[1], n // best[1]), n
    assert factorization(4096) == (64, 64) and factorization(11008) == (86, 128)
    assert factorization(128, 4) == (4, 32) and factorization(128, 64) == (2, 64)


def lokr_layer(out_f, in_f, r, seed):
    rng = np.random.default_rng(seed)
    layer = LoKrLinear(Linear(in_f, out_f, True, rng))
    for p, std in ((layer.base.weight, 0.5), (layer.base.bias, 0.1)):
        p.data = bk.asarray(rng.normal(0, std, p.shape))
        p.requires_grad = False
    layer.add_adapter("a", LoKrConfig(r=r, alpha=3.0), rng)
    layer.set_active("a")
    f = layer.adapters.a
    f.B.data = bk.asarray(rng.normal(0, 0.5, f.B.shape))
    return layer, f


@settings(max_examples=8)
@given(st.sampled_from([(16, 16), (64, 16), (12, 18), (6, 7)]), st.integers(0, 10**6))
def test_layer_is_w_plus_the_kronecker_update_and_its_gradient(float64, shape, seed):
    # the faults caught: the factors in the wrong Kronecker order or reshape, a wrong scale, a
    # wrong backward (the forward never forms the kron: this checks the index bookkeeping)
    out_f, in_f = shape
    layer, f = lokr_layer(out_f, in_f, 1, seed)
    x = Tensor(np.random.default_rng(seed + 1).normal(0, 1, (2, in_f)), requires_grad=True)
    W = host(layer.base.weight.data) + (3.0 / 1) * np.kron(host(f.C.data),
                                                           host(f.B.data) @ host(f.A.data))
    want = host(x.data) @ W.T + host(layer.base.bias.data)
    np.testing.assert_allclose(host(layer(x).data), want, rtol=1e-10, atol=1e-12)
    gradcheck(lambda x, *_: layer(x), [x, f.C, f.B, f.A])


def trained(seed=3):
    pm = get_peft_model(GPT(CFG), LoKrConfig(r=2, target_modules=TARGETS))
    rng = np.random.default_rng(seed)
    for _, m in pm.base_model.named_modules():
        if isinstance(m, LoKrLinear):
            for t in m.adapter_tensors("default").values():
                t.data = bk.asarray(rng.normal(0, 0.3, t.shape), dtype=np.float32)
    return pm


def test_step_zero_is_the_base_and_counts_by_hand():
    # the faults caught: B not zero at init; shapes of C and B A not from the factorisation
    ids = ids_batch()
    base = GPT(CFG)
    want = logits(base, ids)
    pm = get_peft_model(base, LoKrConfig(r=2, target_modules=TARGETS))
    np.testing.assert_array_equal(logits(pm, ids), want)
    fc_in = pm.base_model.blocks[0].mlp.fc_in.adapters.default      # (64, 16): (8,8) x (4,4)
    assert (fc_in.C.shape, fc_in.B.shape, fc_in.A.shape) == ((8, 4), (8, 2), (2, 4))
    per_block = (4 * 4 + 2 * (4 + 4)) + (8 * 4 + 2 * (8 + 4)) + (4 * 8 + 2 * (4 + 8))
    assert pm.num_parameters(trainable_only=True) == 2 * per_block


def test_merge_unmerge_and_a_refused_merge():
    # the faults caught: a merged weight other than W + s kron(C, B A); an unmerge that does
    # not take it out; a merge of non-finite factors that writes some layers
    ids = ids_batch(1)
    pm = trained()
    before = {n: host(p.data).copy() for n, p in pm.base_model.named_parameters()}
    out = logits(pm, ids)
    pm.merge()
    np.testing.assert_allclose(logits(pm, ids), out, rtol=1e-4, atol=1e-5)
    layer = pm.base_model.blocks[1].mlp.fc_out
    f = layer.adapters.default
    want = before["blocks.1.mlp.fc_out.base.weight"] + f.scale * np.kron(
        host(f.C.data).astype(np.float64), host(f.B.data).astype(np.float64) @ host(f.A.data))
    np.testing.assert_allclose(host(layer.base.weight.data), want, rtol=1e-5, atol=1e-6)
    pm.unmerge()
    for n, p in pm.base_model.named_parameters():
        np.testing.assert_allclose(host(p.data), before[n], rtol=1e-5, atol=1e-6, err_msg=n)
    pm.base_model.blocks[1].mlp.fc_out.adapters.default.C.data[0, 0] = np.nan
    kept = {n: host(p.data).copy() for n, p in pm.base_model.named_parameters()}
    with pytest.raises(ValueError, match="non-finite values in C"):
        pm.merge()
    assert all(np.array_equal(host(p.data), kept[n], equal_nan=True)
               for n, p in pm.base_model.named_parameters())


def test_save_load_round_trip(tmp_path):
    ids = ids_batch(2)
    pm = trained()
    pm.save_adapter(tmp_path / "k")
    np.testing.assert_array_equal(logits(load_peft_model(GPT(CFG), tmp_path / "k"), ids),
                                  logits(pm, ids))


def test_a_rank_beyond_the_factor_and_bad_fields_are_named_and_change_nothing():
    # the fault caught: r larger than B A's smaller side accepted
    model = GPT(CFG)
    with pytest.raises(ValueError, match=r"LoKrConfig.r=5 exceeds min\(b, d\) = 4 .*fc_in"):
        get_peft_model(model, LoKrConfig(r=5, target_modules=("fc_in",)))  # B A: (8, 4)
    assert not any(isinstance(m, LoKrLinear) for _, m in model.named_modules())
    assert all(p.requires_grad for p in model.parameters())
    for kw, field in (({"r": 0}, "r"), ({"alpha": -1}, "alpha"),
                      ({"decompose_factor": 0}, "decompose_factor"),
                      ({"decompose_factor": -2}, "decompose_factor")):
        with pytest.raises((TypeError, ValueError), match=field):
            LoKrConfig(**kw)
