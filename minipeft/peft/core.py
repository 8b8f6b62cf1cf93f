"""The shared PEFT machinery: apply a method to a frozen model, report, save, load, switch.

    peft_model = get_peft_model(model, config)           # freeze, then do the method's surgery
    peft_model.print_trainable_parameters()
    train(peft_model, ...)                               # only the method's tensors train
    peft_model.save_adapter("adapters/task_b")           # safetensors + adapter_config.json
    with peft_model.disable_adapter(): ...               # the base model, untouched

Every method is a config class (``config.PeftConfig``) whose ``apply`` installs PEFT layers
(``layer.PeftLayer``) in the model: wrappers around base modules, modules attached to it, or a
holder of selected base weights. A layer knows its adapters, the active one, the one folded
into the weights, and how to save, load, fold and unfold them. ``PeftModel`` only talks to that
interface; it never asks which method it holds.

Every call either does all it says or changes nothing: ``_transaction`` records the model (each
parameter's data, flag and mask, each layer's own state, the adapters) and puts it all back if
the call fails, whatever the method.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from minipeft import backend as bk
from minipeft import checks
from minipeft.autograd import Tensor
from minipeft.io import CheckpointError, save_json, save_tensors
from minipeft.nn.module import Module
from minipeft.peft.config import CONFIG_CLASSES, PeftConfig
from minipeft.peft.files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    read_adapter,
    read_adapter_config,
    save_folder,
)
from minipeft.peft.layer import MergedAdapterError, PeftLayer, rows_using

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "CONFIG_CLASSES", "PeftConfig", "PeftLayer",
           "PeftModel", "MergedAdapterError", "get_peft_model", "load_peft_model", "peft_layers",
           "read_adapter", "read_adapter_config"]


def peft_layers(model: Module):
    """(path, layer) for every PeftLayer in ``model``, outermost first."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PeftLayer)]


def _check_config(config, who: str) -> None:
    if not isinstance(config, PeftConfig):
        raise TypeError(f"{who} needs a PEFT config (LoraConfig, SelectiveConfig, ...), got "
                        f"{type(config).__name__}")


class PeftModel(Module):
    """A frozen base model plus one or more named adapters of one method."""

    def __init__(self, model, config: PeftConfig, adapter_name: str = "default", seed: int = 0,
                 *, _saved: tuple | None = None):
        if isinstance(model, PeftModel):
            raise TypeError("get_peft_model: the model is already a PeftModel; add another "
                            "adapter with add_adapter(name, config)")
        if not isinstance(model, Module):
            raise TypeError(f"get_peft_model needs a model (a minipeft Module such as GPT), "
                            f"got {type(model).__name__}")
        _check_config(config, "get_peft_model")
        if peft_layers(model):
            raise TypeError("get_peft_model: the model already holds PEFT layers (a base_model "
                            "of a PeftModel?); use that PeftModel's add_adapter")
        self.base_model = model
        self.method = config.method      # every adapter of this model uses this method
        self.peft_configs: dict[str, PeftConfig] = {}
        self.active_adapter: str | None = None
        self._cache = None               # the (path, layer) list; reset by every _transaction
        self._check_new(adapter_name, config, seed, "get_peft_model")
        with self._transaction():        # a config that does not fit leaves the model as it was
            model.requires_grad_(False)
            for p in model.parameters():
                p.mask = None
            self._add(adapter_name, config, seed, _saved)

    @property
    def config(self):
        return self.base_model.config

    def _layers(self):
        if self._cache is None:          # found once: walking every module per call costs time
            self._cache = peft_layers(self.base_model)
        return self._cache

    def _folded(self) -> str | None:
        """The adapter the base weights hold (None: none)."""
        names = {layer.folded_adapter() for _, layer in self._layers()} - {None}
        return names.pop() if names else None

    def _refuse_if_folded(self, what: str, keep: str | None = "") -> None:
        folded = self._folded()
        if folded is not None and folded != keep:
            raise MergedAdapterError(f"{what}: adapter {folded!r} is folded into the base "
                                     "weights by merge(); call unmerge() first")

    # ---------------------------------------------------------------- one rollback mechanism
    @contextmanager
    def _transaction(self):
        """Run the block all or nothing. On failure the module tree is put back (layers the
        block added go, layers it took out return), each layer gets its own state back, and so
        do every parameter (data, flag, mask), the configs and the active adapter. The layer
        cache is reset either way: this is the one place that changes the model's structure."""
        tree = [(m, {k: v for k, v in vars(m).items() if isinstance(v, Module)})
                for _, m in self.base_model.named_modules()]
        layers = [(m, m.snapshot()) for _, m in self._layers()]
        params = [(p, p.data, p.requires_grad, p.mask) for p in self.parameters()]
        configs, active = dict(self.peft_configs), self.active_adapter
        try:
            yield
        except BaseException:
            for m, children in tree:             # the module tree: what was wrapped or added
                for k in [k for k, v in vars(m).items()
                          if isinstance(v, Module) and k not in children]:
                    delattr(m, k)
                vars(m).update(children)
            for layer, snap in layers:           # each layer's own state
                layer.restore(snap)
            for p, data, flag, mask in params:
                p.data, p.requires_grad, p.mask = data, flag, mask
            self.peft_configs, self.active_adapter = configs, active
            raise
        finally:
            self._cache = None

    # ---------------------------------------------------------------- adapters
    def _check_name(self, name) -> str:
        return checks.check_identifier("adapter name", name, reserved=RESERVED)

    def _check_known(self, name, who: str) -> str:
        if not isinstance(name, str):
            raise TypeError(f"{who}: an adapter name is a string, got {type(name).__name__}")
        if name not in self.peft_configs:
            raise ValueError(f"{who}: no adapter named {name!r}; have {sorted(self.peft_configs)}")
        return name

    def add_adapter(self, name: str, config: PeftConfig, seed: int = 0) -> None:
        """Add a new adapter of this model's method and make it the active one."""
        self._check_new(name, config, seed, "add_adapter")
        with self._transaction():
            self._add(name, config, seed)

    def _check_new(self, name, config, seed, who: str) -> None:
        _check_config(config, who)
        self._check_name(name)
        checks.check_int(f"{who}: seed", seed, low=0)
        if name in self.peft_configs:
            raise ValueError(f"an adapter named {name!r} already exists; delete it first")
        if config.method != self.method:
            raise ValueError(f"this model holds {self.method} adapters; cannot add a "
                             f"{config.method} adapter (apply it to a fresh base instead)")
        self._refuse_if_folded(who)

    def _add(self, name: str, config: PeftConfig, seed: int, saved=None) -> None:
        """Install adapter ``name`` and activate it; ``saved`` = (tensors, folder) fills it from
        a file (built from ``config.loadable()``). Runs inside a ``_transaction``."""
        (config if saved is None else config.loadable()).install(self.base_model, name, seed)
        self.peft_configs[name] = config
        self._cache = None
        self.set_adapter(name)
        if saved is not None:
            self._fill(name, *saved)
            self.set_adapter(name)         # masks and flags as the file says

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the active adapter (None: run the base model)."""
        if name is not None:
            self._check_known(name, "set_adapter")
        self._refuse_if_folded("set_adapter", keep=name)
        for _, layer in self._layers():
            layer.set_active(name)
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; a layer left without adapters is taken out of the model."""
        self._check_known(name, "delete_adapter")
        self._refuse_if_folded("delete_adapter")
        with self._transaction():
            if self.active_adapter == name:
                self.set_adapter(None)
            for path, layer in reversed(self._layers()):
                if name in layer.adapter_names():
                    layer.delete(name)
                    if not layer.adapter_names():
                        layer.detach(self.base_model, path)
            del self.peft_configs[name]

    @contextmanager
    def disable_adapter(self):
        """Run the untouched base model inside the block; the adapter comes back after."""
        self._refuse_if_folded("disable_adapter")
        active = self.active_adapter
        self.set_adapter(None)
        try:
            yield self
        finally:
            self.set_adapter(active)

    def unload(self):
        """Undo everything: unmerge, take every PEFT layer out (wrapped modules go back, base
        weights a method trained are restored). Returns the base model as it was."""
        self.unmerge()
        with self._transaction():
            self.set_adapter(None)
            for path, layer in reversed(self._layers()):
                layer.detach(self.base_model, path)
            for p in self.base_model.parameters():
                p.requires_grad, p.mask = False, None
            self.peft_configs, self.active_adapter = {}, None
        return self.base_model

    def _tensors(self, name: str) -> dict:
        """Full name -> Parameter of adapter ``name``'s tensors."""
        out = {}
        for path, layer in self._layers():
            if name in layer.adapter_names():
                for local, p in layer.adapter_tensors(name).items():
                    out[_full(path, layer, local)] = p
        return out

    # ---------------------------------------------------------------- forward
    def forward(self, ids, adapter_names=None, **kwargs):
        """Run the adapted model. ``adapter_names`` (one per row, None = base) runs a mixed
        batch in which each row uses its own adapter, for methods that support it."""
        if not isinstance(ids, Tensor):         # lists too: prepare_inputs reads ids.shape
            ids = bk.asarray(ids)
        for _, layer in self._layers():
            if layer.adds_inputs and layer.active is not None:
                kwargs = layer.prepare_inputs(ids, kwargs)
        if adapter_names is None:
            return self.base_model(ids, **kwargs)
        names = self._check_row_adapters(ids, adapter_names)
        with rows_using(names):
            return self.base_model(ids, **kwargs)

    def _check_row_adapters(self, ids, names) -> list:
        if not all(layer.supports_mixed_batch for _, layer in self._layers()):
            raise ValueError(f"mixed-batch inference (adapter_names=...) is not supported by "
                             f"the {self.method} method (or by trainable token rows)")
        if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple)):
            raise TypeError(f"adapter_names must be a list or tuple (one name or None per row), "
                            f"got {type(names).__name__}")
        bad = [n for n in names if n is not None and not isinstance(n, str)]
        if bad:
            raise TypeError(f"adapter_names: each entry is an adapter name or None, got "
                            f"{bad[0]!r}")
        if len(names) != len(ids):
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {len(ids)}")
        unknown = sorted({n for n in names if n is not None} - set(self.peft_configs))
        if unknown:
            raise ValueError(f"adapter_names: unknown adapters {unknown}; "
                             f"have {sorted(self.peft_configs)}")
        self._refuse_if_folded("mixed-batch inference")
        return list(names)

    def loss(self, ids, targets, ignore_index: int = -100, **kwargs):
        from minipeft.autograd import functional as F
        return F.cross_entropy(self(ids, **kwargs), targets, ignore_index)

    # ---------------------------------------------------------------- reports
    def trainable_report(self) -> dict:
        trainable = self.num_parameters(trainable_only=True)
        total = self.num_parameters()
        return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total}

    def print_trainable_parameters(self) -> dict:
        r = self.trainable_report()
        print(f"trainable params: {r['trainable']:,} || all params: {r['total']:,} || "
              f"trainable%: {r['percent']:.4f}")
        return r

    # ---------------------------------------------------------------- save / load
    def adapter_state(self, name: str | None = None) -> dict:
        """What ``save_adapter`` writes: name -> array, only the adapter's own tensors."""
        name = self.active_adapter if name is None else name
        if name is None:
            raise ValueError("adapter_state: no active adapter; name one")
        self._check_known(name, "adapter_state")
        out = {}
        for path, layer in self._layers():
            if name in layer.adapter_names():
                for local, arr in layer.state(name).items():
                    out[_full(path, layer, local)] = arr
        return out

    def save_adapter(self, folder, name: str | None = None) -> int:
        """Write the adapter's tensors and config to ``folder``, as a whole: the two files are
        written into a new folder that then replaces the old one, so an interrupted save leaves
        the old adapter or the new one, never a mix. Returns the bytes written."""
        name = self.active_adapter if name is None else name
        if name is None:
            raise ValueError("save_adapter: no active adapter; name one")
        self._check_known(name, "save_adapter")
        cfg = self.peft_configs[name]
        meta = {"method": cfg.method, "config": cfg.to_dict(),
                "base_config": self.config.to_dict()}
        tensors = self.adapter_state(name)

        def write(tmp: Path) -> int:
            size = save_tensors(tmp / ADAPTER_WEIGHTS, tensors, meta)
            save_json(tmp / ADAPTER_CONFIG, meta)
            return size + (tmp / ADAPTER_CONFIG).stat().st_size

        return save_folder(folder, write)

    def load_adapter(self, folder, name: str = "default", seed: int = 0) -> None:
        """Add the adapter saved in ``folder`` under ``name`` and activate it. The file, its
        method and base config are checked first; tensor names and shapes once the adapter's
        layers exist, and a mismatch undoes everything: a bad file leaves the model as it was."""
        self._check_name(name)
        cfg, tensors = read_adapter(folder, self.base_model)
        if cfg.method != self.method:
            raise CheckpointError(f"{folder}: holds a {cfg.method!r} adapter but this "
                                  f"model uses {self.method!r}")
        self._check_new(name, cfg, seed, "load_adapter")
        with self._transaction():
            self._add(name, cfg, seed, (tensors, folder))

    def _fill(self, name: str, tensors: dict, folder) -> None:
        """Copy saved tensors into adapter ``name``: every layer checks its share first."""
        layers = sorted(((path, layer) for path, layer in self._layers()
                         if name in layer.adapter_names()),
                        key=lambda pl: (pl[1].names_from_root, -len(pl[0])))
        shares = {id(layer): {} for _, layer in layers}
        unexpected = []
        for key, arr in tensors.items():
            for path, layer in layers:       # the deepest layer that claims the key owns it
                start = "" if layer.names_from_root else path + "."
                if key.startswith(start) and layer.claims(name, key[len(start):]):
                    shares[id(layer)][key[len(start):]] = arr
                    break
            else:
                unexpected.append(key)
        missing, problems = [], []
        for path, layer in reversed(layers):
            m, p = layer.check_state(name, shares[id(layer)])
            missing += [_full(path, layer, k) for k in m]
            problems += [_full(path, layer, k) for k in p]
        if missing or unexpected or problems:
            head = [f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"] \
                if missing or unexpected else []
            raise CheckpointError(f"{folder}: tensors do not fit: {'; '.join(head + problems)}")
        for _, layer in layers:
            layer.load_state(name, shares[id(layer)])

    # ---------------------------------------------------------------- merge
    def merge(self) -> None:
        """Fold the active adapter into the base weights (methods that allow it). Idempotent.
        Every layer checks first (finite values, no overflow, an unmerge that gives the base
        weights back); one refusal and no weight changes."""
        name = self.active_adapter
        if name is None:
            raise ValueError("merge(): no active adapter to merge; set_adapter(name) first")
        cfg = self.peft_configs[name]
        if not cfg.mergeable:
            raise ValueError(f"merge(): the {cfg.method} method cannot fold its adapters into the "
                             "base weights")
        layers = [layer for _, layer in self._layers() if layer.active is not None]
        plans = [(layer, layer.check_merge()) for layer in layers]  # all check, then all apply
        for layer, plan in reversed(plans):  # innermost first: a wrapper folds in on top
            layer.apply_merge(plan)

    def unmerge(self) -> None:
        """Undo ``merge`` (nothing to do when no adapter is folded in). Idempotent."""
        for _, layer in self._layers():      # outermost first: the reverse of merge's order
            layer.unmerge()

    def __repr__(self) -> str:
        r = self.trainable_report()
        return (f"PeftModel(method={self.method}, adapters={sorted(self.peft_configs)}, "
                f"active={self.active_adapter}, trainable={r['trainable']:,}/{r['total']:,})")


def _full(path: str, layer: PeftLayer, local: str) -> str:
    return local if layer.names_from_root or not path else f"{path}.{local}"


# Adapter names become attributes of a layer's ``adapters`` module: they must not shadow what
# the module classes define (``training``, ``forward``, ``named_modules``, ...).
RESERVED = frozenset(a for cls in (Module, PeftLayer, PeftModel) for a in dir(cls)) | \
    {"base", "adapters", "active", "base_model"}


def get_peft_model(model, config: PeftConfig, adapter_name: str = "default",
                   seed: int = 0) -> PeftModel:
    """Freeze ``model`` and apply ``config``'s method to it (in place); returns the wrapper."""
    return PeftModel(model, config, adapter_name, seed)


def load_peft_model(model, folder, adapter_name: str = "default") -> PeftModel:
    """Apply the adapter saved in ``folder`` to a plain base ``model``; the method is read from
    the file. Everything is checked first, so a bad file leaves the model unchanged."""
    config, tensors = read_adapter(folder, model)
    return PeftModel(model, config, adapter_name, _saved=(tensors, folder))
