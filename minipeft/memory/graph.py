"""The graph walk: the bytes a forward pass keeps alive for backward, read from the graph.

Every op declares what its backward keeps (``Tensor._make(..., saved=, workspace=)`` in
``minipeft.autograd``, as PyTorch's ``ctx.save_for_backward``), so the walk needs no knowledge of
any op: from the output it follows ``_parents`` and counts each node's output and its declared
``_saved`` arrays. Every array is reduced to the buffer that owns its memory (``.base``), so a
view (a reshape, a transpose, the ``x2`` a linear keeps) is counted once. Parameters, the batch
and the final output are not activations. The busiest backward op is the node with the largest
declared ``_workspace``.

Each buffer is credited to the block whose forward made it, found by recording every block's
output during the forward pass (``forward_with_groups``).
"""

from __future__ import annotations

from minipeft import backend as bk
from minipeft.autograd import Tensor
from minipeft.nn.module import ModuleList, Parameter


def is_array(v) -> bool:
    return isinstance(v, bk.np.ndarray) or bk.is_array(v)


def root(a):
    """The array that owns ``a``'s memory (follow ``.base`` through views)."""
    while is_array(getattr(a, "base", None)):
        a = a.base
    return a


def workspace(node) -> int:
    """The bytes ``node``'s backward allocates at its busiest moment, as the op declared. An op
    that declares nothing (a user's own ``Tensor._make``) is taken to allocate its gradients."""
    if node._workspace is not None:
        return node._workspace
    return sum(p.data.nbytes for p in node._parents if p.requires_grad)


def graph_activations(output: Tensor, exclude=(), groups=None) -> dict:
    """Bytes the graph behind ``output`` keeps alive, each buffer counted once.

    ``exclude``: arrays or Tensors not to count (parameters, the batch); Parameters are never
    counted, nor is ``output``'s own data. ``groups``: ordered (name, [Tensor, ...]) pairs, e.g.
    each block's output; a buffer is credited to the first group from whose tensors it can be
    reached, and whatever is left to ``"head"``. Returns {total, per_group, by_op, workspace,
    workspace_op}: ``by_op`` credits a node's output and its declared saved arrays (layer-norm
    xhat, attention P, ...) to its op.
    """
    skip = {id(root(a.data if isinstance(a, Tensor) else a)) for a in exclude}
    skip.add(id(root(output.data)))
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
            stack.extend((p, False) for p in t._parents if id(p) not in seen_nodes)
        total = 0
        # Credit each buffer to the op that made it: node outputs in forward order (a reshape
        # or transpose is a view, so its producer comes first), then the declared saved arrays.
        saved = [(t.data, t.op) for t in nodes if not isinstance(t, Parameter)]
        saved += [(a, t.op) for t in nodes for a in t._saved]
        for a, op in saved:
            r = root(a)
            if id(r) in skip or id(r) in counted:
                continue
            counted[id(r)] = r.nbytes
            total += r.nbytes
            by_op[op] = by_op.get(op, 0) + r.nbytes
        for t in nodes:
            if t._backward is not None and workspace(t) > best[0]:
                best = (workspace(t), f"{t.op} {tuple(t.shape)}")
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


def forward_with_groups(model, x, y):
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
