"""The bench's numbers, checked against formulas (never its timings: those live in the bench)."""

from __future__ import annotations

import io

import pytest

from minipeft.bench import CONFIGS, run


@pytest.fixture(scope="module")
def report():
    return run(configs=("XS",), steps=2, gen_tokens=4, gen_repeats=1, out=io.StringIO())


def test_full_ft_flops_are_six_n_tokens_plus_attention(report):
    """Counted by the ops = the textbook formula: 6 x matmul parameters x tokens (forward 2,
    backward 4) plus attention's 12 B H T^2 D per layer (q k^T and P v forward, four products
    backward)."""
    cfg = CONFIGS["XS"]
    full = next(r for r in report["steps"] if r["method"] == "full")
    C, L, V, B, T = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.batch_size, cfg.block_size
    matmul_params = L * 12 * C * C + V * C             # q, k, v, o (4 C^2), MLP (8 C^2), head
    attention = 12 * B * cfg.n_head * T * T * (C // cfg.n_head) * L
    assert full["tokens_per_step"] == B * T
    assert full["gflop_per_step"] * 1e9 == pytest.approx(6 * matmul_params * B * T + attention)


def test_peft_steps_execute_fewer_flops_and_hold_less_memory(report):
    rows = {r["method"]: r for r in report["steps"]}
    full = rows["full"]
    for method in ("lora_r8_qv", "houlsby", "bitfit"):
        assert rows[method]["gflop_per_step"] < full["gflop_per_step"], method
    # Memory: not Houlsby. Its adapters add activations (two bottleneck MLPs per block) and
    # it trains the layer norms, about what full FT's gradients and AdamW state cost at these
    # sizes: measured 2.43 MB against 2.40 MB here (XS), 511 MB against 502 MB on M.
    for method in ("lora_r8_qv", "bitfit"):
        assert rows[method]["peak_train_mb"] < full["peak_train_mb"], method
    assert {r["method"] for r in report["steps"]} == {"full", "lora_r8_qv", "prompt16",
                                                      "houlsby", "bitfit"}
    for r in report["steps"]:
        assert r["step_ms"] > 0 and 0 < r["fraction_of_peak"]
        assert r["step_vs_full"] == pytest.approx(r["step_ms"] / full["step_ms"])


def test_generation_rows_compare_merged_and_unmerged_lora_with_the_base(report):
    (gen,) = report["generation"]
    assert gen["merged_over_base"] == pytest.approx(gen["lora_merged_ms"] / gen["base_ms"])
    assert gen["new_tokens"] == 4


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown methods"):
        run(configs=("XS",), methods=("full", "nope"), out=io.StringIO())


def test_profile_times_every_kind_of_op_the_step_runs():
    """The profile's ops are the ones a GPT step makes, their times add up to (about) the step,
    and the engine is left unpatched afterwards."""
    from minipeft.autograd.tensor import Tensor
    from minipeft.bench import profile_step

    make = Tensor._make
    prof = profile_step(CONFIGS["XS"], "full", None, steps=3)
    assert Tensor._make is make
    assert {"linear", "attention", "gelu", "layer_norm", "cross_entropy", "embedding", "add",
            "optimizer"} <= set(prof)
    assert all(f >= 0 and b >= 0 for f, b in prof.values())
    assert all(prof[op][1] > 0 for op in ("linear", "attention", "gelu", "layer_norm"))
    parts = sum(f + b for op, (f, b) in prof.items() if op != "step")
    assert 0.5 * prof["step"][0] < parts < 1.5 * prof["step"][0]    # medians of parts
