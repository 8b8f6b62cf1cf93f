"""Module and Parameter: named, nested containers of trainable arrays.

A ``Module`` finds its parameters and children by walking its own attributes in the order they
were set, so names come out as ``blocks.0.attn.q_proj.weight`` with no registration code. A
``Parameter`` is a Tensor that is a model weight; its ``requires_grad`` flag is *the* switch for
trainability: the optimizer, the adapter saver and the reports all read it, and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator

from minipeft import backend as bk
from minipeft.autograd import Tensor


class Parameter(Tensor):
    """A model weight. ``requires_grad`` says whether it trains; ``mask`` (optional, boolean,
    same shape) restricts training to some elements (selective fine-tuning)."""

    __slots__ = ("mask",)

    def __init__(self, data, requires_grad: bool = True, name: str | None = None):
        super().__init__(data, requires_grad=requires_grad, name=name)
        self.mask = None

    def num_trainable(self) -> int:
        """Elements that train: all of them, the masked ones, or none when frozen."""
        if not self.requires_grad:
            return 0
        return int(self.mask.sum()) if self.mask is not None else self.size

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, requires_grad={self.requires_grad})"


class StateDictError(ValueError):
    """A state dict does not fit the model: names every missing, unexpected or mis-shaped key."""


class Module:
    """Base class of every layer. Subclasses set Parameters and child Modules as attributes
    in ``__init__`` and define ``forward``."""

    training: bool = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    # ---------------------------------------------------------------- traversal
    def _children(self) -> Iterator[tuple[str, object]]:
        for key, value in vars(self).items():
            if isinstance(value, (Parameter, Module)):
                yield key, value

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """Every module in the tree, this one first (with name ``prefix``)."""
        yield prefix, self
        for key, value in self._children():
            if isinstance(value, Module):
                yield from value.named_modules(f"{prefix}.{key}" if prefix else key)

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Every parameter, depth first, in definition order (a shared one appears once)."""
        seen = set()
        for mod_name, mod in self.named_modules(prefix):
            for key, value in vars(mod).items():
                if isinstance(value, Parameter) and id(value) not in seen:
                    seen.add(id(value))
                    yield (f"{mod_name}.{key}" if mod_name else key), value

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def trainable_parameters(self) -> list[Parameter]:
        """The parameters with ``requires_grad``: exactly what an optimizer should update."""
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self, trainable_only: bool = False) -> int:
        if trainable_only:
            return sum(p.num_trainable() for p in self.parameters())
        # frozen weights a module stores in another form (a 4-bit QuantLinear's codes) count too
        stored = sum(m.stored_weights() for _, m in self.named_modules()
                     if hasattr(m, "stored_weights"))
        return sum(p.size for p in self.parameters()) + stored

    def get_submodule(self, name: str) -> Module:
        """The module at a dotted path such as ``blocks.0.attn.q_proj``."""
        mod = self
        for part in name.split(".") if name else []:
            child = vars(mod).get(part)
            if not isinstance(child, Module):
                raise KeyError(f"no submodule {name!r} (stopped at {part!r})")
            mod = child
        return mod

    def set_submodule(self, name: str, module: Module) -> None:
        """Replace the module at a dotted path: the tool of PEFT's module surgery."""
        parent_name, _, leaf = name.rpartition(".")
        parent = self.get_submodule(parent_name)
        if not isinstance(vars(parent).get(leaf), Module):
            raise KeyError(f"no submodule {name!r} to replace")
        setattr(parent, leaf, module)

    # ---------------------------------------------------------------- modes and grads
    def train(self, mode: bool = True) -> Module:
        for _, mod in self.named_modules():
            mod.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def requires_grad_(self, flag: bool = True) -> Module:
        """Freeze (False) or unfreeze (True) every parameter of this module."""
        for p in self.parameters():
            p.requires_grad = flag
        return self

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Name -> array (on the current device), for every parameter."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the parameters. Checks everything first, so a bad dict changes
        nothing; the error names each missing, unexpected and mis-shaped key."""
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [f"{k}: model {own[k].shape}, file {tuple(state[k].shape)}"
                  for k in own if k in state and tuple(state[k].shape) != own[k].shape]
        problems = []
        if strict and missing:
            problems.append(f"missing keys: {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys: {unexpected}")
        if shapes:
            problems.append(f"shape mismatches: {shapes}")
        problems += _value_problems(own, state)
        if problems:
            raise StateDictError("load_state_dict: " + "; ".join(problems))
        for key, p in own.items():
            if key in state:
                p.data = bk.asarray(state[key], dtype=p.dtype).copy()


def _value_problems(own: dict, state: dict) -> list[str]:
    """What a float parameter must not receive: a non-float array (complex would lose its
    imaginary part, integers and booleans are not weights), values beyond the parameter's
    dtype (a float64 1e39 would become inf in float32), or NaN/inf."""
    dtypes, ranges, nonfinite = [], [], []
    for key, p in own.items():
        if key not in state or p.dtype.kind != "f":
            continue
        a = state[key]
        a = a.data if isinstance(a, Tensor) else a
        kind = getattr(getattr(a, "dtype", None), "kind", None)
        if kind != "f":
            dtypes.append(f"{key}: {getattr(a, 'dtype', type(a).__name__)}")
            continue
        finite = bool(bk.xp.isfinite(bk.asarray(a)).all())
        if not finite:
            nonfinite.append(key)
        elif a.dtype.itemsize > p.dtype.itemsize and a.size and \
                float(abs(bk.asarray(a)).max()) > float(bk.np.finfo(p.dtype).max):
            ranges.append(f"{key} (|value| up to {float(abs(bk.asarray(a)).max()):.3g})")
    problems = []
    if dtypes:
        problems.append(f"not floating-point arrays (a weight must be real floats): {dtypes}")
    if ranges:
        problems.append(f"values beyond the parameters' dtype range (they would become inf): "
                        f"{ranges}")
    if nonfinite:
        problems.append(f"NaN or inf values: {nonfinite}")
    return problems


class ModuleList(Module):
    """An ordered list of modules, named ``0``, ``1``, ... (so ``blocks.3.attn``)."""

    def __init__(self, modules):
        for i, m in enumerate(modules):
            setattr(self, str(i), m)
        self._n = len(modules)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Module:
        if not -self._n <= i < self._n:
            raise IndexError(f"index {i} out of range for ModuleList of length {self._n}")
        return getattr(self, str(i % self._n))

    def __iter__(self):
        return (getattr(self, str(i)) for i in range(self._n))
