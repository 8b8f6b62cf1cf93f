"""Bottleneck adapters and IA3, proved against independent computation.

Each claim in the modules' docstrings is checked: step 0 equals the base model exactly (zero
up-projection, ones for IA3); the layers compute the formulas written there (NumPy by hand);
gradients match finite differences; the frozen base stays bit-identical under AdamW with weight
decay; placements put adapters where documented; IA3 merges exactly, idempotently and refuses
vectors that would destroy weights; save/load round trips; and every method learns.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft import backend as bk
from minipeft.autograd import Tensor, gradcheck
from minipeft.data import VOCAB, TaskMixture
from minipeft.io import load_tensors
from minipeft.nn import GPT, MLP, GPTConfig, Linear
from minipeft.peft import (
    AdapterConfig,
    AdapterLayer,
    Bottleneck,
    IA3Config,
    IA3Linear,
    IA3Vector,
    get_peft_model,
)
from minipeft.peft.core import ADAPTER_WEIGHTS
from minipeft.train import TrainConfig, evaluate_lm, train

TINY = GPTConfig(vocab_size=20, block_size=12, n_layer=2, n_head=2, n_embd=16)
METHODS = {
    "houlsby": AdapterConfig(bottleneck=4),
    "pfeiffer": AdapterConfig(reduction_factor=4, activation="gelu", placement="pfeiffer"),
    "parallel": AdapterConfig(bottleneck=4, placement="parallel", scale=0.5),
    "ia3": IA3Config(),
}


def host(a) -> np.ndarray:
    return bk.to_numpy(a)


def ids_for(cfg=TINY, B=3, T=7, seed=0):
    return bk.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T)))


def randomize(pm, seed=0, low=-0.5, high=0.5):
    """Give every adapter tensor random values, so a test sees the adapter act."""
    rng = np.random.default_rng(seed)
    for p in pm.trainable_parameters():
        p.data = bk.asarray(rng.uniform(low, high, p.shape), dtype=p.dtype)


def gelu_np(a):
    return 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))


# --------------------------------------------------------------------------- step 0 = base
@given(st.sampled_from(["houlsby", "pfeiffer", "parallel"]), st.sampled_from(["relu", "gelu"]),
       st.integers(1, 16), st.integers(0, 2**16), st.sampled_from([None, (0,), (1,)]))
def test_adapter_at_init_equals_base_exactly(placement, activation, width, seed, layers):
    base = GPT(TINY, seed=seed)
    ids = ids_for(seed=seed)
    ref = host(base(ids).data)
    cfg = AdapterConfig(bottleneck=width, activation=activation, placement=placement,
                        layers=layers, scale=2.0)
    pm = get_peft_model(base, cfg, seed=seed + 1)
    np.testing.assert_array_equal(host(pm(ids).data), ref)


@pytest.mark.parametrize("targets", [("k_proj", "v_proj", "fc_out"), ("q_proj", "o_proj", "fc_in")])
def test_ia3_at_init_equals_base_exactly(backend, targets):
    base = GPT(TINY, seed=3)
    ids = ids_for()
    ref = host(base(ids).data)
    pm = get_peft_model(base, IA3Config(target_modules=targets))
    np.testing.assert_array_equal(host(pm(ids).data), ref)


def test_adapter_at_init_equals_base_on_this_backend(backend):
    base = GPT(TINY, seed=4)
    ids = ids_for()
    ref = host(base(ids).data)
    pm = get_peft_model(base, METHODS["houlsby"])
    np.testing.assert_array_equal(host(pm(ids).data), ref)
    randomize(pm)
    assert not np.allclose(host(pm(ids).data), ref)   # and the adapter does act once trained
    with pm.disable_adapter():
        np.testing.assert_array_equal(host(pm(ids).data), ref)


# --------------------------------------------------------------------------- the formulas
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_sequential_adapter_computes_its_formula(backend, activation):
    rng = np.random.default_rng(0)
    lin = Linear(6, 5, rng=bk.host_rng(1))
    layer = AdapterLayer(lin, "output")
    layer.adapters.a = Bottleneck(5, 3, activation, 1.0, bk.host_rng(2), np.float32)
    layer.active = "a"
    ad = layer.adapters.a
    ad.up.weight.data = bk.asarray(rng.normal(size=(5, 3)), dtype=np.float32)
    ad.up.bias.data = bk.asarray(rng.normal(size=5), dtype=np.float32)
    ad.down.bias.data = bk.asarray(rng.normal(size=3), dtype=np.float32)
    x = rng.normal(size=(2, 4, 6)).astype(np.float32)
    W, b = host(lin.weight.data).astype(np.float64), host(lin.bias.data).astype(np.float64)
    Wd, bd = host(ad.down.weight.data), host(ad.down.bias.data)
    Wu, bu = host(ad.up.weight.data), host(ad.up.bias.data)
    h = x @ W.T + b
    z = h @ Wd.T + bd
    f = np.maximum(z, 0) if activation == "relu" else gelu_np(z)
    want = h + f @ Wu.T + bu
    got = host(layer(Tensor(bk.asarray(x))).data)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_parallel_adapter_computes_its_formula(backend):
    rng = np.random.default_rng(1)
    base = GPT(TINY, seed=0)
    pm = get_peft_model(base, METHODS["parallel"])
    randomize(pm, seed=2)
    layer = base.get_submodule("blocks.0.mlp")
    x = rng.normal(size=(2, 3, 16)).astype(np.float32)
    mlp = layer.base
    W1, b1 = host(mlp.fc_in.weight.data), host(mlp.fc_in.bias.data)
    W2, b2 = host(mlp.fc_out.weight.data), host(mlp.fc_out.bias.data)
    ad = layer.adapters.default
    Wd, bd = host(ad.down.weight.data), host(ad.down.bias.data)
    Wu, bu = host(ad.up.weight.data), host(ad.up.bias.data)
    want = (gelu_np(x @ W1.T + b1) @ W2.T + b2
            + 0.5 * (np.maximum(x @ Wd.T + bd, 0) @ Wu.T + bu))
    got = host(layer(Tensor(bk.asarray(x))).data)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target,scale_input", [("k_proj", False), ("fc_out", True)])
def test_ia3_layer_computes_its_formula(backend, target, scale_input):
    base = GPT(TINY, seed=0)
    pm = get_peft_model(base, IA3Config())
    randomize(pm, low=0.2, high=2.0)
    part = "attn" if target == "k_proj" else "mlp"
    layer = base.get_submodule(f"blocks.1.{part}.{target}")
    assert isinstance(layer, IA3Linear) and layer.scale_input == scale_input
    W, b = host(layer.base.weight.data), host(layer.base.bias.data)
    l = host(layer.adapters.default.l.data)
    x = np.random.default_rng(0).normal(size=(2, 3, W.shape[1])).astype(np.float32)
    want = (l * x) @ W.T + b if scale_input else l * (x @ W.T + b)
    got = host(layer(Tensor(bk.asarray(x))).data)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("activation,parallel", [("relu", False), ("gelu", False),
                                                 ("gelu", True)])
def test_adapter_layer_gradients(float64, activation, parallel):
    """d/d(input) and d/d(every adapter weight), float64 finite differences."""
    rng = bk.host_rng(0)
    base = MLP(6, True, rng, 0.3) if parallel else Linear(6, 6, rng=rng, std=0.3)
    base.requires_grad_(False)
    layer = AdapterLayer(base, parallel)
    layer.adapters.a = Bottleneck(6, 3, activation, 0.7 if parallel else 1.0, rng, np.float64)
    layer.active = "a"
    ad = layer.adapters.a
    ad.up.weight.data = bk.asarray(rng.normal(size=(6, 3)))   # nonzero: gradients reach W_down
    ad.down.bias.data = bk.asarray(rng.normal(0, 0.3, size=3))
    x = Tensor(bk.asarray(rng.normal(size=(2, 3, 6))), requires_grad=True)
    params = [ad.down.weight, ad.down.bias, ad.up.weight, ad.up.bias]
    gradcheck(lambda x, *ps: layer(x), [x, *params])


@pytest.mark.parametrize("target", ["v_proj", "fc_out"])
def test_ia3_gradients(float64, target):
    rng = bk.host_rng(1)
    lin = Linear(8, 5, rng=rng, std=0.5)
    lin.requires_grad_(False)
    layer = IA3Linear(lin, scale_input=target == "fc_out")
    n = 8 if target == "fc_out" else 5
    layer.adapters.a = IA3Vector(bk.asarray(rng.uniform(0.5, 1.5, n)))
    layer.active = "a"
    x = Tensor(bk.asarray(rng.normal(size=(3, 8))), requires_grad=True)
    gradcheck(lambda x, l: layer(x), [x, layer.adapters.a.l])


def test_adapter_gradients_through_the_whole_model(float64):
    cfg = GPTConfig(vocab_size=9, block_size=6, n_layer=1, n_head=2, n_embd=4)
    pm = get_peft_model(GPT(cfg, seed=0), AdapterConfig(bottleneck=2, activation="gelu"))
    randomize(pm, seed=3)
    ids = ids_for(cfg, B=2, T=4)
    params = pm.trainable_parameters()            # 2 adapters x 4 + 2 layer norms x 2 (Houlsby)
    assert len(params) == 12 and all(p.dtype == np.float64 for p in params)
    gradcheck(lambda *ps: pm(ids), params)


# --------------------------------------------------------------------------- frozen base
@pytest.mark.parametrize("method", list(METHODS))
def test_frozen_base_bit_identical_after_adamw_with_weight_decay(method):
    base = GPT(TINY, seed=0)
    before = {n: (p, host(p.data).copy()) for n, p in base.named_parameters()}
    pm = get_peft_model(base, METHODS[method])
    adapter_before = {n: host(p.data).copy() for n, p in pm._tensors("default").items()}
    rng = np.random.default_rng(0)
    batch = lambda B: (rng.integers(0, 20, (B, 8)), rng.integers(0, 20, (B, 8)))
    train(pm, batch, TrainConfig(steps=4, batch_size=4, lr=1e-2, weight_decay=0.1, warmup=0,
                                 progress=False))
    for n, (p, old) in before.items():
        np.testing.assert_array_equal(host(p.data), old, err_msg=n)
        assert p.grad is None and not p.requires_grad, n
    moved = [n for n, p in pm._tensors("default").items()
             if not np.array_equal(host(p.data), adapter_before[n])]
    assert moved, "no adapter tensor changed"


# --------------------------------------------------------------------------- placements
def _types(model, i=0):
    return {path: type(model.get_submodule(f"blocks.{i}.{path}")).__name__
            for path in ("attn.o_proj", "mlp")}


def test_placements_put_adapters_where_documented():
    m = GPT(TINY)
    get_peft_model(m, AdapterConfig(bottleneck=2, placement="houlsby"))
    assert _types(m) == {"attn.o_proj": "AdapterLayer", "mlp": "MLP"}
    assert isinstance(m.get_submodule("blocks.1.mlp.fc_out"), AdapterLayer)
    assert isinstance(m.get_submodule("blocks.1.mlp.fc_in"), Linear)

    m = GPT(TINY)
    get_peft_model(m, AdapterConfig(bottleneck=2, placement="pfeiffer", layers=(1,)))
    assert isinstance(m.blocks[1], AdapterLayer) and m.blocks[1].reads == "block"
    assert _types(m, "1.base") == {"attn.o_proj": "Linear", "mlp": "MLP"}
    assert type(m.blocks[0]).__name__ == "Block"                            # layers=(1,)

    m = GPT(TINY)
    get_peft_model(m, AdapterConfig(bottleneck=2, placement="parallel"))
    assert _types(m) == {"attn.o_proj": "Linear", "mlp": "AdapterLayer"}
    assert isinstance(m.get_submodule("blocks.0.mlp.base"), MLP)
    assert m.get_submodule("blocks.0.mlp").parallel


def test_parameter_count_is_2Cm_plus_m_plus_C_per_adapter():
    C, m, L = 16, 4, TINY.n_layer
    pm = get_peft_model(GPT(TINY), AdapterConfig(bottleneck=4))         # + 2 layer norms
    assert pm.num_parameters(trainable_only=True) == 2 * L * (2 * C * m + m + C) + L * 4 * C
    pm = get_peft_model(GPT(TINY), AdapterConfig(bottleneck=4, layer_norms=False))
    assert pm.num_parameters(trainable_only=True) == 2 * L * (2 * C * m + m + C)
    for placement in ("pfeiffer", "parallel"):
        pm = get_peft_model(GPT(TINY), AdapterConfig(bottleneck=4, placement=placement))
        assert pm.num_parameters(trainable_only=True) == L * (2 * C * m + m + C)
    pm = get_peft_model(GPT(TINY), IA3Config())
    assert pm.num_parameters(trainable_only=True) == TINY.n_layer * 6 * C


def test_zero_width_bottleneck_raises_and_changes_nothing():
    m = GPT(TINY)                                      # n_embd = 16
    with pytest.raises(ValueError, match="zero-width bottleneck"):
        get_peft_model(m, AdapterConfig(reduction_factor=32))
    assert not any(isinstance(mod, AdapterLayer) for _, mod in m.named_modules())
    with pytest.raises(ValueError, match="bottleneck"):
        AdapterConfig(bottleneck=0)
    with pytest.raises(ValueError, match="placement"):
        AdapterConfig(placement="middle")
    with pytest.raises(ValueError, match="layers"):
        get_peft_model(GPT(TINY), AdapterConfig(layers=(5,)))
    with pytest.raises(ValueError, match="target_modules"):
        IA3Config(target_modules=("ln_1",))


def test_several_named_adapters_switch_and_mix_placements():
    base = GPT(TINY, seed=0)
    ids = ids_for()
    ref = host(base(ids).data)
    pm = get_peft_model(base, AdapterConfig(bottleneck=2, placement="parallel"), "a")
    randomize(pm, seed=1)
    out_a = host(pm(ids).data)
    pm.add_adapter("b", AdapterConfig(bottleneck=3, placement="pfeiffer"), seed=5)
    # pfeiffer wraps the whole block, around the parallel wrapper of its MLP
    assert isinstance(base.get_submodule("blocks.0"), AdapterLayer)
    assert isinstance(base.get_submodule("blocks.0.base.mlp"), AdapterLayer)
    np.testing.assert_array_equal(host(pm(ids).data), ref)   # b is active and at its init
    randomize(pm, seed=2)                                     # only b trains, so only b changes
    out_b = host(pm(ids).data)
    pm.set_adapter("a")
    np.testing.assert_array_equal(host(pm(ids).data), out_a)
    assert not np.allclose(out_a, out_b)
    pm.delete_adapter("b")
    np.testing.assert_array_equal(host(pm(ids).data), out_a)


# --------------------------------------------------------------------------- IA3 merge
def _weights(model):
    return {n: host(p.data).copy() for n, p in model.named_parameters() if ".adapters." not in n}


def test_ia3_merge_matches_unmerged_and_the_folding_formula(backend):
    base = GPT(TINY, seed=2)
    pm = get_peft_model(base, IA3Config())
    randomize(pm, low=0.3, high=1.8)
    ids = ids_for()
    unmerged = host(pm(ids).data)
    original = _weights(base)
    pm.merge()
    np.testing.assert_allclose(host(pm(ids).data), unmerged, rtol=1e-4, atol=1e-5)
    k = base.get_submodule("blocks.0.attn.k_proj")
    f = base.get_submodule("blocks.0.mlp.fc_out")
    lk, lf = host(k.adapters.default.l.data), host(f.adapters.default.l.data)
    np.testing.assert_allclose(host(k.base.weight.data),
                               original["blocks.0.attn.k_proj.base.weight"] * lk[:, None],
                               rtol=1e-6)
    np.testing.assert_allclose(host(k.base.bias.data),
                               original["blocks.0.attn.k_proj.base.bias"] * lk, rtol=1e-6)
    np.testing.assert_allclose(host(f.base.weight.data),
                               original["blocks.0.mlp.fc_out.base.weight"] * lf[None, :],
                               rtol=1e-6)
    once = _weights(base)
    pm.merge()                                                # idempotent
    for n, w in _weights(base).items():
        np.testing.assert_array_equal(w, once[n], err_msg=n)
    pm.unmerge()
    pm.unmerge()
    for n, w in _weights(base).items():
        np.testing.assert_allclose(w, original[n], rtol=1e-6, atol=1e-7, err_msg=n)
    np.testing.assert_allclose(host(pm(ids).data), unmerged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_ia3_merge_refuses_bad_vectors_and_changes_nothing(bad):
    base = GPT(TINY, seed=2)
    pm = get_peft_model(base, IA3Config())
    randomize(pm, low=0.3, high=1.8)
    last = base.get_submodule("blocks.1.mlp.fc_out").adapters.default.l   # merged last
    data = host(last.data).copy()
    data[5] = bad
    last.data = bk.asarray(data)
    original = _weights(base)
    with pytest.raises(ValueError, match="zero or non-finite"):
        pm.merge()
    for n, w in _weights(base).items():
        np.testing.assert_array_equal(w, original[n], err_msg=n)
    assert not any(getattr(m, "merged", False) for _, m in base.named_modules())


# --------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_round_trip_holds_only_the_method_tensors(tmp_path, method):
    cfg = METHODS[method]
    pm = get_peft_model(GPT(TINY, seed=0), cfg)
    randomize(pm, low=0.5, high=1.5)
    ids = ids_for()
    want = host(pm(ids).data)
    pm.save_adapter(tmp_path / "ad")
    tensors, _ = load_tensors(tmp_path / "ad" / ADAPTER_WEIGHTS)
    assert set(tensors) == set(pm._tensors("default"))
    frozen = {n.replace(".base.", ".") for n, p in pm.named_parameters() if not p.requires_grad}
    assert not frozen & {k.replace("base_model.", "") for k in tensors}
    assert sum(t.size for t in tensors.values()) == pm.num_parameters(trainable_only=True)

    other = get_peft_model(GPT(TINY, seed=0), cfg, seed=99)
    other.load_adapter(tmp_path / "ad", name="loaded")
    np.testing.assert_allclose(host(other(ids).data), want, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- learning
LEARN = GPTConfig(vocab_size=len(VOCAB), block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def pretrained():
    """A base that knows copy and sort (about a second of full training), and a reverse task.

    A random tied-embedding GPT cannot express a peaked distribution (its logits are tiny), so
    a method's learning is measured on a base that has learned something."""
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
    lr = 3e-2 if method == "ia3" else 1e-2
    train(pm, data.sample, TrainConfig(steps=30, batch_size=16, lr=lr, warmup=0, progress=False))
    after = evaluate_lm(pm, x, y)["loss"]
    assert after < before - 0.1, (before, after)


# --------------------------------------------------------------------------- the papers' maths
def test_pfeiffer_reads_the_stream_after_the_feed_forward_residual_add(backend):
    """Pfeiffer et al. / AdapterHub SeqBnConfig: out = x2 + A(x2), x2 = x1 + mlp(ln_2(x1)).
    The fault caught: the adapter reading the raw MLP output f (out = x2 + A(f)), Houlsby's
    feed-forward adapter alone, which this placement computed before."""
    cfg = GPTConfig(vocab_size=20, block_size=12, n_layer=1, n_head=2, n_embd=16)
    plain, ids = GPT(cfg, seed=2), ids_for(cfg)
    pm = get_peft_model(GPT(cfg, seed=2), AdapterConfig(bottleneck=4, placement="pfeiffer"))
    randomize(pm, seed=5)
    ad = pm.base_model.blocks[0].adapters.default
    Wd, bd = host(ad.down.weight.data), host(ad.down.bias.data)
    Wu, bu = host(ad.up.weight.data), host(ad.up.bias.data)

    def A(h):                                                        # (B, T, C) by hand
        return np.maximum(h @ Wd.T + bd, 0) @ Wu.T + bu

    blk = plain.blocks[0]
    h = plain.tok_emb(ids) + plain.pos_emb(bk.xp.arange(ids.shape[1]))
    x1 = h + blk.attn(blk.ln_1(h))[0]
    f = blk.mlp(blk.ln_2(x1))
    x2 = host((x1 + f).data)
    W = host(plain.tok_emb.weight.data)

    def head(out):                                                   # ln_f, tied head
        return host(plain.ln_f(Tensor(bk.asarray(out.astype(np.float32)))).data) @ W.T

    got = host(pm(ids).data)
    np.testing.assert_allclose(got, head(x2 + A(x2)), rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, head(x2 + A(host(f.data))), atol=1e-3)


def test_houlsby_trains_the_layer_norms_as_its_own_copies():
    """Houlsby et al. train the layer norms too: counted, starting as the base's (step 0 is
    the base), moving in training while the base's own norms stay frozen and bit-identical,
    and off with layer_norms=False."""
    base = GPT(TINY, seed=0)
    ln = {n: (p, host(p.data).copy()) for n, p in base.named_parameters() if ".ln_" in n}
    pm = get_peft_model(base, AdapterConfig(bottleneck=2))
    names = {n for n, p in pm.named_parameters() if p.requires_grad and ".ln_" in n}
    assert len(names) == 4 * TINY.n_layer                            # ln_1, ln_2: w, b
    rng = np.random.default_rng(0)
    batch = lambda B: (rng.integers(0, 20, (B, 8)), rng.integers(0, 20, (B, 8)))
    train(pm, batch, TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup=0, progress=False))
    params = dict(pm.named_parameters())
    assert all(not np.array_equal(host(params[n].data), ln[n.replace(
        ".adapters.default", "").replace("base_model.", "")][1]) for n in names)
    for n, (p, old) in ln.items():
        np.testing.assert_array_equal(host(p.data), old, err_msg=n)
        assert not p.requires_grad
    off = get_peft_model(GPT(TINY), AdapterConfig(bottleneck=2, layer_norms=False))
    assert not any(".ln_" in n for n, p in off.named_parameters() if p.requires_grad)
