"""Proofs for minipeft.base: the cached base model is trained once, found again, and reproducible.

Every test points ``MINIPEFT_CACHE`` at its own empty folder, so nothing depends on a cache left
by an earlier run. The cache is proven by making a second pretraining impossible
(``pretrain`` replaced by a function that raises), not by timing.
"""

import json
import os
from dataclasses import replace

import numpy as np
import pytest

import minipeft.base as base
from minipeft import backend as bk
from minipeft.autograd import no_grad
from minipeft.data import TaskMixture, exact_match
from minipeft.io import load_json

host = bk.to_numpy


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny_recipe(monkeypatch):
    """The quick recipe cut to 30 steps, for tests that must pretrain several times."""
    tiny = replace(base.RECIPES["quick"], steps=30, warmup=5, eval_examples=40)
    monkeypatch.setitem(base.RECIPES, "quick", tiny)
    return tiny


def weights(model):
    return {k: host(v).copy() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def no_pretraining(*args, **kwargs):
    raise AssertionError("pretrain() ran although the base model was cached")


@pytest.mark.slow  # one real pretraining of the quick recipe: ~5-15 s on one core
def test_quick_base_pretrains_once_then_loads_from_the_cache(cache, monkeypatch):
    model, info = base.load_base("quick", seed=0, progress=False)
    recipe = base.RECIPES["quick"]
    folder = cache / base.recipe_key("quick", recipe, 0)
    assert sorted(os.listdir(folder)) == ["config.json", "info.json", "model.safetensors"]
    assert load_json(folder / "info.json") == json.loads(json.dumps(info))
    assert info["steps"] == recipe.steps and info["num_parameters"] == model.num_parameters()
    assert model.config == recipe.gpt_config()

    # exact match per task, recomputed independently of evaluate_lm
    mix = TaskMixture(list(recipe.tasks), seed=0, length=getattr(recipe, "length", 8))
    assert set(info["exact_match"]) == set(recipe.tasks)
    for task in recipe.tasks:
        x, y = mix.eval_set(task, recipe.eval_examples)
        with no_grad():
            pred = model.eval()(bk.asarray(x)).data.argmax(axis=-1)
        assert info["exact_match"][task] == pytest.approx(exact_match(pred, y), abs=1e-12)
    assert info["final_loss"] < np.log(model.config.vocab_size)     # it learned something

    monkeypatch.setattr(base, "pretrain", no_pretraining)
    again, info2 = base.load_base("quick", seed=0, progress=False)
    assert info2 == load_json(folder / "info.json") and same(weights(again), weights(model))


def test_same_seed_same_weights_other_seed_other_weights(cache, tiny_recipe, monkeypatch):
    a, _ = base.load_base("quick", seed=3, progress=False)
    b, _ = base.load_base("quick", seed=3, progress=False, retrain=True)  # trains again
    assert same(weights(a), weights(b))
    c, _ = base.load_base("quick", seed=4, progress=False)
    assert not same(weights(a), weights(c))
    folders = sorted(os.listdir(cache))                             # one entry per seed
    assert len(folders) == 2 and all(f.startswith("base-quick-s") for f in folders)
    # a changed recipe is another key, so a stale cache entry is never used for it
    other = replace(tiny_recipe, steps=31)
    assert base.recipe_key("quick", other, 3) != base.recipe_key("quick", tiny_recipe, 3)


def test_unreadable_cache_entry_is_retrained(cache, tiny_recipe, monkeypatch, capsys):
    model, _ = base.load_base("quick", seed=0, progress=False)
    folder = cache / base.recipe_key("quick", tiny_recipe, 0)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])                       # truncated
    again, _ = base.load_base("quick", seed=0, progress=False)
    assert "unreadable" in capsys.readouterr().err
    assert same(weights(again), weights(model))                     # retrained, same seed
    monkeypatch.setattr(base, "pretrain", no_pretraining)
    base.load_base("quick", seed=0, progress=False)                 # and cached again


def test_half_written_cache_entry_is_not_trusted(cache, tiny_recipe):
    """info.json is written last: weights without it count as no cache entry."""
    model, _ = base.load_base("quick", seed=0, progress=False)
    folder = cache / base.recipe_key("quick", tiny_recipe, 0)
    (folder / "info.json").unlink()
    (folder / "model.safetensors").write_bytes(b"half")
    again, info = base.load_base("quick", seed=0, progress=False)
    assert same(weights(again), weights(model)) and (folder / "info.json").is_file()


def test_unknown_base_is_a_clear_error(cache):
    with pytest.raises(ValueError, match=r"unknown base 'huge'; choose from \[.*'quick'"):
        base.load_base("huge")
