"""Gradient checkpointing: the same gradients as the plain graph, bit for bit, with only the
block inputs kept between forward and backward."""

import numpy as np
import pytest

from minipeft import backend as bk
from minipeft.autograd import Tensor, gradcheck, linear
from minipeft.autograd.checkpoint import checkpoint
from minipeft.nn.gpt import GPT, GPTConfig


def _graph_nodes(t: Tensor) -> int:
    """How many op nodes the graph behind t holds (what backward will walk)."""
    seen, stack = set(), [t]
    while stack:
        n = stack.pop()
        if id(n) in seen or n.op == "leaf":
            continue
        seen.add(id(n))
        stack.extend(n._parents)
    return len(seen)


def test_checkpoint_matches_the_plain_graph_on_a_diamond(float64):
    rng = np.random.default_rng(0)
    W = Tensor(rng.normal(size=(5, 4)), requires_grad=True)
    x = Tensor(rng.normal(size=(3, 4)), requires_grad=True)
    fn = lambda x: (linear(x, W).tanh() * linear(x, W)).sum(axis=-1)   # x and W fan out
    fn(x).sum().backward()
    plain = (x.grad.copy(), W.grad.copy())
    x.grad = W.grad = None
    y = checkpoint(fn, x, params=[W])
    assert _graph_nodes(y) == 1                  # nothing inside fn was kept
    y.sum().backward()
    np.testing.assert_array_equal(bk.to_numpy(x.grad), bk.to_numpy(plain[0]))
    np.testing.assert_array_equal(bk.to_numpy(W.grad), bk.to_numpy(plain[1]))
    gradcheck(lambda x, W: checkpoint(lambda x: linear(x, W).tanh(), x, params=[W]), [x, W])


def test_a_frozen_input_still_reaches_the_block_parameters(float64):
    W = Tensor(np.eye(3), requires_grad=True)
    x = Tensor(np.ones((2, 3)))                  # no grad: only W's path makes the graph
    checkpoint(lambda x: linear(x, W), x, params=[W]).sum().backward()
    np.testing.assert_array_equal(bk.to_numpy(W.grad), np.full((3, 3), 2.0))
    assert x.grad is None


@pytest.mark.parametrize("freeze_embeddings", [False, True])
def test_gpt_checkpointing_gives_the_plain_gradients(float64, freeze_embeddings):
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=3, n_head=2, n_embd=16)
    rng = np.random.default_rng(1)
    ids = bk.asarray(rng.integers(0, 11, (2, 8)))
    grads, nodes = [], []
    for flag in (False, True):
        model = GPT(GPTConfig(**{**cfg.__dict__, "checkpoint": flag}), seed=0)
        if freeze_embeddings:
            model.tok_emb.weight.requires_grad = model.pos_emb.weight.requires_grad = False
        loss = model.loss(ids, ids)
        nodes.append(_graph_nodes(loss))
        loss.backward()
        grads.append({n: bk.to_numpy(p.grad) for n, p in model.named_parameters()
                      if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        np.testing.assert_array_equal(grads[0][n], grads[1][n], err_msg=n)
    assert nodes[1] < nodes[0] / 3               # one node per block instead of its whole graph


def test_checkpointing_with_dropout_is_refused():
    with pytest.raises(ValueError, match="checkpoint=True needs dropout=0"):
        GPTConfig(checkpoint=True, dropout=0.1)
    with pytest.raises(TypeError, match="GPTConfig.checkpoint"):
        GPTConfig(checkpoint=1)
