"""NF4 quantisation (QLoRA's base): the code book against the published levels, every weight at
its nearest level, packing that round-trips, the paper's 4.127 bits per parameter, and a
quantised linear whose input gradient is the float linear's on the dequantised weight."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft import backend as bk
from minipeft.autograd import Tensor, gradcheck
from minipeft.autograd import functional as F
from minipeft.nn.gpt import GPT, GPTConfig
from minipeft.quant import (
    NF4Weight,
    QuantError,
    QuantLinear,
    dequantize_blockwise,
    int4_levels,
    nf4_levels,
    pack,
    quant_linear,
    quantize_blockwise,
    quantize_model,
    unpack,
)

# The NF4 levels as published with QLoRA (bitsandbytes' table, the paper's appendix E):
# written out here, not computed, so the construction from quantiles is checked against them.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def test_nf4_levels_are_the_published_ones():
    np.testing.assert_allclose(nf4_levels(), PUBLISHED_NF4, atol=1e-6)


def _gaussian(shape, seed=0, std=0.02):
    return bk.asarray(np.random.default_rng(seed).normal(0, std, shape).astype(np.float32))


@given(st.integers(1, 4), st.sampled_from([64, 128]), st.integers(0, 10**6))
def test_every_weight_gets_its_nearest_level(rows, cols, seed):
    W = _gaussian((rows, cols), seed)
    levels = nf4_levels()
    codes, c = quantize_blockwise(W, levels, 64)
    # brute force, a second code path: distance to all 16 levels, take the smallest
    u = bk.to_numpy(W).reshape(rows, cols // 64, 64) / bk.to_numpy(c)[..., None]
    d = np.abs(u[..., None] - np.asarray(levels, np.float32))
    best = d.min(-1)
    got = np.take_along_axis(d, bk.to_numpy(codes).reshape(rows, cols // 64, 64, 1), -1)[..., 0]
    np.testing.assert_allclose(got, best, atol=1e-6)      # ties may pick either neighbour
    # each block's largest |w| is represented exactly (it maps to +-1)
    back = bk.to_numpy(dequantize_blockwise(codes, c, levels, 64))
    np.testing.assert_allclose(np.abs(back).reshape(rows, -1, 64).max(-1), bk.to_numpy(c),
                               rtol=1e-6)


@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_pack_then_unpack_is_the_identity(values):
    codes = bk.asarray(np.asarray(values, np.uint8).reshape(1, -1))
    packed = pack(codes)
    assert packed.shape == (1, len(values) // 2) and packed.dtype == np.uint8
    np.testing.assert_array_equal(bk.to_numpy(unpack(packed)), bk.to_numpy(codes))


def test_bits_per_parameter_is_the_papers_4_127():
    qw = NF4Weight(_gaussian((256, 1024)))
    # 4 bits of code + 8/64 for the 8-bit constants + 32/(64*256) for their scales, + a mean
    expected = 4 + 8 / 64 + 32 / (64 * 256) + 32 / (256 * 1024)
    assert qw.bits_per_parameter() == pytest.approx(expected, rel=1e-9)
    assert NF4Weight(_gaussian((256, 1024)), double=False).bits_per_parameter() == 4.5


def test_double_quantisation_barely_changes_the_weights():
    W = _gaussian((128, 256), seed=3)
    one = bk.to_numpy(NF4Weight(W, double=False).dequantize())
    two = bk.to_numpy(NF4Weight(W, double=True).dequantize())
    err = np.abs(bk.to_numpy(W) - one).mean()
    assert np.abs(one - two).mean() < 0.05 * err


def test_nf4_beats_uniform_int4_on_normal_weights():
    W = _gaussian((256, 512), seed=1)
    Wn = bk.to_numpy(W)
    errs = {}
    for name, levels in {"nf4": nf4_levels(), "int4": int4_levels()}.items():
        codes, c = quantize_blockwise(W, levels, 64)
        errs[name] = np.mean((bk.to_numpy(dequantize_blockwise(codes, c, levels, 64)) - Wn) ** 2)
    assert errs["nf4"] < 0.9 * errs["int4"], errs


def test_quant_linear_matches_linear_on_the_dequantised_weight(float64):
    W = _gaussian((8, 64), seed=2)
    qw = NF4Weight(W)
    x = Tensor(np.random.default_rng(0).normal(size=(3, 64)), requires_grad=True)

    Wd = Tensor(qw.dequantize().astype(np.float64))
    y1, y2 = quant_linear(x, qw), F.linear(x, Wd)
    np.testing.assert_allclose(bk.to_numpy(y1.data), bk.to_numpy(y2.data), rtol=1e-6)
    gradcheck(lambda x: quant_linear(x, qw), [x])


def test_bad_weights_are_refused_before_anything_changes():
    W = _gaussian((4, 64))
    W[1, 3] = np.nan
    with pytest.raises(QuantError, match="NaN or inf"):
        NF4Weight(W)
    with pytest.raises(QuantError, match="does not divide"):
        NF4Weight(_gaussian((4, 96)), block=64)
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=32))
    # width 32 does not hold a block of 64: refused, and not one layer was replaced
    with pytest.raises(QuantError, match="does not divide"):
        quantize_model(model)
    assert not any(isinstance(m, QuantLinear) for _, m in model.named_modules())


def test_a_quantised_model_computes_the_float_model_on_its_dequantised_weights():
    cfg = GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=64)
    model, twin = GPT(cfg), GPT(cfg)
    twin.load_state_dict(model.state_dict())
    ids = bk.asarray(np.random.default_rng(0).integers(0, 16, (2, 8)))
    paths = quantize_model(model)
    assert len(paths) == 2 * 6 and all(p.startswith("blocks.") for p in paths)
    for p in paths:                        # the second path: float Linears, dequantised weights
        twin.get_submodule(p).weight.data[...] = model.get_submodule(p).weight.data
    np.testing.assert_allclose(bk.to_numpy(model(ids).data), bk.to_numpy(twin(ids).data),
                               atol=1e-5)
    assert all(model.get_submodule(p).bias.requires_grad is False for p in paths)


def test_a_quantised_model_counts_the_weights_its_codes_stand_for():
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=64))
    before = model.num_parameters()
    quantize_model(model)
    assert model.num_parameters() == before          # same weights, stored in 4 bits
