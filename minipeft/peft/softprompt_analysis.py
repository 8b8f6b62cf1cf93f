"""What do learned soft prompts look like? Their nearest vocabulary tokens.

A trained virtual token is a vector p in R^C that is, in general, no token's embedding. To read
it, list the k tokens whose embeddings e_v point most nearly its way (cosine similarity)::

    sim(p, e_v) = p . e_v / (|p| |e_v|)          top k over the V rows of the embedding

Lester et al. (2021, sec. 7) found such neighbour lists form tight, task-related clusters. On
the category language of ``minipeft.data.language`` that can be *measured*: the purity of each
list (``cluster_purity``: the share of its most common word category). A claim needs a baseline,
so ``random_baseline`` gives the purity of random vectors drawn with the embedding's own
per-dimension mean and standard deviation: purity above that spread means something; inside
it, the clusters may be chance.

All functions accept Tensors or arrays of either backend and return host (NumPy) results.
"""

from __future__ import annotations

from minipeft import backend as bk
from minipeft.data.language import WordTokenizer, cluster_purity


def _matrix(a, who: str):
    a = a.data if hasattr(a, "requires_grad") else a               # a Tensor or Parameter
    a = bk.asarray(a)
    if a.ndim != 2 or a.dtype.kind != "f":
        raise ValueError(f"{who} must be a 2-D float array, got shape {tuple(a.shape)} and "
                         f"dtype {a.dtype}")
    return a.astype(bk.np.float64)


def nearest_tokens(vectors, embedding, k: int = 5):
    """The k most cosine-similar vocabulary rows of each vector.

    vectors (n, C), embedding (V, C) -> ids (n, k) int64 and similarities (n, k), both sorted
    from the most similar; ties go to the lower token id.
    """
    P, E = _matrix(vectors, "vectors"), _matrix(embedding, "embedding")
    if P.shape[1] != E.shape[1]:
        raise ValueError(f"vectors have {P.shape[1]} dimensions but the embedding has "
                         f"{E.shape[1]}: shapes {tuple(P.shape)} and {tuple(E.shape)}")
    V = E.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= V:
        raise ValueError(f"k must be an int in [1, {V}] (the vocabulary size), got {k!r}")
    xp = bk.xp
    tiny = bk.np.finfo(bk.np.float64).tiny                      # a zero vector has similarity 0
    P = P / xp.maximum(xp.linalg.norm(P, axis=1, keepdims=True), tiny)     # (n, C) unit rows
    E = E / xp.maximum(xp.linalg.norm(E, axis=1, keepdims=True), tiny)     # (V, C)
    sims = bk.to_numpy(P @ E.T)                                 # (n, V) cosines, on the host
    ids = bk.np.argsort(-sims, axis=1, kind="stable")[:, :k]    # (n, k) stable: ties by id
    return ids.astype(bk.np.int64), bk.np.take_along_axis(sims, ids, axis=1)


def neighbour_purity(vectors, embedding, tokenizer: WordTokenizer | None = None, k: int = 5,
                     exclude=None) -> float:
    """Mean category purity of each vector's k nearest tokens (1.0 = every list one category).

    ``exclude``: one token id per vector to drop from its own list (use it when the vectors are
    token embeddings themselves, so a word is not counted as its own neighbour).
    """
    tokenizer = tokenizer or WordTokenizer()
    extra = 0 if exclude is None else 1
    ids, _ = nearest_tokens(vectors, embedding, k + extra)
    if exclude is None:
        lists = ids.tolist()
    else:
        exclude = list(exclude)
        if len(exclude) != len(ids):
            raise ValueError(f"exclude needs one token id per vector ({len(ids)}), "
                             f"got {len(exclude)}")
        lists = [[i for i in row if i != int(x)][:k] for row, x in zip(ids.tolist(), exclude)]
    return cluster_purity(lists, tokenizer)


def random_baseline(embedding, n: int, k: int = 5, seeds=(0, 1, 2, 3, 4),
                    tokenizer: WordTokenizer | None = None) -> dict:
    """Neighbour purity of n random vectors (per-dimension mean/std of the embedding), per seed.

    Returns ``{"purities": [...], "mean", "std", "min", "max"}``: the spread chance produces.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    E = bk.to_numpy(_matrix(embedding, "embedding"))                # (V, C) host
    mu, sd = E.mean(axis=0), E.std(axis=0)                          # (C,) each
    purities = [neighbour_purity(bk.host_rng(s).normal(mu, sd, size=(n, E.shape[1])), E,
                                 tokenizer, k) for s in seeds]
    arr = bk.np.asarray(purities)
    return {"purities": purities, "mean": float(arr.mean()), "std": float(arr.std()),
            "min": float(arr.min()), "max": float(arr.max())}
