"""Memory of a training step: the counts, the graph walk, the GPT formula and the allocator agree.

Independent oracles: parameter bytes are summed from ``state_dict()`` arrays; the graph walk is
checked against ``gpt_activation_bytes``, a formula written from the ops' code, term by term; the
predictions are checked against what tracemalloc (NumPy) or the CuPy pool measured.
"""

from __future__ import annotations

import numpy as np
import pytest

from minipeft import backend as bk
from minipeft.autograd import Tensor
from minipeft.memory import (
    format_memory_table,
    gpt_activation_breakdown,
    gpt_activation_bytes,
    graph_activations,
    measure_forward,
    measure_step,
    memory_table,
    parameter_bytes,
    training_memory_formula,
)
from minipeft.nn import GPT, GPTConfig
from minipeft.optim import AdamW
from minipeft.peft import SelectiveConfig, bitfit, full_finetuning, get_peft_model

MB = 2 ** 20
# S-like but small enough for 2 CPU cores: activations of about 8 MiB, weights about 0.5 MiB
SMALL = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64)
BATCH = 8


def batch(cfg: GPTConfig, B: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, (B, cfg.block_size))
    y = rng.integers(0, cfg.vocab_size, (B, cfg.block_size))
    return bk.asarray(x), bk.asarray(y)


def peft(cfg: GPTConfig, config) -> object:
    return get_peft_model(GPT(cfg, seed=0), config)


# --------------------------------------------------------------------------- parameter counts
def test_parameter_bytes_full_vs_bitfit():
    full, bf = peft(SMALL, full_finetuning()), peft(SMALL, bitfit())
    weights = sum(a.nbytes for a in full.base_model.state_dict().values())
    biases = sum(a.nbytes for k, a in bf.base_model.state_dict().items() if k.endswith(".bias"))
    f, b = parameter_bytes(full), parameter_bytes(bf)
    assert f["weights"] == b["weights"] == weights            # the weights are all still there
    assert f["gradients"] == weights and f["optimizer"] == 2 * weights
    assert b["gradients"] == biases and b["optimizer"] == 2 * biases
    assert biases < 0.02 * weights


def test_full_vs_bitfit_step(backend):
    """Gradient and optimizer bytes collapse to the biases'; activations barely move."""
    x, y = batch(SMALL, BATCH)
    full = measure_step(peft(SMALL, full_finetuning()), x, y)
    bf = measure_step(peft(SMALL, bitfit()), x, y)
    assert full.predicted["weights"] == bf.predicted["weights"]
    assert bf.predicted["gradients"] < 0.02 * full.predicted["gradients"]
    assert bf.predicted["optimizer"] == 2 * bf.predicted["gradients"]
    # Activations: BitFit's frozen embedding tables build no graph, so it skips exactly the two
    # lookups and the position ids (N C + T C values and T int64s): under 2% here.
    N, T, C = BATCH * SMALL.block_size, SMALL.block_size, SMALL.n_embd
    diff = full.predicted["activations"] - bf.predicted["activations"]
    assert diff == 4 * (N * C + T * C) + 8 * T
    assert diff < 0.02 * full.predicted["activations"]
    assert bf.measured["activations"] == pytest.approx(full.measured["activations"], rel=0.02)
    # measured gradients follow the prediction (the allocator also sees the loss and a few
    # Python objects, hence the small absolute slack)
    for m in (full, bf):
        assert abs(m.measured["gradients"] - m.predicted["gradients"]) \
            < 0.02 * m.predicted["gradients"] + 64 * 1024


def test_masked_tensor_still_gets_full_gradient():
    x, y = batch(SMALL, 2)
    mem = measure_step(peft(SMALL, SelectiveConfig(mask="random", mask_fraction=0.1)), x, y)
    full = parameter_bytes(peft(SMALL, full_finetuning()))
    assert mem.predicted["gradients"] == full["gradients"]   # not 10% of it
    assert mem.measured["gradients"] > 0.9 * full["gradients"]
    assert any("full-size gradient" in n for n in mem.notes)


# --------------------------------------------------------------------------- graph walk = formula
@pytest.mark.parametrize("cfg, B, method, dropout", [
    (GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32), 4, "full", 0.0),
    (GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32), 4, "bitfit", 0.0),
    (GPTConfig(vocab_size=50, block_size=12, n_layer=3, n_head=2, n_embd=24), 3, "full", 0.0),
    (GPTConfig(vocab_size=50, block_size=12, n_layer=1, n_head=1, n_embd=16), 2, "full", 0.1),
    (GPTConfig(vocab_size=50, block_size=12, n_layer=1, n_head=1, n_embd=16), 2, "bitfit", 0.1),
])
def test_graph_walk_equals_formula(cfg, B, method, dropout):
    """Exact: the formula lists every array our ops keep, the walk finds every array kept."""
    from dataclasses import replace

    from minipeft.memory import _forward_with_groups

    cfg = replace(cfg, dropout=dropout)
    model = peft(cfg, full_finetuning() if method == "full" else bitfit())
    model.train()
    x, y = batch(cfg, B)
    loss, groups = _forward_with_groups(model, x, y)
    walk = graph_activations(loss, exclude=model.parameters() + [x, y], groups=groups)
    f = gpt_activation_breakdown(B, cfg.block_size, cfg.n_embd, cfg.n_layer, cfg.n_head,
                                 cfg.vocab_size, 4, trainable_embeddings=method == "full",
                                 dropout=dropout > 0)
    assert walk["total"] == f["total"]
    assert walk["per_group"]["embeddings"] == f["embeddings"]
    assert walk["per_group"]["head"] == f["head"]
    for i in range(cfg.n_layer):
        assert walk["per_group"][f"blocks.{i}"] == f["per_layer"]
    assert gpt_activation_bytes(B, cfg.block_size, cfg.n_embd, cfg.n_layer, cfg.n_head,
                                cfg.vocab_size, 4, trainable_embeddings=method == "full",
                                dropout=dropout > 0) == f["total"]


def test_walk_counts_views_once_and_skips_parameters():
    from minipeft.nn import Parameter

    w = Parameter(bk.xp.ones((4, 8), dtype=np.float32))
    a = Tensor(bk.xp.ones((4, 8), dtype=np.float32), requires_grad=True)
    h = (a * w)                                       # saves a and w (w is a weight)
    v = h.reshape(8, 4).transpose(1, 0)               # views of h: no new buffer
    out = (v * v).sum()                               # mul saves v twice (one buffer: h)
    walk = graph_activations(out, exclude=[a])
    assert walk["total"] == h.data.nbytes + (v * v).data.nbytes


# --------------------------------------------------------------------------- predicted vs measured
def test_predicted_matches_measured(backend):
    """Numbers are printed (shown with ``-s`` or on failure)."""
    x, y = batch(SMALL, BATCH)
    for config in (full_finetuning(), bitfit()):
        mem = measure_step(peft(SMALL, config), x, y)
        p, m = mem.predicted, mem.measured
        print(f"\n[{backend}, {config.label}] " + mem.table())
        static_p = p["weights"] + p["gradients"] + p["optimizer"]
        static_m = m["weights"] + m["gradients"] + m["optimizer"]
        assert static_m == pytest.approx(static_p, rel=0.10)
        assert m["activations"] == pytest.approx(p["activations"], rel=0.05)
        # W + O + the step's measured peak; the arrays a selective PEFT model keeps to undo
        # itself (m["other_resident"]) are resident too, but no part of the training step
        assert m["peak_train"] == pytest.approx(p["peak"], rel=0.25)
        assert m["peak_total"] == m["peak_train"] + m["other_resident"]
        assert sum(mem.per_layer.values()) == p["activations"]


def test_no_grad_forward_saves_nothing(backend):
    model = GPT(SMALL, seed=0)
    x, y = batch(SMALL, 4)
    off = measure_forward(model, x, grad=False)
    assert off["walked"] == 0
    assert abs(off["measured"] - off["output"]) < 16 * 1024   # only the logits (B, T, V)
    on = measure_forward(model, x, grad=True)
    assert on["walked"] > 10 * on["output"]
    assert on["measured"] - on["output"] == pytest.approx(on["walked"], rel=0.03)


def test_measure_step_restores_the_model():
    model = peft(SMALL, full_finetuning())
    before = {k: bk.to_numpy(v).copy() for k, v in model.state_dict().items()}
    opt = AdamW(model.trainable_parameters())
    x, y = batch(SMALL, 2)
    mem = measure_step(model, x, y, optimizer=opt)
    assert mem.measured["optimizer"] == opt.state_bytes() == mem.predicted["optimizer"]
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(bk.to_numpy(v), before[k])
    assert opt.t == 0 and all(float(abs(st["m"]).max()) == 0 for st in opt.state)
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- formulas and table
def test_training_memory_formula():
    # the classic rule: fp32 Adam costs 16 bytes per trained parameter before activations
    f = training_memory_formula(10**9, 10**9, 4, "adam")
    assert (f["weights"], f["gradients"], f["optimizer"], f["total"]) == (4e9, 4e9, 8e9, 16e9)
    lora = training_memory_formula(10**9, 10**6, 4, "adamw", activations_bytes=5)
    assert lora["total"] == 4e9 + 4e6 + 8e6 + 5
    assert training_memory_formula(100, 10, optimizer="sgd")["optimizer"] == 0
    # on our model it agrees with the parameter count
    model = peft(SMALL, bitfit())
    pb = parameter_bytes(model)
    g = training_memory_formula(model.num_parameters(), pb["gradients"] // 4)
    assert (g["weights"], g["gradients"], g["optimizer"]) == \
        (pb["weights"], pb["gradients"], pb["optimizer"])
    with pytest.raises(ValueError, match="optimizer"):
        training_memory_formula(10, 1, optimizer="lion")
    with pytest.raises(ValueError, match="n_trainable"):
        training_memory_formula(10, 11)


def test_memory_table_rows():
    tiny = dict(name="tiny", vocab_size=64, n_embd=32, n_layer=1, n_head=2, block_size=16,
                batch=2)
    rows = memory_table([tiny], ("full", "bitfit"))
    assert [(r["config"], r["method"]) for r in rows] == [("tiny", "full"), ("tiny", "bitfit")]
    full, bf = rows
    assert bf["gradients_predicted"] < full["gradients_predicted"]
    assert full["weights_predicted"] == bf["weights_predicted"]
    text = format_memory_table(rows)
    assert "tiny" in text and "bitfit" in text
    with pytest.raises(ValueError, match="unknown methods"):
        memory_table([tiny], ("nope",))
