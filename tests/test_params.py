"""Proofs for minipeft.params: the calculator agrees with published counts and with our models.

Published totals: GPT-2 124M has 124,439,808 parameters (HF ``gpt2``, tied head); LLaMA-2-7B has
6,738,415,616 (Meta's checkpoint, untied head, SwiGLU MLP, RMSNorm, no biases).
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft.nn import GPT, GPTConfig
from minipeft.params import PRESETS, count_parameters, lora_parameter_count, spec_from_config


def test_gpt2_124m_matches_the_published_count():
    c = count_parameters(PRESETS["gpt2-124m"])
    assert c["total"] == 124_439_808
    # written out: wte + wpe + 12 blocks + ln_f
    block = (2 * 768) + (4 * 768 * 768 + 4 * 768) + (2 * 768) + (2 * 768 * 3072 + 3072 + 768)
    assert c["total"] == 50257 * 768 + 1024 * 768 + 12 * block + 2 * 768
    assert c["head"] == 0                                           # tied to the embedding


def test_llama2_7b_matches_the_published_count():
    c = count_parameters(PRESETS["llama2-7b"])
    assert c["total"] == 6_738_415_616
    assert c["embeddings"] == c["head"] == 32000 * 4096             # untied
    assert c["norms"] == (2 * 32 + 1) * 4096                        # RMSNorm: one gain vector


@pytest.mark.parametrize("preset", ["gpt2-124m", "llama2-7b", "gpt3-175b"])
def test_mlp_holds_about_twice_the_attention_weights(preset):
    """SEED-NOTES row 9: 'most parameters are in attention' does not hold."""
    c = count_parameters(PRESETS[preset])
    assert 1.95 < c["mlp"] / c["attention"] < 2.05
    assert c["attention"] < c["total"] / 3 + 1                      # never most of the model
    assert sum(v for k, v in c.items() if k != "total") == c["total"]


def test_gpt3_175b_is_about_175_billion():
    assert 174e9 < count_parameters(PRESETS["gpt3-175b"])["total"] < 176e9


def component_of(name: str) -> str:
    """Our GPT's parameter names, grouped by hand (independent of the calculator)."""
    if name.startswith(("tok_emb.", "pos_emb.")):
        return "embeddings"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if ".ln_" in name or name.startswith("ln_f."):
        return "norms"
    assert name.startswith("lm_head."), name
    return "head"


def check_config(cfg: GPTConfig):
    model = GPT(cfg)
    by_component = dict.fromkeys(("embeddings", "attention", "mlp", "norms", "head"), 0)
    for name, p in model.named_parameters():
        by_component[component_of(name)] += p.size
    counts = count_parameters(spec_from_config(cfg))
    assert counts["total"] == model.num_parameters()
    assert {k: counts[k] for k in by_component} == by_component


@pytest.mark.parametrize("bias,tie", [(True, True), (True, False), (False, True),
                                      (False, False)])
def test_calculator_equals_our_model(bias, tie):
    check_config(GPTConfig(vocab_size=38, block_size=49, n_layer=2, n_head=4, n_embd=128,
                           bias=bias, tie_weights=tie))


@given(vocab=st.integers(1, 50), block=st.integers(1, 20), layers=st.integers(1, 3),
       heads=st.integers(1, 4), head_dim=st.integers(1, 6), bias=st.booleans(),
       tie=st.booleans())
def test_calculator_equals_our_model_on_random_configs(vocab, block, layers, heads, head_dim,
                                                       bias, tie):
    check_config(GPTConfig(vocab_size=vocab, block_size=block, n_layer=layers, n_head=heads,
                           n_embd=heads * head_dim, bias=bias, tie_weights=tie))


def test_lora_count_is_r_times_in_plus_out():
    spec = PRESETS["gpt2-124m"]
    assert lora_parameter_count(spec, 8) == 12 * 2 * 8 * (768 + 768)  # q and v, all layers
    assert lora_parameter_count(spec, 4, ("fc_in",), layers=[0, 1]) == 2 * 4 * (768 + 3072)
    with pytest.raises(ValueError, match="unknown targets"):
        lora_parameter_count(spec, 4, ("c_attn",))
    with pytest.raises(ValueError, match="r must be positive"):
        lora_parameter_count(spec, 0)


def test_weight_memory_of_llama2_7b_at_32_16_and_4_bits():
    from minipeft.params import weight_bytes

    spec = PRESETS["llama2-7b"]
    assert weight_bytes(spec, "fp32") == 4 * 6_738_415_616
    assert weight_bytes(spec, "bf16") == 2 * 6_738_415_616
    # by hand: 32 blocks of q, k, v, o (4096 x 4096) and gate, up, down (4096 x 11008) in NF4
    # (4 bits + 8 bits per 64 + 32 bits per 64*256); embeddings, head and norms stay at 16 bits
    matrices = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    rest = 2 * 32000 * 4096 + (2 * 32 + 1) * 4096
    assert matrices + rest == 6_738_415_616
    nf4 = matrices * (4 + 8 / 64 + 32 / 16384) / 8 + 2 * rest
    assert weight_bytes(spec, "nf4") == pytest.approx(nf4, abs=1)
    assert 3.8e9 < weight_bytes(spec, "nf4") < 3.9e9          # ~3.9 GB against 27 GB in fp32
    with pytest.raises(ValueError, match="precision"):
        weight_bytes(spec, "int3")
