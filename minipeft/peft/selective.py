"""Selective fine-tuning: train a chosen subset of the base model's own weights.

Nothing is added. Some parameters get ``requires_grad=True`` again, by
  * component   -- attention, mlp, norms, embeddings, head (or all of them);
  * layer       -- e.g. only the last k blocks;
  * type        -- weights and/or biases (BitFit: biases only, Ben Zaken et al. 2021);
  * element     -- a boolean mask inside each chosen tensor keeps a fraction k of its entries:
                   random, largest |w| (magnitude), or largest accumulated squared gradient
                   (a diagonal-Fisher score, measured on a few calibration batches).

Whole-tensor selection saves compute as well as memory: a frozen tensor's gradient is never
computed. An element mask saves only optimizer work on paper: the chosen tensor's *full*
gradient is still computed, then the update is applied only where the mask is True (the frozen
elements stay bit-identical). Lesson 04 measures this.

Full fine-tuning is the preset that selects everything, so every comparison uses one code path.

Like every method, the selection lives in a PEFT layer: ``Selection``, attached to the base as
``peft_selection``. It holds, per adapter, the names it trains, their masks, and a host copy of
the original values, so that ``set_adapter(None)`` / ``disable_adapter()`` / ``unload()`` give
the base model back, and several selective adapters can share one base (each adapter's trained
values are swapped in when it becomes active). A saved adapter holds each trained tensor in
full, or ``(flat indices, values)`` where a mask applies; loading takes the mask from those
indices, so a random or gradient mask needs neither its seed nor calibration batches again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from minipeft import backend as bk
from minipeft import checks
from minipeft.nn.module import Module
from minipeft.peft import targets
from minipeft.peft.config import PeftConfig
from minipeft.peft.layer import PeftLayer, value_problems
from minipeft.peft.targets import layer_of

COMPONENTS = ("attention", "mlp", "norms", "embeddings", "head")
PARAM_TYPES = ("weight", "bias")
MASKS = (None, "random", "magnitude", "gradient")


def component_of(name: str) -> str:
    """Which component a parameter name belongs to (DESIGN.md's naming)."""
    if name.startswith(("tok_emb.", "pos_emb.")):
        return "embeddings"
    if name.startswith(("lm_head.", "cls_head.")):
        return "head"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if name.startswith("ln_f.") or ".ln_" in name:
        return "norms"
    raise ValueError(f"component_of: cannot place parameter {name!r} in {COMPONENTS}")


@dataclass(frozen=True)
class SelectiveConfig(PeftConfig):
    components: tuple = ("all",)       # subset of COMPONENTS, or ("all",)
    layers: tuple | None = None        # block indices to train (None: all blocks)
    last_k: int | None = None          # shorthand: the last k blocks (overrides layers)
    param_types: tuple = PARAM_TYPES   # ("bias",) is BitFit
    mask: str | None = None            # element mask: None, "random", "magnitude", "gradient"
    mask_fraction: float = 0.1         # fraction of each chosen tensor's elements that train
    label: str = "selective"           # name used in reports ("full", "bitfit", ...)
    # batches (x, y) used to score elements for mask="gradient"; not saved
    calibration: tuple = field(default=(), repr=False, compare=False)

    method = "selective"

    def __post_init__(self):
        super().__post_init__()
        who = "SelectiveConfig"
        comps = targets.check_targets(f"{who}.components", self.components)
        bad = [c for c in comps if c not in COMPONENTS + ("all",)]
        if bad:
            raise ValueError(f"{who}.components: unknown {bad}; choose from "
                             f"{COMPONENTS + ('all',)}")
        kinds = targets.check_targets(f"{who}.param_types", self.param_types)
        bad = [t for t in kinds if t not in PARAM_TYPES]
        if bad:
            raise ValueError(f"{who}.param_types: unknown {bad}; choose from {PARAM_TYPES}")
        object.__setattr__(self, "components", comps)
        object.__setattr__(self, "param_types", kinds)
        object.__setattr__(self, "layers", targets.check_layers(f"{who}.layers", self.layers))
        if self.last_k is not None:
            checks.check_int(f"{who}.last_k", self.last_k, low=1)
        if self.mask is not None:
            checks.check_choice(f"{who}.mask", self.mask, MASKS[1:])
        checks.check_float(f"{who}.mask_fraction", self.mask_fraction, low=0.0, high=1.0,
                           low_open=True)
        if not isinstance(self.label, str) or not self.label:
            raise TypeError(f"{who}.label must be a non-empty string, got {self.label!r}")
        if not isinstance(self.calibration, (tuple, list)):
            raise TypeError(f"{who}.calibration must be a tuple of (x, y) batches")

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("calibration")
        return d

    def loadable(self) -> SelectiveConfig:
        """Loading takes each mask from the file's indices: build without one (no calibration
        batches, no seed needed)."""
        return replace(self, mask=None, calibration=())

    # ---------------------------------------------------------------- which tensors
    def selected(self, model) -> list[str]:
        """Names of the base parameters this config trains."""
        n_layer = model.config.n_layer
        if self.last_k is not None:
            if self.last_k > n_layer:
                raise ValueError(f"SelectiveConfig.last_k={self.last_k} exceeds the model's "
                                 f"{n_layer} blocks")
            layers = tuple(range(n_layer - self.last_k, n_layer))
        else:                                         # else a wrong index selects silently less
            layers = self.layers and tuple(targets.in_range("SelectiveConfig.layers",
                                                            self.layers, n_layer))
        comps = COMPONENTS if "all" in self.components else self.components
        names = []
        for name in targets.base_parameters(model):
            kind = "bias" if name.endswith(".bias") else "weight"
            layer = layer_of(name)
            if component_of(name) not in comps or kind not in self.param_types:
                continue
            if layers is not None and layer is not None and layer not in layers:
                continue
            if layers is not None and layer is None and component_of(name) == "embeddings":
                continue  # a layer choice keeps the top of the network (ln_f, head), not the input
            names.append(name)
        return names

    def apply(self, model, name: str, seed: int) -> list[str]:
        if self.mask == "gradient" and not self.calibration:
            raise ValueError("SelectiveConfig(mask='gradient') needs calibration batches: "
                             "calibration=((x, y), ...)")
        chosen = self.selected(model)
        if not chosen:
            raise ValueError(f"SelectiveConfig selects no parameter of this model "
                             f"(components={self.components}, layers={self.layers}, "
                             f"last_k={self.last_k}, param_types={self.param_types})")
        params = targets.base_parameters(model)
        scores = _gradient_scores(model, chosen, self.calibration) if self.mask == "gradient" \
            else {}
        rng = bk.host_rng(seed)
        masks = {}
        for n in chosen:
            if self.mask is not None and self.mask_fraction < 1.0:
                masks[n] = _top_fraction(self._score(params[n], n, scores, rng),
                                         self.mask_fraction)
        holder = vars(model).get("peft_selection")
        if holder is None:                            # surgery: the base gains one attribute
            holder = model.peft_selection = Selection()
        holder.add(name, {n: params[n] for n in chosen}, masks)
        return chosen

    def _score(self, p, name, scores, rng):
        if self.mask == "random":
            return bk.asarray(rng.random(p.shape))
        if self.mask == "magnitude":
            return bk.xp.abs(p.data)
        return scores[name]


class Chosen(Module):
    """One selective adapter: which base parameters train, their masks, and (while another
    adapter is active) its trained values. No Parameters of its own."""

    def __init__(self, params: dict, masks: dict):
        self.params = params          # name -> the base Parameter (a dict: not walked)
        self.masks = masks            # name -> boolean mask (absent: the whole tensor)
        self.parked = {}              # name -> trained values while not active


class Selection(PeftLayer):
    """Holds every selective adapter of a model and the original values of what they train.

    Active adapter a: a's parameters hold a's values, train, and carry a's masks; every other
    selected parameter holds its original value. Switching parks a's values and brings the
    next adapter's in; None brings the base back."""

    names_from_root = True        # its tensors are the base's own, named as in the base

    def __init__(self):
        super().__init__()
        self.originals = {}       # name -> host copy of the value before any adapter trained

    def add(self, name: str, params: dict, masks: dict) -> None:
        for n, p in params.items():
            self.originals.setdefault(n, bk.to_numpy(p.data).copy())
        setattr(self.adapters, name, Chosen(params, masks))

    def adapter_tensors(self, name: str) -> dict:
        return dict(getattr(self.adapters, name).params)

    def set_active(self, name: str | None) -> None:
        name = name if name in self.adapter_names() else None
        if name == self.active:
            return
        if self.active is not None:                   # park the active adapter's values
            a = getattr(self.adapters, self.active)
            for n, p in a.params.items():
                a.parked[n] = p.data
                p.data = bk.asarray(self.originals[n]).copy()
                p.requires_grad, p.mask = False, None
        if name is not None:                          # and bring the next one's in
            a = getattr(self.adapters, name)
            for n, p in a.params.items():
                if n in a.parked:
                    p.data = a.parked.pop(n)
                p.requires_grad, p.mask = True, a.masks.get(n)
        self.active = name

    def delete(self, name: str) -> None:
        if self.active == name:
            self.set_active(None)
        super().delete(name)

    def detach(self, model, path: str) -> None:
        self.set_active(None)                         # the base's values back
        super().detach(model, path)

    def snapshot(self):
        own, adapters = super().snapshot()
        parked = {n: dict(getattr(self.adapters, n).parked) for n in self.adapter_names()}
        return own, adapters, dict(self.originals), parked

    def restore(self, snap) -> None:
        own, adapters, originals, parked = snap
        super().restore((own, adapters))
        self.originals = originals
        for n, values in parked.items():
            getattr(self.adapters, n).parked = values

    # ---------------------------------------------------------------- save / load
    def _values(self, name: str, n: str):
        """Adapter ``name``'s current values of ``n`` (live when active, else parked)."""
        a = getattr(self.adapters, name)
        return a.parked[n] if n in a.parked else a.params[n].data

    def state(self, name: str) -> dict:
        """Each trained tensor in full, or (flat indices, values) where a mask applies."""
        a = getattr(self.adapters, name)
        out = {}
        for n in a.params:
            v = self._values(name, n)
            if n not in a.masks:
                out[n] = v
            else:
                idx = bk.xp.flatnonzero(a.masks[n])
                out[f"{n}::indices"] = idx.astype(bk.np.int64)
                out[f"{n}::values"] = v.reshape(-1)[idx]
        return out

    def claims(self, name: str, key: str) -> bool:
        base, _, part = key.partition("::")
        return base in getattr(self.adapters, name).params and part in ("", "indices", "values")

    def check_state(self, name: str, arrays: dict) -> tuple[list, list]:
        a = getattr(self.adapters, name)
        missing, problems = [], []
        for n, p in a.params.items():
            full, idx, values = (arrays.get(n), arrays.get(f"{n}::indices"),
                                 arrays.get(f"{n}::values"))
            if full is not None and idx is None and values is None:
                if tuple(full.shape) != p.shape:
                    problems.append(f"{n}: expected {p.shape}, file {tuple(full.shape)}")
                problems += value_problems(n, full, p.dtype)
            elif full is None and idx is not None and values is not None:
                if idx.dtype.kind not in "iu" or idx.ndim != 1 or values.shape != idx.shape or \
                        (idx.size and (idx.min() < 0 or idx.max() >= p.size)) or \
                        len(bk.np.unique(idx)) != idx.size:
                    problems.append(f"{n}: sparse indices/values do not fit shape {p.shape}")
                problems += value_problems(f"{n}::values", values, p.dtype)
            elif full is None and idx is None and values is None:
                missing.append(n)
            else:
                problems.append(f"{n}: give the tensor in full or as ::indices and ::values")
        return missing, problems

    def load_state(self, name: str, arrays: dict) -> None:
        """Write the file's values (the adapter is active: PeftModel activates it first)."""
        a = getattr(self.adapters, name)
        for n, p in a.params.items():
            if n in arrays:
                p.data = bk.asarray(arrays[n], dtype=p.dtype).copy()
                a.masks.pop(n, None)
            else:
                idx = bk.asarray(arrays[f"{n}::indices"])
                flat = bk.asarray(self.originals[n]).reshape(-1).copy()
                flat[idx] = bk.asarray(arrays[f"{n}::values"], dtype=p.dtype)
                p.data = flat.reshape(p.shape)
                mask = bk.xp.zeros(p.size, dtype=bool)
                mask[idx] = True
                a.masks[n] = mask.reshape(p.shape)
            if self.active != name:
                a.parked[n] = p.data
                p.data = bk.asarray(self.originals[n]).copy()
            else:
                p.mask = a.masks.get(n)

    def __repr__(self) -> str:
        return f"Selection(adapters={self.adapter_names()}, active={self.active})"


def _top_fraction(score, fraction: float):
    """Boolean mask of the ``fraction`` largest scores (at least one element)."""
    k = max(1, int(round(fraction * score.size)))
    flat = score.reshape(-1)
    top = bk.xp.argpartition(-flat, k - 1)[:k]
    mask = bk.xp.zeros(flat.shape, dtype=bool)
    mask[top] = True
    return mask.reshape(score.shape)


def _gradient_scores(model, names, batches) -> dict:
    """Sum over calibration batches of the squared gradient of each chosen tensor (Fisher)."""
    params = targets.base_parameters(model)
    flags = {n: p.requires_grad for n, p in params.items()}
    for n in names:
        params[n].requires_grad = True
    scores = {n: bk.xp.zeros_like(params[n].data) for n in names}
    try:
        for x, y in batches:
            model.zero_grad()
            model.loss(bk.asarray(x), bk.asarray(y)).backward()
            for n in names:
                if params[n].grad is not None:
                    scores[n] += params[n].grad ** 2
    finally:
        model.zero_grad()
        for n, f in flags.items():
            params[n].requires_grad = f
    return scores


# ---------------------------------------------------------------------------- presets
def full_finetuning() -> SelectiveConfig:
    """Every parameter trains: the baseline every PEFT method is measured against."""
    return SelectiveConfig(label="full")


def bitfit() -> SelectiveConfig:
    """Biases only (BitFit)."""
    return SelectiveConfig(param_types=("bias",), label="bitfit")


def last_blocks(k: int) -> SelectiveConfig:
    """The last k transformer blocks (plus the final norm and head)."""
    return SelectiveConfig(last_k=k, label=f"last{k}")


def embedding_only() -> SelectiveConfig:
    """Retrain only the embedding tables: "keep the input fixed, retrain the embeddings"."""
    return SelectiveConfig(components=("embeddings",), label="embeddings")
