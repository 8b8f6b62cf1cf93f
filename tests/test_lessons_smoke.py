"""Each lesson runs with ``--quick`` and what it measured is checked, not just that it ran.

A lesson's ``main(argv)`` returns a dict of its measurements. ``run_lesson("01_autograd",
"--quick")`` (from conftest.py) loads ``lessons/01_autograd.py`` by path (lesson names start with
a digit, so they are not importable modules) and calls it. Figures go to a temporary folder
through ``MINIPEFT_LESSON_OUT`` (the ``lesson_out`` fixture), so tests never write into the
repository.

To add a lesson: one test that calls ``run_lesson`` and asserts on the returned numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_lesson

pytestmark = pytest.mark.usefixtures("lesson_out")   # every lesson writes into tmp_path


def test_01_autograd(lesson_out):
    m = run_lesson("01_autograd", "--quick", "--seed", "0")
    # (a) the scalar graph's gradients equal the hand-derived chain rule
    assert m["scalar_max_abs_diff"] < 1e-12
    # (b) softmax + cross-entropy: (p - onehot)/N by hand == library == finite differences
    ce = m["softmax_ce"]
    assert ce["loss_diff"] < 1e-12 and ce["hand_vs_library"] < 1e-12
    assert ce["gradcheck_ok"] and ce["gradcheck_abs"] < 1e-7
    # (c) every op's backward agrees with finite differences
    ops = m["ops"]
    for required in ("add", "matmul", "getitem", "cross_entropy", "layer_norm", "embedding",
                     "attention", "dropout", "linear"):
        assert required in ops
    bad = {k: v["max_abs_err"] for k, v in ops.items() if not v["ok"] or v["max_abs_err"] > 1e-6}
    assert not bad, f"ops whose gradient disagrees with finite differences: {bad}"
    # (d) the step the library uses sits in the accurate part of the error curve
    assert min(m["eps_sweep"].values()) < 1e-8
    fig = Path(m["figure"])
    assert fig.parent == lesson_out and fig.is_file() and fig.stat().st_size > 10_000


def test_02_tiny_transformer(lesson_out, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path / "cache"))  # a clean cache: it pretrains
    m = run_lesson("02_tiny_transformer", "--quick", "--seed", "0")
    # (b) the per-component counts add up to the model and agree with the calculator
    counts, calc = m["components"], m["calculator"]
    assert sum(counts.values()) == m["num_parameters"] == calc["total"]
    assert all(counts[k] == calc[k] for k in counts)
    assert counts["head"] == 0                                      # tied head: no extra weights
    assert 1.9 < m["mlp_over_attention"] < 2.1
    # (c) the loss fell, and the cached base scores every one of its skills
    losses = m["losses"]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert set(m["base_exact_match"]) == set(m["base_info"]["tasks"])
    assert all(0.0 <= v <= 1.0 for v in m["base_exact_match"].values())
    assert m["samples"] and all(s["prompt"].endswith("=") for s in m["samples"])
    # (d) the attention recomputed by hand is causal, normalised and the model's own
    attn = m["attention"]
    assert attn["upper_max"] == 0.0 and attn["row_sum_err"] < 1e-5
    assert attn["recompute_diff"] < 1e-5
    # (f) SEED-NOTES row 9: in real models the MLP holds ~2x attention; attention is no majority
    real = m["real_models"]
    assert real["gpt2-124m"]["total"] == 124_439_808
    assert real["llama2-7b"]["total"] == 6_738_415_616
    for spec in real.values():
        assert 1.9 < spec["mlp_over_attention"] < 2.1 and not spec["attention_is_majority"]
    fig = Path(m["figure"])
    assert fig.parent == lesson_out and fig.is_file() and fig.stat().st_size > 10_000


def test_03a_step_memory(lesson_out):
    m = run_lesson("03a_step_memory", "--quick", "--seed", "0")
    grid = m["grid"]
    # (a) W + G + O does not depend on B or T; activations scale with B (exactly) and T
    state = [sum(r["measured"][c] for c in ("weights", "gradients", "optimizer")) for r in grid]
    assert max(state) / min(state) - 1 < 1e-3         # a few bytes of Python objects aside
    by = {(r["B"], r["T"]): r["measured"]["activations"] for r in grid}
    (b0, b1), (t0, t1) = sorted({r["B"] for r in grid}), sorted({r["T"] for r in grid})
    assert abs(by[(b1, t0)] / by[(b0, t0)] - b1 / b0) < 0.1
    assert by[(b0, t1)] / by[(b0, t0)] >= 0.95 * t1 / t0
    for r in grid:  # the graph walk predicts the allocator, the closed form predicts the walk
        assert abs(r["measured"]["activations"] / r["predicted"]["activations"] - 1) < 0.1
        assert abs(r["formula_activations"] / r["predicted"]["activations"] - 1) < 1e-3
        assert r["predicted"]["peak"] >= r["measured"]["peak"]
        # catches a workspace or overlap model that over-predicts wildly (quick sizes: 11-22%)
        assert r["predicted"]["peak"] <= 1.3 * r["measured"]["peak"]
    # the printed verdict on T follows the printed ratio and margin (catches a fixed sentence,
    # e.g. "grows faster than T" beside x1.99 for x2)
    v = grid[0]["verdicts"]
    expect = ("faster" if v["t_ratio"] > v["t_factor"] * (1 + v["margin"]) else
              "proportional" if v["t_ratio"] >= v["t_factor"] * (1 - v["margin"]) else "slower")
    assert v["t_verdict"] == expect
    assert v["t_ratio"] == pytest.approx(by[(b0, t1)] / by[(b0, t0)])
    # (b) per-layer credit adds up and every block is alike
    walked = m["layers"]["walked"]
    assert abs(sum(walked.values()) / grid[-1]["predicted"]["activations"] - 1) < 1e-9
    assert len({v for k, v in walked.items() if k.startswith("blocks.")}) == 1
    # (c) SEED-NOTES row 10: LoRA removes gradients + optimizer state, not activations
    for r in m["lora"]:
        lo, full = r["lora"]["measured"], r["full"]["measured"]
        assert lo["gradients"] + lo["optimizer"] < 0.1 * (full["gradients"] + full["optimizer"])
        assert lo["activations"] > 0.9 * full["activations"]
    small, large = m["lora"]          # the larger the batch, the less LoRA saves
    assert large["peak_change"] > small["peak_change"]
    # the printed LoRA verdicts follow the numbers (catches "did not shrink" printed always)
    rel = [r["activation_change"] / r["full"]["measured"]["activations"] for r in m["lora"]]
    lv = small["verdicts"]
    assert lv["shrank"] == any(x < -lv["margin"] for x in rel)
    assert lv["grew"] == all(x > lv["margin"] for x in rel)
    assert lv["smaller_saving"] == (large["peak_change"] > small["peak_change"] + lv["margin"])
    fig = Path(m["figure"])
    assert fig.parent == lesson_out and fig.is_file() and fig.stat().st_size > 10_000


def test_03b_memory_at_scale(lesson_out):
    m = run_lesson("03b_memory_at_scale", "--quick", "--seed", "0")
    # (d) GPT-3 175B: ~10,000x fewer trainable; the published 350 GB is the 16-bit weights
    pub = m["published"]
    assert 8_000 < pub["fewer_params"] < 12_000
    assert pub["closest"] == "all 16-bit (2+2+4 B)"
    assert abs(pub["by_accounting"][pub["closest"]]["lora"] / 350e9 - 1) < 0.01
    mixed = pub["by_accounting"]["mixed (2+2+12 B)"]
    assert abs(mixed["full"] / (16 * m["real"]["gpt3-175b"]["params"]) - 1) < 1e-9
    # (e) the flip: formula brackets the measured crossing; LoRA flips at a larger width
    flip = m["flip"]
    assert flip["check"]["agrees"] and flip["flip_full"] < flip["flip_lora"]
    fig = Path(m["figure"])
    assert fig.parent == lesson_out and fig.is_file() and fig.stat().st_size > 10_000


def test_04_selective(lesson_out, shared_quick_cache, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE", str(shared_quick_cache))
    m = run_lesson("04_selective", "--quick", "--seed", "0")
    counts, mem = m["counts"], m["memory"]
    # (a) masks train ~10% of every tensor; BitFit and LayerNorm-only a few percent at most
    for name in ("mask_random", "mask_magnitude", "mask_gradient"):
        assert abs(counts[name]["pct"] - 10) < 0.5
    assert counts["bitfit"]["pct"] < 5 and counts["layernorm"]["pct"] < 5
    # (b) SEED-NOTES row 2: 15-20% is a selective choice; on GPT-2 the last 3 blocks are one
    band = m["band"]
    assert band["agree"] and "last 3 blocks" in band["GPT-2 124M"]["inside"]
    assert band["gpt2_lora_pct"] < 0.01
    # (c) training moved the held-out loss for full fine-tuning
    assert m["runs"]["full"]["best"]["loss"] < m["before"]["loss"]
    # (d) every frozen or masked-out element is bit-identical; trainable ones moved
    for name, r in m["frozen"].items():
        assert r["frozen_changed"] == 0, name
        assert r["trainable_changed"] > 0, name
    # (e, f) SEED-NOTES row 6: a mask keeps the full gradient and optimizer state; whole-tensor
    # choices do not
    for name in ("mask_random", "mask_magnitude", "mask_gradient"):
        # predicted from the graph: exact; measured by tracemalloc: within its few bytes of noise
        assert mem[name]["predicted_gradients"] == mem["full"]["predicted_gradients"]
        assert mem[name]["gradients"] == pytest.approx(mem["full"]["gradients"], rel=0.01)
        assert mem[name]["optimizer"] == pytest.approx(mem["full"]["optimizer"], rel=0.01)
    assert mem["bitfit"]["gradients"] < 0.2 * mem["full"]["gradients"]
    assert mem["last1"]["activations"] < mem["full"]["activations"]
    # "mixed results" is judged over seeds: full FT's seeds really differ (fault caught: a seed
    # that changes nothing fakes zero noise), and an inversion is reported only when the
    # fewer-parameter variant's mean loss is below the other's by more than the spread
    losses = m["verdict"]["losses"]
    assert len(losses["full"]) == 3 and len(set(losses["full"])) == 3
    inv = m["verdict"]["inversion"]
    if inv:
        i, j = inv
        assert counts[i]["pct"] < counts[j]["pct"]
        assert max(losses[i]) < max(losses[j]) and sum(losses[i]) < sum(losses[j])
    fig = Path(m["figure"])
    assert fig.parent == lesson_out and fig.is_file() and fig.stat().st_size > 10_000


def test_10a_eckart_young(lesson_out, shared_quick_cache, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE", str(shared_quick_cache))
    m = run_lesson("10a_eckart_young", "--quick", "--seed", "0")
    # (1) Eckart-Young: the measured rank-r error is the tail energy at every rank (fault
    # caught: a truncation that keeps the wrong singular values, or an off-by-one in the tail)
    ey = m["eckart_young"]
    assert ey["held"] and max(ey["max_abs_diff"].values()) < 1e-9
    assert ey["energy8"]["pretrained"] > ey["energy8"]["random"]
    fig = Path(m["figure"])
    assert fig.parent == lesson_out and fig.is_file() and fig.stat().st_size > 10_000


def test_10b_intrinsic_rank(lesson_out, shared_quick_cache, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE", str(shared_quick_cache))
    m = run_lesson("10b_intrinsic_rank", "--quick", "--seed", "0")
    # (2) the full fine-tune learnt; its update is steeper than noise; full rank reproduces it
    # (fault caught: ΔW taken against the wrong base, so W + ΔW is not the fine-tune)
    base, ft = m["base_score"], m["ft_score"]
    assert ft["loss"] < base["loss"]
    assert m["spectra"]["mean_energy8"] > m["spectra"]["random_energy8"]
    trunc = m["truncation"]
    assert trunc["full_rank_matches"]
    rows = trunc["rows"]
    assert rows[max(rows)]["loss"] < rows[0]["loss"] and abs(rows[max(rows)]["kept"] - 1) < 1e-3
    # (3) the trained LoRA learnt; the truncation is Frobenius-closer to ΔW (Eckart-Young)
    lv = m["lora_vs_truncation"]
    assert lv["rows"]["LoRA r=8 on q,v (trained)"]["loss"] < base["loss"]
    assert all(f["trunc"] <= f["lora"] + 1e-9 for f in lv["frobenius"].values())
    # the gain the "low intrinsic rank" verdict waits for is the measured answer-token gain
    gain = (ft["token_acc"] - base["token_acc"]) / (1 - base["token_acc"])
    assert m["ft_gain"] == pytest.approx(gain) and m["ft_learned"] == (gain >= 0.5)
    fig = Path(m["figure"])
    assert fig.parent == lesson_out and fig.is_file() and fig.stat().st_size > 10_000


def test_10c_subspaces(lesson_out, shared_quick_cache, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE", str(shared_quick_cache))
    m = run_lesson("10c_subspaces", "--quick", "--seed", "0")
    # (4) φ lies in [0, 1]; the random expectation is max(i, j) / d
    sub, d = m["subspaces"], m["width"]
    assert m["r_big"] == min(64, d // 2)
    for t in sub["table"].values():
        assert all(0.0 <= t[k] <= 1.0 + 1e-9 for k in ("phi11_big", "phi_r_big", "phi11_seed",
                                                       "phi_rr_seed", "dW_phi11_big"))
    assert sub["random"]["phi11"] == 1 / d and sub["random"]["phi_r_big"] == m["r_big"] / d
    # (5) W's own top-r directions give the largest projection; factor = ||ΔW|| / projection
    for a in m["amplification"]["rows"].values():
        assert a["random_norm"] <= a["w_own_norm"] + 1e-9
        assert a["proj_norm"] <= a["w_own_norm"] + 1e-9
        assert abs(a["factor"] - a["delta_norm"] / a["proj_norm"]) < 1e-9 * a["factor"]
    # (5) two LoRA seeds give two different updates, so the position has a measured spread
    # (fault caught: the "second seed" reusing the first run, which would fake zero noise)
    amp = m["amplification"]
    assert amp["per_seed"][0] != amp["per_seed"][1] and amp["position_sd"] > 0
    assert amp["paper_factor"] == 21.5 and amp["lr_ratio"] == pytest.approx(10.0)
    fig = Path(m["figure"])
    assert fig.parent == lesson_out and fig.is_file() and fig.stat().st_size > 10_000


def test_10d_pissa(lesson_out, shared_quick_cache, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE", str(shared_quick_cache))
    m = run_lesson("10d_pissa", "--quick", "--seed", "0")
    # (6) PiSSA: step 0 is the base model, s B A = truncate(W, r), and both curves start there
    # (fault caught: a PiSSA init that forgets to subtract B A from the frozen weight)
    p = m["pissa"]
    assert p["step0_ok"] and p["step0"]["default"] == 0.0
    assert p["step0"]["ba_vs_truncate"] < 1e-5 and p["step0"]["residual"] < 1e-5
    assert p["curve_default"][0] == p["curve_pissa"][0] == m["base_loss"]
    assert p["curve_pissa"][-1] < m["base_loss"] and p["curve_default"][-1] < m["base_loss"]
    assert len(p["final_loss"]["pissa"]) == len(p["final_loss"]["default"]) == 2
    assert p["final_loss"]["pissa"][0] == pytest.approx(p["curve_pissa"][-1])
    fig = Path(m["figure"])
    assert fig.parent == lesson_out and fig.is_file() and fig.stat().st_size > 10_000


def test_09_forgetting(lesson_out, shared_quick_cache, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE", str(shared_quick_cache))
    m = run_lesson("09_forgetting", "--quick", "--seed", "0")
    grid = m["grid"]
    # the quick grid: 2 methods x 2 lrs x 2 seeds
    assert len(grid) == 8 and {r.method for r in grid} == {"full", "lora_r8_qv"}
    assert len({r.lr for r in grid if r.method == "full"}) == 2
    before = m["before"]
    lora = [r for r in grid if r.method == "lora_r8_qv"]
    # the adapter is applied while training and scoring: LoRA learnt task-B tokens beyond the
    # base (fault caught: adapter not applied), and its <copy> answers differ from the base's
    # (fault caught: forgetting measured with the adapter switched off)
    assert max(r.b_tok for r in lora) > before["b_tok"] + 0.1
    assert all(r.copy_outputs != r.copy_outputs_before for r in lora)
    for r in m["records"]:
        c = r.copy_outputs
        assert abs(c["copied"] + c["shifted"] + c["other"] - 1) < 1e-9
        # the end of the path is what the record reports (fault caught: a stale evaluation)
        assert r.b_tok == r.curve[-1]["b_tok"] and r.a_em_after == r.curve[-1]["a_em"]
    # the marker option trains exactly one more embedding row: C more numbers (a tied head
    # shares it). Fault caught: trainable_token_indices ignored by the study.
    on = next(r for r in m["records"] if r.method == "lora_r8_qv" and r.train_marker)
    off = next(r for r in m["records"] if r.method == "lora_r8_qv" and not r.train_marker)
    from minipeft.base import load_base

    width = load_base("quick", progress=False)[0].config.n_embd
    assert on.trainable - off.trainable == width
    # rehearsal rows were run for both methods at their chosen lr
    assert {(r.method, r.rehearsal) for r in m["records"]} >= {("full", 0.1), ("lora_r8_qv", 0.1)}
    # the verdict names the numbers it was chosen from, or says the question is unanswered
    assert "points" in m["verdict"] or "could not be tested" in m["verdict"]
    assert Path(m["figure"]).is_file()


def test_11_tradeoffs(lesson_out, shared_quick_cache, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE", str(shared_quick_cache))
    m = run_lesson("11_tradeoffs", "--quick", "--seed", "0")
    rows = {r["method"]: r for r in m["rows"]}
    assert rows["full"]["trainable %"] == pytest.approx(100.0)
    # full FT and LoRA ran two seeds (the noise); the seeds differ (fault caught: a seed that
    # changes nothing, which fakes zero noise). Compared on the loss, a continuous number: the
    # two seeds' token accuracies (on 64 examples) can tie by chance, and did.
    for name in ("full", "lora_r8_qv"):
        recs = [r for r in m["records"] if r.method == name]
        assert len(recs) == 2 and recs[0].b_loss != recs[1].b_loss
    for name, row in rows.items():
        recs = [r for r in m["records"] if r.method == name]
        assert row["peak step MB"] == pytest.approx(
            sum(r.memory["measured"]["peak_step"] for r in recs) / len(recs) / 2**20)
        # quality is scored with the method applied: better than the base on task-B tokens for
        # full FT and LoRA (fault caught: scoring the base instead of the adapted model)
        if name in ("full", "lora_r8_qv"):
            assert row["task B tok %"] > 100 * recs[0].curve[0]["b_tok"]
    # LoRA's descendants are rows too. QLoRA trains the same LoRA factors as lora_r8_qv (same
    # count), on a base kept in 4 bits: its resident weights + optimizer state are below LoRA's
    # (fault caught: a memory column that reads the step's peak, where QLoRA's dequantised
    # weights make it no cheaper; or a QLoRA row run on a float base)
    assert rows["qlora_r8_qv"]["trainable %"] == pytest.approx(rows["lora_r8_qv"]["trainable %"])
    assert rows["qlora_r8_qv"]["weights+opt MB"] < 0.9 * rows["lora_r8_qv"]["weights+opt MB"]
    assert "llama_adapter" in rows and not any(
        r.mergeable for r in m["records"] if r.method == "llama_adapter")
    assert any(line.startswith("Row 13") for line in m["verdicts"])
    assert not any("cost nothing" in line for line in m["verdicts"])
    assert Path(m["figure"]).is_file()


def test_05_lora(lesson_out, shared_quick_cache, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE", str(shared_quick_cache))
    m = run_lesson("05_lora", "--quick", "--seed", "0")
    # (a) the layer is the formula, costs the factored FLOPs, and computes no dW0
    maths = m["maths"]
    assert maths["by_hand_max_abs_diff"] < 1e-4 and maths["merged_form_max_abs_diff"] < 1e-4
    assert maths["flops_counted"] == maths["flops_factored"] < maths["flops_full"]
    assert maths["weight_grad_matmuls"] == 2
    # (b) B = 0 at init, so step 0 is the base model exactly
    assert maths["B_zero_at_init"] and maths["step0_max_abs_diff"] == 0.0
    # (c) formula == calculator == the model's own count, for every rank and target set
    assert all(c["formula"] == c["calculator"] == c["model"] for c in m["counts"])
    # (d) every run lowered the held-out loss; LoRA keeps far less gradient + optimizer state
    runs = m["runs"]
    for row in list(runs.values()) + list(m["alpha"].values()) + list(m["targets"].values()):
        assert row["loss"] < m["before"]["loss"], row["label"]
    for r in (1, 4, 16):
        assert runs[f"r={r}"]["grad_opt_mib"] < runs["full"]["grad_opt_mib"]
        assert runs[f"r={r}"]["trainable"] < runs["full"]["trainable"]
    # (e) rank(s B A) <= r for every trained adapted matrix
    assert m["ranks"]["rank_bound_held"]
    for per in m["ranks"]["per_matrix"].values():
        assert all(v <= r for r, v in per["lora"].items())
    # (f) with Adam, a larger s = alpha/r moves ΔW further in the same steps
    norms = [row["delta_norm"] for row in m["alpha"].values()]
    assert norms == sorted(norms)
    # (row 13) every LoRA run answers more tokens right than the base (fault caught: the adapter
    # not applied, or B frozen at 0); the seeds really vary the run (fault caught: a seed that
    # is ignored measures zero noise and makes any verdict look certain)
    for row in runs.values():
        assert row["token_acc"] > m["before"]["token_acc"], row["label"]
    for accs in m["seed_token_acc"].values():
        assert len(accs) == 2 and accs[0] != accs[1]
    assert {c["verdict"] for c in m["comparable"].values()} <= {
        "comparable", "not comparable", "undecided"}
    fig = Path(m["figure"])
    assert fig.parent == lesson_out and fig.is_file() and fig.stat().st_size > 10_000


def test_06_lora_task_switching(lesson_out, shared_quick_cache, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE", str(shared_quick_cache))
    m = run_lesson("06_lora_task_switching", "--quick", "--seed", "0")
    a, b = m["chosen"]
    assert a != b and {a, b} <= set(m["candidates"])
    # (b) SEED-NOTES row 4: each adapter is a small fraction of the base model on disk
    sizes = m["sizes"]
    for n in (a, b):
        assert (Path(m["adapter_folder"]) / n / "adapter_model.safetensors").is_file()
        assert sizes[n] < 0.2 * sizes["base"]
    # (c) reloaded into one fresh base, both adapters reproduce the trained model exactly
    assert all(v == 0.0 for v in m["reload_max_abs_diff"].values())
    # (d) the best-learnt task is best served by its own adapter
    acc = m["accuracy"][a]
    assert acc[a] > acc[b] and acc[a] > acc["None"]
    # (e) merged == unmerged within round-off; unmerge restores W0; no reload
    for r in m["merge"].values():
        assert r["max_abs_diff"] < 1e-3 and r["drift_after_unmerge"] < 1e-5
    assert m["same_parameters"] and m["drift_after_cycles"] < 1e-4
    # (f) a mixed batch equals each row alone, logits and generated tokens
    assert m["mixed_max_abs_diff"] < 1e-4 and m["mixed_same_predictions"]
    assert m["mixed_generation_identical"]
    # (g) merged generation: the same tokens as unmerged, at exactly the base's FLOPs
    flops = m["gen_flops"]
    assert m["merged_same_tokens"] and flops["merged"] == flops["base"] < flops["unmerged"]
    fig = Path(m["figure"])
    assert fig.parent == lesson_out and fig.is_file() and fig.stat().st_size > 10_000


def test_07_adapters(lesson_out, shared_quick_cache, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE", str(shared_quick_cache))
    m = run_lesson("07_adapters", "--quick", "--seed", "0")
    # (a) every adapter placement is matched to LoRA's trainable count; IA3 is far smaller
    counts = m["counts"]
    for name in ("houlsby", "pfeiffer", "parallel"):
        assert abs(counts[name] / counts["lora"] - 1) < 0.05
    assert counts["ia3"] < 0.2 * counts["lora"]
    # (b) zero up-projection, B = 0, unit IA3 vectors: step 0 is exactly the base model
    assert all(d == 0.0 for d in m["step0_diff"].values())
    # row 7, read off the models: Houlsby after attention and the MLP, Pfeiffer on the block's
    # output (fault caught: a placement that wraps the wrong sublayer, or none)
    assert m["wraps"]["houlsby"] == ["attn.o_proj", "mlp.fc_out"]
    assert m["wraps"]["pfeiffer"] == ["the block"] and m["row7_held"]
    # (c) every method lowered the held-out loss; gradients + optimizer state are small next
    #     to the activations (SEED-NOTES row 10 seen from the adapter side)
    for r in m["runs"].values():
        assert r["final"]["loss"] < r["before"]["loss"]
    for mem in m["memory"].values():
        assert mem["grad_opt_mib"] < mem["act_mib"] and mem["step_ms"] > 0
    # (d) merged LoRA (wrapper or plain GPT) reproduces the unmerged model; every model timed
    assert m["merge_diff"] < 1e-4 and m["plain_diff"] < 1e-4
    assert {"base", "lora merged, plain GPT", "lora unmerged", "houlsby"} <= set(m["latency_ms"])
    assert all(v > 0 for v in m["latency_ms"].values())
    flops = m["gen_flops"]          # merged: exactly the base's matmuls; adapters: always more
    assert flops["lora merged"] == flops["lora merged, plain GPT"] == flops["base"]
    assert all(flops[n] > flops["base"] for n in ("houlsby", "pfeiffer", "parallel"))
    assert flops["lora unmerged"] > flops["base"]
    assert 0 < m["adapter_bytes"]["ia3"] < m["adapter_bytes"]["lora"]
    fig = Path(m["figure"])
    assert fig.parent == lesson_out and fig.is_file() and fig.stat().st_size > 10_000


def test_08a_prompt_tuning(lesson_out, shared_quick_cache, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE", str(shared_quick_cache))
    m = run_lesson("08a_prompt_tuning", "--quick", "--seed", "0")
    rows = m["rows"]
    # (a) a prompt of n virtual tokens trains n x C numbers; the model is otherwise frozen
    # (fault caught: a prompt config whose length is ignored, or a base left trainable)
    C = rows["vocab n=1"]["trainable"]
    assert rows["vocab n=4"]["trainable"] == 4 * C and rows["vocab n=16"]["trainable"] == 16 * C
    assert len(m["per_position"]) > 0 and all(0 <= a <= 1 for a in m["per_position"])
    # (b) collapsing the prefix MLP changes no output and keeps only the table
    c = m["collapse"]
    assert c["max_logit_diff"] == 0.0 and c["same_tokens"]
    assert c["kept"] < c["trained"] and c["bytes_table"] < c["bytes_mlp"]
    # (c) retraining the embeddings learns the new marker (better than before training)
    assert rows["embedding-only"]["token_acc"] > m["before_tok"]
    # the match threshold is measured on the embedding: a symbol's nearest other symbol, in (0, 1]
    assert 0 < m["task_threshold"] <= 1
    fig = Path(m["figure"])
    assert fig.parent == lesson_out and fig.is_file() and fig.stat().st_size > 10_000


def test_08b_prompt_cost(lesson_out, shared_quick_cache, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE", str(shared_quick_cache))
    m = run_lesson("08b_prompt_cost", "--quick", "--seed", "0")
    # (d) every model timed; the extra positions are counted (fault caught: a prompt that is
    # not prepended in the forward, or a prefix that runs through the layers like a prompt)
    assert all(v > 0 for v in m["forward_ms"].values()) and 0 <= m["noise"]
    f = m["forward_flops"]          # counted: more positions, more matmul work
    assert f["base"] == f["base (again)"] == f["embedding-only"]
    assert f["base"] < f["prompt n=1"] < f["prompt n=4"] < f["prompt n=16"]
    assert f["base"] < f["prefix n=4"] < f["prompt n=4"]
    fig = Path(m["figure"])
    assert fig.parent == lesson_out and fig.is_file() and fig.stat().st_size > 10_000


def test_08c_reading_prompts(lesson_out):
    m = run_lesson("08c_reading_prompts", "--quick", "--seed", "0")
    # (e) the language prompt: loss fell; random-init vectors match no word; a vocab init
    #     starts exactly at a word; purities and the chance level are proper fractions
    lang = m["language"]
    for r in lang["runs"]:
        assert sum(r["loss"][-5:]) < sum(r["loss"][:5])
        assert 0 <= r["learned"]["purity"] <= 1 and 0 <= r["after"]["mention"] <= 1
        if r["init"] == "random":
            assert r["learned"]["max_cos"] < 0.99
            # the trained vectors are read, not the init (fault caught: reading P before training)
            assert r["learned"]["max_cos"] != r["initial"]["max_cos"]
        else:
            assert r["initial"]["max_cos"] > 0.999
    assert len(lang["chance"]["purities"]) == 5 and 0 < lang["chance"]["mean"] <= 1
    # the match threshold is measured on the embedding: a word's nearest other word, in (0, 1]
    assert 0 < lang["chance"]["match"] <= 1
    assert m["none_match"] == {i: max(s["max_cos"]) < lang["chance"]["match"]
                               for i, s in m["summary"].items()}
    fig = Path(m["figure"])
    assert fig.parent == lesson_out and fig.is_file() and fig.stat().st_size > 10_000
