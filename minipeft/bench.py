"""How fast is a hand-written engine? ``python -m minipeft.bench`` measures it, in one run.

1. The machine's own float32 matmul peak (GFLOP/s), at the shapes the model multiplies.
2. Training steps (forward + backward + AdamW; median of several after warm-up) for configs S
   and M and the methods full FT, LoRA r=8 on q/v, prompt tuning (16 virtual tokens), Houlsby
   adapters and BitFit: step ms, tokens/s, model FLOP/s (the FLOPs of the matmuls actually
   executed, counted by the ops themselves) as a fraction of the peak, and the peak memory of
   training (weights, gradients, optimizer state and activations together).
3. Inference: KV-cached generation of 128 tokens with the base model vs the merged LoRA model.

Timings are ratios within one run: the machines are shared and noisy, so compare rows, not runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from dataclasses import dataclass

from minipeft import backend as bk
from minipeft.autograd import counters
from minipeft.checks import check_int, check_output_file
from minipeft.io import atomic_write_bytes
from minipeft.nn import GPT, GPTConfig, generate
from minipeft.optim import AdamW


@dataclass(frozen=True)
class BenchConfig:
    name: str
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    block_size: int
    batch_size: int

    def gpt(self) -> GPTConfig:
        return GPTConfig(vocab_size=self.vocab_size, block_size=self.block_size,
                         n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd)


CONFIGS = {
    "S": BenchConfig("S", 512, 128, 4, 4, 128, 16),
    "M": BenchConfig("M", 2048, 256, 6, 8, 256, 8),
    "XS": BenchConfig("XS", 64, 32, 2, 2, 32, 8),  # --quick
    "L": BenchConfig("L", 2048, 1024, 12, 16, 1024, 8),  # a GPU's size (scripts/gpu_check.sh)
}
PROMPT_TOKENS = 16


def method_configs() -> dict:
    """The PEFT configs the bench compares (None = full fine-tuning)."""
    from minipeft.peft import AdapterConfig, LoraConfig, PromptTuningConfig, bitfit

    return {
        "full": None,
        "lora_r8_qv": LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")),
        "prompt16": PromptTuningConfig(num_virtual_tokens=PROMPT_TOKENS),
        "houlsby": AdapterConfig(placement="houlsby", reduction_factor=16),
        "bitfit": bitfit(),
    }


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        bk.synchronize()
        t = time.perf_counter()
        fn()
        bk.synchronize()
        out.append(time.perf_counter() - t)
    return out


def matmul_peak(cfg: BenchConfig, repeats: int = 9) -> float:
    """Best float32 GFLOP/s over the model's matmul shapes (N = batch * tokens), each shape
    timed by its fastest repeat: a peak is what the machine can do, and other load on a shared
    machine only ever slows a repeat down."""
    xp = bk.xp
    rng = bk.host_rng(0)
    N, C = cfg.batch_size * cfg.block_size, cfg.n_embd
    best = 0.0
    for m, k, n in [(N, C, C), (N, C, 4 * C), (N, 4 * C, C), (N, C, cfg.vocab_size)]:
        a = bk.asarray(rng.standard_normal((m, k)), dtype=bk.np.float32)
        b = bk.asarray(rng.standard_normal((k, n)), dtype=bk.np.float32)
        xp.matmul(a, b)
        t = min(_timed(lambda a=a, b=b: xp.matmul(a, b), repeats))
        best = max(best, 2 * m * k * n / t / 1e9)
    return best


def build(cfg: BenchConfig, method: str, peft_cfg):
    from minipeft.peft import get_peft_model

    model = GPT(cfg.gpt(), seed=0)
    if peft_cfg is None:
        return model, cfg.block_size
    peft = get_peft_model(model, peft_cfg)
    real_tokens = cfg.block_size - (PROMPT_TOKENS if method.startswith("prompt") else 0)
    return peft, real_tokens


def training_setup(cfg: BenchConfig, method: str, peft_cfg):
    """A model of ``cfg`` with ``method``, its AdamW and one fixed batch: (model, opt, x, y)."""
    model, T = build(cfg, method, peft_cfg)
    rng = bk.host_rng(1)
    x = bk.asarray(rng.integers(0, cfg.vocab_size, (cfg.batch_size, T)))
    y = bk.asarray(rng.integers(0, cfg.vocab_size, (cfg.batch_size, T)))
    return model, AdamW(model.trainable_parameters(), lr=1e-4), x, y


def make_step(cfg: BenchConfig, method: str, peft_cfg):
    """A closure doing one training step (zero_grad, forward, backward, AdamW) on
    ``training_setup``'s model and batch. Returns (step, model, tokens per step)."""
    model, opt, x, y = training_setup(cfg, method, peft_cfg)

    def step():
        opt.zero_grad()
        model.loss(x, y).backward()
        opt.step()
    return step, model, x.size


def bench_steps(cfg: BenchConfig, methods: dict, steps: int, peak: float) -> list[dict]:
    """Time every method's training step on ``cfg``, the methods taking turns step by step
    (a shared machine's speed drifts over a run; taking turns makes the drift hit all alike)."""
    built = {m: make_step(cfg, m, c) for m, c in methods.items()}
    flops = {}
    for m, (step, _, _) in built.items():
        step()                                     # warm-up; AdamW creates its state
        counters.clear()
        step()
        flops[m] = counters["matmul_flops"]        # the matmuls this method really executed
    times = {m: [] for m in built}
    for _ in range(steps):
        for m, (step, _, _) in built.items():
            times[m] += _timed(step, 1)
    rows = []
    for m, (_, model, tokens) in built.items():
        ms = statistics.median(times[m]) * 1e3
        trainable, total = model.num_parameters(trainable_only=True), model.num_parameters()
        rows.append({"config": cfg.name, "method": m, "step_ms": ms,
                     "tokens_per_s": tokens / (ms / 1e3), "tokens_per_step": tokens,
                     "gflop_per_step": flops[m] / 1e9, "gflops": flops[m] / (ms / 1e3) / 1e9,
                     "fraction_of_peak": flops[m] / (ms / 1e3) / 1e9 / peak,
                     "peak_train_mb": training_peak_bytes(cfg, m, methods[m]) / 2**20,
                     "trainable": trainable, "trainable_pct": 100 * trainable / total})
    return rows


def profile_step(cfg: BenchConfig, method: str, peft_cfg, steps: int = 5) -> dict:
    """Where one training step's time goes, per kind of op: {op: [forward ms, backward ms]}
    (medians over ``steps`` steps) plus ``"optimizer"`` and ``"step"`` (the whole step).

    Each op's backward is timed around its closure. An op's forward is the time since the
    previous op was made: its own array work plus the Python between the two ops (so reading
    "linear 200 ms forward" means the linear layers and the code that calls them)."""
    from minipeft.autograd.tensor import Tensor

    model, opt, x, y = training_setup(cfg, method, peft_cfg)
    for _ in range(2):                                 # warm-up; AdamW creates its state
        opt.zero_grad()
        model.loss(x, y).backward()
        opt.step()
    make = Tensor._make
    runs, last = [], [0.0]

    def timed_make(data, parents, backward, op, saved=(), workspace=None):
        now = time.perf_counter()
        fwd, bwd = runs[-1]
        fwd[op] = fwd.get(op, 0.0) + now - last[0]

        def timed_backward(g):
            t = time.perf_counter()
            out = backward(g)
            bwd[op] = bwd.get(op, 0.0) + time.perf_counter() - t
            return out
        out = make(data, parents, timed_backward, op, saved, workspace)
        last[0] = time.perf_counter()
        return out

    Tensor._make = staticmethod(timed_make)
    try:
        totals, optimizer = [], []
        for _ in range(steps):
            runs.append(({}, {}))
            bk.synchronize()
            start = last[0] = time.perf_counter()
            opt.zero_grad()
            model.loss(x, y).backward()
            bk.synchronize()
            t = time.perf_counter()
            opt.step()
            bk.synchronize()
            optimizer.append(time.perf_counter() - t)
            totals.append(time.perf_counter() - start)
    finally:
        Tensor._make = make
    ops = sorted({op for fwd, bwd in runs for op in fwd | bwd})
    out = {op: [statistics.median(r[i].get(op, 0.0) for r in runs) * 1e3 for i in (0, 1)]
           for op in ops}
    out["optimizer"] = [statistics.median(optimizer) * 1e3, 0.0]
    out["step"] = [statistics.median(totals) * 1e3, 0.0]
    return out


def profile_table(cfg: BenchConfig, method: str, prof: dict) -> str:
    step = prof["step"][0]
    rows = sorted(((op, f, b) for op, (f, b) in prof.items() if op != "step"),
                  key=lambda r: -(r[1] + r[2]))
    lines = [f"profile of one {cfg.name} {method} step: {step:.0f} ms",
             "| op | forward ms | backward ms | share |", "|---|---|---|---|"]
    lines += [f"| {op} | {f:.1f} | {b:.1f} | {100 * (f + b) / step:.0f}% |" for op, f, b in rows]
    return "\n".join(lines)


def training_peak_bytes(cfg: BenchConfig, method: str, peft_cfg) -> int:
    """Peak bytes held while training: weights, gradients, optimizer state and activations,
    all of them. Traced from before the model exists through two steps (the first creates
    AdamW's m and v), so memory that persists between steps counts too (tracemalloc on NumPy,
    the CuPy pool's high-water mark on a GPU)."""
    if bk.name == "cupy":
        pool = bk.xp.get_default_memory_pool()
        bk.synchronize()
        pool.free_all_blocks()
        base = pool.total_bytes()
        step, _, _ = make_step(cfg, method, peft_cfg)
        step()
        step()
        bk.synchronize()
        return max(pool.total_bytes() - base, 0)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        step, _, _ = make_step(cfg, method, peft_cfg)
        step()
        step()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def bench_generation(cfg: BenchConfig, new_tokens: int, repeats: int) -> dict:
    """KV-cached generation time: base model vs merged LoRA (same weights' shapes, no extra
    work once merged) vs unmerged LoRA (two extra small products per target)."""
    from minipeft.peft import LoraConfig, get_peft_model

    prompt = bk.asarray(bk.host_rng(2).integers(0, cfg.vocab_size, (1, 8)))
    new_tokens = min(new_tokens, cfg.block_size - 8)
    base = GPT(cfg.gpt(), seed=0)
    lora = get_peft_model(GPT(cfg.gpt(), seed=0), LoraConfig(r=8, target_modules=("q_proj",
                                                                                  "v_proj")))
    run = {
        "base": lambda: generate(base, prompt, new_tokens),
        "lora_unmerged": lambda: generate(lora, prompt, new_tokens),
    }
    times = {k: [] for k in ("base", "lora_unmerged", "lora_merged")}
    for _ in range(repeats):  # interleaved, so drift in machine load hits all three alike
        lora.unmerge()
        times["lora_unmerged"] += _timed(run["lora_unmerged"], 1)
        lora.merge()
        times["lora_merged"] += _timed(run["lora_unmerged"], 1)
        times["base"] += _timed(run["base"], 1)
    lora.unmerge()
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"config": cfg.name, "new_tokens": new_tokens, **{f"{k}_ms": v for k, v in med.items()},
            "merged_over_base": med["lora_merged"] / med["base"],
            "unmerged_over_base": med["lora_unmerged"] / med["base"]}


def run(configs=("S", "M"), methods=None, steps: int = 10, gen_tokens: int = 128,
        gen_repeats: int = 5, out=sys.stdout) -> dict:
    all_methods = method_configs()
    methods = list(all_methods) if methods is None else list(methods)
    unknown = [m for m in methods if m not in all_methods]
    if unknown:
        raise ValueError(f"bench: unknown methods {unknown}; choose from {list(all_methods)}")
    from minipeft import parallel

    report = {"backend": bk.name, "threads": parallel.threads(), "peaks_gflops": {}, "steps": [],
              "generation": []}
    print(f"backend {bk.name}, {report['threads']} thread(s) (MINIPEFT_THREADS)", file=out)
    for name in configs:
        cfg = CONFIGS[name]
        peak = matmul_peak(cfg)
        report["peaks_gflops"][name] = peak
        print(f"[{name}] float32 matmul peak at the model's shapes: {peak:.1f} GFLOP/s", file=out)
        for row in bench_steps(cfg, {m: all_methods[m] for m in methods}, steps, peak):
            m = row["method"]
            report["steps"].append(row)
            print(f"  {m:<11} {row['step_ms']:8.1f} ms/step  {row['tokens_per_s']:9.0f} tok/s  "
                  f"{row['gflops']:6.1f} GFLOP/s ({row['fraction_of_peak']:.0%} of peak)  "
                  f"peak training mem {row['peak_train_mb']:7.1f} MB", file=out, flush=True)
        gen = bench_generation(cfg, gen_tokens, gen_repeats)
        report["generation"].append(gen)
        print(f"  generate {gen['new_tokens']} tokens (KV cache): base {gen['base_ms']:.1f} ms, "
              f"merged LoRA {gen['lora_merged_ms']:.1f} ms ({gen['merged_over_base']:.2f}x), "
              f"unmerged {gen['lora_unmerged_ms']:.1f} ms ({gen['unmerged_over_base']:.2f}x)",
              file=out, flush=True)
    full = {r["config"]: r["step_ms"] for r in report["steps"] if r["method"] == "full"}
    for r in report["steps"]:
        r["step_vs_full"] = r["step_ms"] / full[r["config"]] if r["config"] in full else None
    print(summary_table(report), file=out)
    return report


def summary_table(report: dict) -> str:
    lines = ["| config | method | trainable % | ms/step | x full | tokens/s | GFLOP/s | % peak "
             "| peak train MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["steps"]:
        vs = f"{r['step_vs_full']:.2f}" if r.get("step_vs_full") else "-"
        lines.append(f"| {r['config']} | {r['method']} | {r['trainable_pct']:.2f} | "
                     f"{r['step_ms']:.1f} | {vs} | {r['tokens_per_s']:.0f} | {r['gflops']:.1f} | "
                     f"{100 * r['fraction_of_peak']:.0f} | {r['peak_train_mb']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m minipeft.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny config, a few seconds")
    ap.add_argument("--configs", default="S,M", help="comma-separated: S, M, L (L is a GPU's "
                    "size; default S,M)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row (median)")
    ap.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    ap.add_argument("--profile", metavar="METHOD", help="instead of the table: where one step "
                    "of METHOD (e.g. full) goes, per kind of op, for each config")
    args = ap.parse_args(argv)
    configs = ["XS"] if args.quick else args.configs.split(",")
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"--configs: unknown config {c!r}; choose from S, M, L")
    try:            # every argument and the file it will write, before any measuring
        if args.json is not None:
            check_output_file("--json", args.json)
        check_int("--steps", args.steps, low=1)
        if args.methods is not None:
            unknown = [m for m in args.methods.split(",") if m not in method_configs()]
            if unknown:
                raise ValueError(f"--methods: unknown {unknown}; choose from "
                                 f"{', '.join(method_configs())}")
        if args.profile is not None and args.profile not in method_configs():
            raise ValueError(f"--profile: unknown method {args.profile!r}; choose from "
                             f"{', '.join(method_configs())}")
    except (ValueError, TypeError) as exc:
        ap.error(str(exc))
    if args.profile is not None:
        report = {"backend": bk.name, "profiles": {}}
        for c in configs:
            prof = profile_step(CONFIGS[c], args.profile, method_configs()[args.profile],
                                steps=3 if args.quick else args.steps)
            report["profiles"][c] = prof
            print(profile_table(CONFIGS[c], args.profile, prof), flush=True)
        if args.json:
            atomic_write_bytes(args.json, json.dumps(report, indent=2).encode())
            print(f"wrote {args.json}")
        return report
    report = run(configs, args.methods.split(",") if args.methods else None,
                 steps=3 if args.quick else args.steps, gen_tokens=16 if args.quick else 128,
                 gen_repeats=2 if args.quick else 9)
    if args.json:
        atomic_write_bytes(args.json, json.dumps(report, indent=2).encode())
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
