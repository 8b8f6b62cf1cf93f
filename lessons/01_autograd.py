"""Lesson 01: reverse-mode automatic differentiation, from one chain rule to tensors.

Every method in this textbook trains some parameters and leaves others alone. To train anything we
need dL/dθ, the gradient of a scalar loss L with respect to each parameter θ, and this lesson
builds that gradient machine from the chain rule up, then proves it op by op.

1. One scalar, one chain.  For L = f(g(h(x))), the chain rule says

       dL/dx = f'(g(h(x))) · g'(h(x)) · h'(x).

   Evaluate the program forward and remember every intermediate value. Then walk *backwards*,
   carrying the "adjoint" v̄ = dL/dv of each value v. Start with L̄ = 1; each node turns the
   adjoint of its output into adjoints of its inputs by multiplying with its local derivative:

       h̄ = ḡ · g'(h),   x̄ = h̄ · h'(x).

   That is reverse mode. One backward pass gives dL/d(every input) at a cost of a few forward
   passes, however many inputs there are. A network has one loss and millions of parameters, so
   reverse mode (not forward mode, which costs one pass per input) is what deep learning uses.

2. A graph, not a chain.  Real programs reuse values: in L = tanh(a·b + c) · a the input a is
   used twice. The rule for such a *fan-out* is to SUM the adjoints arriving along each use:
   ā = (adjoint via the product a·b) + (adjoint via the final multiplication). To be sure a
   node's adjoint is complete before it is passed on, nodes are visited in reverse topological
   order: a node only after everything that consumed it.

3. Tensors.  Nothing changes except that v̄ now has v's shape. Each op supplies a
   vector-Jacobian product instead of a scalar derivative, for example, with Y = X W:

       X̄ = Ȳ Wᵀ,   W̄ = Xᵀ Ȳ.

   Broadcasting copies a value along an axis in the forward pass, so the backward pass *sums*
   the adjoint along that axis: "the adjoint of broadcast is sum".

4. Skipping work.  If W is frozen (as the base model is in every PEFT method) nobody needs W̄, so
   the matmul Xᵀ Ȳ is never run. That skipped product, and the activations it would need, are
   where parameter-efficient fine-tuning saves compute and memory.

5. Softmax + cross-entropy, by hand.  With p = softmax(z) and L = -log p_t for target class t:

       log p_t = z_t - log Σ_k exp(z_k)   ⇒   dL/dz_j = p_j - [j = t].

   Averaged over N rows: dL/dz = (p - onehot(t)) / N. The library fuses the two ops into one
   with exactly this backward, which is cheaper and stabler than differentiating through them.

6. Trust, but verify.  A gradient formula can be checked against the definition of a
   derivative. The central difference (L(x + ε) - L(x - ε)) / 2ε has error O(ε²) from
   truncation plus O(δ/ε) from rounding (δ ≈ 1e-16 in float64), so ε ≈ 1e-6 gives about 1e-10.
   ``gradcheck`` does this for every element of every input, and the table below runs it on
   every op in the library.

The parts: (a) a scalar graph with a fan-out, its gradients by the engine against the chain
rule by hand; (b) softmax + cross-entropy, (p - onehot)/N by hand against the library and finite
differences; (c) every op of the library against finite differences; (d) which finite-difference
step is most accurate (the figure's right panel).

Run:  python lessons/01_autograd.py [--quick] [--seed N]
Set MINIPEFT_BACKEND=cupy to run the same lesson on a GPU.
"""

from __future__ import annotations

import time

import matplotlib

matplotlib.use("Agg")  # render to a file; no display needed
import matplotlib.pyplot as plt
import numpy as np  # host-side only: the hand-derived references and the figure

from minipeft import backend as bk
from minipeft import lessonkit
from minipeft.autograd import (
    Tensor,
    attention,
    cross_entropy,
    dropout,
    embedding,
    gelu,
    gradcheck,
    layer_norm,
    linear,
    log_softmax,
    no_grad,
    ops,
    softmax,
)

MASK_SEED = 0         # dropout's mask in (c), the same for every evaluation gradcheck makes
TRIALS = 3            # random inputs per op in the table (the worst one is reported)
QUICK_TRIALS = 1
SIZE = 3              # side length of the test tensors
QUICK_SIZE = 2
EPS = 1e-6            # finite-difference step (float64)
ATOL, RTOL = 1e-6, 1e-4   # an element passes when |analytic - numeric| <= ATOL + RTOL |numeric|
EPS_SWEEP = np.logspace(-1, -12, 23)   # for the figure: error of central differences vs step
OUT_NAME = "01_autograd.png"


def leaf(a, name: str | None = None) -> Tensor:
    """A float64 tensor on the current backend that wants its gradient."""
    return Tensor(np.asarray(a, dtype=np.float64), requires_grad=True, name=name)


def topological_order(root: Tensor) -> list[Tensor]:
    """Every node of root's graph, each after its inputs (iterative depth-first search)."""
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, inputs_done = stack.pop()
        if inputs_done:
            order.append(node)
        elif id(node) not in seen:
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in reversed(node._parents))
    return order


# --------------------------------------------------------------------------- (a) a scalar graph
def scalar_chain_rule(values: dict) -> float:
    print("\n(a) A scalar graph:  L = tanh(a*b + c) * a     (a is used twice: a fan-out)\n")
    a, b, c = (leaf(values[k], name=k) for k in "abc")
    d = a * b
    e = d + c
    f = ops.tanh(e)
    L = f * a
    for t, n in ((d, "d"), (e, "e"), (f, "f"), (L, "L")):
        t.name = n

    order = topological_order(L)  # walk it now: backward() frees the graph as it goes
    print(f"    {'node':<5} {'op':<8} {'shape':<7} {'inputs':<8} value")
    for t in order:
        ins = ",".join(p.name for p in t._parents) or "-"
        print(f"    {t.name:<5} {t.op:<8} {str(t.shape):<7} {ins:<8} {t.item():+.6f}")

    L.backward()

    # By hand, with f = tanh(ab + c) and tanh' = 1 - tanh²:
    #   dL/da = f + a (1 - f²) b   (two paths into a: the final product and the product a*b)
    #   dL/db = a (1 - f²) a,   dL/dc = a (1 - f²)
    av, bv, cv = (values[k] for k in "abc")
    fv = np.tanh(av * bv + cv)
    hand = {"a": fv + av * (1 - fv ** 2) * bv, "b": av * (1 - fv ** 2) * av,
            "c": av * (1 - fv ** 2)}
    print(f"\n    {'input':<6} {'autograd':>12} {'by hand':>12} {'|diff|':>9}")
    worst = 0.0
    for t in (a, b, c):
        got = float(bk.to_numpy(t.grad))
        worst = max(worst, abs(got - hand[t.name]))
        print(f"    {t.name:<6} {got:>12.8f} {hand[t.name]:>12.8f} {abs(got - hand[t.name]):>9.1e}")
    return worst


# --------------------------------------------------------------------------- (b) softmax + CE
def softmax_cross_entropy(rng, N: int, V: int) -> dict:
    print(f"\n(b) Softmax + cross-entropy on N={N} rows, V={V} classes: dL/dz = (p - onehot)/N\n")
    z = rng.standard_normal((N, V))
    t = rng.integers(0, V, N)

    # by hand, with plain arrays
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)                            # (N, V)
    onehot = np.eye(V)[t]                                           # (N, V)
    hand_loss = -np.log(p[np.arange(N), t]).mean()
    hand_grad = (p - onehot) / N

    # the library
    Z = leaf(z)
    targets = bk.asarray(t)
    loss = cross_entropy(Z, targets)
    loss.backward()
    lib_grad = bk.to_numpy(Z.grad)

    # and the definition of a derivative
    check = gradcheck(lambda Z: cross_entropy(Z, targets), [leaf(z)], eps=EPS, atol=ATOL,
                      rtol=RTOL, raise_on_fail=False)
    out = {"loss_diff": abs(loss.item() - hand_loss),
           "hand_vs_library": float(np.abs(hand_grad - lib_grad).max()),
           "gradcheck_abs": check.max_abs_err, "gradcheck_ok": check.ok}
    print(f"    loss: library {loss.item():.10f}, by hand {hand_loss:.10f}")
    print(f"    max |hand - library| gradient      {out['hand_vs_library']:.1e}")
    print(f"    max |library - finite difference|  {out['gradcheck_abs']:.1e}")
    return out


# --------------------------------------------------------------------------- (c) every op
def op_cases(rng, n: int) -> list:
    """(name, function of tensors, input arrays): one case per op, inputs shaped by n."""
    r = lambda *s: rng.standard_normal(s)
    pos = lambda *s: rng.uniform(0.5, 2.0, s)                       # log, sqrt, denominators
    away = lambda *s: rng.uniform(0.1, 2.0, s) * rng.choice([-1, 1], s)  # relu: off its kink
    V = n + 2
    ids = bk.asarray(rng.integers(0, V, (n, n + 1)))                # repeats are likely
    rows = bk.asarray(rng.integers(0, n, 2 * n))                    # repeated row indices
    cond = bk.asarray(rng.random((n, 1, n)) < 0.5)
    targets = rng.integers(0, V, (2, n))
    targets[0, 0] = -100                                            # an ignored position
    targets = bk.asarray(targets)
    T = n + 1
    return [
        ("add", ops.add, [r(n, 1, n), r(T, 1)]),                    # broadcasting both ways
        ("sub", ops.sub, [r(n, T), r(T)]),
        ("mul", ops.mul, [r(1, n, T), r(n, 1, 1)]),
        ("div", ops.div, [r(n, T), pos(1, T)]),
        ("neg", ops.neg, [r(n, T)]),
        ("pow", lambda x: x ** 3, [r(n, T)]),
        ("matmul", ops.matmul, [r(2, 1, n, T), r(n, T, 2)]),        # batch dims broadcast
        ("exp", ops.exp, [r(n, T)]),
        ("log", ops.log, [pos(n, T)]),
        ("sqrt", ops.sqrt, [pos(n, T)]),
        ("tanh", ops.tanh, [r(n, T)]),
        ("relu", ops.relu, [away(n, T)]),
        ("sum", lambda x: ops.sum(x, axis=(0, -1), keepdims=True), [r(n, T, 2)]),
        ("mean", lambda x: ops.mean(x, axis=1), [r(n, T, 2)]),
        ("max", lambda x: ops.max(x, axis=-1), [r(n, T)]),
        ("reshape", lambda x: x.reshape(T, -1), [r(n, T)]),
        ("transpose", lambda x: x.permute(2, 0, 1), [r(n, T, 2)]),
        ("swapaxes", lambda x: ops.swapaxes(x, 0, -1), [r(n, T, 2)]),
        ("getitem", lambda x: x[rows, 1:], [r(n, T)]),
        ("concatenate", lambda x, y: ops.concatenate([x, y], axis=1), [r(n, 2), r(n, T)]),
        ("stack", lambda x, y: ops.stack([x, y], axis=-1), [r(n, T), r(n, T)]),
        ("where", lambda x, y: ops.where(cond, x, y), [r(n, T, n), r(n)]),
        ("masked_fill", lambda x: ops.masked_fill(x, cond, -5.0), [r(n, T, n)]),
        ("broadcast_to", lambda x: ops.broadcast_to(x, (2, n, T)), [r(n, 1)]),
        ("linear", linear, [r(2, n, T), r(n + 2, T), r(n + 2)]),
        ("gelu", gelu, [r(n, T)]),
        ("softmax", lambda x: softmax(x, axis=0), [r(n, T)]),
        ("log_softmax", log_softmax, [r(n, T)]),
        ("cross_entropy", lambda x: cross_entropy(x, targets), [r(2, n, V)]),
        ("layer_norm", layer_norm, [r(n, T), r(T), r(T)]),
        ("embedding", lambda w: embedding(w, ids), [r(V, n)]),
        ("dropout", lambda x: dropout(x, 0.5, True, rng=bk.device_rng(MASK_SEED)), [r(n, T)]),
        ("attention", attention, [r(1, 2, n, 2), r(1, 2, T, 2), r(1, 2, T, 2)]),  # Tq < Tk
    ]


def every_op(rng, n: int, trials: int) -> dict:
    print(f"\n(c) Every op against finite differences (float64, eps={EPS:g}, worst of "
          f"{trials} random input{'s' if trials > 1 else ''})\n")
    results = {}
    for _ in range(trials):
        for name, fn, arrays in op_cases(rng, n):
            t0 = time.perf_counter()
            res = gradcheck(fn, [leaf(a) for a in arrays], eps=EPS, atol=ATOL, rtol=RTOL,
                            raise_on_fail=False)
            seconds = time.perf_counter() - t0
            old = results.get(name)
            if old is None or res.max_abs_err > old["max_abs_err"] or not res.ok:
                results[name] = {"max_abs_err": res.max_abs_err, "max_rel_err": res.max_rel_err,
                                 "ok": res.ok and (old is None or old["ok"]),
                                 "checked": res.checked, "seconds": seconds}
    print(f"    {'op':<14} {'elements':>8} {'max abs err':>12} {'max rel err':>12}  result")
    for name, m in results.items():
        print(f"    {name:<14} {m['checked']:>8} {m['max_abs_err']:>12.1e} "
              f"{m['max_rel_err']:>12.1e}  {'pass' if m['ok'] else 'FAIL'}")
    failed = [k for k, m in results.items() if not m["ok"]]
    print(f"\n    {len(results) - len(failed)}/{len(results)} ops pass"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return results


# --------------------------------------------------------------------------- (d) the step size
def eps_sweep(x0: float = 0.5) -> np.ndarray:
    """Which step should a finite difference take? The error of the central difference of tanh
    at x0, for each step in EPS_SWEEP, against the exact derivative 1 - tanh²."""
    exact = 1 - np.tanh(x0) ** 2
    errs = []
    with no_grad():
        for eps in EPS_SWEEP:
            up = ops.tanh(leaf(x0 + eps)).item()
            down = ops.tanh(leaf(x0 - eps)).item()
            errs.append(abs((up - down) / (2 * eps) - exact))
    sweep = np.maximum(np.array(errs), 1e-17)
    best = EPS_SWEEP[int(np.argmin(sweep))]
    print(f"\n(d) Central differences are most accurate near eps = {best:.0e} "
          f"(error {sweep.min():.0e}); too small a step drowns in rounding.")
    return sweep


# --------------------------------------------------------------------------- the figure
def figure(results: dict, sweep: np.ndarray):
    """(c) every op's worst gradient error, (d) the error of central differences vs the step."""
    names = list(results)
    errs = np.array([max(results[k]["max_abs_err"], 1e-17) for k in names])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 6.5), gridspec_kw={"width_ratios": [3, 2]})
    colors = ["tab:blue" if results[k]["ok"] else "tab:red" for k in names]
    floor = -13.0  # bars grow from here: a longer bar is a larger error
    ax1.barh(names, np.log10(errs) - floor, left=floor, color=colors)
    ax1.set_xlim(floor, 0)
    ax1.axvline(np.log10(ATOL), color="k", ls="--", lw=1, label=f"tolerance {ATOL:g}")
    ax1.invert_yaxis()
    ax1.set_xlabel("log10 max |analytic - numeric| gradient error")
    ax1.set_title("Every op's backward vs central differences (float64)")
    ax1.legend(loc="lower right")
    ax2.loglog(EPS_SWEEP, sweep, "o-")
    ax2.axvline(EPS, color="k", ls="--", lw=1, label=f"eps used = {EPS:g}")
    ax2.set_xlabel("finite-difference step eps")
    ax2.set_ylabel("|central difference - exact derivative|")
    ax2.set_title("d tanh(x)/dx at x = 0.5: truncation O(eps²)\nvs rounding O(1e-16/eps)")
    ax2.legend()
    return fig


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = lessonkit.arguments(__doc__, quick="smaller inputs, one trial per op").parse_args(argv)
    clock = lessonkit.Stopwatch()
    rng = np.random.default_rng(args.seed)
    n, trials = (QUICK_SIZE, QUICK_TRIALS) if args.quick else (SIZE, TRIALS)
    print(f"Lesson 01: reverse-mode autodiff (backend: {bk.name}, seed {args.seed})")

    values = {"a": 0.7, "b": -1.3, "c": 0.4}
    scalar_diff = scalar_chain_rule(values)
    ce = softmax_cross_entropy(rng, N=2 * n, V=n + 3)
    results = every_op(rng, n, trials)
    sweep = eps_sweep()

    path = lessonkit.save_figure(figure(results, sweep), OUT_NAME)
    print(f"    figure saved to {path}  ({clock.seconds():.0f} s in all)")
    return {"scalar_max_abs_diff": scalar_diff, "softmax_ce": ce, "ops": results,
            "eps_sweep": dict(zip(EPS_SWEEP.tolist(), sweep.tolist())), "figure": str(path)}


if __name__ == "__main__":
    main()
