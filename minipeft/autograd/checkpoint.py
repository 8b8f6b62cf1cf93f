"""Gradient checkpointing: keep a block's inputs, not its activations, and recompute in backward.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost". A training step normally
keeps every activation a block's backward will need (for a transformer block: the layer norms'
statistics, q, k, v, the attention probabilities (B, H, T, T), the MLP's hidden (B, T, 4C) ...).
``checkpoint(fn, *inputs, params=...)`` runs ``fn`` without recording a graph, so none of that
is kept; the output is one node whose parents are the inputs and the trainable tensors ``fn``
uses. When the gradient reaches it, the node runs ``fn`` once more, this time recording the
graph, back-propagates through that fresh graph at once and lets it go::

    forward:   y = fn(x)                       graph kept: x -> [checkpoint] -> y
    backward:  y' = fn(x')  (x' = x, a leaf)   graph of fn built, walked, freed
               dx = x'.grad; each parameter's .grad accumulates inside the walk

Memory: one block's activations at a time instead of all of them, plus every block's input.
Time: one more forward per block (about a third more compute for a step).
The result is exact: the recomputation is the same arithmetic on the same numbers, so the
gradients equal the plain path's bit for bit, provided ``fn`` is deterministic (no dropout with
a fresh random mask: the GPT refuses checkpointing with dropout while training).
"""

from __future__ import annotations

from contextlib import contextmanager

from minipeft.autograd import tensor as _engine
from minipeft.autograd.tensor import Tensor, is_grad_enabled, no_grad


@contextmanager
def _grad_on():
    """Record a graph even when backward() itself was called under no_grad()."""
    old, _engine._grad_enabled = _engine._grad_enabled, True
    try:
        yield
    finally:
        _engine._grad_enabled = old


def checkpoint(fn, *inputs: Tensor, params=()) -> Tensor:
    """``fn(*inputs)`` with its activations recomputed in backward instead of kept.

    ``params``: the tensors ``fn`` reads besides its inputs (a block's parameters); those that
    require grad become the node's parents, so a block whose input is frozen (LoRA over a frozen
    embedding) still reaches its trainable tensors. Their gradients accumulate into ``.grad``
    during the recomputation; the node returns gradients only for ``inputs``.
    """
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"checkpoint: input {i} must be a Tensor, got {type(x).__name__}")
    trainable = tuple(p for p in params if p is not None and p.requires_grad)
    if not is_grad_enabled() or not (trainable or any(x.requires_grad for x in inputs)):
        return fn(*inputs)                         # nothing to differentiate: a plain call
    with no_grad():
        out = fn(*inputs)                          # no graph, no activations kept
    if not isinstance(out, Tensor):
        raise TypeError(f"checkpoint: fn must return one Tensor, got {type(out).__name__}")

    def backward(g):
        leaves = [Tensor(x.data, requires_grad=x.requires_grad) for x in inputs]
        with _grad_on():
            again = fn(*leaves)                    # the same forward, graph recorded this time
        if again.requires_grad:
            again.backward(g)                      # params' .grad accumulate here
        return tuple(leaf.grad if x.requires_grad else None
                     for leaf, x in zip(leaves, inputs)) + (None,) * len(trainable)

    return Tensor._make(out.data, tuple(inputs) + trainable, backward, "checkpoint")
