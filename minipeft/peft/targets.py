"""Which modules and parameters a config names: one routine for every method.

Names are *logical* paths, the names of the base model (``blocks.0.attn.q_proj``), whatever
wrappers earlier adapters put around a module (a wrapped module really sits at
``blocks.0.attn.q_proj.base``). A target matches a logical path when it equals the path or a
dotted suffix of it (``"q_proj"``, ``"attn.q_proj"``); ``*`` (any run of characters, dots
included) and ``?`` (one character) make it a glob: ``"blocks.0.*"``, ``"*_proj"``.

There are no regular expressions: a pattern read from a file cannot make the loader backtrack
for hours. ``glob_match`` runs in O(len(pattern) x len(path)) steps whatever the pattern, and a
target is at most ``MAX_TARGET`` characters of ``[A-Za-z0-9_.*?]``.

``layers`` (block indices) keeps the modules inside those blocks; modules outside the blocks
(``tok_emb``, ``lm_head``) are kept by a layer choice.
"""

from __future__ import annotations

import string

from minipeft import checks
from minipeft.nn.module import Module, Parameter
from minipeft.peft.layer import PeftLayer

MAX_TARGET = 200
TARGET_CHARS = set(string.ascii_letters + string.digits + "_.*?")


def layer_of(path: str) -> int | None:
    """The block index of ``blocks.{i}.…``, None outside the blocks."""
    parts = path.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() \
        else None


def glob_match(pattern: str, text: str) -> bool:
    """Does ``pattern`` (``*`` any run, ``?`` one character) match the whole of ``text``?
    Greedy with one backtrack point: O(len(pattern) x len(text)), never exponential."""
    p = t = 0
    star, mark = -1, 0
    while t < len(text):
        if p < len(pattern) and pattern[p] in ("?", text[t]):
            p, t = p + 1, t + 1
        elif p < len(pattern) and pattern[p] == "*":
            star, mark, p = p, t, p + 1                 # let * match nothing first
        elif star >= 0:
            mark += 1                                   # then one more character
            p, t = star + 1, mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def matches(target: str, path: str) -> bool:
    """The target rule: the whole logical path, or a dotted suffix of it (globs allowed)."""
    return glob_match(target, path) or glob_match("*." + target, path)


def check_targets(who: str, targets, allow_empty: bool = False) -> tuple[str, ...]:
    """A name or a list of names/globs, each short and made of ``[A-Za-z0-9_.*?]``."""
    targets = (targets,) if isinstance(targets, str) else targets
    targets = checks.check_str_tuple(who, targets, allow_empty=allow_empty)
    for t in targets:
        if len(t) > MAX_TARGET or not set(t) <= TARGET_CHARS:
            raise ValueError(f"{who}: {t[:60]!r} is not a module name or glob (at most "
                             f"{MAX_TARGET} characters of letters, digits, '_', '.', '*', '?'; "
                             "regular expressions are not accepted)")
    return targets


def check_layers(who: str, layers) -> tuple[int, ...] | None:
    """None (every block) or a non-empty list of distinct block indices >= 0; the model's
    depth is checked when the config is applied (``in_range``)."""
    if layers is None:
        return None
    return checks.check_int_tuple(who, layers, low=0, allow_empty=False)


def in_range(who: str, layers, n_layer: int) -> list[int]:
    """The block indices ``layers`` names (all when None), checked against the depth."""
    if layers is None:
        return list(range(n_layer))
    bad = [i for i in layers if i >= n_layer]
    if bad:
        raise ValueError(f"{who} must be block indices in [0, {n_layer}), got {bad}")
    return sorted(layers)


def walk(model: Module):
    """(logical path, real path, module) for every module, in model order. A PEFT layer is
    listed, then its ``base`` under the same logical path; its adapters are not entered."""
    out = []

    def visit(mod, real, logical):
        out.append((logical, real, mod))
        if isinstance(mod, PeftLayer):
            base = vars(mod).get("base")
            if isinstance(base, Module):
                visit(base, f"{real}.base" if real else "base", logical)
            return
        for key, child in vars(mod).items():
            if isinstance(child, Module):
                visit(child, f"{real}.{key}" if real else key,
                      f"{logical}.{key}" if logical else key)

    visit(model, "", "")
    return out


def select(model, who: str, targets, kinds, layers=None, owner=None,
           kind_name: str = "Linear") -> list[tuple[str, str, Module]]:
    """(logical path, real path, module) of every module of ``kinds`` (or an ``owner`` layer,
    a method's own layer that already holds adapters there) that a target names, inside
    ``layers``. Raises ValueError, naming the target, when one matches nothing or nothing is
    left; changes nothing."""
    blocks = in_range(f"{who}.layers", layers, model.config.n_layer)
    cands, seen = [], set()
    for logical, real, m in walk(model):
        inner = m
        while owner and isinstance(inner, owner):      # an owner layer counts as what it wraps
            inner = inner.base
        if logical in seen or not isinstance(inner, kinds):
            continue
        if isinstance(m, PeftLayer) and not (owner and isinstance(m, owner)):
            continue
        seen.add(logical)                              # the outermost candidate of a path
        cands.append((logical, real, m))
    chosen = set()
    for t in targets:
        hits = [c[0] for c in cands if matches(t, c[0])]
        if not hits:
            names = sorted({c[0].rpartition(".")[2] for c in cands})
            raise ValueError(f"{who}.target_modules: {t!r} matches no {kind_name} module; "
                             f"available {kind_name} names: {names} (or full paths such as "
                             f"{[c[0] for c in cands[:1]]})")
        chosen.update(hits)
    out = [c for c in cands if c[0] in chosen and
           (layers is None or layer_of(c[0]) is None or layer_of(c[0]) in blocks)]
    if not out:
        raise ValueError(f"{who} selects no module (targets {tuple(targets)}, layers {layers})")
    return out


def base_parameters(model) -> dict[str, Parameter]:
    """Logical name -> Parameter for the base model's own parameters (none of an adapter's)."""
    out, seen = {}, set()
    for logical, _, m in walk(model):
        for key, p in vars(m).items():
            if isinstance(p, Parameter) and id(p) not in seen:
                seen.add(id(p))
                out[f"{logical}.{key}" if logical else key] = p
    return out
