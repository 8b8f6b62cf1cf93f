"""Proofs for minipeft.optim and the divergence guard of minipeft.train.

Each optimizer is compared with its update rule written out in plain NumPy, step by step; the
PEFT promises (a frozen or masked-out weight never moves, and costs no optimizer state) are
checked bit for bit; clipping is checked against an independently computed norm.
"""

import math

import numpy as np
import pytest

from minipeft import backend as bk
from minipeft.autograd import Tensor
from minipeft.nn import GPT, GPTConfig, Module, Parameter
from minipeft.optim import SGD, AdamW, clip_grad_norm, cosine_schedule
from minipeft.train import TrainConfig, TrainingDivergedError, make_optimizer, train

host = bk.to_numpy
rng0 = np.random.default_rng(0)
# a quadratic bowl  L(p) = 1/2 sum a (p - c)^2  with gradient  a (p - c)
A = {"w": rng0.uniform(0.5, 3.0, (3, 2)), "b": rng0.uniform(0.5, 3.0, (4,))}
C = {"w": rng0.normal(size=(3, 2)), "b": rng0.normal(size=(4,))}
P0 = {"w": rng0.normal(size=(3, 2)), "b": rng0.normal(size=(4,))}


def bowl_params():
    return {k: Parameter(v.copy()) for k, v in P0.items()}


def bowl_backward(params):
    """The loss through autograd, so the optimizer sees a gradient the library computed."""
    loss = None
    for k, p in params.items():
        term = (((p - Tensor(C[k])) ** 2) * Tensor(A[k])).sum() * 0.5
        loss = term if loss is None else loss + term
    loss.backward()


def test_adamw_matches_the_update_written_out(float64, backend):
    lr, (b1, b2), eps, wd = 0.05, (0.8, 0.95), 1e-8, 0.1
    params = bowl_params()
    opt = AdamW(list(params.values()), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    ref = {k: v.copy() for k, v in P0.items()}
    m = {k: np.zeros_like(v) for k, v in P0.items()}
    v = {k: np.zeros_like(v) for k, v in P0.items()}
    for t in range(1, 8):
        opt.zero_grad()
        bowl_backward(params)
        opt.step()
        for k in ref:
            g = A[k] * (ref[k] - C[k])
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat, v_hat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
            if ref[k].ndim >= 2:                                   # matrices only (nanoGPT)
                ref[k] = ref[k] - lr * wd * ref[k]                 # decoupled: not via g
            ref[k] = ref[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
            np.testing.assert_allclose(host(params[k].data), ref[k], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(host(opt.state[list(params).index(k)]["m"]), m[k],
                                       rtol=1e-12, atol=1e-14)
    assert opt.t == 7


def test_adamw_first_step_moves_each_coordinate_by_lr():
    """With bias correction, step 1 is lr * g/|g| = lr * sign(g) (up to eps), whatever |g| is."""
    p = Parameter(np.array([1e-3, -5.0, 200.0], dtype=np.float64))
    p.grad = bk.asarray(np.array([1e-4, -3.0, 1e3]))
    AdamW([p], lr=0.01, eps=1e-12).step()
    np.testing.assert_allclose(host(p.data), [1e-3 - 0.01, -5.0 + 0.01, 200.0 - 0.01],
                               rtol=0, atol=1e-9)                 # eps/|g| = 1e-8 of a step


@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.05)])
def test_sgd_matches_the_update_written_out(float64, backend, momentum, wd):
    lr = 0.05
    params = bowl_params()
    opt = SGD(list(params.values()), lr=lr, momentum=momentum, weight_decay=wd)
    ref = {k: v.copy() for k, v in P0.items()}
    buf = {k: None for k in P0}
    for _ in range(6):
        opt.zero_grad()
        bowl_backward(params)
        opt.step()
        for k in ref:
            g = A[k] * (ref[k] - C[k]) + (wd * ref[k] if ref[k].ndim >= 2 else 0)  # L2: in g
            if momentum:
                buf[k] = g if buf[k] is None else momentum * buf[k] + g
                g = buf[k]
            ref[k] = ref[k] - lr * g
            np.testing.assert_allclose(host(params[k].data), ref[k], rtol=1e-12, atol=1e-12)


def test_optimizers_reach_the_bottom_of_the_bowl(float64):
    for make in (lambda ps: AdamW(ps, lr=0.05), lambda ps: SGD(ps, lr=0.1, momentum=0.5)):
        params = bowl_params()
        opt = make(list(params.values()))
        for _ in range(400):
            opt.zero_grad()
            bowl_backward(params)
            opt.step()
        for k in params:
            np.testing.assert_allclose(host(params[k].data), C[k], atol=1e-3)


# --------------------------------------------------------------------------- PEFT promises
CFG = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)


def batches(seed=0):
    rng = np.random.default_rng(seed)
    return lambda B: (rng.integers(0, 11, (B, 8)), rng.integers(0, 11, (B, 8)))


def snapshot(model):
    return {k: host(v).copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_frozen_parameters_never_move_and_cost_no_state(backend, optimizer):
    model = GPT(CFG, seed=0)
    model.requires_grad_(False)
    trainable = ["blocks.1.attn.q_proj.weight", "blocks.1.attn.v_proj.weight", "ln_f.bias"]
    named = dict(model.named_parameters())
    for name in trainable:
        named[name].requires_grad = True
    before = snapshot(model)
    cfg = TrainConfig(steps=25, batch_size=4, lr=0.05, weight_decay=0.5, warmup=0,
                      optimizer=optimizer, progress=False)
    opt = make_optimizer(model, cfg)
    assert [id(p) for p in opt.params] == [id(named[n]) for n in trainable]
    train(model, batches(), cfg, optimizer=opt)
    after = snapshot(model)
    for name in before:
        if name in trainable:
            assert not np.array_equal(before[name], after[name]), f"{name} did not train"
        else:
            assert np.array_equal(before[name], after[name]), f"frozen {name} moved"
            assert named[name].grad is None                         # never even computed
    # state for the three trainable tensors only: AdamW m and v, SGD one momentum buffer
    trainable_bytes = sum(named[n].data.nbytes for n in trainable)
    assert len(opt.state) == len(trainable)
    per = 2 if optimizer == "adamw" else 1
    assert opt.state_bytes() == per * trainable_bytes
    assert all(a.shape == named[n].shape for n, st in zip(trainable, opt.state)
               for a in st.values())


def test_optimizer_refuses_frozen_or_no_parameters():
    model = GPT(CFG)
    frozen = model.parameters()[0].requires_grad_(False)
    with pytest.raises(ValueError, match="frozen parameter"):
        AdamW([frozen])
    with pytest.raises(ValueError, match="no trainable parameters"):
        SGD(model.requires_grad_(False).trainable_parameters())
    with pytest.raises(ValueError, match="lr must be > 0"):
        AdamW(model.requires_grad_(True).trainable_parameters(), lr=0.0)


@pytest.mark.parametrize("make", [lambda ps: AdamW(ps, lr=0.1, weight_decay=0.3),
                                  lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.3)])
def test_masked_out_elements_stay_bit_identical(float64, backend, make):
    params = bowl_params()
    mask = np.zeros((3, 2), dtype=bool)
    mask[0, 1] = mask[2, 0] = True
    params["w"].mask = bk.asarray(mask)
    opt = make(list(params.values()))
    for _ in range(20):
        opt.zero_grad()
        bowl_backward(params)
        opt.step()
    w = host(params["w"].data)
    assert np.array_equal(w[~mask], P0["w"][~mask])                 # bit for bit
    assert (w[mask] != P0["w"][mask]).all()                         # the chosen ones moved
    assert (host(params["b"].data) != P0["b"]).all()                # unmasked: all moved
    assert params["w"].num_trainable() == 2


# --------------------------------------------------------------------------- clipping
def grads_of(shapes, scale, seed=0):
    rng = np.random.default_rng(seed)
    params = [Parameter(np.zeros(s)) for s in shapes]
    for p in params:
        p.grad = bk.asarray(rng.normal(0.0, scale, p.shape))
    return params


def test_clip_scales_the_global_norm_to_the_limit(float64):
    params = grads_of([(3, 4), (5,), (2, 2, 2)], scale=2.0)
    before = [host(p.grad).copy() for p in params]
    norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in before))
    assert norm > 5.0
    returned = clip_grad_norm(params, 1.0)
    assert returned == pytest.approx(norm, rel=1e-6)                # the norm before clipping
    after = [host(p.grad) for p in params]
    assert np.sqrt(sum((g ** 2).sum() for g in after)) == pytest.approx(1.0, rel=1e-5)
    ratios = np.concatenate([(a / b).ravel() for a, b in zip(after, before)])
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-12)       # one common factor


def test_clip_leaves_small_gradients_alone(float64):
    params = grads_of([(3, 4), (5,)], scale=0.01)
    before = [host(p.grad).copy() for p in params]
    norm = clip_grad_norm(params, 1.0)
    assert norm < 1.0
    assert all(np.array_equal(host(p.grad), b) for p, b in zip(params, before))
    assert clip_grad_norm([Parameter(np.zeros(3))], 1.0) == 0.0     # no gradients at all


def test_clip_reports_non_finite_norms_without_scaling(float64):
    params = grads_of([(3,)], scale=1.0)
    params[0].grad[1] = np.inf
    assert math.isinf(clip_grad_norm(params, 1.0))
    assert np.isinf(host(params[0].grad)[1])                        # left for train() to refuse


# --------------------------------------------------------------------------- schedule
def test_cosine_schedule_endpoints_and_shape():
    lr, total, warm, floor = 0.01, 100, 10, 0.1
    s = [cosine_schedule(t, total, lr, warm, floor) for t in range(total + 1)]
    assert s[0] == pytest.approx(lr / warm)                         # warmup starts small
    assert s[warm - 1] == pytest.approx(lr)                         # ... and reaches the peak
    assert s[warm] == pytest.approx(lr)                             # decay starts at the peak
    assert s[total] == pytest.approx(floor * lr)                    # and ends at the floor
    mid = warm + (total - warm) // 2
    assert s[mid] == pytest.approx(lr * (floor + (1 - floor) * 0.5))  # half way: the mean
    assert all(a < b for a, b in zip(s[:warm - 1], s[1:warm]))      # warmup rises
    assert all(a >= b for a, b in zip(s[warm:], s[warm + 1:]))      # decay never rises
    assert cosine_schedule(0, 50, lr) == pytest.approx(lr)          # no warmup: peak at once
    assert cosine_schedule(10_000, 50, lr, 5) == pytest.approx(floor * lr)  # past the end


# --------------------------------------------------------------------------- divergence
class Poisoned(GPT):
    """A GPT whose loss is multiplied by ``poison``: the batch function sets it to NaN/inf."""

    poison = 1.0

    def loss(self, x, y, **kw):
        return super().loss(x, y, **kw) * self.poison


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_train_stops_on_a_bad_loss_and_keeps_the_last_good_weights(bad):
    model = Poisoned(CFG, seed=0)
    draw, seen = batches(), {}

    def next_batch(B):
        step = len(seen)
        seen[step] = snapshot(model)                                # = weights after step - 1
        model.poison = bad if step == 4 else 1.0
        return draw(B)

    cfg = TrainConfig(steps=10, batch_size=4, lr=0.05, warmup=0, progress=False)
    with np.errstate(invalid="ignore"), pytest.raises(TrainingDivergedError, match="at step 4"):
        train(model, next_batch, cfg)
    now = snapshot(model)
    assert not all(np.array_equal(seen[0][k], seen[4][k]) for k in now)  # it did train
    assert all(np.array_equal(now[k], seen[4][k]) for k in now)     # step 4 was not applied


class Distance(Module):
    """loss = |x w - y|: finite at a perfect fit, where its gradient is 0/0 = NaN."""

    def __init__(self):
        self.w = Parameter(np.ones((3, 1)))

    def loss(self, x, y):
        r = Tensor(x) @ self.w - Tensor(y)
        return (r * r).sum().sqrt()


def test_train_stops_on_a_bad_gradient_even_when_the_loss_is_finite(float64):
    model = Distance()
    calls = []

    def next_batch(B):
        calls.append(host(model.w.data).copy())
        x = np.eye(3)
        y = host(model.w.data).copy() if len(calls) == 3 else np.zeros((3, 1))  # exact fit
        return x, y

    cfg = TrainConfig(steps=6, batch_size=1, lr=0.1, warmup=0, grad_clip=0, progress=False,
                      optimizer="sgd")
    with np.errstate(divide="ignore", invalid="ignore"), \
            pytest.raises(TrainingDivergedError, match=r"step 2: loss=0\.0, gradient norm=nan"):
        train(model, next_batch, cfg)
    assert np.array_equal(host(model.w.data), calls[2])


@pytest.mark.parametrize("make", [AdamW, SGD])
def test_weight_decay_shrinks_matrices_and_leaves_vectors_alone(make):
    """With a zero gradient the update is the decay alone: a matrix shrinks by exactly
    (1 - lr wd) (AdamW; SGD: the same, its decay rides in g), a vector does not move at all,
    unless decay_vectors asks for it."""
    w = Parameter(np.array([[1.0, -2.0], [0.5, 4.0]], dtype=np.float64))
    b = Parameter(np.array([3.0, -1.0], dtype=np.float64))
    for p in (w, b):
        p.grad = bk.xp.zeros_like(p.data)
    w0, b0 = host(w.data).copy(), host(b.data).copy()
    make([w, b], lr=0.1, weight_decay=0.5).step()
    np.testing.assert_allclose(host(w.data), w0 * (1 - 0.1 * 0.5), rtol=1e-12)
    np.testing.assert_array_equal(host(b.data), b0)                 # bit for bit
    make([w, b], lr=0.1, weight_decay=0.5, decay_vectors=True).step()
    np.testing.assert_allclose(host(b.data), b0 * (1 - 0.1 * 0.5), rtol=1e-12)


def test_bitfit_with_weight_decay_trains_its_biases_exactly_as_without():
    """BitFit trains only biases (vectors): weight decay must not shrink them, so training with
    wd = 0.5 and with wd = 0 gives bit-identical biases (two runs, same batches). Before the
    ndim >= 2 rule the decayed run drifted away."""
    from minipeft.peft import bitfit, get_peft_model

    def run(wd):
        model = get_peft_model(GPT(CFG, seed=0), bitfit())
        assert all(p.ndim == 1 for p in model.trainable_parameters())
        start = [host(p.data).copy() for p in model.trainable_parameters()]
        train(model, batches(), TrainConfig(steps=8, batch_size=4, lr=0.05, weight_decay=wd,
                                            warmup=0, progress=False))
        return start, [host(p.data).copy() for p in model.trainable_parameters()]
    (start, plain), (_, decayed) = run(0.0), run(0.5)
    assert sum(not np.array_equal(a, b) for a, b in zip(start, plain)) >= len(start) - 1
    for i, (a, b) in enumerate(zip(decayed, plain)):
        np.testing.assert_array_equal(a, b, err_msg=f"bias {i}")
