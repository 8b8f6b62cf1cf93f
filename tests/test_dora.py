"""Proofs for minipeft.peft.dora, each against an independent computation in NumPy (float64):

* the value: y = m ⊙ x (W0 + s B A)ᵀ / ||W0 + s B A||_row + b, with the norm over the input
  dimension of each output row (np.linalg.norm(..., axis=1));
* the gradient with the norm detached (the default): central differences of that NumPy formula
  with ||V|| frozen at its current value; with ``detach_norm=False``: plain finite differences;
* step 0 equals the base bit for bit; merge/unmerge; save/load; bad configs named.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft import backend as bk
from minipeft.autograd import Tensor, gradcheck, no_grad
from minipeft.nn import GPT, GPTConfig, Linear
from minipeft.peft import DoraConfig, DoRALinear, get_peft_model, load_peft_model
from minipeft.peft.core import ADAPTER_WEIGHTS

CFG = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16)
host = bk.to_numpy


def ids_batch(seed=0, B=3, T=8):
    return bk.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T)))


def logits(model, ids):
    with no_grad():
        return host(model(ids).data).astype(np.float64)


def layer64(in_f, out_f, r, seed, detach=True):
    """A DoRA layer in float64 with random A, B and m (as training would leave them)."""
    rng = np.random.default_rng(seed)
    layer = DoRALinear(Linear(in_f, out_f, True, rng))
    layer.base.weight.data = bk.asarray(rng.normal(0, 0.5, (out_f, in_f)))
    layer.base.bias.data = bk.asarray(rng.normal(0, 0.1, (out_f,)))
    layer.base.weight.requires_grad = layer.base.bias.requires_grad = False
    layer.add_adapter("a", DoraConfig(r=r, alpha=2 * r, detach_norm=detach), rng)
    layer.set_active("a")
    f = layer.factors("a")
    for t in (f.A, f.B):
        t.data = bk.asarray(rng.normal(0, 0.4, t.shape))
    f.m.data = f.m.data * bk.asarray(rng.uniform(0.5, 1.5, f.m.shape))
    return layer, f


def formula(x, W0, b, A, B, m, s, frozen_norm=None):
    """NumPy float64: y = m ⊙ x Vᵀ / ||V||_row + b, V = W0 + s B A."""
    V = W0 + s * B @ A
    n = np.linalg.norm(V, axis=1) if frozen_norm is None else frozen_norm
    return (x @ V.T) * (m / n) + b


def numeric_grads(fn, arrays, R, eps=1e-6):
    """Central differences of sum(fn(*arrays) * R) for every element of every array."""
    out = []
    for a in arrays:
        g = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            old = a[i]
            a[i] = old + eps
            up = (fn(*arrays) * R).sum()
            a[i] = old - eps
            down = (fn(*arrays) * R).sum()
            a[i] = old
            g[i] = (up - down) / (2 * eps)
        out.append(g)
    return out


@given(st.integers(2, 6), st.integers(1, 5), st.integers(1, 3), st.integers(0, 10**6))
def test_value_and_detached_gradient_against_numpy(float64, in_f, out_f, r, seed):
    # the faults caught: the norm over the wrong axis, m not applied per output unit, the bias
    # scaled, a gradient that flows through the norm although the docstring says it is detached
    layer, f = layer64(in_f, out_f, r, seed)
    rng = np.random.default_rng(seed + 1)
    x = Tensor(rng.normal(0, 1, (2, in_f)), requires_grad=True)
    y = layer(x)
    W0, b = host(layer.base.weight.data), host(layer.base.bias.data)
    arrays = [host(x.data).copy(), host(f.A.data).copy(), host(f.B.data).copy(),
              host(f.m.data).copy()]
    np.testing.assert_allclose(host(y.data), formula(arrays[0], W0, b, *arrays[1:], f.scale),
                               rtol=1e-10, atol=1e-12)
    R = rng.normal(0, 1, y.shape)
    y.backward(bk.asarray(R))
    n0 = np.linalg.norm(W0 + f.scale * arrays[2] @ arrays[1], axis=1)     # frozen ||V||
    want = numeric_grads(lambda x, A, B, m: formula(x, W0, b, A, B, m, f.scale, n0), arrays, R)
    for got, w in zip((x.grad, f.A.grad, f.B.grad, f.m.grad), want):
        np.testing.assert_allclose(host(got), w, rtol=1e-5, atol=1e-7)


def test_exact_gradient_when_the_norm_is_not_detached_and_that_detaching_changes_it(float64):
    # the fault caught: detach_norm=False still detaching (or the graph's norm being wrong)
    layer, f = layer64(5, 4, 2, seed=3, detach=False)
    x = Tensor(np.random.default_rng(4).normal(0, 1, (3, 5)), requires_grad=True)
    gradcheck(lambda x, *_: layer(x), [x, f.A, f.B, f.m])
    exact = host(f.A.grad).copy()
    f.detach_norm = True
    for t in (x, f.A, f.B, f.m):
        t.grad = None
    layer(x).backward(bk.asarray(np.random.default_rng(0).standard_normal((3, 4))))
    # same seed for the projection as gradcheck's R: a different gradient for A
    assert np.abs(host(f.A.grad) - exact).max() > 1e-3


@pytest.mark.parametrize("detach", [True, False])
def test_step_zero_is_the_base_bit_for_bit_and_m_is_the_row_norm(detach):
    # the faults caught: m initialised over the wrong axis (fc_in is not square), B not zero
    ids = ids_batch()
    base = GPT(CFG)
    want = logits(base, ids)
    W = host(base.blocks[0].mlp.fc_in.weight.data).astype(np.float64).copy()   # (64, 16)
    pm = get_peft_model(base, DoraConfig(r=2, target_modules=("q_proj", "fc_in"),
                                         detach_norm=detach))
    np.testing.assert_array_equal(logits(pm, ids), want)
    m = host(pm.base_model.blocks[0].mlp.fc_in.factors("default").m.data)
    assert m.shape == (64,)
    np.testing.assert_allclose(m, np.linalg.norm(W, axis=1), rtol=1e-6)


def trained(seed=5):
    pm = get_peft_model(GPT(CFG), DoraConfig(r=2, target_modules=("q_proj", "v_proj", "fc_in")))
    rng = np.random.default_rng(seed)
    for _, layer in pm.base_model.named_modules():
        if isinstance(layer, DoRALinear):
            f = layer.factors("default")
            f.A.data = bk.asarray(rng.normal(0, 0.3, f.A.shape), dtype=np.float32)
            f.B.data = bk.asarray(rng.normal(0, 0.3, f.B.shape), dtype=np.float32)
            f.m.data = (f.m.data * rng.uniform(0.5, 1.5, f.m.shape)).astype(np.float32)
    return pm


def weights(pm):
    return {n: host(p.data).copy() for n, p in pm.base_model.named_parameters()}


def test_merge_equals_the_adapter_and_unmerge_gives_the_base_back():
    # the faults caught: merged weights that are not m ⊙ V / ||V||; an unmerge that forgets
    # the merge-time norm; a second merge that folds twice
    ids = ids_batch(1)
    pm = trained()
    before, out = weights(pm), logits(pm, ids)
    pm.merge()
    pm.merge()                                                     # idempotent
    np.testing.assert_allclose(logits(pm, ids), out, rtol=1e-4, atol=1e-5)
    layer = pm.base_model.blocks[1].attn.v_proj
    f = layer.factors("default")
    W0 = before["blocks.1.attn.v_proj.base.weight"].astype(np.float64)
    V = W0 + f.scale * host(f.B.data).astype(np.float64) @ host(f.A.data)
    want = host(f.m.data)[:, None] * V / np.linalg.norm(V, axis=1, keepdims=True)
    np.testing.assert_allclose(host(layer.base.weight.data), want, rtol=1e-5, atol=1e-6)
    pm.unmerge()
    for k, v in weights(pm).items():
        np.testing.assert_allclose(v, before[k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(logits(pm, ids), out, rtol=1e-5, atol=1e-6)


def test_a_merge_that_could_not_be_undone_is_refused_and_changes_nothing():
    # the fault caught: a zero magnitude merged (W0 = W' ||V|| / m is then lost)
    pm = trained()
    pm.base_model.blocks[1].mlp.fc_in.factors("default").m.data[3] = 0.0
    before = weights(pm)
    with pytest.raises(ValueError, match="merge refused"):
        pm.merge()
    assert all(np.array_equal(v, before[k]) for k, v in weights(pm).items())
    assert all(not getattr(m, "merged", False) for _, m in pm.base_model.named_modules())


def test_save_holds_a_b_and_m_and_reloads(tmp_path):
    # the fault caught: m not saved (a reload would restart it at ||W0||)
    from safetensors.numpy import load_file
    ids = ids_batch(2)
    pm = trained()
    pm.save_adapter(tmp_path / "d")
    keys = load_file(str(tmp_path / "d" / ADAPTER_WEIGHTS))
    assert sorted(keys) == sorted(f"blocks.{i}.{p}.{t}" for i in range(2)
                                  for p in ("attn.q_proj", "attn.v_proj", "mlp.fc_in")
                                  for t in ("A", "B", "m"))
    np.testing.assert_array_equal(logits(load_peft_model(GPT(CFG), tmp_path / "d"), ids),
                                  logits(pm, ids))


@pytest.mark.parametrize("kw, field", [({"detach_norm": 1}, "detach_norm"),
                                       ({"dropout": 0.1}, "dropout"),
                                       ({"init": "pissa"}, "pissa"),
                                       ({"target_embedding": True}, "target_embedding")])
def test_bad_configs_are_named(kw, field):
    with pytest.raises((TypeError, ValueError), match=field):
        DoraConfig(**kw)
