"""Proofs for minipeft.peft.lora and lora_merge: every claim checked against an independent path.

The independent path is a *plain* GPT whose weights are set on the host to ``W + s B A`` (NumPy,
float64, from the adapter's factors): if LoRA is what its docstring says, the adapted model and
that dense model compute the same logits. Layer-level claims compare with ``x @ (W + s B A).T + b``
written out in NumPy.
"""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file

from minipeft import backend as bk
from minipeft.autograd import Tensor, counters, gradcheck, linear, no_grad
from minipeft.io import CheckpointError
from minipeft.lowrank import truncate
from minipeft.nn import GPT, GPTConfig, Linear
from minipeft.nn.layers import Embedding
from minipeft.optim import AdamW
from minipeft.params import PRESETS, lora_parameter_count, spec_from_config
from minipeft.peft import (
    LoraConfig,
    LoRAEmbedding,
    LoRALinear,
    MergedAdapterError,
    add_weighted_adapter,
    get_peft_model,
)
from minipeft.peft.core import ADAPTER_WEIGHTS
from minipeft.peft.lora import lora_linear

CFG = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16)
host = bk.to_numpy


def ids_batch(seed=0, B=4, T=8, V=32):
    return bk.asarray(np.random.default_rng(seed).integers(0, V, (B, T)))


def logits(model, ids, **kw):
    with no_grad():
        return host(model(ids, **kw).data).astype(np.float64)


def lora_layers(pm):
    return [(p, m) for p, m in pm.base_model.named_modules()
            if isinstance(m, (LoRALinear, LoRAEmbedding))]


def perturb(pm, name, seed, std=0.2):
    """Give adapter ``name`` random A and B, as training would (B = 0 makes adapters alike)."""
    rng = np.random.default_rng(seed)
    for _, layer in lora_layers(pm):
        if name in layer.adapter_names():
            f = layer.factors(name)
            f.A.data = bk.asarray(rng.normal(0, std, f.A.shape), dtype=f.A.dtype)
            f.B.data = bk.asarray(rng.normal(0, std, f.B.shape), dtype=f.B.dtype)


def dense_update(layer, name):
    """s B A in float64 on the host, in the layout of the base weight."""
    f = layer.factors(name)
    d = f.scale * host(f.B.data).astype(np.float64) @ host(f.A.data).astype(np.float64)
    return d.T if isinstance(layer, LoRAEmbedding) else d


def dense_model(pm, names, weights=None, seed=0, cfg=CFG):
    """A plain GPT with W <- W_base + Σ w_i s_i B_i A_i: the oracle for adapted outputs."""
    ref = GPT(cfg, seed=seed)
    weights = weights or [1.0] * len(names)
    for path, layer in lora_layers(pm):
        W = host(layer.base.weight.data).astype(np.float64)
        for n, w in zip(names, weights):
            if n in layer.adapter_names():
                W = W + w * dense_update(layer, n)
        ref.get_submodule(path).weight.data = bk.asarray(W, dtype=bk.default_dtype())
    return ref


def snapshot(model):
    return {n: (host(p.data).copy(), p.requires_grad) for n, p in model.named_parameters()}


def assert_same(snap, model):
    now = snapshot(model)
    assert list(now) == list(snap)
    for n, (data, flag) in snap.items():
        assert np.array_equal(now[n][0], data, equal_nan=True) and now[n][1] == flag, n


# ============================================================================ config
def test_bad_configs_raise_specific_messages():
    with pytest.raises(ValueError, match=r"LoraConfig.r must be >= 1, got 0"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match=r"alpha must be > 0.*got -1"):
        LoraConfig(alpha=-1)
    with pytest.raises(ValueError, match=r"alpha must be > 0"):
        LoraConfig(alpha=0)
    with pytest.raises(ValueError, match=r"dropout must be < 1.0, got 1.0"):
        LoraConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"init must be one of .*'xavier'"):
        LoraConfig(init="xavier")
    with pytest.raises(ValueError, match="nothing to adapt"):
        LoraConfig(target_modules=())
    with pytest.raises(ValueError, match=r"'q_proj\[' is not a module name or glob"):
        LoraConfig(target_modules=("q_proj[",))


def test_unknown_target_lists_names_and_leaves_model_unchanged(backend):
    model = GPT(CFG)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'qproj' matches no Linear.*'fc_in'.*'q_proj'"):
        get_peft_model(model, LoraConfig(target_modules=("q_proj", "qproj")))
    assert_same(before, model)
    assert isinstance(model.blocks[0].attn.q_proj, Linear)
    pm = get_peft_model(model, LoraConfig())
    before = snapshot(pm)
    with pytest.raises(ValueError, match=r"layers must be block indices in \[0, 2\), got \[7\]"):
        pm.add_adapter("b", LoraConfig(layers=(7,)))
    with pytest.raises(ValueError, match="matches no Linear"):
        pm.add_adapter("b", LoraConfig(target_modules="proj"))  # suffix only at a dot
    assert_same(before, pm)
    assert list(pm.peft_configs) == ["default"]


def test_config_round_trips_through_dict():
    cfg = LoraConfig(r=4, target_modules=["q_proj", "fc_in"], layers=[1], use_rslora=True)
    assert cfg.target_modules == ("q_proj", "fc_in") and cfg.layers == (1,)
    assert LoraConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("targets, layers, expected", [
    ("attn.q_proj", None, ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]),
    ("blocks.1.mlp.fc_out", None, ["blocks.1.mlp.fc_out"]),
    ("blocks.0.*_proj", None, [f"blocks.0.attn.{k}_proj" for k in "qkvo"]),
    ("*.?_proj", (1,), [f"blocks.1.attn.{k}_proj" for k in "qkvo"]),
    (("q_proj", "fc_in"), (1,), ["blocks.1.attn.q_proj", "blocks.1.mlp.fc_in"]),
])
def test_target_rule(targets, layers, expected):
    pm = get_peft_model(GPT(CFG), LoraConfig(target_modules=targets, layers=layers))
    assert [p for p, _ in lora_layers(pm)] == expected


def test_rslora_scale(backend):
    assert LoraConfig(r=16, alpha=8).scale == 0.5
    assert LoraConfig(r=16, alpha=8, use_rslora=True).scale == 8 / 4
    pm = get_peft_model(GPT(CFG), LoraConfig(r=16, alpha=8, use_rslora=True))
    assert all(m.factors("default").scale == 2.0 for _, m in lora_layers(pm))


# ============================================================================ the layer
def make_layer(in_f, out_f, r, seed=0, rslora=False, dropout=0.0):
    base = Linear(in_f, out_f, rng=bk.host_rng(seed), std=0.5)
    base.bias.data = bk.asarray(np.random.default_rng(seed).normal(size=out_f),
                                dtype=base.bias.dtype)
    base.requires_grad_(False)
    layer = LoRALinear(base)
    cfg = LoraConfig(r=r, alpha=3.0, use_rslora=rslora, dropout=dropout)
    layer.add_adapter("a", cfg, bk.host_rng(seed))
    layer.active = "a"
    f = layer.factors("a")
    f.B.data = bk.asarray(np.random.default_rng(seed + 1).normal(size=f.B.shape), dtype=f.B.dtype)
    return layer, cfg


@given(in_f=st.integers(1, 9), out_f=st.integers(1, 9), r=st.integers(1, 5),
       lead=st.lists(st.integers(1, 3), min_size=1, max_size=3), rslora=st.booleans(),
       seed=st.integers(0, 2**16))
def test_forward_equals_dense_and_merge_round_trips(backend, in_f, out_f, r, lead, rslora, seed):
    layer, cfg = make_layer(in_f, out_f, r, seed, rslora)
    x = np.random.default_rng(seed + 2).normal(size=(*lead, in_f)).astype(np.float32)
    W0, b = host(layer.base.weight.data).astype(np.float64), host(layer.base.bias.data)
    f = layer.factors("a")
    BA = host(f.B.data).astype(np.float64) @ host(f.A.data).astype(np.float64)
    expected = x @ (W0 + cfg.scale * BA).T + b                       # the dense oracle
    with no_grad():
        y = host(layer(Tensor(bk.asarray(x))).data)
        try:
            layer.merge()
        except ValueError as exc:
            # the documented refusal (peft/layer.py): s B A dwarfs W0, so float32 cannot hold W0
            # beside it and unmerge could not give W0 back; the base must be left untouched
            assert "merge refused" in str(exc)
            assert np.array_equal(host(layer.base.weight.data), W0.astype(np.float32))
            assert np.abs(cfg.scale * BA).max() > 1e2 * np.abs(W0).max()
            return
        W_merged = host(layer.base.weight.data).copy()
        layer.merge()                                                 # idempotent
        assert np.array_equal(host(layer.base.weight.data), W_merged)
        y_merged = host(layer(Tensor(bk.asarray(x))).data)
        layer.unmerge()
        layer.unmerge()
    tol = 1e-5 * (1 + np.abs(expected).max())
    assert np.allclose(y, expected, rtol=1e-5, atol=tol)
    assert np.allclose(W_merged, W0 + cfg.scale * BA, rtol=1e-5, atol=1e-6)
    assert np.allclose(y_merged, expected, rtol=1e-5, atol=tol)      # no double counting
    scale_W = 1e-6 * (1 + np.abs(W_merged).max())
    assert np.allclose(host(layer.base.weight.data), W0, rtol=0, atol=scale_W)


def test_gradcheck_through_lora_linear(backend, float64):
    layer, _ = make_layer(5, 4, 3, seed=1)
    f = layer.factors("a")
    x = Tensor(bk.asarray(np.random.default_rng(0).normal(size=(2, 3, 5))), requires_grad=True)
    gradcheck(lambda x, A, B: layer(x), [x, f.A, f.B])
    assert layer.base.weight.grad is None


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_of_the_fused_op_with_every_input_trainable(backend, float64, bias):
    rng = np.random.default_rng(3)
    t = lambda *shape: Tensor(bk.asarray(rng.normal(size=shape)), requires_grad=True)
    x, W, A, B, b = t(2, 3, 5), t(4, 5), t(3, 5), t(4, 3), t(4)
    gradcheck(lambda x, W, A, B, *b: lora_linear(x, W, b[0] if b else None, A, B, 0.7),
              [x, W, A, B, b] if bias else [x, W, A, B])


def test_fused_op_equals_the_three_op_composition(backend, float64):
    """A second code path: base linear + (s x Aᵀ) Bᵀ as separate ops, same values and grads."""
    rng = np.random.default_rng(4)
    arrays = [rng.normal(size=s) for s in ((2, 3, 5), (4, 5), (4,), (3, 5), (4, 3))]
    g = bk.asarray(rng.normal(size=(2, 3, 4)))
    results = []
    for fused in (True, False):
        x, W, b, A, B = [Tensor(bk.asarray(a), requires_grad=True) for a in arrays]
        W.requires_grad = False                                     # frozen, as in LoRA
        y = (lora_linear(x, W, b, A, B, 0.7) if fused
             else linear(x, W, b) + linear(linear(x, A) * 0.7, B))
        y.backward(g)
        results.append([host(y.data)] + [host(t.grad) for t in (x, b, A, B)])
        assert W.grad is None
    for fused_value, composed_value in zip(*results):
        assert np.allclose(fused_value, composed_value, rtol=1e-12, atol=1e-12)


def test_lora_step_saves_no_more_activation_bytes_than_full_ft_plus_rank_r(backend):
    """The fused op keeps no (…, out) arrays beyond the base model's: LoRA's predicted
    activations exceed full FT's by at most the thin h = s x Aᵀ per adapted layer."""
    from minipeft.memory import measure_step

    ids = ids_batch()
    x, y = ids[:, :-1], ids[:, 1:]
    full = measure_step(GPT(CFG), x, y).predicted["activations"]
    pm = get_peft_model(GPT(CFG), LoraConfig(r=2, target_modules=("q_proj", "v_proj")))
    lora = measure_step(pm, x, y).predicted["activations"]
    thin = len(lora_layers(pm)) * x.size * 2 * bk.np.dtype(bk.default_dtype()).itemsize
    assert lora <= full + thin


def test_gradcheck_through_mixed_batch(backend, float64):
    layer, cfg = make_layer(4, 3, 2, seed=2)
    layer.add_adapter("b", cfg, bk.host_rng(5))
    fb = layer.factors("b")
    fb.B.data = bk.asarray(np.random.default_rng(9).normal(size=fb.B.shape))
    layer.row_adapters = ["b", None, "a", "b"]
    fa = layer.factors("a")
    x = Tensor(bk.asarray(np.random.default_rng(0).normal(size=(4, 2, 4))), requires_grad=True)
    gradcheck(lambda x, *_: layer(x), [x, fa.A, fa.B, fb.A, fb.B])


def test_merge_refuses_nan_and_leaves_weights_unchanged(backend):
    pm = get_peft_model(GPT(CFG), LoraConfig(r=2))
    perturb(pm, "default", 0)
    last = lora_layers(pm)[-1][1]           # only the last layer is bad: no layer may merge
    last.factors("default").A.data[0, 0] = float("nan")
    before = snapshot(pm.base_model)
    with pytest.raises(ValueError, match="non-finite values in A"):
        pm.merge()
    assert_same(before, pm.base_model)
    assert not any(m.merged for _, m in lora_layers(pm))


# ============================================================================ the model
def test_init_equals_base_exactly(backend):
    ids = ids_batch()
    for init in ("kaiming", "gaussian"):
        model = GPT(CFG)
        base = logits(model, ids)
        pm = get_peft_model(model, LoraConfig(r=4, init=init, dropout=0.1,
                                              target_modules=("q_proj", "v_proj", "fc_out"),
                                              target_embedding=True))
        pm.eval()
        assert np.array_equal(logits(pm, ids), base)


def test_dropout_acts_on_the_lora_branch_only(backend):
    ids = ids_batch()
    model = GPT(CFG)
    base = logits(model, ids)
    pm = get_peft_model(model, LoraConfig(r=2, dropout=0.5))
    pm.train()
    assert np.array_equal(logits(pm, ids), base)       # B = 0: dropout has nothing to drop
    perturb(pm, "default", 11)
    first, second = logits(pm, ids), logits(pm, ids)
    assert not np.allclose(first, second)              # fresh masks each step
    pm.eval()
    assert np.allclose(logits(pm, ids), logits(dense_model(pm, ["default"]), ids), atol=1e-5)


def test_adapted_model_equals_dense_model_merged_or_not(backend):
    ids = ids_batch()
    pm = get_peft_model(GPT(CFG), LoraConfig(r=3, target_modules=("q_proj", "v_proj", "fc_in")))
    perturb(pm, "default", 1)
    expected = logits(dense_model(pm, ["default"]), ids)
    assert np.allclose(logits(pm, ids), expected, atol=1e-5)
    W0 = {p: host(m.base.weight.data).copy() for p, m in lora_layers(pm)}
    pm.merge()
    once = {p: host(m.base.weight.data).copy() for p, m in lora_layers(pm)}
    pm.merge()
    assert all(np.array_equal(host(m.base.weight.data), once[p]) for p, m in lora_layers(pm))
    assert np.allclose(logits(pm, ids), expected, atol=1e-5)
    pm.unmerge()
    pm.unmerge()
    for p, m in lora_layers(pm):
        assert np.allclose(host(m.base.weight.data), W0[p], rtol=0, atol=1e-6)
    assert np.allclose(logits(pm, ids), expected, atol=1e-5)


def test_base_frozen_after_adamw_and_rank_at_most_r(backend):
    r = 2
    pm = get_peft_model(GPT(CFG), LoraConfig(r=r, target_modules=("q_proj", "v_proj", "fc_in")))
    frozen = {n: host(p.data).copy() for n, p in pm.named_parameters() if not p.requires_grad}
    trained = {n: host(p.data).copy() for n, p in pm.named_parameters() if p.requires_grad}
    assert all(n.endswith((".A", ".B")) for n in trained)
    opt = AdamW(pm.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    ids = ids_batch(3)
    for _ in range(5):
        opt.zero_grad()
        pm.loss(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()
    params = dict(pm.named_parameters())
    for n, data in frozen.items():
        assert np.array_equal(host(params[n].data), data), n
        assert params[n].grad is None, n
    assert all(not np.array_equal(host(params[n].data), d) for n, d in trained.items())
    for _, m in lora_layers(pm):
        f = m.factors("default")
        BA = host(f.B.data).astype(np.float64) @ host(f.A.data).astype(np.float64)
        assert 0 < np.linalg.matrix_rank(BA) <= r


def test_weight_grad_matmuls_are_two_per_targeted_linear(backend):
    pm = get_peft_model(GPT(CFG), LoraConfig(r=2, target_modules=("q_proj", "v_proj", "fc_in")))
    ids = ids_batch()
    counters["weight_grad_matmul"] = 0
    pm.loss(ids[:, :-1], ids[:, 1:]).backward()
    n_linear = len(lora_layers(pm))
    assert n_linear == 6
    assert counters["weight_grad_matmul"] == 2 * n_linear
    assert len(pm.trainable_parameters()) == 2 * n_linear


@pytest.mark.parametrize("r, targets, layers", [
    (8, ("q_proj", "v_proj"), None),
    (2, ("q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out"), None),
    (4, ("fc_in",), (1,)),
])
def test_trainable_count_equals_calculator(r, targets, layers):
    pm = get_peft_model(GPT(CFG), LoraConfig(r=r, target_modules=targets, layers=layers))
    assert pm.num_parameters(trainable_only=True) == \
        lora_parameter_count(spec_from_config(CFG), r, targets, layers)


def test_published_counts():
    assert lora_parameter_count(PRESETS["gpt3-175b"], 1) == 4_718_592     # LoRA paper, Table 4
    assert lora_parameter_count(PRESETS["gpt3-175b"], 8) == 37_748_736
    assert lora_parameter_count(PRESETS["llama2-7b"], 8) == 4_194_304


# ============================================================================ save / load
def test_saved_file_holds_only_factors_and_reloads(backend, tmp_path):
    ids = ids_batch()
    pm = get_peft_model(GPT(CFG), LoraConfig(r=2, target_modules=("q_proj", "fc_out")))
    perturb(pm, "default", 2)
    pm.save_adapter(tmp_path / "a")
    keys = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS))
    assert sorted(keys) == sorted(f"blocks.{i}.{m}.{t}" for i in range(2)
                                  for m in ("attn.q_proj", "mlp.fc_out") for t in "AB")
    assert keys["blocks.0.attn.q_proj.A"].shape == (2, 16)
    assert keys["blocks.0.mlp.fc_out.B"].shape == (16, 2)
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["method"] == "lora" and meta["config"]["r"] == 2

    fresh = get_peft_model(GPT(CFG), LoraConfig(), adapter_name="scratch")
    fresh.load_adapter(tmp_path / "a", name="task")
    assert fresh.active_adapter == "task"
    assert np.array_equal(logits(fresh, ids), logits(pm, ids))


def test_load_onto_other_base_or_corrupt_file_fails_cleanly(backend, tmp_path):
    pm = get_peft_model(GPT(CFG), LoraConfig(r=2))
    perturb(pm, "default", 3)
    pm.save_adapter(tmp_path / "a")
    other = get_peft_model(GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2,
                                         n_embd=8)), LoraConfig(), adapter_name="scratch")
    before = snapshot(other)
    with pytest.raises(CheckpointError, match=r"another base model.*'n_embd': \(8, 16\)"):
        other.load_adapter(tmp_path / "a", name="task")
    assert_same(before, other)
    assert list(other.peft_configs) == ["scratch"]

    target = get_peft_model(GPT(CFG), LoraConfig(), adapter_name="scratch")
    before = snapshot(target)
    path = tmp_path / "a" / ADAPTER_WEIGHTS
    raw = path.read_bytes()
    for broken in (raw[: len(raw) // 2], b"\x00" * 7, b"not a safetensors file at all"):
        path.write_bytes(broken)
        with pytest.raises(CheckpointError, match="truncated or corrupted"):
            target.load_adapter(tmp_path / "a", name="task")
        assert_same(before, target)


# ============================================================================ several adapters
def two_adapters():
    pm = get_peft_model(GPT(CFG), LoraConfig(r=2), adapter_name="a")
    pm.add_adapter("b", LoraConfig(r=3, target_modules=("q_proj", "v_proj", "fc_in")), seed=1)
    perturb(pm, "a", 4)
    perturb(pm, "b", 5)
    return pm


def test_task_switching_merge_and_disable(backend):
    ids = ids_batch()
    pm = two_adapters()
    base = logits(GPT(CFG), ids)
    want = {n: logits(dense_model(pm, [n]), ids) for n in "ab"}
    for n in "aba":
        pm.set_adapter(n)
        assert np.allclose(logits(pm, ids), want[n], atol=1e-5)
    with pm.disable_adapter():
        assert np.array_equal(logits(pm, ids), base)
    pm.set_adapter("a")
    pm.merge()
    assert np.allclose(logits(pm, ids), want["a"], atol=1e-5)
    pm.unmerge()
    pm.set_adapter("b")
    pm.merge()                                        # B on top of the restored W, no reload
    assert np.allclose(logits(pm, ids), want["b"], atol=1e-5)
    with pytest.raises(MergedAdapterError, match="'b' is folded into the base weights"):
        pm.delete_adapter("b")


def test_mixed_batch_equals_each_row_alone(backend):
    ids = ids_batch(B=5)
    pm = two_adapters()
    rows = ["a", None, "b", "a", None]
    mixed = logits(pm, ids, adapter_names=rows)
    for i, n in enumerate(rows):
        ref = GPT(CFG) if n is None else dense_model(pm, [n])
        assert np.allclose(mixed[i], logits(ref, ids[i:i + 1])[0], atol=1e-5), (i, n)


# ============================================================================ add_weighted_adapter
def new_vs_sum(pm, new, names, weights):
    """(new adapter's B A, Σ w_i s_i B_i A_i) per layer, float64 on the host."""
    out = {}
    for p, m in lora_layers(pm):
        total = sum((w * dense_update(m, n) for n, w in zip(names, weights)
                     if n in m.adapter_names()), np.zeros(m.base.weight.shape))
        out[p] = (dense_update(m, new), total)
    return out


def test_weighted_cat_is_the_exact_weighted_sum(backend):
    ids = ids_batch()
    pm = two_adapters()
    cfg = add_weighted_adapter(pm, ["a", "b"], [0.7, -1.3], "ab", how="cat")
    assert cfg.r == 5 and pm.active_adapter == "b"
    for p, (new, total) in new_vs_sum(pm, "ab", ["a", "b"], [0.7, -1.3]).items():
        assert np.allclose(new, total, atol=1e-6), p
    pm.set_adapter("ab")
    ref = dense_model(pm, ["a", "b"], [0.7, -1.3])
    assert np.allclose(logits(pm, ids), logits(ref, ids), atol=1e-5)


def test_weighted_linear_is_the_factor_sum_not_the_update_sum(backend):
    pm = get_peft_model(GPT(CFG), LoraConfig(r=2), adapter_name="a")
    pm.add_adapter("b", LoraConfig(r=2, alpha=4), seed=1)
    perturb(pm, "a", 6)
    perturb(pm, "b", 7)
    add_weighted_adapter(pm, ["a"], [-2.0], "a2", how="linear")    # one adapter: exact
    for p, (new, total) in new_vs_sum(pm, "a2", ["a"], [-2.0]).items():
        assert np.allclose(new, total, atol=1e-6), p
    w = [0.5, 2.0]
    add_weighted_adapter(pm, ["a", "b"], w, "mix", how="linear")
    for p, m in lora_layers(pm):
        fa, fb = m.factors("a"), m.factors("b")
        A = sum(np.sqrt(wi) * f.scale * host(f.A.data) for wi, f in zip(w, (fa, fb)))
        B = sum(np.sqrt(wi) * host(f.B.data) for wi, f in zip(w, (fa, fb)))
        new, total = new_vs_sum(pm, "mix", ["a", "b"], w)[p]
        assert np.allclose(new, B @ A, atol=1e-5)
        assert not np.allclose(new, total, atol=1e-3)              # the cross terms
    pm2 = two_adapters()
    with pytest.raises(ValueError, match=r"equal ranks, got \[2, 3\]"):
        add_weighted_adapter(pm2, ["a", "b"], [1, 1], "x", how="linear")
    assert "x" not in pm2.peft_configs


def test_weighted_svd_error_is_the_tail_energy(backend):
    pm = two_adapters()
    names, w = ["a", "b"], [1.0, 0.5]
    add_weighted_adapter(pm, names, w, "s", how="svd")           # r = max rank = 3
    for p, (new, total) in new_vs_sum(pm, "s", names, w).items():
        S = np.linalg.svd(total, compute_uv=False)
        tail = np.sqrt(np.sum(S[3:] ** 2))
        assert np.isclose(np.linalg.norm(new - total), tail, rtol=1e-4, atol=1e-6), p
        assert np.allclose(new, host(truncate(bk.asarray(total), 3)), atol=1e-5)
    with pytest.raises(ValueError, match=r"r must be <= 16, got 17"):
        add_weighted_adapter(pm, names, w, "t", how="svd", r=17)


# ============================================================================ PiSSA, embedding
def test_pissa_starts_at_base_and_freezes_the_residual(backend):
    ids = ids_batch()
    model = GPT(CFG)
    W = {p: host(model.get_submodule(p).weight.data).astype(np.float64)
         for p in ("blocks.0.attn.q_proj", "blocks.1.attn.v_proj")}
    base = logits(model, ids)
    pm = get_peft_model(model, LoraConfig(r=4, alpha=8, init="pissa"))
    assert np.allclose(logits(pm, ids), base, atol=1e-5)
    for p, W0 in W.items():
        m = pm.base_model.get_submodule(p)
        top = dense_update(m, "default")
        assert np.allclose(top, host(truncate(bk.asarray(W0), 4)), atol=1e-5)  # top-r part
        assert np.allclose(host(m.base.weight.data), W0 - top, atol=1e-6)     # the residual
    with pm.disable_adapter():
        assert not np.allclose(logits(pm, ids), base, atol=1e-4)  # the residual model
    with pytest.raises(ValueError, match="r=17 exceeds"):
        get_peft_model(GPT(CFG), LoraConfig(r=17, init="pissa"))
    before = snapshot(pm)
    with pytest.raises(ValueError, match="a model of its own"):
        pm.add_adapter("second", LoraConfig(r=2, init="pissa"))
    assert_same(before, pm)


def test_saved_pissa_adapter_reloads_into_fresh_base(backend, tmp_path):
    ids = ids_batch()
    pm = get_peft_model(GPT(CFG), LoraConfig(r=4, init="pissa"))
    perturb(pm, "default", 10)                      # "trained" away from the PiSSA start
    pm.save_adapter(tmp_path / "p")
    # load_adapter needs a LoRA PeftModel; its placeholder adapter sits on other layers
    other = get_peft_model(GPT(CFG), LoraConfig(target_modules="fc_in"), adapter_name="x")
    other.load_adapter(tmp_path / "p", name="task")
    assert np.allclose(logits(other, ids), logits(pm, ids), atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_lora_equals_dense_table(backend, tied):
    cfg = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16,
                    tie_weights=tied)
    ids = ids_batch()
    model = GPT(cfg)
    base = logits(model, ids)
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=(), target_embedding=True),
                        adapter_name="a")
    assert isinstance(pm.base_model.tok_emb, LoRAEmbedding)
    assert np.array_equal(logits(pm, ids), base)
    perturb(pm, "a", 8)
    want = logits(dense_model(pm, ["a"], cfg=cfg), ids)   # the tied head sees the new table
    assert np.allclose(logits(pm, ids), want, atol=1e-5)
    pm.merge()
    assert np.allclose(logits(pm, ids), want, atol=1e-5)
    pm.unmerge()
    assert np.allclose(host(pm.base_model.tok_emb.base.weight.data),
                       host(GPT(cfg).tok_emb.weight.data), atol=1e-6)
    pm.add_adapter("b", LoraConfig(r=2, target_modules=(), target_embedding=True), seed=1)
    rows = ["a", None, "b", "a"]
    if tied:
        with pytest.raises(ValueError, match="tied LM head"):
            pm(ids, adapter_names=rows)
    else:
        perturb(pm, "b", 9)
        mixed = logits(pm, ids, adapter_names=rows)
        for i, n in enumerate(rows):
            ref = GPT(cfg) if n is None else dense_model(pm, [n], cfg=cfg)
            assert np.allclose(mixed[i], logits(ref, ids[i:i + 1])[0], atol=1e-5)


def test_gradcheck_through_lora_embedding(backend, float64):
    layer = LoRAEmbedding(Embedding(7, 5, rng=bk.host_rng(0)))
    layer.base.requires_grad_(False)
    layer.add_adapter("a", LoraConfig(r=2), bk.host_rng(1))
    layer.active = "a"
    f = layer.factors("a")
    f.B.data = bk.asarray(np.random.default_rng(2).normal(size=f.B.shape))
    ids = bk.asarray(np.array([[0, 3, 3], [6, 1, 0]]))
    gradcheck(lambda A, B: layer(ids), [f.A, f.B])
    gradcheck(lambda A, B: (layer.weight * 1.0), [f.A, f.B])       # the tied head's table
