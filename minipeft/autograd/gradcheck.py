"""Checking a backward pass against the definition of a derivative.

For a function f of tensors, project its output onto a fixed random direction R to get a
scalar L = sum(f(x) * R); then for each input element x_i, the central difference

    (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)   =   dL/dx_i  +  O(eps^2)

must match the analytic gradient that ``backward()`` produced. In float64 with eps = 1e-6 the
two agree to about 1e-8 for smooth ops, so any mistake in a backward formula shows up plainly.
"""

from __future__ import annotations

from dataclasses import dataclass

from minipeft import backend as bk
from minipeft.autograd.tensor import Tensor


class GradcheckError(AssertionError):
    """The analytic gradient disagrees with finite differences."""


@dataclass
class GradcheckResult:
    """Worst disagreement found: which input, which element, both values and the errors."""
    ok: bool
    max_abs_err: float
    max_rel_err: float
    worst_input: int
    worst_index: tuple
    analytic: float
    numeric: float
    checked: int

    def report(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        return (f"gradcheck {verdict}: {self.checked} elements checked; worst at input "
                f"{self.worst_input}, index {self.worst_index}: analytic {self.analytic:.6e}, "
                f"numeric {self.numeric:.6e} (abs err {self.max_abs_err:.2e}, "
                f"rel err {self.max_rel_err:.2e})")


def gradcheck(fn, inputs, eps: float = 1e-6, atol: float = 1e-6, rtol: float = 1e-4,
              max_elements: int | None = None, seed: int = 0,
              raise_on_fail: bool = True) -> GradcheckResult:
    """Compare the gradients of ``fn(*inputs)`` with central differences.

    ``inputs`` are tensors; those with ``requires_grad`` are checked (use float64). With
    ``max_elements``, a random sample of that many coordinates per input is checked (for large
    models). An element passes when |analytic - numeric| <= atol + rtol * |numeric|.
    """
    inputs = list(inputs)
    checked_inputs = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    if not checked_inputs:
        raise ValueError("gradcheck: no input has requires_grad=True")
    for i in checked_inputs:
        if inputs[i].dtype != bk.np.float64:
            raise TypeError(f"gradcheck: input {i} has dtype {inputs[i].dtype}; finite "
                            "differences need float64")
    rng = bk.host_rng(seed)
    out = fn(*inputs)
    R = bk.asarray(rng.standard_normal(out.shape))                  # fixed projection

    def scalar() -> float:
        from minipeft.autograd.tensor import no_grad
        with no_grad():
            return float(bk.to_numpy((fn(*inputs).data * R).sum()))

    for i in checked_inputs:
        inputs[i].grad = None
    out.backward(R)

    worst = GradcheckResult(True, 0.0, 0.0, -1, (), 0.0, 0.0, 0)
    worst_score = float("-inf")
    for i in checked_inputs:
        t = inputs[i]
        analytic = bk.to_numpy(t.grad) if t.grad is not None else bk.np.zeros(t.shape)
        flat = bk.np.arange(t.size)
        if max_elements is not None and t.size > max_elements:
            flat = rng.choice(t.size, size=max_elements, replace=False)
        for f in flat:
            idx = bk.np.unravel_index(int(f), t.shape)
            old = t.data[idx].item()
            t.data[idx] = old + eps
            up = scalar()
            t.data[idx] = old - eps
            down = scalar()
            t.data[idx] = old
            numeric = (up - down) / (2 * eps)
            a = float(analytic[idx])
            err = abs(a - numeric)
            score = err - (atol + rtol * abs(numeric))
            worst.checked += 1
            worst.max_abs_err = max(worst.max_abs_err, err)
            worst.max_rel_err = max(worst.max_rel_err, err / max(abs(numeric), 1e-12))
            if score > worst_score:
                worst_score = score
                worst.worst_input, worst.worst_index = i, tuple(int(j) for j in idx)
                worst.analytic, worst.numeric = a, numeric
    worst.ok = worst_score <= 0
    if not worst.ok and raise_on_fail:
        raise GradcheckError(worst.report())
    return worst
