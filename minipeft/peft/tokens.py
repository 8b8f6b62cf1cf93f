"""Trainable token rows: chosen rows of the token embedding train, for any method.

Every config takes ``trainable_token_indices`` (as Hugging Face PEFT's option of that name):
the listed token ids get rows that train beside the method's own tensors. The typical use is a
token the base never saw in pretraining (a new task marker): its frozen row is noise to the
model, and no adapter elsewhere can give it a meaning the frozen embedding does not carry.

The layer wraps ``tok_emb`` and keeps, per adapter, a delta for the k listed rows::

    rows   (k,)        the token ids, fixed                    (saved with the adapter)
    delta  (k, C)      zero at init: step 0 is the base model   (the only thing that trains)
    table  (V, C)      W0 + scatter(delta): row rows[i] is W0[rows[i]] + delta[i], others W0

A lookup adds ``delta_ext[slot[id]]``, where ``slot`` maps a listed id to its delta row and every
other id to an extra all-zero row, so an unlisted token's embedding is ``W0 + 0.0``: the same
bits. A tied LM head reads ``.weight``, the table above, so the output layer's rows for those
tokens train too and all other output rows stay the base's.

Merging (with a mergeable method) adds the deltas to the k rows, after any layer it wraps has
folded in its own update, and keeps the k rows as they were, so ``unmerge`` puts them back
exactly (before the wrapped layer takes its update out).
"""

from __future__ import annotations

from minipeft import backend as bk
from minipeft.autograd import Tensor, concatenate, embedding
from minipeft.nn.module import Module, Parameter
from minipeft.peft.layer import PeftLayer


class TokenRows(Module):
    """One adapter's rows: ``rows`` (k,) token ids (an int array, not trained) and ``delta``."""

    def __init__(self, rows, dim: int, dtype):
        self.rows = bk.asarray(rows, dtype=bk.np.int64)                    # (k,)
        self.delta = Parameter(bk.xp.zeros((len(rows), dim), dtype=dtype))  # (k, C)


class TrainableTokens(PeftLayer):
    """Wraps the token embedding (``base``: an Embedding, or another PEFT layer around it)."""

    mergeable = True

    def __init__(self, base, vocab_size: int, dim: int):
        self.base = base                        # set first: its parameters are listed first
        super().__init__()
        self.vocab_size, self.dim = vocab_size, dim

    def _table_delta(self, name: str):
        """(slot (V,) int, delta_ext (k+1, C)): the lookup that adds each row's delta."""
        a = getattr(self.adapters, name)
        k = a.rows.shape[0]
        slot = bk.xp.full((self.vocab_size,), k, dtype=bk.np.int64)   # unlisted -> zero row
        slot[a.rows] = bk.xp.arange(k)
        zero = Tensor(bk.xp.zeros((1, self.dim), dtype=a.delta.dtype))
        return slot, concatenate([a.delta, zero], axis=0)              # (k+1, C)

    def _name(self):
        return None if self.active is None or self.active == self.merged_adapter else self.active

    def forward(self, ids):
        ids = ids.data if isinstance(ids, Tensor) else bk.asarray(ids)
        y = self.base(ids)                                              # (..., C)
        name = self._name()
        if name is None:
            return y
        slot, delta = self._table_delta(name)
        return y + embedding(delta, slot[ids])                          # (..., C)

    @property
    def weight(self):
        """The table as a tied head must see it (V, C)."""
        w = self.base.weight
        name = self._name()
        if name is None:
            return w
        slot, delta = self._table_delta(name)
        return w + embedding(delta, slot)                               # (V, C)

    # ---------------------------------------------------------------- save / load / merge
    def state(self, name: str) -> dict:
        a = getattr(self.adapters, name)
        return {"delta": a.delta.data, "rows": a.rows}

    def claims(self, name: str, key: str) -> bool:
        return key in ("delta", "rows")

    def check_state(self, name: str, arrays: dict) -> tuple[list, list]:
        missing, problems = super().check_state(name, {k: v for k, v in arrays.items()
                                                       if k == "delta"})
        a = getattr(self.adapters, name)
        rows = arrays.get("rows")
        if rows is None:
            missing.append("rows")
        elif rows.dtype.kind not in "iu" or rows.shape != a.rows.shape or \
                not bool((bk.asarray(rows) == a.rows).all()):
            problems.append(f"rows: the file lists token rows {rows.tolist()[:8]}, the config "
                            f"{bk.to_numpy(a.rows).tolist()[:8]}")
        return missing, problems

    def _base_table(self):
        """The innermost plain table (under any other wrapper around tok_emb)."""
        m = self.base
        while isinstance(m, PeftLayer):
            m = m.base
        return m.weight

    def _merge_plan(self, name: str):
        a = getattr(self.adapters, name)
        new = self._base_table().data[a.rows] + a.delta.data           # (k, C)
        if not bool(bk.xp.isfinite(new).all()):
            raise ValueError(f"merge refused: token rows of adapter {name!r} are not finite; "
                             "the base weights were left unchanged")
        return name

    def _install(self, name) -> None:
        """Add the delta to the rows as they are now (a wrapped layer folded in first) and
        keep those rows, so that unmerge puts them back exactly."""
        W = self._base_table()
        a = getattr(self.adapters, name)
        data = W.data.copy()
        self._kept = data[a.rows].copy()                                # (k, C)
        data[a.rows] = (self._kept + a.delta.data).astype(W.dtype)
        W.data = data

    def _take_out(self, name: str) -> None:
        W = self._base_table()
        a = getattr(self.adapters, name)
        data = W.data.copy()
        data[a.rows] = self._kept
        W.data = data
        del self._kept

    def __repr__(self) -> str:
        return f"TrainableTokens({self.base!r}, adapters={self.adapter_names()})"


def check_rows(model, rows, who: str) -> None:
    """Every listed row must exist in the model's vocabulary."""
    V = model.config.vocab_size
    bad = [i for i in rows if i >= V]
    if bad:
        raise ValueError(f"{who}.trainable_token_indices must lie in [0, {V}) (vocab_size), "
                         f"got {bad}")


def add_rows(model, name: str, rows) -> list[str]:
    """Give adapter ``name`` trainable rows ``rows`` of ``tok_emb`` (wrapping it once)."""
    layer = model.tok_emb
    if not isinstance(layer, TrainableTokens):
        inner = layer
        while isinstance(inner, PeftLayer):
            inner = inner.base
        layer = TrainableTokens(layer, inner.num_embeddings, inner.dim)
        model.tok_emb = layer
    dtype = layer._base_table().dtype
    setattr(layer.adapters, name, TokenRows(rows, layer.dim, dtype))
    return ["tok_emb"]
