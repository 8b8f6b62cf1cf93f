"""Memory from counts alone: parameter state (W, G, O) and our GPT's activations as formulas.

No model is run here. ``parameter_bytes`` counts a built model's parameters; the other functions
take sizes, so they also serve models too big to build (GPT-3 in lesson 03). The activation
formula lists, term by term, the arrays our ops declare they save for backward (``saved=`` in
``minipeft.autograd``); ``graph.py``'s walk of a real graph must agree with it exactly.
"""

from __future__ import annotations


# --------------------------------------------------------------------------- counting parameters
def parameter_bytes(model, optimizer: str = "adam") -> dict:
    """W, G and O counted from the parameters: {weights, gradients, optimizer, masked_tensors}.

    A trainable tensor gets a gradient and optimizer state of its *full* size, masked or not.
    """
    params = model.parameters()
    trainable = [p for p in params if p.requires_grad]
    nbytes = lambda p: p.size * p.dtype.itemsize
    grads = sum(nbytes(p) for p in trainable)
    return {"weights": sum(nbytes(p) for p in params), "gradients": grads,
            "optimizer": _STATES[optimizer] * grads,
            "masked_tensors": sum(getattr(p, "mask", None) is not None for p in trainable)}


_STATES = {"adam": 2, "adamw": 2, "momentum": 1, "sgd": 0}  # state arrays per trainable tensor


def training_memory_formula(n_params: int, n_trainable: int, bytes_per_param: int = 4,
                            optimizer: str = "adam", activations_bytes: int = 0,
                            workspace_bytes: int = 0) -> dict:
    """The memory of a training step from counts alone, for models too big to build here.

    ``n_trainable`` counts whole trainable tensors (a masked tensor counts in full). Optimizer
    state is ``adam``/``adamw`` (m, v), ``momentum`` (one buffer) or ``sgd`` (none), all in
    ``bytes_per_param``. ``total`` is the sum: the peak when activations, gradients and the
    workspace coexist, as they do in our engine's backward pass.
    """
    if optimizer not in _STATES:
        raise ValueError(f"training_memory_formula: optimizer must be one of {sorted(_STATES)}, "
                         f"got {optimizer!r}")
    if not 0 <= n_trainable <= n_params:
        raise ValueError(f"training_memory_formula: need 0 <= n_trainable <= n_params, got "
                         f"n_trainable={n_trainable}, n_params={n_params}")
    out = {"weights": n_params * bytes_per_param,
           "gradients": n_trainable * bytes_per_param,
           "optimizer": _STATES[optimizer] * n_trainable * bytes_per_param,
           "activations": int(activations_bytes), "workspace": int(workspace_bytes)}
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------- the GPT formula
def gpt_activation_breakdown(batch: int, seq: int, d_model: int, n_layer: int, n_head: int,
                             vocab: int, bytes_per_value: int = 4, *,
                             trainable_embeddings: bool = True, dropout: bool = False,
                             index_bytes: int = 8, target_bytes: int = 8) -> dict:
    """Bytes our GPT's graph keeps for backward, term by term, as our ops save them.

    N = B T tokens, C = d_model, F = 4 C, H heads. Per block (elements):
        ln_1, ln_2      output, xhat (N C each), rstd (N)        2 x (2 N C + N)
        q, k, v         projection outputs                        3 N C
        attention       probabilities P (B, H, T, T); output O    B H T^2 + N C
                        (O is stored (B, T, H, D), so merging the heads for o_proj is a view)
        o_proj, fc_out  outputs                                   2 N C
        residual adds   outputs                                   2 N C
        fc_in, GELU     fc_in output, tanh term, GELU output      3 N F = 12 N C
        dropout         output and mask, twice (if dropout > 0)   4 N C
    Embeddings: with trainable tables the two lookups (N C, T C), the position ids and their sum;
    frozen, only the sum (it feeds the first layer norm). Head: ln_f (2 N C + N), logits and
    cross-entropy's softmax (N V each), and its row index, safe targets and mask (N each).
    ``trainable_embeddings`` means tok_emb and pos_emb train (full fine-tuning).
    """
    B, T, C, H, V, L = batch, seq, d_model, n_head, vocab, n_layer
    N, v = B * T, bytes_per_value
    per_layer = {
        "layer_norms": v * 2 * (2 * N * C + N),
        "qkv": v * 3 * N * C,
        "attention_probs": v * B * H * T * T,
        "attention_out": v * N * C,
        "projections_out": v * 2 * N * C,
        "residual_adds": v * 2 * N * C,
        "mlp_hidden": v * 3 * N * 4 * C,
        "dropout": v * 4 * N * C if dropout else 0,
    }
    if trainable_embeddings:
        emb = v * (2 * N * C + T * C) + index_bytes * T + (v * 2 * N * C if dropout else 0)
    else:
        emb = v * N * C
    head = v * (2 * N * C + N + 2 * N * V) + N * (index_bytes + target_bytes + 1)
    layer = sum(per_layer.values())
    return {"embeddings": emb, "per_layer": layer, "layers": L * layer, "head": head,
            "total": emb + L * layer + head, "per_layer_terms": per_layer}


def gpt_activation_bytes(batch: int, seq: int, d_model: int, n_layer: int, n_head: int,
                         vocab: int, bytes_per_value: int = 4, **kwargs) -> int:
    """Total of ``gpt_activation_breakdown`` (same arguments)."""
    return gpt_activation_breakdown(batch, seq, d_model, n_layer, n_head, vocab,
                                    bytes_per_value, **kwargs)["total"]


