"""One validator per kind of value: every public config and call checks its inputs here.

Each function takes the *name* the user wrote (``"LoraConfig.r"``, ``"--steps"``) and the value,
and either returns the value in its canonical form or raises ``TypeError`` (wrong kind of value)
or ``ValueError`` (right kind, out of range) whose message names the field, says what was
expected and shows what came. Validation happens before any work, so a refused input leaves
models and files exactly as they were.

    r = check_int("LoraConfig.r", r, low=1)
    lr = check_float("TrainConfig.lr", lr, low=0.0, low_open=True)
    layers = check_int_tuple("AdapterConfig.layers", layers, low=0, high=n_layer - 1)

Booleans are refused where numbers are expected (``True`` is an ``int`` in Python, but
``r=True`` is a mistake), and strings are refused where sequences of names or numbers are
expected (``"qv"`` would otherwise be read as ``("q", "v")``).
"""

from __future__ import annotations

import keyword
import math
import numbers


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """An integer (not a bool, not a float such as 2.0) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {_show(value)} "
                        f"({type(value).__name__})")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_float(name: str, value, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (ints accepted, bools and strings refused) within its bounds;
    ``low_open`` / ``high_open`` exclude the bound itself."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_show(value)} "
                        f"({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """True or False, nothing else (not 0/1, not "yes")."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_show(value)}")
    return value


def check_choice(name: str, value, choices) -> str:
    """One of a fixed set of strings."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {_show(value)}")
    return value


def _as_sequence(name: str, value, what: str) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of {what}, got {_show(value)} "
                        f"({type(value).__name__})")
    return tuple(value)


def check_int_tuple(name: str, value, *, low: int | None = None, high: int | None = None,
                    allow_empty: bool = True, unique: bool = True) -> tuple[int, ...]:
    """A list/tuple of integers, each within [low, high]; duplicates refused by default."""
    items = _as_sequence(name, value, "integers")
    if not items and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    out = tuple(check_int(f"{name}[{i}]", v, low=low, high=high) for i, v in enumerate(items))
    if unique and len(set(out)) != len(out):
        raise ValueError(f"{name} has repeated entries: {list(out)}")
    return out


def check_str_tuple(name: str, value, *, allow_empty: bool = True) -> tuple[str, ...]:
    """A list/tuple of non-empty strings."""
    items = _as_sequence(name, value, "strings")
    if not items and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    for i, v in enumerate(items):
        if not isinstance(v, str) or not v:
            raise TypeError(f"{name}[{i}] must be a non-empty string, got {_show(v)}")
    return items


def check_identifier(name: str, value, *, reserved=()) -> str:
    """A Python identifier that is not a keyword and not one of ``reserved`` (for example the
    attributes and methods of the module classes an adapter name would be stored on)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {_show(value)} ({type(value).__name__})")
    if not value.isidentifier() or keyword.iskeyword(value) or not value.isascii():
        raise ValueError(f"{name} must be an ASCII identifier (letters, digits, underscores, "
                         f"not starting with a digit), got {_show(value)}")
    if value.startswith("_") or value in reserved:
        raise ValueError(f"{name} {value!r} is reserved (an attribute or method of the model "
                         f"classes, or starts with '_'): choose another name")
    return value


def check_id_array(name: str, value):
    """Token ids (a Tensor, an array or nested lists) as an array on the current backend.
    Ragged lists (rows of different lengths) or mixed objects get an error naming ``name``
    instead of NumPy's; shape and dtype are left to the caller, which knows what it needs."""
    from minipeft import backend as bk  # late: the checks above need no arrays

    if hasattr(value, "requires_grad") and hasattr(value, "data"):   # a Tensor
        return value.data
    try:
        out = bk.asarray(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name} must be a rectangular array of token ids (every row the same "
                         f"length), got a {type(value).__name__} that is not: {exc}") from None
    if out.dtype == object:
        raise ValueError(f"{name} must be a rectangular array of integer token ids, got an "
                         "array of Python objects (ragged rows or mixed values)")
    return out


# ---------------------------------------------------------------------------- paths we will write
def _nearest_existing(path):
    """``path`` itself if it exists, else its closest existing ancestor (the folder a write
    would have to create the rest in)."""
    from pathlib import Path

    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_path_text(name: str, value) -> str:
    import os

    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a path, got {_show(value)} ({type(value).__name__})")
    if not value.strip():
        raise ValueError(f"{name} must be a path, got an empty string")
    if "\0" in value:
        raise ValueError(f"{name} must not contain a NUL character, got {_show(value)}")
    return value


def _check_can_create_in(name: str, value: str, what: str) -> None:
    import os

    base = _nearest_existing(value)
    if not base.is_dir():
        raise ValueError(f"{name} {value}: cannot create {what} there, {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {value}: cannot write into {base} (permission denied)")


def check_output_dir(name: str, value) -> str:
    """A folder we will write into: an existing writable folder, or a path whose nearest
    existing ancestor is a writable folder (so it can be created). Checks only; creates
    nothing, so a refused run leaves the file system as it was."""
    import os
    from pathlib import Path

    value = _check_path_text(name, value)
    p = Path(value)
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"{name} {value}: is a file, not a folder; give a folder path")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ValueError(f"{name} {value}: the folder is not writable (permission denied)")
        return value
    _check_can_create_in(name, value, "a folder")
    return value


def check_output_file(name: str, value) -> str:
    """A file we will write: not a folder, and either a writable existing file or a path whose
    nearest existing ancestor is a writable folder. Checks only; creates nothing."""
    import os
    from pathlib import Path

    value = _check_path_text(name, value)
    p = Path(value)
    if p.is_dir() or value.endswith(("/", os.sep)):
        raise ValueError(f"{name} {value}: is a folder; give a file path")
    if p.exists():
        if not os.access(p, os.W_OK) or not os.access(p.parent, os.W_OK | os.X_OK):
            raise ValueError(f"{name} {value}: cannot replace this file (permission denied)")
        return value
    _check_can_create_in(name, value, "the file")
    return value
