"""The meter: one training step measured by the allocator, beside its prediction.

    mem = measure_step(model, x, y)      # any GPT or PeftModel with .loss(x, y)
    print(mem.table())

Predicted (see ``formulas`` and ``graph``):

* W, G, O counted from the parameters; A from the graph walk of the warm-up step's graph;
* peak = W + O + max(A + G + workspace,  G + AdamW temporaries). The first term is the backward
  pass: it starts with every activation alive, and our engine keeps each node's *output* until
  ``backward()`` returns (only the declared saved extras are freed as it goes), so activations
  and gradients overlap almost entirely. The workspace is the largest any one op declares for
  its backward (measured per op: GELU 2 x its output, layer norm 3 x, attention its
  probabilities once plus the gradients; ``tests/test_memory.py`` checks each). The second
  term is the update, after the graph is gone. The first term is an upper bound: the busiest
  op (the last block's GELU backward) runs early in the backward pass, after the head's saved
  softmax was freed and before most gradients exist, so it runs high by up to G plus those
  freed extras (about 8% for full fine-tuning of the test's model, 4% for BitFit).

Measured: on NumPy, ``tracemalloc`` (NumPy reports its buffers to it) gives the step's peak above
the bytes already resident before the step; on CuPy the default memory pool does
(``used_bytes`` around each phase, ``total_bytes`` as the high-water mark). The resident W and O
are counted exactly, so ``peak_train = W + O + peak_step`` compares with the prediction, and
``peak_total`` adds the other arrays the modules hold (a selective PEFT model keeps a host copy
of the weights it edits, to undo itself: with full fine-tuning, another W).
"""

from __future__ import annotations

import gc
import tracemalloc
from dataclasses import asdict, dataclass, field

from minipeft import backend as bk
from minipeft.autograd import no_grad
from minipeft.memory.formulas import parameter_bytes
from minipeft.memory.graph import forward_with_groups, graph_activations, is_array, root
from minipeft.nn.module import Parameter
from minipeft.optim import AdamW

MB = 2 ** 20


# --------------------------------------------------------------------------- measuring
def _traced_now() -> int:
    return tracemalloc.get_traced_memory()[0]


class _Meter:
    """Current and peak bytes above a baseline: tracemalloc on NumPy, the memory pool on CuPy."""

    def __init__(self):
        self.cupy = bk.name == "cupy"
        self.started = False

    def __enter__(self):
        gc.collect()
        if self.cupy:
            self.pool = bk.xp.get_default_memory_pool()
            bk.synchronize()
            self.pool.free_all_blocks()      # so total_bytes() grows only for this step
            self.base = self.pool.used_bytes()
            self.total0 = self.pool.total_bytes()
        else:
            if not tracemalloc.is_tracing():
                tracemalloc.start()
                self.started = True
            tracemalloc.reset_peak()
            self.base = _traced_now()
        return self

    def now(self) -> int:
        """Bytes allocated above the baseline now."""
        if self.cupy:
            bk.synchronize()
            return self.pool.used_bytes() - self.base
        return _traced_now() - self.base

    def peak(self) -> int:
        """Highest bytes above the baseline since the last ``peak()`` (or entering). On CuPy
        the pool keeps no per-phase peak: its total bytes (used plus cached free blocks) since
        entering, an upper bound, as the pool rounds sizes up to 512 bytes and splits blocks."""
        if self.cupy:
            bk.synchronize()
            return self.pool.total_bytes() - self.base
        peak = tracemalloc.get_traced_memory()[1] - self.base
        tracemalloc.reset_peak()
        return peak

    def __exit__(self, *exc):
        if self.started:
            tracemalloc.stop()


def _resident(model, optimizer, inputs) -> dict:
    """Bytes held before the step, counted exactly: parameter buffers, optimizer state and
    every other array the modules hold (element masks, the host copies a selective PEFT model
    keeps to undo itself, ...), each buffer once; on CuPy only device arrays count."""
    seen: set = set()

    def add(a):
        r = root(a)
        if id(r) in seen:
            return 0
        seen.add(id(r))
        return r.nbytes
    weights = sum(add(p.data) for p in model.parameters())
    opt = sum(add(a) for st in getattr(optimizer, "state", []) for a in st.values())
    other = 0
    for _, mod in model.named_modules():
        stack = list(vars(mod).values())
        while stack:
            v = stack.pop()
            if isinstance(v, Parameter):
                stack.extend(a for a in (v.mask, v.grad) if a is not None)
            elif is_array(v) and bk.array_backend(v) == bk.name:
                other += add(v)
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
            elif isinstance(v, dict):
                stack.extend(v.values())
    other += sum(add(a) for a in inputs)
    return {"weights": weights, "optimizer": opt, "other": other}


def measure_forward(model, x, y=None, grad: bool = True) -> dict:
    """Bytes held after a forward pass alone: {measured, walked, output}.

    ``measured`` is the allocator's count (tracemalloc current, or the pool's used bytes) after
    the forward minus before, and includes the output; ``walked`` is ``graph_activations``
    (without the output); ``output`` is the output's size. With ``grad=False`` the forward runs
    under ``no_grad()``: no graph, so ``walked`` is 0 and ``measured`` is just the output.
    Runs one unmeasured forward first, so lazily built caches (the causal mask) exist.
    """
    x = bk.asarray(x)
    y = None if y is None else bk.asarray(y)
    run = (lambda: model.loss(x, y)) if y is not None else (lambda: model(x))
    with no_grad():
        run()
    params = model.parameters()
    with _Meter() as meter:
        if grad:
            out = run()
        else:
            with no_grad():
                out = run()
        measured = meter.now()
        walked = graph_activations(out, exclude=params + [x] + ([y] if y is not None else []))
    return {"measured": measured, "walked": walked["total"], "output": int(out.data.nbytes)}


@dataclass
class StepMemory:
    """Predicted and measured bytes of one training step (see the module docstring)."""

    predicted: dict                 # weights, gradients, optimizer, activations, workspace, peak
    measured: dict                  # the same categories, plus peak_step, resident, phases
    per_layer: dict                 # activations by block: embeddings, blocks.i, head
    by_op: dict = field(default_factory=dict)   # activations by the op that made/saved them
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        p, m = self.predicted, self.measured
        rows = [("weights", p["weights"], m["weights"], "all parameters, resident before the step"),
                ("gradients", p["gradients"], m["gradients"],
                 "trainable tensors at full size (masked too)"),
                ("optimizer", p["optimizer"], m["optimizer"], "AdamW m and v"),
                ("activations", p["activations"], m["activations"],
                 "kept by the graph after forward"),
                ("workspace", p["workspace"], None, p["workspace_op"]),
                ("peak", p["peak"], m["peak_train"],
                 "pred: W+O+max(A+G+workspace, G+update); meas: W+O + step peak"),
                ("other", None, m["other_resident"], "other arrays the modules hold"),
                ("peak total", None, m["peak_total"], "everything held at the peak")]
        lines = [f"memory of one training step ({m['backend']}), MiB",
                 f"{'':12} {'predicted':>10} {'measured':>10}   note"]
        cell = lambda b: f"{b / MB:10.2f}" if b is not None else f"{'-':>10}"
        for name, pv, mv, note in rows:
            lines.append(f"{name:12} {cell(pv)} {cell(mv)}   {note}")
        lines.append(f"{'step peak':12} {'':10} {m['peak_step'] / MB:10.2f}   above the "
                     f"{m['resident'] / MB:.2f} MiB resident before the step")
        lines.append("activations by layer: " + ", ".join(
            f"{k} {v / MB:.2f}" for k, v in self.per_layer.items()))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def measure_step(model, x, y, optimizer=None, restore: bool = True) -> StepMemory:
    """Predict and measure the memory of one training step of ``model`` on the batch (x, y).

    Builds ``AdamW(model.trainable_parameters())`` unless an ``optimizer`` is given, runs one
    warm-up step (so optimizer state and lazy caches exist, and the graph it builds is walked
    for the predicted activations), then the measured step: zero_grad, forward, backward,
    ``optimizer.step()``. With ``restore`` (the default) the trainable weights, their gradients
    and the optimizer's state are put back afterwards, so measuring changes nothing.
    """
    x, y = bk.asarray(x), bk.asarray(y)
    was_training = getattr(model, "training", True)
    model.train()
    trainable = model.trainable_parameters()
    if not trainable:
        raise ValueError("measure_step: the model has no trainable parameters")
    gc.collect()
    created = optimizer is None
    if created:                        # measure the optimizer state as it is allocated
        with _Meter() as meter:
            optimizer = AdamW(trainable)
            opt_measured = meter.now()
    else:
        opt_measured = optimizer.state_bytes()
    backup = _snapshot(trainable, optimizer) if restore else None
    try:
        # warm-up step, walking the graph it builds
        optimizer.zero_grad()
        loss, groups = forward_with_groups(model, x, y)
        walk = graph_activations(loss, exclude=model.parameters() + [x, y], groups=groups)
        del groups
        loss.backward()
        optimizer.step()
        del loss
        # the measured step
        optimizer.zero_grad()
        resident = _resident(model, optimizer, [x, y])
        phases = {}
        with _Meter() as meter:
            loss = model.loss(x, y)
            act_measured = meter.now()
            phases["forward"] = meter.peak()
            loss.backward()
            grad_measured = meter.now()
            phases["backward"] = meter.peak()
            optimizer.step()
            phases["update"] = meter.peak()
            peak_step = max(phases.values())
        del loss
    finally:
        if backup is not None:
            _restore(trainable, optimizer, backup)
        model.train(was_training)

    counts = parameter_bytes(model)
    largest = max(p.size * p.dtype.itemsize for p in trainable)
    W, G, O, A = counts["weights"], counts["gradients"], counts["optimizer"], walk["total"]
    predicted = {"weights": W, "gradients": G, "optimizer": O, "activations": A,
                 "workspace": walk["workspace"], "workspace_op": walk["workspace_op"],
                 "peak_backward": W + O + A + G + walk["workspace"],
                 "peak_update": W + O + G + 2 * largest}
    predicted["peak"] = max(predicted["peak_backward"], predicted["peak_update"])
    res = resident["weights"] + resident["optimizer"] + resident["other"]
    measured = {"backend": bk.name, "weights": resident["weights"], "gradients": grad_measured,
                "optimizer": opt_measured, "activations": act_measured,
                "peak_step": peak_step, "resident": res, "other_resident": resident["other"],
                "peak_train": resident["weights"] + resident["optimizer"] + peak_step,
                "peak_total": res + peak_step,
                **{f"peak_{k}": v for k, v in phases.items()}}
    notes = []
    if counts["masked_tensors"]:
        notes.append(f"{counts['masked_tensors']} trainable tensors carry an element mask; "
                     "each still gets a full-size gradient and full m, v")
    if not created:
        notes.append("optimizer given: its 'measured' bytes are its state_bytes() count")
    if resident["other"] > max(0.01 * res, 64 * 1024):
        notes.append(f"the modules hold {resident['other'] / MB:.2f} MiB of other arrays "
                     "(e.g. a selective PEFT model's host copy of the weights it edits, "
                     "element masks): in 'peak total', not in the predicted categories")
    return StepMemory(predicted=predicted, measured=measured, per_layer=walk["per_group"],
                      by_op=walk["by_op"], notes=notes)


def _snapshot(params, optimizer) -> dict:
    return {"data": [p.data.copy() for p in params], "grad": [p.grad for p in params],
            "state": [{k: a.copy() for k, a in st.items()} for st in optimizer.state],
            "t": getattr(optimizer, "t", None)}


def _restore(params, optimizer, backup) -> None:
    for p, d, g in zip(params, backup["data"], backup["grad"]):
        p.data[...] = d                # in place: the parameter keeps its buffer
        p.grad = g
    for st, saved in zip(optimizer.state, backup["state"]):
        for k, a in saved.items():
            if k in st:
                st[k][...] = a
        for k in [k for k in st if k not in saved]:
            del st[k]
    if backup["t"] is not None:
        optimizer.t = backup["t"]
