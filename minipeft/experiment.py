"""The study: one base model, one new task B, every method, measured side by side.

For each method and seed, starting from the same pretrained base (which knows task A):
  1. parameter efficiency  -- trainable count and %, adapter bytes on disk;
  2. memory efficiency     -- measured peak of one training step, with its breakdown;
  3. training speed        -- step time (the fastest of several) and tokens/s;
  4. model quality         -- task-B exact match and loss, with the learning curve;
  5. inference cost        -- ms per generated token (KV cache), merged where mergeable;
  and forgetting           -- task-A exact match before minus after, on held-out examples,
                              with the adapter active (merged where it can be).

Honest design: each method gets its own learning rate (from a small sweep, or the defaults
below, which came from one), every method sees the same number of training tokens, and
forgetting is also read at *matched task-B quality* (the first evaluation at which task B reaches
``match_em``), since a method that learns nothing forgets nothing.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from minipeft import backend as bk
from minipeft.data import TaskMixture
from minipeft.nn import GPT, generate
from minipeft.train import TrainConfig, evaluate_lm, train


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str      # selective / reparameterisation / additive
    lr: float        # default learning rate (per method: PEFT usually needs 10-100x full FT's)
    build: object    # () -> PeftConfig


def method_specs() -> dict[str, MethodSpec]:
    """Every method of the study, by name.

    The learning rates were chosen by trying 3e-3 to 1e-1 on the default base with task B =
    shift for 200 steps, keeping the lowest task-B loss (IA3: 98% exact match at 1e-1, 3% at
    3e-2). Adapters, the last block alone, BitFit, LoRA r=1 and soft prompts learnt little of
    shift at any of those rates. ``StudyConfig(lr_sweep=...)`` sweeps again for another base or
    task.
    """
    from minipeft import peft as P

    specs = [
        MethodSpec("full", "selective", 1e-3, P.full_finetuning),
        MethodSpec("last1", "selective", 1e-2, lambda: P.last_blocks(1)),
        MethodSpec("bitfit", "selective", 1e-2, P.bitfit),
        MethodSpec("mask10", "selective", 1e-3,
                   lambda: P.SelectiveConfig(mask="magnitude", mask_fraction=0.1,
                                             label="mask10")),
        MethodSpec("lora_r1_qv", "reparameterisation", 1e-2,
                   lambda: P.LoraConfig(r=1, alpha=2)),
        MethodSpec("lora_r8_qv", "reparameterisation", 1e-2,
                   lambda: P.LoraConfig(r=8, alpha=16)),
        MethodSpec("lora_r8_all", "reparameterisation", 1e-2,
                   lambda: P.LoraConfig(r=8, alpha=16, target_modules=(
                       "q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out"))),
        MethodSpec("houlsby", "additive", 1e-2, lambda: P.AdapterConfig(placement="houlsby",
                                                                         bottleneck=16)),
        MethodSpec("pfeiffer", "additive", 1e-2, lambda: P.AdapterConfig(placement="pfeiffer",
                                                                          bottleneck=16)),
        MethodSpec("prompt16", "additive", 3e-2,
                   lambda: P.PromptTuningConfig(num_virtual_tokens=16, init="vocab")),
        MethodSpec("prefix8", "additive", 1e-2,
                   lambda: P.PrefixTuningConfig(num_virtual_tokens=8)),
        MethodSpec("ia3", "additive", 1e-1, P.IA3Config),
    ]
    return {s.name: s for s in specs}


@dataclass
class StudyConfig:
    base: str = "default"            # which cached base model (see minipeft.base)
    task_b: str = "shift"            # the new task (see minipeft.data.tasks)
    methods: tuple = tuple(method_specs())
    seeds: tuple = (0,)
    steps: int = 400                 # same token budget for every method
    batch_size: int = 64
    eval_every: int = 50             # learning-curve resolution
    eval_examples: int = 300         # held-out examples per task per evaluation
    match_em: float = 0.5            # task-B accuracy at which forgetting is compared
    lr_sweep: tuple = ()             # multipliers of each method's default lr, e.g. (0.3, 1, 3)
    sweep_steps: int = 100
    gen_tokens: int = 16
    progress: bool = True


@dataclass
class RunRecord:
    """Everything measured for one (method, seed)."""
    method: str
    family: str
    seed: int
    lr: float
    trainable: int
    total: int
    adapter_bytes: int
    memory: dict
    step_ms: float
    tokens_per_s: float
    b_em: float
    b_loss: float
    a_em_before: float
    a_em_after: float
    a_loss_before: float
    a_loss_after: float
    gen_ms_per_token: float
    gen_ms_per_token_unmerged: float | None
    extra_prompt_len: int
    mergeable: bool
    curve: list = field(default_factory=list)   # [{"step", "b_em", "a_em", ...}]
    a_em_at_match: float | None = None          # task-A accuracy when B first reached match_em
    step_at_match: int | None = None

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / self.total

    @property
    def forgetting(self) -> float:
        """Drop in held-out task-A exact match (before minus after)."""
        return self.a_em_before - self.a_em_after


def score(model, x, y, ignore_index: int = -100, predictions: bool = False) -> dict:
    """Held-out quality of ``model`` on (x, y): loss (nats per answer token), answer-token
    accuracy (share of answer tokens predicted right: sees partial learning) and exact match
    (every answer token right: equals greedy decoding). ``predictions=True`` adds the argmax
    ids (n, T) on the host, for reading *what* the model answers."""
    from minipeft.autograd import functional as F
    from minipeft.autograd import no_grad

    was_training = getattr(model, "training", False)
    model.eval()
    total, tokens, right, rows_ok, preds = 0.0, 0, 0, 0, []
    with no_grad():
        for i in range(0, len(x), 256):
            xb, yb = bk.asarray(x[i:i + 256]), bk.asarray(y[i:i + 256])   # (b, T) each
            logits = model(xb)                                            # (b, T, V)
            counted = yb != ignore_index
            n = int(counted.sum())
            total += F.cross_entropy(logits, yb, ignore_index).item() * n
            tokens += n
            pred = logits.data.argmax(axis=-1)                            # (b, T)
            right += int(((pred == yb) & counted).sum())
            rows_ok += int(((pred == yb) | ~counted).all(axis=1).sum())
            if predictions:
                preds.append(bk.to_numpy(pred))
    if was_training:
        model.train()
    out = {"loss": total / max(tokens, 1), "token_acc": right / max(tokens, 1),
           "exact_match": rows_ok / max(len(x), 1)}
    if predictions:
        out["pred"] = bk.np.concatenate(preds)
    return out


def _task_a_em(model, mix_a, tasks_a, n) -> tuple[float, float]:
    scores = [evaluate_lm(model, *mix_a.eval_set(t, n)) for t in tasks_a]
    return (statistics.mean(s["exact_match"] for s in scores),
            statistics.mean(s["loss"] for s in scores))


def run_one(spec: MethodSpec, base_state: dict, base_cfg, tasks_a, study: StudyConfig,
            seed: int, lr: float, length: int = 8) -> RunRecord:
    """Fine-tune a fresh copy of the base with one method and measure everything."""
    from minipeft.memory import measure_step
    from minipeft.peft import get_peft_model

    base = GPT(base_cfg)
    base.load_state_dict(base_state)
    mix_a = TaskMixture(list(tasks_a), seed=seed, length=length)
    mix_b = TaskMixture([study.task_b], seed=1000 + seed, length=length)
    xb_eval, yb_eval = mix_b.eval_set(study.task_b, study.eval_examples)
    a_em_before, a_loss_before = _task_a_em(base, mix_a, tasks_a, study.eval_examples)

    config = spec.build()
    model = get_peft_model(base, config, seed=seed)
    merge = getattr(config, "mergeable", False)

    def evaluate(m):
        b = evaluate_lm(m, xb_eval, yb_eval)
        if merge:
            m.merge()
        a_em, a_loss = _task_a_em(m, mix_a, tasks_a, study.eval_examples)
        if merge:
            m.unmerge()
        return {"b_em": b["exact_match"], "b_loss": b["loss"], "a_em": a_em, "a_loss": a_loss}

    cfg = TrainConfig(steps=study.steps, batch_size=study.batch_size, lr=lr,
                      eval_every=study.eval_every, progress=study.progress,
                      desc=f"{spec.name} seed {seed}")
    result = train(model, mix_b.sample, cfg, evaluate=evaluate)
    curve = [{"step": 0, "b_em": None, "a_em": a_em_before}] + result.evals
    final = result.evals[-1]

    # speed and memory: measured on one more batch, after training (same shapes)
    x, y = mix_b.sample(study.batch_size)
    mem = measure_step(model, bk.asarray(x), bk.asarray(y))
    step_ms = _step_ms(model, x, y)

    with tempfile.TemporaryDirectory() as tmp:
        adapter_bytes = model.save_adapter(Path(tmp) / "adapter")

    gen_unmerged = _gen_ms_per_token(model, xb_eval, study.gen_tokens) if merge else None
    if merge:
        model.merge()
    gen = _gen_ms_per_token(model, xb_eval, study.gen_tokens)

    record = RunRecord(
        method=spec.name, family=spec.family, seed=seed, lr=lr,
        trainable=model.num_parameters(trainable_only=True), total=model.num_parameters(),
        adapter_bytes=adapter_bytes, memory=mem.as_dict(), step_ms=step_ms,
        tokens_per_s=x.size / (step_ms / 1e3), b_em=final["b_em"], b_loss=final["b_loss"],
        a_em_before=a_em_before, a_em_after=final["a_em"], a_loss_before=a_loss_before,
        a_loss_after=final["a_loss"], gen_ms_per_token=gen,
        gen_ms_per_token_unmerged=gen_unmerged,
        extra_prompt_len=getattr(config, "num_virtual_tokens", 0), mergeable=merge, curve=curve)
    for point in result.evals:
        if point["b_em"] >= study.match_em:
            record.a_em_at_match, record.step_at_match = point["a_em"], point["step"]
            break
    return record


def _step_ms(model, x, y, steps: int = 7) -> float:
    """Time of one training step: the fastest of ``steps`` after a warm-up. The fastest, not the
    median: on a shared machine other load only ever adds time, and methods are timed one after
    another, so the minimum is the fairest comparison between them."""
    from minipeft.optim import AdamW

    opt = AdamW(model.trainable_parameters(), lr=1e-12)  # tiny lr: time it, change nothing much
    x, y = bk.asarray(x), bk.asarray(y)
    times = []
    for _ in range(steps + 1):
        bk.synchronize()
        t = time.perf_counter()
        opt.zero_grad()
        model.loss(x, y).backward()
        opt.step()
        bk.synchronize()
        times.append(time.perf_counter() - t)
    model.zero_grad()
    return min(times[1:]) * 1e3


def _gen_ms_per_token(model, x_eval, new_tokens: int, repeats: int = 5) -> float:
    """KV-cached greedy generation, ms per new token: the fastest of ``repeats`` runs."""
    prompt = bk.asarray(x_eval[:1, :4])
    generate(model, prompt, 2)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        generate(model, prompt, new_tokens)
        bk.synchronize()
        best = min(best, time.perf_counter() - t)
    return best * 1e3 / new_tokens


def sweep_lr(spec: MethodSpec, base_state, base_cfg, study: StudyConfig, length: int) -> float:
    """Pick the lr multiplier with the lowest task-B eval loss after ``sweep_steps`` steps."""
    from minipeft.peft import get_peft_model

    mix_b = TaskMixture([study.task_b], seed=999, length=length)
    xb, yb = mix_b.eval_set(study.task_b, study.eval_examples)
    best = (float("inf"), spec.lr)
    for mult in study.lr_sweep:
        base = GPT(base_cfg)
        base.load_state_dict(base_state)
        model = get_peft_model(base, spec.build())
        cfg = TrainConfig(steps=study.sweep_steps, batch_size=study.batch_size,
                          lr=spec.lr * mult, progress=False)
        try:
            train(model, mix_b.sample, cfg)
            loss = evaluate_lm(model, xb, yb)["loss"]
        except FloatingPointError:
            loss = float("inf")
        best = min(best, (loss, spec.lr * mult))
    return best[1]


def run_study(study: StudyConfig, log=print) -> list[RunRecord]:
    """Run every (method, seed) of ``study`` from one cached base; returns the records."""
    from minipeft.base import load_base

    specs = method_specs()
    unknown = [m for m in study.methods if m not in specs]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(specs)}")
    base, info = load_base(study.base, progress=study.progress)
    tasks_a, length = tuple(info["tasks"]), info["length"]
    if study.task_b in tasks_a:
        raise ValueError(f"task_b={study.task_b!r} is one of the base's pretraining tasks "
                         f"{tasks_a}; choose a new task")
    state = {k: v.copy() for k, v in base.state_dict().items()}
    records = []
    for name in study.methods:
        spec = specs[name]
        lr = sweep_lr(spec, state, base.config, study, length) if study.lr_sweep else spec.lr
        for seed in study.seeds:
            t = time.perf_counter()
            rec = run_one(spec, state, base.config, tasks_a, study, seed, lr, length)
            records.append(rec)
            log(f"{name:<12} seed {seed}: task B {rec.b_em:6.1%}  task A {rec.a_em_before:6.1%}"
                f" -> {rec.a_em_after:6.1%}  trainable {rec.trainable_pct:7.3f}%  "
                f"lr {lr:.0e}  ({time.perf_counter() - t:.0f} s)")
    return records
