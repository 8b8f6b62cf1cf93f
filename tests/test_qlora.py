"""Proofs for minipeft.peft.qlora: LoRA on a frozen 4-bit base.

The independent path is NumPy on the host: the layer computes x (dequant(W) + s B A)ᵀ + b with
W read back from its 4-bit codes; gradients are checked against central differences (float64
inputs and factors; the 4-bit weight dequantises to fixed float32 numbers, a constant).
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft import backend as bk
from minipeft.autograd import Tensor, counters, gradcheck, no_grad
from minipeft.nn import GPT, GPTConfig
from minipeft.optim import AdamW
from minipeft.peft import LoraConfig, QLoraConfig, QLoRALinear, get_peft_model, load_peft_model
from minipeft.peft.lora import BaseKindError
from minipeft.peft.qlora import qlora_linear
from minipeft.quant import NF4Weight, QuantLinear, quantize_model

CFG = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=64)
host = bk.to_numpy


def ids_batch(seed=0, B=3, T=8):
    return bk.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T)))


def logits(model, ids):
    with no_grad():
        return host(model(ids).data).astype(np.float64)


def quantised(seed=0):
    model = GPT(CFG, seed=seed)
    quantize_model(model)
    return model


def bits(model):
    """Every stored number of the model (float parameters and 4-bit codes), as bytes."""
    out = {n: host(p.data).tobytes() for n, p in model.named_parameters()}
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[n + ".packed"] = host(m.qweight.packed).tobytes()
    return out


def perturb(pm, seed, std=0.2):
    rng = np.random.default_rng(seed)
    for _, m in pm.base_model.named_modules():
        if isinstance(m, QLoRALinear):
            for t in m.adapter_tensors(m.active).values():
                t.data = bk.asarray(rng.normal(0, std, t.shape), dtype=t.dtype)


def _weights(rng, out_f, in_f, r):
    W = bk.asarray(rng.normal(0, 0.05, (out_f, in_f)).astype(np.float32))
    A = Tensor(rng.normal(0, 0.3, (r, in_f)), requires_grad=True)
    B = Tensor(rng.normal(0, 0.3, (out_f, r)), requires_grad=True)
    b = Tensor(rng.normal(0, 0.1, (out_f,)), requires_grad=True)
    return NF4Weight(W), A, B, b


@given(st.sampled_from([64, 128]), st.integers(1, 9), st.integers(1, 4), st.integers(0, 10**6))
def test_fused_op_is_the_dense_formula_on_the_dequantised_weight_and_its_gradient(
        float64, in_f, out_f, r, seed):
    # the faults caught: a wrong term or scale in forward, a wrong backward formula, a gradient
    # that goes to the frozen codes
    rng = np.random.default_rng(seed)
    qw, A, B, b = _weights(rng, out_f, in_f, r)
    x = Tensor(rng.normal(0, 1, (2, 3, in_f)), requires_grad=True)
    y = qlora_linear(x, qw, b, A, B, 0.7)
    W = host(qw.dequantize()).astype(np.float64)                   # read back from the codes
    want = host(x.data) @ (W + 0.7 * host(B.data) @ host(A.data)).T + host(b.data)
    np.testing.assert_allclose(host(y.data), want, rtol=1e-10, atol=1e-12)
    gradcheck(lambda x, A, B, b: qlora_linear(x, qw, b, A, B, 0.7), [x, A, B, b])


def test_backward_keeps_no_float_copy_of_the_weight(float64):
    # the fault caught: the dequantised (out, in) weight saved for backward (QLoRA's memory
    # saving is that the float weight never outlives one matmul)
    qw, A, B, b = _weights(np.random.default_rng(1), 8, 64, 2)
    x = Tensor(np.ones((4, 64)), requires_grad=True)
    y = qlora_linear(x, qw, b, A, B, 1.0)
    saved = [c.cell_contents for c in y._backward.__closure__]
    big = [v.shape for v in saved if bk.is_array(v) and v.size >= 8 * 64]
    assert big == [], big
    before = counters["weight_grad_matmul"]
    y.backward(bk.xp.ones(y.shape))
    assert counters["weight_grad_matmul"] - before == 2      # dA and dB only, never dW


def test_step_zero_is_the_quantised_base_and_training_moves_only_the_factors():
    # the faults caught: B not zero at init; the adapter not applied; codes or biases trained
    ids = ids_batch()
    model = quantised()
    want = logits(model, ids)
    pm = get_peft_model(model, QLoraConfig(r=4, target_modules=("q_proj", "v_proj", "fc_in")))
    np.testing.assert_array_equal(logits(pm, ids), want)
    frozen = {k: v for k, v in bits(pm.base_model).items() if ".adapters." not in k}
    opt = AdamW(pm.trainable_parameters(), lr=1e-2)
    targets = bk.asarray(np.roll(host(ids), 1, axis=1))
    losses = []
    for _ in range(5):
        loss = pm.loss(ids, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = {k: v for k, v in bits(pm.base_model).items() if ".adapters." not in k}
    assert after == frozen
    assert not np.array_equal(logits(pm, ids), want)
    with pm.disable_adapter():
        np.testing.assert_array_equal(logits(pm, ids), want)


def test_model_equals_float_model_on_dequantised_weights_plus_updates():
    # the fault caught: a layer computing anything but dequant(W) + s B A (second code path:
    # a plain float GPT whose weights are set on the host)
    ids = ids_batch(1)
    pm = get_peft_model(quantised(), QLoraConfig(r=3, alpha=6, target_modules=("v_proj",
                                                                               "fc_out")))
    perturb(pm, 2)
    ref = GPT(CFG, seed=0)
    for path, m in pm.base_model.named_modules():
        if isinstance(m, QuantLinear):
            W = host(m.qweight.dequantize()).astype(np.float64)
            outer = path[:-len(".base")] if path.endswith(".base") else path
            layer = pm.base_model.get_submodule(outer)
            if isinstance(layer, QLoRALinear):
                f = layer.factors("default")
                W = W + f.scale * host(f.B.data).astype(np.float64) @ host(f.A.data)
            ref.get_submodule(outer).weight.data = bk.asarray(W, dtype=np.float32)
    np.testing.assert_allclose(logits(pm, ids), logits(ref, ids), rtol=1e-4, atol=1e-4)


def test_merge_is_refused_and_requantising_would_not_be_reversible():
    # the fault caught: a merge that writes the 4-bit base (it could not be undone)
    ids = ids_batch()
    pm = get_peft_model(quantised(), QLoraConfig(r=2))
    perturb(pm, 3)
    before, out = bits(pm.base_model), logits(pm, ids)
    with pytest.raises(ValueError, match="cannot fold"):
        pm.merge()
    assert bits(pm.base_model) == before
    np.testing.assert_array_equal(logits(pm, ids), out)
    # why: quant(dequant(W) + ΔW) - ΔW is not dequant(W) (NumPy, float64)
    layer = pm.base_model.blocks[0].attn.q_proj
    W = host(layer.base.qweight.dequantize()).astype(np.float64)
    delta = host(layer.delta_weight("default")).astype(np.float64)
    back = host(NF4Weight(bk.asarray((W + delta).astype(np.float32))).dequantize()) - delta
    assert np.abs(back - W).max() > 1e-3 * np.abs(W).max()


def test_save_load_round_trip_and_the_wrong_base_is_named_and_changes_nothing(tmp_path):
    # the faults caught: a QLoRA adapter silently loaded onto float weights (or LoRA onto 4-bit)
    ids = ids_batch(2)
    pm = get_peft_model(quantised(), QLoraConfig(r=2, target_modules=("q_proj", "fc_in")))
    perturb(pm, 4)
    pm.save_adapter(tmp_path / "q")
    np.testing.assert_array_equal(logits(load_peft_model(quantised(), tmp_path / "q"), ids),
                                  logits(pm, ids))

    float_base = GPT(CFG)
    before = bits(float_base)
    with pytest.raises(BaseKindError, match="quantize_model"):
        load_peft_model(float_base, tmp_path / "q")
    assert bits(float_base) == before
    assert all(p.requires_grad for p in float_base.parameters())    # flags put back too
    assert all(type(m).__name__ != "QLoRALinear" for _, m in float_base.named_modules())

    lora = get_peft_model(GPT(CFG), LoraConfig(r=2))
    lora.save_adapter(tmp_path / "f")
    four_bit = quantised()
    before = bits(four_bit)
    with pytest.raises(BaseKindError, match="QLoraConfig"):
        load_peft_model(four_bit, tmp_path / "f")
    assert bits(four_bit) == before
    assert not any(type(m).__name__.endswith("LoRALinear") for _, m in four_bit.named_modules())


@pytest.mark.parametrize("kw, field", [({"init": "pissa"}, "init"),
                                       ({"target_embedding": True}, "target_embedding"),
                                       ({"r": 0}, "r")])
def test_bad_configs_are_named(kw, field):
    with pytest.raises(ValueError, match=field):
        QLoraConfig(**kw)
