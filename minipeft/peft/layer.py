"""The method interface: what every PEFT layer knows about itself.

A *PEFT layer* is a module that a method installs in a frozen model (by wrapping a base module,
or by attaching a new one). It holds one set of tensors per adapter name and answers, for any
of them::

    adapter_names()            which adapters it holds          (in ``self.adapters``)
    active                     which one forward uses now       (None: behave like the base)
    merged_adapter             which one the base weights hold  (None: the weights are the base)
    set_active(name)           switch; only the active adapter's tensors train
    adapter_tensors(name)      local name -> Parameter that trains
    state(name) / check_state / load_state     what a save writes, and reading it back
    check_merge / apply_merge / unmerge        fold into the base weights and back
    delete(name), detach(model, path)          remove one adapter, or the whole layer
    snapshot() / restore(snap)                 the layer's own state, for all-or-nothing calls
    prepare_inputs(ids, kwargs)                extra model inputs (when ``adds_inputs``)

``core.PeftModel`` talks to layers only through these names, so it never needs to know which
method made a layer. A new method subclasses ``PeftLayer``, overrides what differs, and keeps
the rest.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

from minipeft import backend as bk
from minipeft.nn.module import Module


class MergedAdapterError(RuntimeError):
    """An adapter is merged into the base weights and the call would make the model compute
    something other than what its active adapter says: ``unmerge()`` first."""


# Per-row adapter names for one mixed-batch forward call (None: every row uses ``active``).
# A context variable, set once by PeftModel.forward, instead of an attribute on every layer.
_ROW_ADAPTERS: ContextVar = ContextVar("row_adapters", default=None)


def row_adapters() -> list | None:
    """The adapter name of each row of the batch being run, or None (one adapter for all)."""
    return _ROW_ADAPTERS.get()


@contextmanager
def rows_using(names):
    token = _ROW_ADAPTERS.set(list(names))
    try:
        yield
    finally:
        _ROW_ADAPTERS.reset(token)


def restores(original, restored, who: str) -> None:
    """Raise ValueError unless ``restored`` equals ``original`` within float tolerance
    (``|restored - original| <= 1e-5 |original| + 1e-4 max|original|``, element by element).

    A merge folds an update into a base weight, and ``unmerge`` must take it out again. In
    float32 ``(W + ΔW) - ΔW`` is W up to round-off unless ΔW dwarfs W (the bits of W are lost)
    or the merged value under- or overflows; merges check this before committing."""
    xp = bk.xp
    o = original.astype(xp.float64)
    err = xp.abs(restored.astype(xp.float64) - o)
    scale = float(xp.abs(o).max()) if o.size else 0.0
    ok = bool(xp.isfinite(restored).all()) and bool((err <= 1e-5 * xp.abs(o) + 1e-4 * scale).all())
    if not ok:
        worst = float(xp.nan_to_num(err, nan=xp.inf).max()) if err.size else 0.0
        raise ValueError(f"merge refused: {who}: unmerging would not give the base weights back "
                         f"(largest error {worst:.3g} for weights of size up to {scale:.3g}); "
                         "the base weights were left unchanged")


class PeftLayer(Module):
    """A module holding per-adapter tensors in ``self.adapters`` (a Module whose attributes
    are adapter names), the ``active`` name, and the ``merged_adapter`` name."""

    supports_mixed_batch = False  # can one batch use a different adapter per row?
    adds_inputs = False           # does prepare_inputs add model inputs (prompts, prefixes)?
    names_from_root = False       # adapter_tensors' names are full model paths already

    def __init__(self):
        self.adapters = Module()
        self.active: str | None = None
        self.merged_adapter: str | None = None  # which adapter the base weights hold, if any

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    def folded_adapter(self) -> str | None:
        """The adapter whose update the base weights hold now (None: they are the base)."""
        return self.merged_adapter

    # ---------------------------------------------------------------- adapters
    def adapter_names(self) -> list[str]:
        return [k for k, v in vars(self.adapters).items() if isinstance(v, Module)]

    def adapter_tensors(self, name: str) -> dict:
        """Local name -> Parameter for adapter ``name`` (what trains and what gets saved)."""
        return dict(getattr(self.adapters, name).named_parameters())

    def set_active(self, name: str | None) -> None:
        """Make ``name`` active here (None, or a name this layer lacks: behave like the base);
        only the active adapter's tensors train."""
        self.active = name if name in self.adapter_names() else None
        for n in self.adapter_names():
            for p in self.adapter_tensors(n).values():
                p.requires_grad = n == self.active

    def delete(self, name: str) -> None:
        """Remove adapter ``name`` (PeftModel unmerges it first)."""
        delattr(self.adapters, name)
        if self.active == name:
            self.active = None

    def detach(self, model: Module, path: str) -> None:
        """Take this layer out of ``model``: put back the module it wraps, or remove it."""
        parent_name, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = vars(self).get("base")
        if isinstance(base, Module):
            setattr(parent, leaf, base)
        else:
            delattr(parent, leaf)

    def snapshot(self):
        """Everything a failed call must put back (the layer's attributes and adapters)."""
        return dict(vars(self)), dict(vars(self.adapters))

    def restore(self, snap) -> None:
        own, adapters = snap
        vars(self).clear()
        vars(self).update(own)
        vars(self.adapters).clear()
        vars(self.adapters).update(adapters)

    # ---------------------------------------------------------------- save / load
    def state(self, name: str) -> dict:
        """Local name -> array: what ``save_adapter`` writes for adapter ``name``."""
        return {k: p.data for k, p in self.adapter_tensors(name).items()}

    def claims(self, name: str, key: str) -> bool:
        """Is ``key`` (a local name from a file) one of adapter ``name``'s tensors here?"""
        return key in self.adapter_tensors(name)

    def check_state(self, name: str, arrays: dict) -> tuple[list, list]:
        """(missing local names, other problems) that stop ``arrays`` (local name -> host
        array, the keys this layer claims) from filling adapter ``name``. Empty: it fits."""
        own = self.adapter_tensors(name)
        missing = [k for k in own if k not in arrays]
        problems = [f"{k}: expected {own[k].shape}, file {tuple(v.shape)}"
                    for k, v in arrays.items() if tuple(v.shape) != own[k].shape]
        problems += [p for k, v in arrays.items() for p in value_problems(k, v, own[k].dtype)]
        return missing, problems

    def load_state(self, name: str, arrays: dict) -> None:
        """Copy ``arrays`` (already checked by ``check_state``) into adapter ``name``."""
        for k, p in self.adapter_tensors(name).items():
            p.data = bk.asarray(arrays[k], dtype=p.dtype).copy()

    # ---------------------------------------------------------------- merge
    mergeable = False  # can this layer fold an adapter into the base weights?

    def check_merge(self):
        """Raise ValueError if merging the active adapter would fail or could not be undone;
        return what ``apply_merge`` installs (None: nothing to do). Changes nothing."""
        if self.active is None or self.merged_adapter == self.active:
            return None
        if not self.mergeable:
            raise ValueError(f"{type(self).__name__} cannot fold an adapter into the base weights")
        if self.merged:
            raise MergedAdapterError(f"adapter {self.merged_adapter!r} is merged; unmerge() "
                                     f"before merging {self.active!r}")
        return self._merge_plan(self.active)

    def _merge_plan(self, name: str):
        raise NotImplementedError

    def apply_merge(self, plan) -> None:
        """Install what ``check_merge`` returned (None: nothing to do)."""
        if plan is None:
            return
        self._install(plan)
        self.merged_adapter = self.active

    def _install(self, plan) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        """Take the merged adapter out of the base weights again. Idempotent."""
        if self.merged_adapter is None:
            return
        self._take_out(self.merged_adapter)
        self.merged_adapter = None

    def _take_out(self, name: str) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- inputs
    def prepare_inputs(self, ids, kwargs: dict) -> dict:
        """Add model inputs before the forward pass (when ``adds_inputs``); default: none."""
        return kwargs


def value_problems(key: str, arr, dtype) -> list[str]:
    """Why a saved array cannot become a tensor of ``dtype`` unchanged: not a real number
    (complex, bool, strings), or finite values beyond the range of ``dtype`` (a float64 of
    1e300 would become inf in float32). Integers are exact and accepted."""
    if arr.dtype.kind not in "fiu":
        return [f"{key}: dtype {arr.dtype} is not a real number"]
    if arr.dtype.kind == "f" and arr.size:
        top = float(bk.np.abs(arr).max())
        if top > float(bk.np.finfo(dtype).max):
            return [f"{key}: values up to {top:.3g} exceed the range of {bk.np.dtype(dtype)}"]
    return []


class DeltaLayer(PeftLayer):
    """A layer whose adapter adds a dense update to the weight it wraps, W' = W + ΔW with
    ΔW = ``delta_weight(name)`` (LoRA, VeRA, LoKr): one merge for all of them. The merge is
    refused (ValueError, nothing changed) when an adapter tensor holds NaN or inf, when W + ΔW
    overflows, or when unmerging, (W + ΔW) - ΔW, would not give W back (``restores``)."""

    mergeable = True

    def delta_weight(self, name: str):
        raise NotImplementedError

    def _merge_plan(self, name: str):
        for label, t in self.adapter_tensors(name).items():
            if not bool(bk.xp.isfinite(t.data).all()):
                raise ValueError(f"merge: adapter {name!r} has non-finite values in {label}; "
                                 "the base weights were left unchanged")
        W0 = self.base.weight.data
        delta = self.delta_weight(name)
        W = (W0 + delta).astype(W0.dtype)
        if not bool(bk.xp.isfinite(W).all()):
            raise ValueError("merge: W + ΔW overflows; the base weights were left unchanged")
        restores(W0, W - delta.astype(W0.dtype), f"{type(self).__name__} adapter {name!r}")
        return W

    def _install(self, W) -> None:
        self.base.weight.data = W

    def _take_out(self, name: str) -> None:
        W = self.base.weight.data - self.delta_weight(name)
        self.base.weight.data = W.astype(self.base.weight.dtype)
