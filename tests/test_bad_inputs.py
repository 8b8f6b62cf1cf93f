"""Issue 15, the non-PEFT classes: every bad input is refused with an error that names it,
*before any work*, and leaves the model and the files exactly as they were.

* class 6: GPTConfig, TrainConfig, ``train`` (ragged or empty batches), ``generate`` and the
  KV cache ``past``: each field by name, kind and range;
* class 7: the CLI checks every argument and everything it will write before it trains;
* class 4 (the base model's file): dtypes a safetensors file may hold get a named decision,
  and NaN/inf in a base model is refused.

Each test asserts the exception (type and the name in its message) *and* that every parameter
is bit-for-bit what it was (``fingerprint``). Tiny models, so the file runs in seconds.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft import backend as bk
from minipeft.autograd import no_grad
from minipeft.nn import GPT, GPTConfig, generate
from minipeft.train import TrainConfig, evaluate_lm, train

V, BLOCK = 13, 12
CFG = GPTConfig(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=2, n_embd=8)


def fingerprint(model) -> dict:
    """Every parameter's bytes, dtype, shape and trainability: what a refused call must keep."""
    return {n: (bk.to_numpy(p.data).tobytes(), p.data.dtype.str, p.shape, p.requires_grad)
            for n, p in model.named_parameters()}


def batches(T=6, seed=0):
    rng = np.random.default_rng(seed)

    def next_batch(B):
        x = rng.integers(0, V, (B, T))
        return x, np.roll(x, -1, axis=1)
    return next_batch


# ============================================================================ class 6: configs
BAD_GPT = [   # (field=value, error, the words the message must hold)
    (dict(bias="no"), TypeError, "GPTConfig.bias must be True or False, got 'no'"),
    (dict(causal="yes"), TypeError, "GPTConfig.causal must be True or False"),
    (dict(n_embd=8.0), TypeError, "GPTConfig.n_embd must be an integer"),
    (dict(n_layer=True), TypeError, "GPTConfig.n_layer must be an integer"),
    (dict(dropout=float("nan")), ValueError, "GPTConfig.dropout must be finite"),
    (dict(n_classes=1.5), TypeError, "GPTConfig.n_classes must be an integer"),
    (dict(pool=None), ValueError, "GPTConfig.pool must be one of"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD_GPT)
def test_gpt_config_names_each_bad_field(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        GPTConfig(**kwargs)


BAD_TRAIN = [
    (dict(min_lr_ratio=float("nan")), ValueError, "TrainConfig.min_lr_ratio must be finite"),
    (dict(min_lr_ratio=-0.5), ValueError, "TrainConfig.min_lr_ratio must be >= 0"),
    (dict(min_lr_ratio=2.0), ValueError, "TrainConfig.min_lr_ratio must be <= 1"),
    (dict(steps=2.5), TypeError, "TrainConfig.steps must be an integer, got 2.5"),
    (dict(batch_size=4.0), TypeError, "TrainConfig.batch_size must be an integer"),
    (dict(batch_size=0), ValueError, "TrainConfig.batch_size must be >= 1"),
    (dict(log_every=0), ValueError, "TrainConfig.log_every must be >= 1, got 0"),
    (dict(lr="3e-3"), TypeError, "TrainConfig.lr must be a number"),
    (dict(lr=0.0), ValueError, "TrainConfig.lr must be > 0"),
    (dict(warmup=1.5), TypeError, "TrainConfig.warmup must be an integer"),
    (dict(eval_every=-1), ValueError, "TrainConfig.eval_every must be >= 0"),
    (dict(checkpoint_every=0.5), TypeError, "TrainConfig.checkpoint_every must be an integer"),
    (dict(progress="no"), TypeError, "TrainConfig.progress must be True or False"),
    (dict(log_path=3), TypeError, "TrainConfig.log_path must be None or a path"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD_TRAIN)
def test_train_config_names_each_bad_field(kwargs, exc, msg):
    # these once passed construction and failed later: log_every=0 with ZeroDivisionError
    # *after* step 0 was applied, min_lr_ratio=NaN by turning every weight NaN
    with pytest.raises(exc, match=msg):
        TrainConfig(**kwargs)


INT_FIELDS = {"steps": 0, "batch_size": 1, "warmup": 0, "eval_every": 0, "log_every": 1,
              "checkpoint_every": 0}                       # field -> smallest allowed value
FLOAT_FIELDS = ("lr", "weight_decay", "min_lr_ratio", "grad_clip")
_not_a_number = st.sampled_from(["1", None, True, [1], float("nan"), float("inf")])


@settings(max_examples=25, deadline=None)
@given(field=st.sampled_from(sorted(INT_FIELDS)),
       value=st.one_of(st.floats(allow_nan=True).filter(lambda v: not float(v).is_integer()
                                                        if math.isfinite(v) else True),
                       st.integers(max_value=-1), _not_a_number))
def test_any_bad_integer_field_of_train_config_is_named(field, value):
    if isinstance(value, int) and not isinstance(value, bool) and value >= INT_FIELDS[field]:
        return
    with pytest.raises((TypeError, ValueError), match=f"TrainConfig.{field} "):
        TrainConfig(**{field: value})


@settings(max_examples=25, deadline=None)
@given(field=st.sampled_from(FLOAT_FIELDS),
       value=st.one_of(st.floats(max_value=-1e-12), _not_a_number))
def test_any_bad_float_field_of_train_config_is_named(field, value):
    with pytest.raises((TypeError, ValueError), match=f"TrainConfig.{field} "):
        TrainConfig(**{field: value})


# ============================================================================ class 6: batches
def _train_once(model, next_batch):
    cfg = TrainConfig(steps=3, batch_size=2, warmup=0, weight_decay=0.1, progress=False)
    return train(model, next_batch, cfg)


@pytest.mark.parametrize("bad,msg", [
    (([[1, 2, 3], [4, 5]], [[2, 3, 4], [5, 6]]), r"batch x at step 0 must be a rectangular"),
    ((np.zeros((0, 6), np.int64), np.zeros((0, 6), np.int64)), r"empty batch at step 0"),
    ((np.zeros((2, 6), np.int64),), r"next_batch must return a pair \(x, y\)"),
])
def test_train_refuses_a_ragged_or_empty_batch_before_the_step(bad, msg):
    # weight decay 0.1: an applied step changes every weight even when the gradient is 0, so an
    # empty batch that slipped through would show as changed weights
    model = GPT(CFG, seed=1)
    before = fingerprint(model)
    with pytest.raises((ValueError, TypeError), match=msg):
        _train_once(model, lambda B: bad)
    assert fingerprint(model) == before


def test_train_refuses_an_empty_batch_arriving_later_and_keeps_the_good_steps():
    model = GPT(CFG, seed=1)
    good, calls, seen = batches(), [], {}

    def next_batch(B):
        calls.append(B)
        if len(calls) == 3:
            seen["before"] = fingerprint(model)          # after two applied steps
            return np.zeros((0, 6), np.int64), np.zeros((0, 6), np.int64)
        return good(B)
    with pytest.raises(ValueError, match="empty batch at step 2"):
        _train_once(model, next_batch)
    assert fingerprint(model) == seen["before"]


def test_model_refuses_ragged_ids_and_targets_and_empty_batches_by_name():
    model = GPT(CFG)
    before = fingerprint(model)
    with pytest.raises(ValueError, match="GPT: ids must be a rectangular array"):
        model([[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match="GPT.loss: targets must be a rectangular array"):
        model.loss([[1, 2], [3, 4]], [[1, 2], [3]])
    with pytest.raises(ValueError, match=r"at least one row .*got shape \(0, 4\)"):
        model(np.zeros((0, 4), np.int64))
    with pytest.raises(ValueError, match=r"evaluate_lm: x and y must hold the same number"):
        evaluate_lm(model, np.zeros((0, 4), np.int64), np.zeros((0, 4), np.int64))
    assert fingerprint(model) == before


# ============================================================================ class 6: generate
@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(temperature="0.7"), TypeError, "generate: temperature must be a number"),
    (dict(temperature=-1.0), ValueError, "generate: temperature must be >= 0"),
    (dict(temperature=math.inf), ValueError, "generate: temperature must be finite"),
    (dict(max_new_tokens=2.5), TypeError, "generate: max_new_tokens must be an integer"),
    (dict(top_k=1.5, temperature=1.0), TypeError, "generate: top_k must be an integer"),
    (dict(top_k=0, temperature=1.0), ValueError, "generate: top_k must be >= 1"),
    (dict(seed=-3), ValueError, "generate: seed must be >= 0"),
    (dict(use_cache="no"), TypeError, "generate: use_cache must be True or False"),
])
def test_generate_names_each_bad_argument(kwargs, exc, msg):
    model = GPT(CFG)
    before = fingerprint(model)
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(exc, match=msg):
        generate(model, np.ones((1, 2), np.int64), **args)
    assert fingerprint(model) == before


def test_a_vanishing_temperature_samples_the_argmax_instead_of_nan():
    # temperature 1e-45 once gave logits / T = inf, inf - inf = NaN probabilities and an error
    # from the sampler; the limit T -> 0 of softmax(z / T) is the argmax, so it must be greedy.
    model = GPT(CFG, seed=3)
    ids = bk.asarray(np.random.default_rng(0).integers(0, V, (3, 4)))
    with no_grad():
        expect = bk.to_numpy(model(ids).data[:, -1].argmax(axis=-1))  # an independent argmax
    out = generate(model, ids, 1, temperature=1e-45, top_k=5, seed=0)
    np.testing.assert_array_equal(bk.to_numpy(out[:, -1]), expect)


def test_a_wrongly_shaped_past_is_named_before_any_work():
    model = GPT(CFG)
    ids = np.ones((2, 3), np.int64)
    with no_grad():
        _, past = model(ids, use_cache=True)                          # (2, H=2, 3, D=4) each
    k, v = past[0]
    bad = {
        "too few layers": (past[:1], r"one \(k, v\) per layer \(2\), got 1"),
        "not a pair": ([(k,), past[1]], r"past\[0\] must be a pair \(k, v\)"),
        "wrong batch": ([(k[:1], v[:1]), past[1]], r"past\[0\] must be a pair .*\(2, 2, Tp, 4\)"),
        "k and v differ": ([(k, v[:, :, :2]), past[1]], r"past\[0\] must be a pair"),
        "lengths differ": ([past[0], (k[:, :, :2], v[:, :, :2])], r"different lengths Tp"),
        "not a list": (k, r"past must be a list"),
    }
    before = fingerprint(model)
    for why, (p, msg) in bad.items():
        with pytest.raises(ValueError, match=msg), no_grad():
            model(np.ones((2, 1), np.int64), past=p, start_pos=3)
        assert fingerprint(model) == before, why


# ============================================================================ class 7: the CLI
@pytest.fixture
def no_work(monkeypatch):
    """Training, studies and benchmarks that fail the test if the CLI ever reaches them."""
    import minipeft.base
    import minipeft.bench
    import minipeft.tour

    def refuse(*args, **kwargs):
        raise AssertionError("the CLI started work before refusing a bad argument")
    monkeypatch.setattr(minipeft.base, "load_base", refuse)
    monkeypatch.setattr(minipeft.tour, "run_study", refuse)
    monkeypatch.setattr(minipeft.bench, "run", refuse)


def _tree(folder):
    """Every path under ``folder`` with its bytes (files) or None (folders)."""
    return {str(p): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


FT = ["finetune", "--method", "lora", "--task", "copy", "--base", "quick"]
BAD_CLI = {   # name -> (argv with FILE / DIR placeholders, words the one-line error must hold)
    "finetune --out FILE": (FT + ["--out", "FILE"], "--out .*is a file"),
    "finetune --out under a file": (FT + ["--out", "FILE/sub/dir"], "--out .*is a file"),
    "finetune --out ''": (FT + ["--out", ""], "--out must be a path, got an empty string"),
    "finetune --lr 0": (FT + ["--lr", "0", "--out", "DIR/a"], "--lr must be > 0"),
    "finetune --lr nan": (FT + ["--lr", "nan", "--out", "DIR/a"], "--lr must be finite"),
    "finetune --steps 0": (FT + ["--steps", "0", "--out", "DIR/a"], "--steps must be >= 1"),
    "finetune --seed -1": (FT + ["--seed", "-1", "--out", "DIR/a"], "--seed must be >= 0"),
    "finetune --method": (["finetune", "--method", "nope", "--task", "copy", "--out", "DIR/a"],
                          "--method: unknown method 'nope'"),
    "compare --out FILE": (["compare", "--out", "FILE"], "--out .*is a file"),
    "compare --seeds": (["compare", "--seeds", "0,x", "--out", "DIR/c"], "--seeds must be"),
    "compare --methods": (["compare", "--methods", "bitfit,nope", "--out", "DIR/c"],
                          r"--methods: unknown \['nope'\]"),
    "compare --steps 0": (["compare", "--steps", "0", "--out", "DIR/c"], "--steps must be >= 1"),
    "tour --out FILE": (["tour", "--quick", "--out", "FILE"], "--out .*is a file"),
    "bench --json DIR": (["bench", "--quick", "--json", "DIR"], "--json .*is a folder"),
    "bench --json under a file": (["bench", "--json", "FILE/x.json"], "--json .*is a file"),
    "params --lora-r 0": (["params", "--lora-r", "0"], "--lora-r must be >= 1"),
}


@pytest.mark.parametrize("case", list(BAD_CLI))
def test_cli_refuses_bad_arguments_and_places_before_any_work(case, tmp_path, capsys, no_work):
    from minipeft.cli import main

    (tmp_path / "FILE").write_text("keep me")
    (tmp_path / "DIR").mkdir()
    argv, msg = BAD_CLI[case]
    argv = [a.replace("FILE", str(tmp_path / "FILE")).replace("DIR", str(tmp_path / "DIR"))
            for a in argv]
    before = _tree(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"minipeft {argv[0]}: error: "), err
    assert re.search(msg, err), err
    assert _tree(tmp_path) == before                     # nothing written, nothing created


def test_cli_as_a_process_refuses_in_one_line_without_a_traceback(tmp_path):
    # as a user runs it: a non-zero exit, one line on stderr, no traceback, and fast (the
    # import of the package is the work; a run that reached training would take far longer)
    import os
    import subprocess
    import sys
    import time

    target = tmp_path / "FILE"
    target.write_text("keep me")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "minipeft.cli", *FT, "--out", str(target)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MINIPEFT_CACHE": str(tmp_path / "cache")})
    seconds = time.perf_counter() - start
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "--out" in proc.stderr and target.read_text() == "keep me"
    assert not (tmp_path / "cache").exists()             # no base was pretrained or cached
    assert seconds < 60, seconds


def test_output_checks_accept_what_can_be_written(tmp_path):
    from minipeft.checks import check_output_dir, check_output_file

    # the good cases pass and create nothing (a check that refuses everything would fail here)
    assert check_output_dir("--out", str(tmp_path / "new" / "deeper")) == \
        str(tmp_path / "new" / "deeper")
    assert check_output_dir("--out", str(tmp_path)) == str(tmp_path)
    assert check_output_file("--json", str(tmp_path / "a" / "b.json"))
    assert not (tmp_path / "new").exists() and not (tmp_path / "a").exists()


def test_bench_and_tour_entry_points_check_where_they_write_before_measuring(tmp_path, no_work,
                                                                             capsys):
    from minipeft import bench
    from minipeft.tour import tour

    with pytest.raises(SystemExit) as exc:                 # argparse's one-line usage error
        bench.main(["--quick", "--json", str(tmp_path)])
    assert exc.value.code == 2 and "--json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--steps", "0"])
    (tmp_path / "FILE").write_text("keep me")
    with pytest.raises(ValueError, match="tour: out_dir .*is a file"):
        tour(out_dir=tmp_path / "FILE", quick=True)
    assert (tmp_path / "FILE").read_text() == "keep me"


# ============================================================================ class 4: file dtypes
def _safetensors_bytes(entries) -> bytes:
    """A safetensors file by hand (the library cannot write BF16/F8 from NumPy):
    entries = [(name, dtype, shape, raw bytes)]."""
    import json

    header, blobs, offset = {}, b"", 0
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs += data
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blobs


def test_bf16_is_decoded_exactly(tmp_path):
    from minipeft.io import load_tensors

    # bfloat16 bit patterns written by hand: 0x3F80 = 1.0, 0xC000 = -2.0, 0x4049 = 3.140625,
    # 0x0000 = 0.0 (the float32 whose upper 16 bits they are)
    bits = np.array([0x3F80, 0xC000, 0x4049, 0x0000], dtype="<u2")
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(_safetensors_bytes([("w", "BF16", (2, 2), bits.tobytes())]))
    tensors, _ = load_tensors(path)
    assert tensors["w"].dtype == np.float32
    np.testing.assert_array_equal(tensors["w"], [[1.0, -2.0], [3.140625, 0.0]])


@pytest.mark.parametrize("dtype,msg", [("F8_E4M3", "8-bit float"), ("F8_E5M2", "8-bit float"),
                                       ("C64", "complex"), ("Q4", "not a dtype minipeft knows")])
def test_unsupported_dtypes_are_refused_by_name(tmp_path, dtype, msg):
    from minipeft.io import CheckpointError, load_tensors

    path = tmp_path / "x.safetensors"
    size = 8 if dtype == "C64" else 1
    path.write_bytes(_safetensors_bytes([("ok", "F32", (1,), b"\0" * 4),
                                         ("blocks.0.w", dtype, (2,), b"\0" * 2 * size)]))
    raw = path.read_bytes()
    with pytest.raises(CheckpointError, match=rf"'blocks.0.w' is stored as {dtype}.*{msg}"):
        load_tensors(path)
    assert path.read_bytes() == raw


def _saved_base(tmp_path, edit):
    """A saved tiny model whose weights file is rewritten with ``edit(tensors)``."""
    from safetensors.numpy import load, save

    from minipeft.io import save_model

    folder = save_model(GPT(CFG, seed=2), tmp_path / "base")
    file = folder / "model.safetensors"
    raw = file.read_bytes()
    tensors = load(raw)
    header = raw[8:8 + int.from_bytes(raw[:8], "little")]
    meta = __import__("json").loads(header)["__metadata__"]
    edit(tensors)
    file.write_bytes(save(tensors, metadata=meta))
    return folder


@pytest.mark.parametrize("case,msg", [
    ("f64 beyond float32", r"would become inf\): \['blocks.0.ln_1.weight \(\|value\| up to 1e\+39"),
    ("nan", r"NaN or inf values: \['blocks.1.mlp.fc_in.bias'\]"),
    ("inf", r"NaN or inf values: \['tok_emb.weight'\]"),
    ("complex", r"stored as C64"),
    ("integers", r"not floating-point arrays.*ln_f.bias: int64"),
])
def test_a_base_model_with_bad_values_is_refused_and_nothing_changes(tmp_path, case, msg):
    from minipeft.io import CheckpointError, load_model

    def edit(t):
        if case == "f64 beyond float32":
            t["blocks.0.ln_1.weight"] = t["blocks.0.ln_1.weight"].astype(np.float64)
            t["blocks.0.ln_1.weight"][3] = 1e39
        elif case == "nan":
            t["blocks.1.mlp.fc_in.bias"][0] = np.nan
        elif case == "inf":
            t["tok_emb.weight"][1, 2] = -np.inf
        elif case == "complex":
            t["pos_emb.weight"] = t["pos_emb.weight"].astype(np.complex64)
        else:
            t["ln_f.bias"] = t["ln_f.bias"].astype(np.int64)
    folder = _saved_base(tmp_path, edit)
    files = _tree(folder)
    with pytest.raises(CheckpointError, match=msg):
        load_model(folder)
    assert _tree(folder) == files
    # the same tensors handed to an existing model leave every one of its weights as it was
    if case != "complex":
        from safetensors.numpy import load

        model = GPT(CFG, seed=5)
        before = fingerprint(model)
        with pytest.raises(ValueError, match=msg):
            model.load_state_dict(load((folder / "model.safetensors").read_bytes()))
        assert fingerprint(model) == before


def test_float64_and_float16_files_within_range_load_as_float32(tmp_path):
    from minipeft.io import load_model

    source = GPT(CFG, seed=2)
    half = lambda name: name.endswith("bias")             # biases as float16, the rest float64
    wide = _saved_base(tmp_path, lambda t: t.update(
        {k: v.astype(np.float16 if half(k) else np.float64) for k, v in t.items()}))
    loaded = load_model(wide)
    for name, p in loaded.named_parameters():
        expect = bk.to_numpy(dict(source.named_parameters())[name].data)
        if half(name):                                   # float16 rounding, done independently
            expect = expect.astype(np.float16).astype(np.float32)
        assert p.data.dtype == np.float32
        np.testing.assert_array_equal(bk.to_numpy(p.data), expect, err_msg=name)
