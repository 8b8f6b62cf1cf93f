"""Memory of one training step, predicted from the model and its graph, and measured.

A training step (forward, backward, AdamW update) holds five kinds of bytes:

    weights      W = every parameter                         resident before the step
    optimizer    O = AdamW's m and v: 2 x each trainable tensor   resident before the step
    gradients    G = one gradient per trainable tensor        made by backward
    activations  A = what the graph keeps alive for backward  made by forward
    workspace    the temporaries of the busiest single backward op

PEFT shrinks G and O (frozen tensors get neither); it does not shrink A, because the
activations of a frozen layer are still needed to pass the gradient *through* it. A masked
tensor (selective fine-tuning with an element mask) still gets a *full-size* gradient and full
m and v: the mask is applied to the update, not to the arithmetic.

How each is found here:

* W, G, O are counted from the parameters (size x itemsize).
* A is counted by *walking the graph* the forward pass built: from the loss follow ``_parents``,
  and open each node's ``_backward`` closure, whose cells hold the arrays and tensors the op saved.
  Every array is reduced to the buffer that owns its memory (``.base``), so a view (a reshape, a
  transpose, the ``x2`` a linear keeps) is counted once. Parameters, the batch itself and the
  final output are not activations. Each buffer is credited to the block whose forward made it,
  found by recording every block's output during the forward pass.
* peak (predicted) = W + O + max(A + G + workspace,  G + AdamW temporaries).
  The first term is the backward pass: it starts with every activation alive, and our engine
  keeps each node's *output* until ``backward()`` returns (only the closures' extra saved arrays
  are freed as it goes), so activations and gradients overlap almost entirely. The workspace is
  the largest temporary of any one op's backward, counted from its code (see ``_workspace``);
  in our GPT that is GELU's backward, five arrays of shape (B, T, 4C), more than attention's two
  (B, H, T, T). The second term is the update, after the graph is gone. The first term is an
  upper bound: the busiest moment (the last block's GELU backward) comes early in the backward
  pass, when only the head's and that block's gradients exist, so with full fine-tuning it
  runs high by up to G (about 5% on config M), and with PEFT (G small) it is nearly exact.

Measured: on NumPy, ``tracemalloc`` (NumPy reports its buffers to it) gives the step's peak above
the bytes already resident before the step; on CuPy the default memory pool does
(``used_bytes`` around each phase, ``total_bytes`` as the high-water mark). The resident W and O
are counted exactly, so ``peak_train = W + O + peak_step`` compares with the prediction, and
``peak_total`` adds the other arrays the modules hold (a selective PEFT model keeps a host copy
of the weights it edits, to undo itself: with full fine-tuning, another W).

    mem = measure_step(model, x, y)      # any GPT or PeftModel with .loss(x, y)
    print(mem.table())
"""

from __future__ import annotations

import gc
import tracemalloc
from dataclasses import asdict, dataclass, field

from minipeft import backend as bk
from minipeft.autograd import Tensor, no_grad
from minipeft.nn.module import ModuleList, Parameter
from minipeft.optim import AdamW

__all__ = ["StepMemory", "measure_step", "measure_forward", "graph_activations",
           "parameter_bytes", "training_memory_formula", "gpt_activation_breakdown",
           "gpt_activation_bytes", "CONFIGS", "memory_table", "format_memory_table"]

MB = 2 ** 20


# --------------------------------------------------------------------------- counting parameters
def parameter_bytes(model, optimizer: str = "adam") -> dict:
    """W, G and O counted from the parameters: {weights, gradients, optimizer, masked_tensors}.

    A trainable tensor gets a gradient and optimizer state of its *full* size, masked or not.
    """
    params = model.parameters()
    trainable = [p for p in params if p.requires_grad]
    nbytes = lambda p: p.size * p.dtype.itemsize
    grads = sum(nbytes(p) for p in trainable)
    return {"weights": sum(nbytes(p) for p in params), "gradients": grads,
            "optimizer": _STATES[optimizer] * grads,
            "masked_tensors": sum(getattr(p, "mask", None) is not None for p in trainable)}


_STATES = {"adam": 2, "adamw": 2, "momentum": 1, "sgd": 0}  # state arrays per trainable tensor


def training_memory_formula(n_params: int, n_trainable: int, bytes_per_param: int = 4,
                            optimizer: str = "adam", activations_bytes: int = 0,
                            workspace_bytes: int = 0) -> dict:
    """The memory of a training step from counts alone, for models too big to build here.

    ``n_trainable`` counts whole trainable tensors (a masked tensor counts in full). Optimizer
    state is ``adam``/``adamw`` (m, v), ``momentum`` (one buffer) or ``sgd`` (none), all in
    ``bytes_per_param``. ``total`` is the sum: the peak when activations, gradients and the
    workspace coexist, as they do in our engine's backward pass.
    """
    if optimizer not in _STATES:
        raise ValueError(f"training_memory_formula: optimizer must be one of {sorted(_STATES)}, "
                         f"got {optimizer!r}")
    if not 0 <= n_trainable <= n_params:
        raise ValueError(f"training_memory_formula: need 0 <= n_trainable <= n_params, got "
                         f"n_trainable={n_trainable}, n_params={n_params}")
    out = {"weights": n_params * bytes_per_param,
           "gradients": n_trainable * bytes_per_param,
           "optimizer": _STATES[optimizer] * n_trainable * bytes_per_param,
           "activations": int(activations_bytes), "workspace": int(workspace_bytes)}
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------- the GPT formula
def gpt_activation_breakdown(batch: int, seq: int, d_model: int, n_layer: int, n_head: int,
                             vocab: int, bytes_per_value: int = 4, *,
                             trainable_embeddings: bool = True, dropout: bool = False,
                             index_bytes: int = 8, target_bytes: int = 8) -> dict:
    """Bytes our GPT's graph keeps for backward, term by term, as our ops save them.

    N = B T tokens, C = d_model, F = 4 C, H heads. Per block (elements):
        ln_1, ln_2      output, xhat (N C each), rstd (N)        2 x (2 N C + N)
        q, k, v         projection outputs                        3 N C
        attention       probabilities P (B, H, T, T); output O    B H T^2 + N C
        merge heads     the (B, T, C) copy that o_proj reads      N C  (0 if H = 1 or T = 1:
                        then (B, H, T, D) -> (B, T, H, D) is already contiguous, a view)
        o_proj, fc_out  outputs                                   2 N C
        residual adds   outputs                                   2 N C
        fc_in, GELU     fc_in output, tanh term, GELU output      3 N F = 12 N C
        dropout         output and mask, twice (if dropout > 0)   4 N C
    Embeddings: with trainable tables the two lookups (N C, T C), the position ids and their sum;
    frozen, only the sum (it feeds the first layer norm). Head: ln_f (2 N C + N), logits and
    cross-entropy's softmax (N V each), and its row index, safe targets and mask (N each).
    ``trainable_embeddings`` means tok_emb and pos_emb train (full fine-tuning).
    """
    B, T, C, H, V, L = batch, seq, d_model, n_head, vocab, n_layer
    N, v = B * T, bytes_per_value
    per_layer = {
        "layer_norms": v * 2 * (2 * N * C + N),
        "qkv": v * 3 * N * C,
        "attention_probs": v * B * H * T * T,
        "attention_out": v * N * C,
        "merge_heads": v * N * C if H > 1 and T > 1 else 0,  # else the reshape is a view
        "projections_out": v * 2 * N * C,
        "residual_adds": v * 2 * N * C,
        "mlp_hidden": v * 3 * N * 4 * C,
        "dropout": v * 4 * N * C if dropout else 0,
    }
    if trainable_embeddings:
        emb = v * (2 * N * C + T * C) + index_bytes * T + (v * 2 * N * C if dropout else 0)
    else:
        emb = v * N * C
    head = v * (2 * N * C + N + 2 * N * V) + N * (index_bytes + target_bytes + 1)
    layer = sum(per_layer.values())
    return {"embeddings": emb, "per_layer": layer, "layers": L * layer, "head": head,
            "total": emb + L * layer + head, "per_layer_terms": per_layer}


def gpt_activation_bytes(batch: int, seq: int, d_model: int, n_layer: int, n_head: int,
                         vocab: int, bytes_per_value: int = 4, **kwargs) -> int:
    """Total of ``gpt_activation_breakdown`` (same arguments)."""
    return gpt_activation_breakdown(batch, seq, d_model, n_layer, n_head, vocab,
                                    bytes_per_value, **kwargs)["total"]


# --------------------------------------------------------------------------- the graph walk
def _is_array(v) -> bool:
    return isinstance(v, bk.np.ndarray) or bk.is_array(v)


def _root(a):
    """The array that owns ``a``'s memory (follow ``.base`` through views)."""
    while _is_array(getattr(a, "base", None)):
        a = a.base
    return a


def _closure_items(fn):
    """Arrays and Tensors held in a backward closure's cells (looking into lists/tuples/dicts)."""
    stack = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            stack.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    while stack:
        v = stack.pop()
        if isinstance(v, Tensor) or _is_array(v):
            yield v
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())


def _workspace(node) -> int:
    """Bytes of temporaries at the busiest moment of ``node``'s backward, read off its code.

    Each op's backward also returns one gradient per input that needs one (``grads_out``).
    gelu: a*a and four temporaries of the derivative expression live at once (5 x output);
    attention: dS and the product dS*P, both (B, H, Tq, Tk), plus dq, dk, dv;
    layer_norm: g*w, its centred copy, xhat*mean(g*w*xhat) and their difference (4 x output);
    cross_entropy: d = p * g/n, the size of the logits; every other op: just its gradients.
    """
    grads_out = sum(p.data.nbytes for p in node._parents if p.requires_grad)
    out = node.data.nbytes
    if node.op == "gelu":
        return 5 * out
    if node.op == "attention":
        q, k = node._parents[0], node._parents[1]
        B, H, Tq, _ = q.shape
        probs = B * H * Tq * k.shape[2] * q.dtype.itemsize
        return 2 * probs + grads_out
    if node.op == "layer_norm":
        return 4 * out
    return grads_out


def graph_activations(output: Tensor, exclude=(), groups=None) -> dict:
    """Bytes the graph behind ``output`` keeps alive, each buffer counted once.

    ``exclude``: arrays or Tensors not to count (parameters, the batch); Parameters are never
    counted, nor is ``output``'s own data. ``groups``: ordered (name, [Tensor, ...]) pairs, e.g.
    each block's output; a buffer is credited to the first group from whose tensors it can be
    reached, and whatever is left to ``"head"``. Returns {total, per_group, by_op, workspace,
    workspace_op}: ``by_op`` credits a node's output to its op and a closure's extra arrays
    (layer-norm xhat, attention P, ...) to the op that saved them.
    """
    skip = {id(_root(a.data if isinstance(a, Tensor) else a)) for a in exclude}
    skip.add(id(_root(output.data)))
    seen_nodes: set = set()
    counted: dict = {}                                   # buffer id -> bytes
    per_group: dict = {}
    by_op: dict = {}
    best = (0, "none")
    named = list(groups or []) + [("head" if groups else "all", [output])]
    for name, roots in named:
        nodes, stack = [], [(t, False) for t in roots if isinstance(t, Tensor)]
        while stack:             # post-order: each node after its inputs, i.e. forward order
            t, inputs_done = stack.pop()
            if inputs_done:
                nodes.append(t)
                continue
            if id(t) in seen_nodes:
                continue
            seen_nodes.add(id(t))
            stack.append((t, True))
            inputs = list(t._parents) + [v for v in _closure_items(t._backward)
                                         if isinstance(v, Tensor)]
            stack.extend((p, False) for p in inputs if id(p) not in seen_nodes)
        total = 0
        # Credit each buffer to the op that made it: node outputs in forward order (a reshape
        # or transpose is a view, so its producer comes first), then the closures' own arrays.
        saved = [(t.data, t.op) for t in nodes if not isinstance(t, Parameter)]
        saved += [(v, t.op) for t in nodes for v in _closure_items(t._backward) if _is_array(v)]
        for a, op in saved:
            root = _root(a)
            if id(root) in skip or id(root) in counted:
                continue
            counted[id(root)] = root.nbytes
            total += root.nbytes
            by_op[op] = by_op.get(op, 0) + root.nbytes
        for t in nodes:
            if t._backward is not None and _workspace(t) > best[0]:
                best = (_workspace(t), f"{t.op} {tuple(t.shape)}")
        per_group[name] = per_group.get(name, 0) + total
    return {"total": sum(counted.values()), "per_group": per_group, "by_op": by_op,
            "workspace": best[0], "workspace_op": best[1]}


def _blocks(model):
    """(label, module) for each entry of the model's ModuleList of blocks ([] if none)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, ModuleList)]
    lists.sort(key=lambda nm: not nm[0].endswith("blocks"))
    if not lists:
        return []
    name, mods = lists[0]
    short = name.rsplit(".", 1)[-1]
    return [(f"{short}.{i}", m) for i, m in enumerate(mods)]


def _tensors_in(obj) -> list:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors_in(o)]
    return []


def _forward_with_groups(model, x, y):
    """Run ``model.loss(x, y)`` (or ``model(x)``) recording each block's inputs and outputs.

    The recorder is an instance attribute ``forward`` that shadows the class's method for the
    duration of one call and is deleted afterwards; the model's code is not touched.
    """
    blocks = _blocks(model)
    record: list = []
    for label, block in blocks:
        def recorder(*args, _block=block, _label=label, **kwargs):
            out = type(_block).forward(_block, *args, **kwargs)
            record.append((_label, _tensors_in(args), _tensors_in(out)))
            return out
        block.forward = recorder
    try:
        out = model.loss(x, y) if y is not None else model(x)
    finally:
        for _, block in blocks:
            vars(block).pop("forward", None)
    groups = []
    if record:
        groups.append(("embeddings", record[0][1]))
        groups += [(label, outs) for label, _, outs in record]
    return out, groups


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
        r = _root(a)
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
            elif _is_array(v) and bk.array_backend(v) == bk.name:
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
        loss, groups = _forward_with_groups(model, x, y)
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


# --------------------------------------------------------------------------- the lesson's table
# The study's two model sizes: S runs in seconds on a laptop, M in a minute.
CONFIGS = {
    "S": dict(vocab_size=512, n_embd=128, n_layer=4, n_head=4, block_size=128, batch=16),
    "M": dict(vocab_size=2048, n_embd=256, n_layer=6, n_head=8, block_size=256, batch=8),
}


def memory_table(configs=("S", "M"), methods=("full", "bitfit"), seed: int = 0) -> list[dict]:
    """One row per (config, method): predicted and measured bytes of a training step.

    ``configs``: names in ``CONFIGS`` or dicts of the same keys. ``methods``: names ("full",
    "bitfit") or a dict name -> PeftConfig (e.g. {"lora": LoraConfig(r=8)}).
    """
    from minipeft.nn import GPT, GPTConfig
    from minipeft.peft import bitfit, full_finetuning, get_peft_model

    presets = {"full": full_finetuning, "bitfit": bitfit}
    if not isinstance(methods, dict):
        unknown = [m for m in methods if m not in presets]
        if unknown:
            raise ValueError(f"memory_table: unknown methods {unknown}; use {sorted(presets)} "
                             "or pass a dict name -> PeftConfig")
        methods = {m: presets[m]() for m in methods}
    rows = []
    for c in configs:
        name, spec = (c, CONFIGS[c]) if isinstance(c, str) else (c.get("name", "custom"), c)
        spec = dict(spec)
        batch = spec.pop("batch")
        spec.pop("name", None)
        cfg = GPTConfig(**spec)
        rng = bk.host_rng(seed)
        x = bk.asarray(rng.integers(0, cfg.vocab_size, (batch, cfg.block_size)))
        y = bk.asarray(rng.integers(0, cfg.vocab_size, (batch, cfg.block_size)))
        for method, peft_config in methods.items():
            model = get_peft_model(GPT(cfg, seed=seed), peft_config, seed=seed)
            mem = measure_step(model, x, y)
            row = {"config": name, "method": method,
                   "trainable": model.num_parameters(trainable_only=True),
                   "total": model.num_parameters()}
            for cat in ("weights", "gradients", "optimizer", "activations"):
                row[f"{cat}_predicted"] = mem.predicted[cat]
                row[f"{cat}_measured"] = mem.measured[cat]
            row["peak_predicted"] = mem.predicted["peak"]
            row["peak_measured"] = mem.measured["peak_train"]
            row["peak_step_measured"] = mem.measured["peak_step"]
            row["other_resident"] = mem.measured["other_resident"]
            row["peak_total_measured"] = mem.measured["peak_total"]
            rows.append(row)
            del model, mem
            gc.collect()
    return rows


def format_memory_table(rows: list[dict]) -> str:
    """The rows of ``memory_table`` as text, in MiB: predicted / measured per category.
    The measured peak is W + O + the step's peak (``peak_train``)."""
    cats = ("weights", "gradients", "optimizer", "activations", "peak")
    head = f"{'cfg':4} {'method':8} " + " ".join(f"{c:>17}" for c in cats)
    lines = [head, f"{'MiB':13} " + " ".join(f"{'pred / meas':>17}" for _ in cats)]
    for r in rows:
        cells = " ".join(f"{r[f'{c}_predicted'] / MB:8.2f}/{r[f'{c}_measured'] / MB:8.2f}"
                         for c in cats)
        lines.append(f"{r['config']:4} {r['method']:8} {cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_memory_table(memory_table()))
