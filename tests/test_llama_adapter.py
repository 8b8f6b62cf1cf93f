"""Proofs for minipeft.peft.llama_adapter: step 0 is the base exactly (difference 0), the layer
against attention written out in NumPy (float64, per head, tanh gate), gradients by finite
differences, the KV cache, save/load, refusals by name."""

import numpy as np
import pytest

from minipeft import backend as bk
from minipeft.autograd import Tensor, gradcheck, no_grad
from minipeft.nn import GPT, GPTConfig
from minipeft.peft import AdaptedAttention, LlamaAdapterConfig, get_peft_model, load_peft_model

CFG = GPTConfig(vocab_size=32, block_size=16, n_layer=3, n_head=2, n_embd=8)
host = bk.to_numpy


def ids_batch(seed=0, B=2, T=6):
    return bk.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T)))


def logits(model, ids):
    with no_grad():
        return host(model(ids).data).astype(np.float64)


def opened(pm, seed=1):
    """Gates and prompts as training would leave them (gates open, prompts moved)."""
    rng = np.random.default_rng(seed)
    for _, m in pm.base_model.named_modules():
        if isinstance(m, AdaptedAttention):
            a = m.adapters.default
            a.gate.data = bk.asarray(rng.normal(0, 1, a.gate.shape), dtype=a.gate.dtype)
            a.prompt.data = bk.asarray(rng.normal(0, 1, a.prompt.shape), dtype=a.prompt.dtype)
    return pm


def test_step_zero_is_the_base_exactly_and_only_the_gates_get_a_first_gradient():
    # the faults caught: a gate that does not start closed (or no tanh(0) = 0), prompts added
    # to the softmax of the real keys (which would dilute it even at gate 0), the wrong blocks
    ids = ids_batch()
    base = GPT(CFG)
    want = logits(base, ids)
    pm = get_peft_model(base, LlamaAdapterConfig(adapter_len=4, adapter_layers=2))
    assert [p for p, m in pm.base_model.named_modules() if isinstance(m, AdaptedAttention)] \
        == ["blocks.1.attn", "blocks.2.attn"]                       # the top L = 2
    assert np.array_equal(logits(pm, ids), want)                    # difference exactly 0
    pm.loss(ids, bk.asarray(np.roll(host(ids), 1, axis=1))).backward()
    for i in (1, 2):
        a = pm.base_model.blocks[i].attn.adapters.default
        assert np.abs(host(a.gate.grad)).min() > 0                  # every head's gate moves
        assert a.prompt.grad is None or not np.any(host(a.prompt.grad))
    assert pm.num_parameters(trainable_only=True) == 2 * (4 * 8 + 2)   # L (n C + H)


def reference(layer, x, name="default"):
    """The layer in NumPy: frozen causal attention plus tanh(g_h)-gated prompt attention."""
    att, a = layer.base, getattr(layer.adapters, name)
    W = {k: (host(getattr(att, k).weight.data), host(getattr(att, k).bias.data))
         for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
    lin = lambda t, k: t @ W[k][0].T + W[k][1]                      # noqa: E731
    B, T, C = x.shape
    H, D = att.n_head, C // att.n_head
    P, g = host(a.prompt.data), host(a.gate.data)
    split = lambda t: t.reshape(t.shape[0], -1, H, D).transpose(0, 2, 1, 3)   # noqa: E731

    def softmax_attend(q, k, v, causal):
        s = q @ k.swapaxes(-1, -2) / np.sqrt(D)
        if causal:
            s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        return (p / p.sum(-1, keepdims=True)) @ v

    q = split(lin(x, "q_proj"))
    y = softmax_attend(q, split(lin(x, "k_proj")), split(lin(x, "v_proj")), True)
    yp = softmax_attend(q, split(lin(P[None], "k_proj")), split(lin(P[None], "v_proj")), False)
    y = y + np.tanh(g)[None, :, None, None] * yp
    return lin(y.transpose(0, 2, 1, 3).reshape(B, T, C), "o_proj")


def test_layer_against_numpy_and_its_gradient(float64):
    # the faults caught: one gate for all heads or no tanh, prompts through the wrong
    # projections, a causal mask on the prompts, a wrong backward
    pm = opened(get_peft_model(GPT(CFG), LlamaAdapterConfig(adapter_len=3, adapter_layers=1)))
    layer = pm.base_model.blocks[2].attn
    a = layer.adapters.default
    x = Tensor(np.random.default_rng(2).normal(0, 1, (2, 5, 8)), requires_grad=True)
    out, _ = layer(x)
    np.testing.assert_allclose(host(out.data), reference(layer, host(x.data)), rtol=1e-10,
                               atol=1e-12)
    gradcheck(lambda x, *_: layer(x)[0], [x, a.prompt, a.gate])


def test_the_kv_cache_gives_the_full_forward_logits():
    # the fault caught: prompts written into the cache (they would be attended twice, with the
    # causal softmax of the real keys)
    pm = opened(get_peft_model(GPT(CFG), LlamaAdapterConfig(adapter_len=3, adapter_layers=2)))
    ids = ids_batch(3)
    full = logits(pm, ids)
    with no_grad():
        first, past = pm(ids[:, :4], use_cache=True)
        step, _ = pm(ids[:, 4:5], past=past, start_pos=4, use_cache=True)
    np.testing.assert_allclose(host(first.data), full[:, :4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(host(step.data)[:, 0], full[:, 4], rtol=1e-5, atol=1e-6)


def test_save_load_and_merge_refused(tmp_path):
    # the faults caught: gates or prompts not saved; a merge claimed for a softmax term
    ids = ids_batch(4)
    pm = opened(get_peft_model(GPT(CFG), LlamaAdapterConfig(adapter_len=3, adapter_layers=2)))
    pm.save_adapter(tmp_path / "l")
    np.testing.assert_array_equal(logits(load_peft_model(GPT(CFG), tmp_path / "l"), ids),
                                  logits(pm, ids))
    with pytest.raises(ValueError, match="cannot fold"):
        pm.merge()
    with pm.disable_adapter():
        np.testing.assert_array_equal(logits(pm, ids), logits(GPT(CFG), ids))


def test_too_many_layers_and_bad_fields_are_named_and_change_nothing():
    # the fault caught: L beyond the depth accepted (or half applied)
    model = GPT(CFG)
    with pytest.raises(ValueError, match=r"adapter_layers=4 exceeds the model's n_layer=3"):
        get_peft_model(model, LlamaAdapterConfig(adapter_layers=4))
    assert not any(isinstance(m, AdaptedAttention) for _, m in model.named_modules())
    assert all(p.requires_grad for p in model.parameters())
    for kw, field in (({"adapter_len": 0}, "adapter_len"), ({"adapter_layers": 0},
                                                            "adapter_layers"),
                      ({"adapter_len": 2.0}, "adapter_len")):
        with pytest.raises((TypeError, ValueError), match=field):
            LlamaAdapterConfig(**kw)
