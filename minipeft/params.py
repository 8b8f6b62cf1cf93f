"""A parameter calculator: where a transformer's weights live, and what LoRA would add.

It counts from the architecture alone (no weights), so it answers for models far too large to
build here: GPT-2, LLaMA-2-7B, GPT-3 175B. For our own configs it must agree with
``GPT.num_parameters()``; for GPT-2 124M with published counts (tests check both).

Per layer, with width d and MLP width f:
    attention   4 d^2 (+ 4 d biases)      q, k, v, o projections, each d x d
    MLP         2 d f (+ f + d biases)    fc_in d -> f, fc_out f -> d   (SwiGLU: 3 d f)
so with f = 4d the MLP holds 8 d^2 against attention's 4 d^2: twice as many weights.

LoRA of rank r on a (d_out x d_in) matrix trains A (r x d_in) and B (d_out x r):
r (d_in + d_out) parameters, i.e. 2 d r for a square d x d projection. VeRA trains r + d_out
(two vectors; its random pair is shared and frozen).

Weight memory at a precision (``weight_bytes``): 32 or 16 bits for every parameter, or QLoRA's
NF4, where the blocks' weight matrices take 4 bits plus their double-quantised constants
(4 + 8/64 + 32/(64*256) = 4.127 bits, ``minipeft/quant.py``) and embeddings, norms and the head
stay at 16 bits, as in the QLoRA paper.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ArchSpec:
    name: str
    vocab_size: int
    block_size: int
    n_layer: int
    d_model: int
    d_ff: int                       # MLP hidden width
    n_head: int
    n_kv_head: int | None = None    # grouped-query attention; None = n_head
    mlp: str = "gelu"               # "gelu": fc_in, fc_out;  "swiglu": gate, up, down
    bias: bool = True
    tied: bool = True               # LM head shares the token embedding
    learned_pos: bool = True        # a position-embedding table (GPT) or none (RoPE)
    norm_params: int = 2            # per norm: 2 for LayerNorm (gain, bias), 1 for RMSNorm

    def matrices(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every weight matrix in one block, by module name."""
        d, f = self.d_model, self.d_ff
        kv = d * (self.n_kv_head or self.n_head) // self.n_head
        mats = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d)}
        if self.mlp == "swiglu":
            mats.update({"fc_gate": (f, d), "fc_in": (f, d), "fc_out": (d, f)})
        else:
            mats.update({"fc_in": (f, d), "fc_out": (d, f)})
        return mats


PRESETS: dict[str, ArchSpec] = {
    "gpt2-124m": ArchSpec("GPT-2 124M", 50257, 1024, 12, 768, 3072, 12),
    "llama2-7b": ArchSpec("LLaMA-2-7B", 32000, 4096, 32, 4096, 11008, 32, mlp="swiglu",
                          bias=False, tied=False, learned_pos=False, norm_params=1),
    "gpt3-175b": ArchSpec("GPT-3 175B", 50257, 2048, 96, 12288, 4 * 12288, 96),
}


def spec_from_config(cfg, name: str = "minipeft") -> ArchSpec:
    """The ArchSpec of one of our GPTConfigs (an encoder's classification head is not counted:
    see ``count_parameters(..., n_classes=)``)."""
    return ArchSpec(name, cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd,
                    4 * cfg.n_embd, cfg.n_head, bias=cfg.bias, tied=cfg.tie_weights)


def count_parameters(spec: ArchSpec, n_classes: int = 0) -> dict[str, int]:
    """Parameters by component: embeddings, attention, mlp, norms, head, and total. With
    ``n_classes``, the head includes a classification layer (d x n_classes + bias)."""
    d, L = spec.d_model, spec.n_layer
    mats = spec.matrices()
    attn_names = ("q_proj", "k_proj", "v_proj", "o_proj")
    attn = sum(o * i + (o if spec.bias else 0) for n, (o, i) in mats.items() if n in attn_names)
    mlp = sum(o * i + (o if spec.bias else 0) for n, (o, i) in mats.items()
              if n not in attn_names)
    per_norm = spec.norm_params * d if spec.bias or spec.norm_params == 1 else d
    counts = {
        "embeddings": spec.vocab_size * d + (spec.block_size * d if spec.learned_pos else 0),
        "attention": L * attn,
        "mlp": L * mlp,
        "norms": (2 * L + 1) * per_norm,
        "head": (0 if spec.tied else spec.vocab_size * d) + (n_classes * (d + 1)),
    }
    counts["total"] = sum(counts.values())
    return counts


def lora_parameter_count(spec: ArchSpec, r: int, targets=("q_proj", "v_proj"),
                         layers=None) -> int:
    """Trainable parameters of LoRA rank ``r`` on ``targets`` in ``layers`` (default: all)."""
    if r <= 0:
        raise ValueError(f"lora_parameter_count: r must be positive, got {r}")
    mats = spec.matrices()
    unknown = [t for t in targets if t not in mats]
    if unknown:
        raise ValueError(f"lora_parameter_count: unknown targets {unknown}; "
                         f"available: {sorted(mats)}")
    n_layers = spec.n_layer if layers is None else len(list(layers))
    return n_layers * sum(r * (mats[t][0] + mats[t][1]) for t in targets)


def vera_parameter_count(spec: ArchSpec, r: int, targets=("q_proj", "v_proj"),
                         layers=None) -> int:
    """Trainable parameters of VeRA (``peft/vera.py``) with shared rank ``r``: per adapted
    (out x in) matrix the vectors d (r) and b (out), r + out numbers; the shared random pair
    is frozen and regenerated from a seed, so it is neither trained nor saved."""
    if r <= 0:
        raise ValueError(f"vera_parameter_count: r must be positive, got {r}")
    mats = spec.matrices()
    unknown = [t for t in targets if t not in mats]
    if unknown:
        raise ValueError(f"vera_parameter_count: unknown targets {unknown}; "
                         f"available: {sorted(mats)}")
    n_layers = spec.n_layer if layers is None else len(list(layers))
    return n_layers * sum(r + mats[t][0] for t in targets)


NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)    # codes + 8-bit constants + their 32-bit scales


def weight_bytes(spec: ArchSpec, precision: str) -> int:
    """Bytes of the weights alone at ``precision``: "fp32", "bf16" or "nf4" (QLoRA's base)."""
    total = count_parameters(spec)["total"]
    if precision in ("fp32", "bf16"):
        return total * (4 if precision == "fp32" else 2)
    if precision != "nf4":
        raise ValueError(f"weight_bytes: precision must be 'fp32', 'bf16' or 'nf4', "
                         f"got {precision!r}")
    quantised = spec.n_layer * sum(o * i for o, i in spec.matrices().values())
    return round(quantised * NF4_BITS / 8) + 2 * (total - quantised)


def with_overrides(spec: ArchSpec, **changes) -> ArchSpec:
    """A copy of ``spec`` with some fields changed (e.g. another width for a what-if)."""
    return replace(spec, **changes)
