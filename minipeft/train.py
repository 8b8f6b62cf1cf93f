"""The one training loop, shared by the lessons, the CLI and the experiment runner.

It knows nothing about GPT or PEFT: it needs a model with ``loss(x, y)`` and
``trainable_parameters()``, and a function that returns the next batch ``(x, y)``. Each step:

    loss = model.loss(x, y);  loss.backward();  clip;  lr = schedule(step);  optimizer.step()

A step whose loss or gradient is not finite is *not* applied: training stops with an error that
names the step, and the weights are left as they were after the last good step.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from minipeft import backend as bk
from minipeft.autograd import no_grad
from minipeft.checks import check_bool, check_choice, check_float, check_id_array, check_int
from minipeft.optim import SGD, AdamW, clip_grad_norm, cosine_schedule


class TrainingDivergedError(FloatingPointError):
    """The loss or a gradient became NaN/inf; the update of that step was not applied."""


@dataclass
class TrainConfig:
    steps: int = 500              # optimizer steps
    batch_size: int = 64          # sequences per step
    lr: float = 3e-3              # peak learning rate
    weight_decay: float = 0.0     # AdamW's decoupled decay (trainable matrices only, ndim >= 2)
    warmup: int = 20              # linear warmup steps, then cosine decay
    min_lr_ratio: float = 0.1     # final lr = min_lr_ratio * lr
    grad_clip: float = 1.0        # global gradient-norm limit (0 = off)
    optimizer: str = "adamw"      # "adamw" or "sgd"
    eval_every: int = 0           # call evaluate() every n steps (0 = only at the end)
    log_path: str | None = None   # JSONL file with one record per logged step
    log_every: int = 10           # steps between JSONL records
    progress: bool = True         # tqdm progress bar
    desc: str = "train"           # progress-bar label
    checkpoint_every: int = 0     # call checkpoint(step) every n steps (0 = never)

    def __post_init__(self):
        # every field by name, kind and range, before any step: NaN or a fraction here would
        # otherwise surface after a step was applied (NaN weights, a ZeroDivisionError)
        check_int("TrainConfig.steps", self.steps, low=0)
        check_int("TrainConfig.batch_size", self.batch_size, low=1)
        check_float("TrainConfig.lr", self.lr, low=0.0, low_open=True)
        check_float("TrainConfig.weight_decay", self.weight_decay, low=0.0)
        check_int("TrainConfig.warmup", self.warmup, low=0)
        check_float("TrainConfig.min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        check_float("TrainConfig.grad_clip", self.grad_clip, low=0.0)
        check_choice("TrainConfig.optimizer", self.optimizer, ("adamw", "sgd"))
        check_int("TrainConfig.eval_every", self.eval_every, low=0)
        if self.log_path is not None and not isinstance(self.log_path, (str, os.PathLike)):
            raise TypeError(f"TrainConfig.log_path must be None or a path, got "
                            f"{type(self.log_path).__name__}")
        check_int("TrainConfig.log_every", self.log_every, low=1)
        check_bool("TrainConfig.progress", self.progress)
        if not isinstance(self.desc, str):
            raise TypeError(f"TrainConfig.desc must be a string, got {type(self.desc).__name__}")
        check_int("TrainConfig.checkpoint_every", self.checkpoint_every, low=0)


@dataclass
class TrainResult:
    losses: list = field(default_factory=list)      # training loss per step
    evals: list = field(default_factory=list)       # {"step": s, **evaluate(model)}
    seconds: float = 0.0
    tokens: int = 0

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def make_optimizer(model, cfg: TrainConfig):
    params = model.trainable_parameters()
    if cfg.optimizer == "sgd":
        return SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _checked_batch(batch, step: int):
    """The (x, y) pair ``next_batch`` returned, as backend arrays, refused with a named error
    (before the step runs) when it is not a pair, ragged, or empty."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"train: next_batch must return a pair (x, y), got "
                        f"{type(batch).__name__} at step {step}")
    x = check_id_array(f"train: batch x at step {step}", batch[0])
    y = check_id_array(f"train: batch y at step {step}", batch[1])
    if x.size == 0 or y.size == 0:
        raise ValueError(f"train: next_batch returned an empty batch at step {step} (x shape "
                         f"{tuple(x.shape)}, y shape {tuple(y.shape)}); nothing was applied")
    return x, y


def train(model, next_batch: Callable[[int], tuple], cfg: TrainConfig,
          evaluate: Callable | None = None, optimizer=None,
          checkpoint: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` steps on batches from ``next_batch(batch_size)``.

    ``evaluate(model) -> dict`` runs every ``cfg.eval_every`` steps and at the end;
    ``checkpoint(step)`` (e.g. a save) runs every ``cfg.checkpoint_every`` steps.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train: cfg must be a TrainConfig, got {type(cfg).__name__}")
    for name, fn in (("next_batch", next_batch), ("evaluate", evaluate),
                     ("checkpoint", checkpoint)):
        if fn is not None and not callable(fn):
            raise TypeError(f"train: {name} must be callable, got {type(fn).__name__}")
    opt = optimizer or make_optimizer(model, cfg)
    params = opt.params
    result = TrainResult()
    log = open(cfg.log_path, "a") if cfg.log_path else None  # noqa: SIM115
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=cfg.desc, disable=not cfg.progress, leave=False)
    try:
        for step in bar:
            x, y = _checked_batch(next_batch(cfg.batch_size), step)
            opt.zero_grad()
            loss = model.loss(x, y)
            loss_value = loss.item()
            loss.backward()
            norm = clip_grad_norm(params, cfg.grad_clip)
            if not (bk.np.isfinite(loss_value) and bk.np.isfinite(norm)):
                opt.zero_grad()
                raise TrainingDivergedError(
                    f"training diverged at step {step}: loss={loss_value}, gradient norm={norm}; "
                    "that step's update was not applied (try a lower lr)")
            opt.lr = cosine_schedule(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
            opt.step()
            result.losses.append(loss_value)
            result.tokens += int(x.size)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss_value:.3f}")
            if log and step % cfg.log_every == 0:
                log.write(json.dumps({"step": step, "loss": loss_value, "lr": opt.lr,
                                      "grad_norm": norm}) + "\n")
            if evaluate and cfg.eval_every and (step + 1) % cfg.eval_every == 0 \
                    and step + 1 < cfg.steps:
                result.evals.append({"step": step + 1, **evaluate(model)})
                model.train()
            if checkpoint and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                checkpoint(step + 1)
    finally:
        bar.close()
        if log:
            log.close()
    result.seconds = time.perf_counter() - start
    if evaluate:
        result.evals.append({"step": cfg.steps, **evaluate(model)})
    model.eval()
    return result


def evaluate_lm(model, x, y, batch_size: int = 256, ignore_index: int = -100) -> dict:
    """Loss and exact match on a fixed set: a row counts as correct when the argmax prediction
    (teacher forcing) equals every non-ignored target, i.e. when greedy decoding is right."""
    from minipeft.autograd import functional as F

    batch_size = check_int("evaluate_lm: batch_size", batch_size, low=1)
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"evaluate_lm: x and y must hold the same number (> 0) of rows, got "
                         f"{len(x)} and {len(y)}")
    was_training = getattr(model, "training", False)
    model.eval()
    total_loss, total_tokens, correct = 0.0, 0, 0
    with no_grad():
        for i in range(0, len(x), batch_size):
            xb, yb = bk.asarray(x[i:i + batch_size]), bk.asarray(y[i:i + batch_size])
            logits = model(xb)
            counted = yb != ignore_index
            n = int(counted.sum())
            total_loss += F.cross_entropy(logits, yb, ignore_index).item() * n
            total_tokens += n
            pred = logits.data.argmax(axis=-1)
            row_ok = ((pred == yb) | ~counted).all(axis=1)
            correct += int(row_ok.sum())
    if was_training:
        model.train()
    return {"loss": total_loss / max(total_tokens, 1), "exact_match": correct / max(len(x), 1)}
