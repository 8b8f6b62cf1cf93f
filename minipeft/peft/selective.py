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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minipeft import backend as bk
from minipeft.io import CheckpointError
from minipeft.peft.adapters import check_layers
from minipeft.peft.core import PeftConfig

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


def layer_of(name: str) -> int | None:
    """The block index of ``blocks.{i}.…``, None outside the blocks."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


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
        for name in ("components", "param_types"):   # one name, as LoraConfig accepts
            v = getattr(self, name)
            object.__setattr__(self, name, (v,) if isinstance(v, str) else tuple(v))
        comps = self.components
        bad = [c for c in comps if c not in COMPONENTS + ("all",)]
        if bad or not comps:
            raise ValueError(f"SelectiveConfig.components: unknown {bad or comps}; "
                             f"choose from {COMPONENTS + ('all',)}")
        bad = [t for t in self.param_types if t not in PARAM_TYPES]
        if bad or not self.param_types:
            raise ValueError(f"SelectiveConfig.param_types: unknown {bad or self.param_types}; "
                             f"choose from {PARAM_TYPES}")
        if self.mask not in MASKS:
            raise ValueError(f"SelectiveConfig.mask must be one of {MASKS}, got {self.mask!r}")
        if not 0.0 < self.mask_fraction <= 1.0:
            raise ValueError(f"SelectiveConfig.mask_fraction must be in (0, 1], "
                             f"got {self.mask_fraction}")
        if self.last_k is not None and (isinstance(self.last_k, bool) or
                                        not isinstance(self.last_k, int) or self.last_k <= 0):
            raise ValueError(f"SelectiveConfig.last_k must be a positive int, got {self.last_k!r}")

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("calibration")
        return d

    # ---------------------------------------------------------------- which tensors
    def selected(self, model) -> list[str]:
        """Names of the parameters this config trains."""
        n_layer = model.config.n_layer
        layers = self.layers
        if self.last_k is not None:
            layers = tuple(range(max(n_layer - self.last_k, 0), n_layer))
        elif layers is not None:                      # else a wrong index selects silently less
            layers = tuple(check_layers(layers, n_layer, "SelectiveConfig"))
        comps = COMPONENTS if "all" in self.components else self.components
        names = []
        for name, _ in model.named_parameters():
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
        params = dict(model.named_parameters())
        scores = _gradient_scores(model, chosen, self.calibration) if self.mask == "gradient" \
            else {}
        rng = bk.host_rng(seed)
        for n in chosen:
            p = params[n]
            p.requires_grad = True
            if self.mask is not None and self.mask_fraction < 1.0:
                p.mask = _top_fraction(self._score(p, n, scores, rng), self.mask_fraction)
        return chosen

    def _score(self, p, name, scores, rng):
        if self.mask == "random":
            return bk.asarray(rng.random(p.shape))
        if self.mask == "magnitude":
            return bk.xp.abs(p.data)
        return scores[name]

    # ---------------------------------------------------------------- saving
    def adapter_state(self, model) -> dict:
        """Each trained tensor in full, or (flat indices, values) where a mask applies."""
        out = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.mask is None:
                out[name] = p.data
            else:
                idx = bk.xp.flatnonzero(p.mask)
                out[f"{name}::indices"] = idx.astype(bk.np.int64)
                out[f"{name}::values"] = p.data.reshape(-1)[idx]
        return out

    def load_state(self, model, tensors: dict) -> None:
        """Write saved values into the base weights, after checking every name and shape."""
        params = dict(model.named_parameters())
        plan = []
        for key, arr in tensors.items():
            base, _, part = key.partition("::")
            if base not in params:
                raise CheckpointError(f"adapter tensor {key!r} names no parameter of this model")
            if part == "":
                if tuple(arr.shape) != params[base].shape:
                    raise CheckpointError(f"{key}: expected shape {params[base].shape}, "
                                          f"file has {tuple(arr.shape)}")
                plan.append((base, None, arr))
            elif part == "indices":
                values = tensors.get(f"{base}::values")
                if values is None or values.shape != arr.shape or \
                        (arr.size and (arr.min() < 0 or arr.max() >= params[base].size)):
                    raise CheckpointError(f"{base}: sparse indices/values do not fit shape "
                                          f"{params[base].shape}")
                plan.append((base, arr, values))
            elif part != "values":
                raise CheckpointError(f"adapter tensor {key!r} is not a selective tensor")
        for base, idx, values in plan:
            p = params[base]
            if idx is None:
                p.data = bk.asarray(values, dtype=p.dtype).copy()
            else:
                flat = p.data.reshape(-1).copy()
                flat[bk.asarray(idx)] = bk.asarray(values, dtype=p.dtype)
                p.data = flat.reshape(p.shape)


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
    params = dict(model.named_parameters())
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
