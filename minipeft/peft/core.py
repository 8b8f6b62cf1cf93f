"""The shared PEFT machinery: apply a method to a frozen model, report, save, load, switch.

    peft_model = get_peft_model(model, LoraConfig(r=8))   # freeze, then do the method's surgery
    peft_model.print_trainable_parameters()
    train(peft_model, ...)                               # only the method's tensors train
    peft_model.save_adapter("adapters/task_b")           # safetensors + adapter_config.json
    with peft_model.disable_adapter(): ...               # the base model, untouched

Every method is a config class with ``apply(model, name, seed)``. Methods that *add* modules
(LoRA, adapters, IA3, prompts, prefixes) put them in ``PeftLayer``s: modules that hold one set of
tensors per adapter name and an ``active`` name (None = behave like the base). Methods that
*select* base weights (selective fine-tuning, full fine-tuning) flip ``requires_grad`` and masks.
Either way, ``requires_grad`` is the single flag the optimizer and the saver read.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

from minipeft import backend as bk
from minipeft.autograd import Tensor
from minipeft.io import CheckpointError, load_json, load_tensors, save_json, save_tensors
from minipeft.nn.module import Module

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


CONFIG_CLASSES: dict = {}  # method name -> config class, filled in as each method file loads


class PeftConfig:
    """Base of every method's config (each a frozen dataclass)."""

    method: str = "base"
    mergeable: bool = False  # can the update be folded into the base weights?

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        CONFIG_CLASSES[cls.method] = cls

    def apply(self, model, name: str, seed: int) -> list[str]:
        """Change ``model`` (already frozen) for adapter ``name``; return what was touched."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"{cls.__name__}: unknown fields {unknown} in adapter config")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class PeftLayer(Module):
    """A module that holds per-adapter tensors. Subclasses keep them in ``self.adapters``
    (a Module whose attributes are adapter names) and read ``self.active`` in forward."""

    supports_mixed_batch = False  # can one batch use a different adapter per row?

    def __init__(self):
        self.adapters = Module()
        self.active: str | None = None
        self.row_adapters: list | None = None  # per-row adapter names (mixed-batch inference)

    def prepare_inputs(self, ids, kwargs: dict) -> dict:
        """Add model inputs before the forward pass (soft prompts, prefixes); default: none."""
        return kwargs

    def adapter_names(self) -> list[str]:
        return [k for k, v in vars(self.adapters).items() if isinstance(v, Module)]

    def adapter_tensors(self, name: str) -> dict:
        """Local name -> Parameter for adapter ``name`` (what gets saved)."""
        return dict(getattr(self.adapters, name).named_parameters())

    def delete(self, name: str) -> None:
        delattr(self.adapters, name)
        if self.active == name:
            self.active = None


def _check_config(config) -> None:
    if not isinstance(config, PeftConfig):
        raise TypeError(f"get_peft_model needs a PEFT config (LoraConfig, SelectiveConfig, "
                        f"...), got {type(config).__name__}")


def peft_layers(model: Module):
    """(path, layer) for every PeftLayer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PeftLayer)]


class PeftModel(Module):
    """A frozen base model plus one or more named adapters of one method."""

    def __init__(self, model, config: PeftConfig, adapter_name: str = "default", seed: int = 0):
        if not isinstance(model, Module):
            raise TypeError(f"get_peft_model needs a model (a minipeft Module such as GPT), "
                            f"got {type(model).__name__}")
        _check_config(config)
        self.base_model = model
        self.peft_configs: dict[str, PeftConfig] = {}
        self.active_adapter: str | None = None
        self._originals: dict = {}
        self._layers = None  # cached (path, PeftLayer) pairs; reset whenever surgery happens
        before = [(p, p.requires_grad, p.mask) for p in model.parameters()]
        model.requires_grad_(False)
        for p in model.parameters():
            p.mask = None
        try:
            self.add_adapter(adapter_name, config, seed)
        except Exception:  # a config that does not fit leaves the model as it was
            for p, flag, mask in before:
                p.requires_grad, p.mask = flag, mask
            raise

    @property
    def config(self):
        return self.base_model.config

    @property
    def method(self) -> str:
        return next(iter(self.peft_configs.values())).method

    # ---------------------------------------------------------------- adapters
    def add_adapter(self, name: str, config: PeftConfig, seed: int = 0) -> None:
        """Add a new adapter of this model's method and make it the active one."""
        _check_config(config)
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"adapter name must be an identifier, got {name!r}")
        if name in self.peft_configs:
            raise ValueError(f"an adapter named {name!r} already exists")
        if self.peft_configs and config.method != self.method:
            raise ValueError(f"this model holds {self.method} adapters; cannot add a "
                             f"{config.method} adapter (apply it to a fresh base instead)")
        if config.method == "selective" and self.peft_configs:
            raise ValueError("selective fine-tuning edits the base weights: one adapter only")
        self._layers = None
        touched = config.apply(self.base_model, name, seed)
        if config.method == "selective":  # keep a host copy to undo (disable) the edit
            params = dict(self.base_model.named_parameters())
            self._originals = {k: bk.to_numpy(params[k].data).copy() for k in touched}
        self.peft_configs[name] = config
        self.set_adapter(name)

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the active adapter (None: run the base model)."""
        if name is not None and name not in self.peft_configs:
            raise ValueError(f"no adapter named {name!r}; have {sorted(self.peft_configs)}")
        for _, layer in peft_layers(self.base_model):
            layer.active = name if name in layer.adapter_names() else None
        self.active_adapter = name
        for n, cfg in self.peft_configs.items():  # only the active adapter trains
            for t in self._tensors(n).values():
                t.requires_grad = n == name and cfg.method != "selective"
        if self.method == "selective":
            for k in self._originals:
                dict(self.base_model.named_parameters())[k].requires_grad = name is not None

    def delete_adapter(self, name: str) -> None:
        if name not in self.peft_configs:
            raise ValueError(f"no adapter named {name!r}; have {sorted(self.peft_configs)}")
        if self.method == "selective":
            raise ValueError("selective fine-tuning edits the base weights; it cannot be deleted")
        self._layers = None
        for _, layer in peft_layers(self.base_model):
            if name in layer.adapter_names():
                layer.delete(name)
        del self.peft_configs[name]
        if self.active_adapter == name:
            self.set_adapter(next(iter(self.peft_configs), None))

    @contextmanager
    def disable_adapter(self):
        """Run the untouched base model inside the block; the adapter comes back after."""
        active = self.active_adapter
        swapped = {}
        if self.method == "selective":
            params = dict(self.base_model.named_parameters())
            for k, orig in self._originals.items():
                swapped[k] = params[k].data
                params[k].data = bk.asarray(orig)
        if any(getattr(m, "merged", False) for _, m in peft_layers(self.base_model)):
            raise RuntimeError("disable_adapter() on a merged model: call unmerge() first")
        self.set_adapter(None)
        try:
            yield self
        finally:
            params = dict(self.base_model.named_parameters())
            for k, data in swapped.items():
                params[k].data = data
            self.set_adapter(active)

    def unload(self):
        """Undo everything: unmerge, put each wrapped base module back, remove added modules and
        restore selectively trained weights. Returns the base model as it was."""
        if any(getattr(m, "merged", False) for _, m in peft_layers(self.base_model)):
            self.unmerge()
        for path, layer in reversed(peft_layers(self.base_model)):
            self._detach(path, layer)
        params = dict(self.base_model.named_parameters())
        for k, orig in self._originals.items():
            params[k].data = bk.asarray(orig)
        for p in params.values():
            p.requires_grad, p.mask = False, None
        self.peft_configs, self.active_adapter, self._originals = {}, None, {}
        self._layers = None
        return self.base_model

    def _detach(self, path: str, layer) -> None:
        """Take one PeftLayer out: put back the module it wraps, or remove an added one."""
        parent_name, _, leaf = path.rpartition(".")
        parent = self.base_model.get_submodule(parent_name)
        base = getattr(layer, "base", None)
        if isinstance(base, Module):
            setattr(parent, leaf, base)
        else:
            delattr(parent, leaf)

    @contextmanager
    def _all_or_nothing(self, name: str):
        """If the block raises, undo what it did while adding adapter ``name``: layers it
        wrapped or added, the adapter itself, base weights it rewrote (PiSSA), trainability
        flags and the active adapter. The model is then exactly as before the block."""
        layers = {id(m) for _, m in peft_layers(self.base_model)}
        params = [(p, p.data, p.requires_grad, p.mask) for p in self.parameters()]
        active = self.active_adapter
        try:
            yield
        except BaseException:
            for path, layer in reversed(peft_layers(self.base_model)):
                if id(layer) not in layers:
                    self._detach(path, layer)
                elif name in layer.adapter_names():
                    layer.delete(name)
            self.peft_configs.pop(name, None)
            self._layers = None
            self.set_adapter(active)
            for p, data, flag, mask in params:
                p.data, p.requires_grad, p.mask = data, flag, mask
            raise

    def _tensors(self, name: str) -> dict:
        """Full name -> Parameter of adapter ``name``'s tensors."""
        out = {}
        for path, layer in peft_layers(self.base_model):
            if name in layer.adapter_names():
                for local, p in layer.adapter_tensors(name).items():
                    out[f"{path}.{local}"] = p
        return out

    # ---------------------------------------------------------------- forward
    def forward(self, ids, adapter_names=None, **kwargs):
        """Run the adapted model. ``adapter_names`` (one per row, None = base) runs a mixed
        batch in which each row uses its own adapter, for methods that support it (LoRA)."""
        if self._layers is None:  # found once: walking every module per call costs latency
            self._layers = peft_layers(self.base_model)
            self._input_layers = [m for _, m in self._layers   # those that add model inputs
                                  if type(m).prepare_inputs is not PeftLayer.prepare_inputs]
        layers = self._layers
        if not isinstance(ids, Tensor):         # lists too: prepare_inputs reads ids.shape
            ids = bk.asarray(ids)
        for layer in self._input_layers:
            if layer.active is not None:
                kwargs = layer.prepare_inputs(ids, kwargs)
        if adapter_names is None:
            return self.base_model(ids, **kwargs)
        self._check_row_adapters(ids, adapter_names, layers)
        try:
            for _, layer in layers:
                layer.row_adapters = list(adapter_names)
            return self.base_model(ids, **kwargs)
        finally:
            for _, layer in layers:
                layer.row_adapters = None

    def _check_row_adapters(self, ids, names, layers) -> None:
        if not all(layer.supports_mixed_batch for _, layer in layers):
            raise ValueError(f"mixed-batch inference (adapter_names=...) is not supported by "
                             f"the {self.method} method")
        if len(names) != len(ids):
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {len(ids)}")
        unknown = sorted({n for n in names if n is not None} - set(self.peft_configs))
        if unknown:
            raise ValueError(f"adapter_names: unknown adapters {unknown}; "
                             f"have {sorted(self.peft_configs)}")
        if any(getattr(layer, "merged", False) for _, layer in layers):
            raise RuntimeError("mixed-batch inference on a merged model: call unmerge() first")

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
        """What ``save_adapter`` writes: name -> array, only the method's tensors."""
        name = name or self.active_adapter
        if name not in self.peft_configs:
            raise ValueError(f"no adapter named {name!r}; have {sorted(self.peft_configs)}")
        if self.method == "selective":
            return self.peft_configs[name].adapter_state(self.base_model)
        return {k: p.data for k, p in self._tensors(name).items()}

    def save_adapter(self, folder, name: str | None = None) -> int:
        """Write the adapter's tensors and config to ``folder``; returns the bytes written."""
        name = name or self.active_adapter
        if name is None:
            raise ValueError("save_adapter: no active adapter; name one")
        if name not in self.peft_configs:
            raise ValueError(f"save_adapter: no adapter named {name!r}; "
                             f"have {sorted(self.peft_configs)}")
        cfg = self.peft_configs[name]
        meta = {"method": cfg.method, "config": cfg.to_dict(),
                "base_config": self.config.to_dict()}
        folder = Path(folder)
        size = save_tensors(folder / ADAPTER_WEIGHTS, self.adapter_state(name), meta)
        save_json(folder / ADAPTER_CONFIG, meta)
        return size + (folder / ADAPTER_CONFIG).stat().st_size

    def load_adapter(self, folder, name: str = "default", seed: int = 0) -> None:
        """Add the adapter saved in ``folder`` under ``name`` and activate it. The file, its
        method and base config are checked first; tensor names and shapes once the adapter's
        layers exist, and a mismatch undoes everything: a bad file leaves the model as it was."""
        cfg, tensors = read_adapter(folder, self.base_model)
        if cfg.method != self.method:
            raise CheckpointError(f"{folder}: holds a {cfg.method!r} adapter but this "
                                  f"model uses {self.method!r}")
        if self.method == "selective":
            cfg.load_state(self.base_model, tensors)  # validates, then writes base weights
            return
        if name in self.peft_configs:
            raise ValueError(f"an adapter named {name!r} already exists; delete it first")
        with self._all_or_nothing(name):
            self.add_adapter(name, cfg, seed)
            self._fill(name, tensors, folder)

    def _fill(self, name: str, tensors: dict, folder) -> None:
        """Copy saved tensors into adapter ``name``, after checking names and shapes."""
        own = self._tensors(name)
        problems = []
        if set(own) != set(tensors):
            problems.append(f"missing {sorted(set(own) - set(tensors))}, "
                            f"unexpected {sorted(set(tensors) - set(own))}")
        problems += [f"{k}: expected {own[k].shape}, file {tuple(v.shape)}"
                     for k, v in tensors.items() if k in own and tuple(v.shape) != own[k].shape]
        if problems:
            raise CheckpointError(f"{folder}: tensors do not fit: {'; '.join(problems)}")
        for k, p in own.items():
            p.data = bk.asarray(tensors[k], dtype=p.dtype).copy()

    def add_weighted_adapter(self, names, weights, new_name: str, how: str = "linear",
                             r: int | None = None):
        """Combine LoRA adapters into a new one (see ``lora_merge.add_weighted_adapter``)."""
        if self.method != "lora":
            raise ValueError(f"add_weighted_adapter combines LoRA adapters; this model uses "
                             f"{self.method}")
        from minipeft.peft.lora_merge import add_weighted_adapter
        return add_weighted_adapter(self, names, weights, new_name, how=how, r=r)

    # ---------------------------------------------------------------- merge
    def merge(self) -> None:
        """Fold the active adapter into the base weights (LoRA, IA3). Idempotent."""
        self._mergeable_layers("merge")
        layers = [layer for _, layer in peft_layers(self.base_model) if layer.active is not None]
        # all or nothing: every layer may refuse before any weight changes; each computes its
        # merged weights once, while checking them, and installs them afterwards
        checked = [(layer, layer.check_merge()) for layer in layers]
        for layer, merged in checked:
            layer.apply_merge(merged)

    def unmerge(self) -> None:
        """Undo ``merge``. Idempotent."""
        self._mergeable_layers("unmerge")
        for _, layer in peft_layers(self.base_model):
            if getattr(layer, "merged", False):
                layer.unmerge()

    def _mergeable_layers(self, what: str) -> None:
        cfg = self.peft_configs.get(self.active_adapter) if self.active_adapter else None
        if cfg is None or not cfg.mergeable:
            raise ValueError(f"{what}(): the {self.method} method cannot be merged into the base "
                             "weights (only LoRA and IA3 can)")

    def __repr__(self) -> str:
        r = self.trainable_report()
        return (f"PeftModel(method={self.method}, adapters={sorted(self.peft_configs)}, "
                f"active={self.active_adapter}, trainable={r['trainable']:,}/{r['total']:,})")


def get_peft_model(model, config: PeftConfig, adapter_name: str = "default",
                   seed: int = 0) -> PeftModel:
    """Freeze ``model`` and apply ``config``'s method to it (in place); returns the wrapper."""
    return PeftModel(model, config, adapter_name, seed)


def read_adapter_config(folder) -> dict:
    """The JSON config of a saved adapter (method, config, base config)."""
    return load_json(Path(folder) / ADAPTER_CONFIG)


def read_adapter(folder, model) -> tuple[PeftConfig, dict]:
    """Read and check a saved adapter: (its config, name -> host array). Raises
    CheckpointError for a missing, corrupted, foreign or mismatched file."""
    folder = Path(folder)
    meta = load_json(folder / ADAPTER_CONFIG)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or \
            not isinstance(meta.get("base_config", {}), dict):
        raise CheckpointError(f"{folder}: {ADAPTER_CONFIG} is not an adapter config (a JSON "
                              "object with 'method', 'config' and 'base_config')")
    tensors, file_meta = load_tensors(folder / ADAPTER_WEIGHTS)
    if file_meta != meta:
        raise CheckpointError(f"{folder}: {ADAPTER_CONFIG} does not match the weights file")
    base_cfg = meta.get("base_config", {})
    if base_cfg != model.config.to_dict():
        diff = {k: (v, base_cfg.get(k)) for k, v in model.config.to_dict().items()
                if base_cfg.get(k) != v}
        raise CheckpointError(f"{folder}: adapter was trained on another base model; "
                              f"differences (this base, adapter's base): {diff}")
    method = meta.get("method")
    if not isinstance(method, str) or method not in CONFIG_CLASSES:
        raise CheckpointError(f"{folder}: unknown PEFT method {method!r}; known: "
                              f"{sorted(CONFIG_CLASSES)}")
    try:
        config = CONFIG_CLASSES[method].from_dict(meta["config"])
    except (TypeError, ValueError) as exc:       # unknown fields, or values the config refuses
        raise CheckpointError(f"{folder}: {ADAPTER_CONFIG} holds no valid {method} config: "
                              f"{exc}") from None
    bad = sorted(k for k, v in tensors.items()
                 if v.dtype.kind in "fc" and not bool(bk.np.isfinite(v).all()))
    if bad:
        raise CheckpointError(f"{folder}: tensors {bad} hold NaN or inf values")
    return config, tensors


def load_peft_model(model, folder, adapter_name: str = "default") -> PeftModel:
    """Apply the adapter saved in ``folder`` to a plain base ``model``; the method is read from
    the file. Everything is checked first, so a bad file leaves the model unchanged."""
    config, tensors = read_adapter(folder, model)
    before = [(p, p.data, p.requires_grad, p.mask) for p in model.parameters()]
    peft = PeftModel(model, config, adapter_name)
    try:
        if config.method == "selective":
            config.load_state(model, tensors)
        else:
            peft._fill(adapter_name, tensors, folder)
    except Exception:
        peft.unload()
        for p, data, flag, mask in before:    # unload freezes all; PiSSA rewrote weights
            p.data, p.requires_grad, p.mask = data, flag, mask
        raise
    return peft
