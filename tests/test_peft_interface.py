"""The method interface, proved: core names no method, a new method needs no change in core,
and ``trainable_token_indices`` works with every method.

Trainable token rows are checked against independent computation: their gradient equals the
matching rows of the gradient of a plain model whose whole embedding trains (tied head: both
the lookup's and the output layer's share); every other row of the table, and every base
weight, stays bit-identical through training; with the adapter disabled, and after ``unload``,
the model is the base bit for bit; save/load and merge/unmerge reproduce the trained model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

import minipeft.peft as peft_pkg
from minipeft import backend as bk
from minipeft.autograd import no_grad
from minipeft.io import load_tensors
from minipeft.nn import GPT, GPTConfig
from minipeft.nn.layers import LayerNorm
from minipeft.nn.module import Module, Parameter
from minipeft.optim import SGD
from minipeft.peft import (
    AdapterConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftLayer,
    PrefixTuningConfig,
    PromptTuningConfig,
    SelectiveConfig,
    TrainableTokens,
    get_peft_model,
    load_peft_model,
)
from minipeft.peft.config import CONFIG_CLASSES
from minipeft.peft.files import ADAPTER_WEIGHTS
from minipeft.peft.targets import glob_match

CFG = GPTConfig(vocab_size=20, block_size=12, n_layer=2, n_head=2, n_embd=16)
ROWS = (3, 7, 11)
host = bk.to_numpy
METHODS = {
    "lora": LoraConfig(r=2, target_modules=("q_proj", "fc_in")),
    "lora_emb": LoraConfig(r=2, target_embedding=True),
    "ia3": IA3Config(),
    "houlsby": AdapterConfig(bottleneck=4),
    "prompt": PromptTuningConfig(num_virtual_tokens=2),
    "prefix": PrefixTuningConfig(num_virtual_tokens=2),
    "bitfit": SelectiveConfig(param_types=("bias",)),
}


def with_rows(cfg, rows=ROWS):
    return replace(cfg, trainable_token_indices=rows)


def ids_for(B=3, T=6, seed=0, V=CFG.vocab_size):
    ids = np.random.default_rng(seed).integers(0, V, (B, T))
    ids[0, :3] = ROWS                                              # the listed rows are read
    return bk.asarray(ids)


def logits(model, ids):
    with no_grad():
        return host(model(ids).data)


def bits(model):
    return {n: host(p.data).tobytes() for n, p in model.named_parameters()}


# ============================================================================ core is generic
def test_core_names_no_method_and_no_merged_probe():
    # the fault caught: a method-specific branch (or a getattr(..., "merged") probe) in core
    src = (Path(peft_pkg.__file__).parent / "core.py").read_text()
    words = set(CONFIG_CLASSES) | {"selective", "lora", "ia3", "prompt", "prefix", "merged",
                                   "adapter_type", "trainable_token"}
    found = sorted(w for w in words if w != "adapter" and re.search(w, src))
    assert found == []


@dataclass(frozen=True)
class ShiftConfig(PeftConfig):
    """A method defined here, outside the package: a learned shift added after ln_f."""

    method = "test_shift"
    mergeable = True

    def apply(self, model, name, seed):
        layer = model.ln_f
        if not isinstance(layer, ShiftLayer):
            layer = ShiftLayer(layer)
            model.ln_f = layer
        setattr(layer.adapters, name, Shift(layer.base.weight.shape[0]))
        return ["ln_f"]


class Shift(Module):
    def __init__(self, n):
        self.b = Parameter(bk.xp.zeros((n,), dtype=bk.xp.float32))


class ShiftLayer(PeftLayer):
    mergeable = True

    def __init__(self, base: LayerNorm):
        self.base = base
        super().__init__()

    def forward(self, x):
        y = self.base(x)
        if self.active is None or self.active == self.merged_adapter:
            return y
        return y + getattr(self.adapters, self.active).b

    def _merge_plan(self, name):
        return self.base.bias.data + getattr(self.adapters, name).b.data

    def _install(self, plan):
        self.base.bias.data = plan

    def _take_out(self, name):
        self.base.bias.data = self.base.bias.data - getattr(self.adapters, name).b.data


CONFIG_CLASSES.pop(ShiftConfig.method)     # registered only inside the test that uses it


def test_a_new_method_needs_nothing_from_core(tmp_path, monkeypatch):
    # the fault caught: core calls that only work for the built-in methods (save, load,
    # switch, merge, disable, delete, unload must all go through the layer interface)
    monkeypatch.setitem(CONFIG_CLASSES, ShiftConfig.method, ShiftConfig)
    base = GPT(CFG)
    want = logits(base, ids_for())
    pm = get_peft_model(base, ShiftConfig())
    pm.add_adapter("two", ShiftConfig())
    b = pm.base_model.ln_f.adapters.default.b
    b.data = bk.asarray(np.linspace(-1, 1, b.shape[0]), dtype=b.dtype)
    pm.set_adapter("default")
    assert pm.num_parameters(trainable_only=True) == CFG.n_embd
    shifted = logits(pm, ids_for())
    with pm.disable_adapter():
        np.testing.assert_array_equal(logits(pm, ids_for()), want)
    pm.save_adapter(tmp_path / "s")
    np.testing.assert_array_equal(logits(load_peft_model(GPT(CFG), tmp_path / "s"), ids_for()),
                                  shifted)
    pm.merge()
    np.testing.assert_allclose(logits(pm, ids_for()), shifted, atol=1e-5)
    pm.unmerge()
    pm.delete_adapter("two")
    plain = pm.unload()
    assert type(plain.ln_f) is LayerNorm
    np.testing.assert_array_equal(logits(plain, ids_for()), want)


def test_glob_match_against_fnmatch_and_is_linear_on_a_hostile_pattern():
    from fnmatch import fnmatchcase
    rng = np.random.default_rng(0)
    for _ in range(300):
        pat = "".join(rng.choice(list("ab*?."), rng.integers(0, 7)))
        text = "".join(rng.choice(list("ab."), rng.integers(0, 9)))
        assert glob_match(pat, text) == fnmatchcase(text, pat), (pat, text)
    # what a backtracking matcher takes hours on: 60 stars against a 200-character miss
    assert not glob_match("*a" * 60 + "X", "a" * 200)


# ============================================================================ trainable tokens
@pytest.mark.parametrize("method", list(METHODS))
def test_trainable_rows_count_start_at_the_method_and_leave_other_rows_bit_identical(method):
    # faults caught: rows not counted as trainable; a non-zero init (step 0 differs from the
    # method alone); an update that leaks into unlisted rows or into the frozen table
    cfg = METHODS[method]
    alone = get_peft_model(GPT(CFG), cfg)
    pm = get_peft_model(GPT(CFG), with_rows(cfg))
    assert pm.num_parameters(trainable_only=True) == \
        alone.num_parameters(trainable_only=True) + len(ROWS) * CFG.n_embd
    np.testing.assert_array_equal(logits(pm, ids_for()), logits(alone, ids_for()))
    base_bits = {n: b for n, b in bits(pm).items() if ".adapters." not in n}
    layer = pm.base_model.tok_emb
    assert isinstance(layer, TrainableTokens)
    table0 = host(layer.weight.data).copy()
    opt = SGD(pm.trainable_parameters(), lr=0.5)
    for step in range(3):
        opt.zero_grad()
        pm.loss(ids_for(seed=step), ids_for(seed=step + 10)).backward()
        opt.step()
    table, inner = host(layer.weight.data), host(layer.base.weight.data)  # (V, C) each
    others = [i for i in range(CFG.vocab_size) if i not in ROWS]
    assert table[others].tobytes() == inner[others].tobytes()    # W + 0.0: the same bits
    if method != "lora_emb":                                      # (LoRA moves every row)
        assert table[others].tobytes() == table0[others].tobytes()
    assert not np.array_equal(table[list(ROWS)], table0[list(ROWS)])
    now = bits(pm)
    frozen = [n for n in base_bits if not dict(pm.named_parameters())[n].requires_grad]
    assert frozen and all(now[n] == base_bits[n] for n in frozen)
    with pm.disable_adapter():
        np.testing.assert_array_equal(logits(pm, ids_for()), logits(GPT(CFG), ids_for()))


def test_the_gradient_of_the_rows_is_the_full_embedding_gradient_at_those_rows():
    # independent path: a plain model whose whole (tied) table trains; the fault caught: a
    # delta that misses the tied head's share, or lands on the wrong rows
    old = bk.default_dtype()
    bk.set_default_dtype(np.float64)
    try:
        ids, targets = ids_for(seed=1), ids_for(seed=2)
        plain = GPT(CFG, seed=3)
        for p in plain.parameters():
            p.data = p.data.astype(np.float64)
            p.requires_grad = False
        plain.tok_emb.weight.requires_grad = True
        plain.loss(ids, targets).backward()
        full = host(plain.tok_emb.weight.grad)                   # (V, C)
        base = GPT(CFG, seed=3)
        for p in base.parameters():
            p.data = p.data.astype(np.float64)
        pm = get_peft_model(base, IA3Config(trainable_token_indices=ROWS))
        for p in pm.trainable_parameters():
            p.data = p.data.astype(np.float64)
        pm.loss(ids, targets).backward()
        delta = pm.base_model.tok_emb.adapters.default.delta
        np.testing.assert_allclose(host(delta.grad), full[list(ROWS)], rtol=1e-10, atol=1e-12)
    finally:
        bk.set_default_dtype(old)


@pytest.mark.parametrize("method", ["lora_emb", "prompt", "bitfit"])
def test_trainable_rows_save_load_and_unload(tmp_path, method):
    # faults caught: rows missing from the file, or restored onto the wrong ids; unload that
    # leaves the wrapper (or the trained rows) in the base
    pm = get_peft_model(GPT(CFG), with_rows(METHODS[method]))
    rng = np.random.default_rng(0)
    for p in pm.trainable_parameters():
        p.data = bk.asarray(rng.normal(0, 0.3, p.shape), dtype=p.dtype)
    want = logits(pm, ids_for())
    pm.save_adapter(tmp_path / "a")
    loaded = load_peft_model(GPT(CFG), tmp_path / "a")
    np.testing.assert_array_equal(logits(loaded, ids_for()), want)
    assert loaded.num_parameters(trainable_only=True) == pm.num_parameters(trainable_only=True)
    other = with_rows(METHODS[method], rows=(1, 2, 3))          # rows of another config
    pm2 = get_peft_model(GPT(CFG), other)
    tensors, _ = load_tensors(tmp_path / "a" / ADAPTER_WEIGHTS)
    assert host(tensors["tok_emb.rows"]).tolist() == list(ROWS)
    assert pm2.base_model.tok_emb.adapters.default.rows.tolist() == [1, 2, 3]
    plain = loaded.unload()
    assert type(plain.tok_emb).__name__ == "Embedding"
    np.testing.assert_array_equal(logits(plain, ids_for()), logits(GPT(CFG), ids_for()))


def test_lora_with_rows_merges_and_unmerges_the_rows_exactly():
    # the fault caught: unmerge in merge's order (the rows' exact restore undone by LoRA's
    # subtraction), or rows left in the table after unmerge
    pm = get_peft_model(GPT(CFG), with_rows(METHODS["lora_emb"]))
    rng = np.random.default_rng(1)
    for p in pm.trainable_parameters():
        p.data = bk.asarray(rng.normal(0, 0.3, p.shape), dtype=p.dtype)
    W0 = host(GPT(CFG).tok_emb.weight.data)
    want = logits(pm, ids_for())
    pm.merge()
    np.testing.assert_allclose(logits(pm, ids_for()), want, atol=1e-5)
    pm.unmerge()
    W = host(pm.base_model.tok_emb.base.base.weight.data)
    np.testing.assert_allclose(W, W0, atol=1e-6)
    np.testing.assert_allclose(logits(pm, ids_for()), want, atol=1e-5)
    # on a table no other layer changes, unmerge puts the kept rows back bit for bit
    ia3 = get_peft_model(GPT(CFG), IA3Config(trainable_token_indices=ROWS))
    delta = ia3.base_model.tok_emb.adapters.default.delta
    delta.data = bk.asarray(rng.normal(0, 0.3, delta.shape), dtype=delta.dtype)
    want = logits(ia3, ids_for())
    ia3.merge()
    np.testing.assert_allclose(logits(ia3, ids_for()), want, atol=1e-5)
    ia3.unmerge()
    assert host(ia3.base_model.tok_emb.base.weight.data).tobytes() == W0.tobytes()
