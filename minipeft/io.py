"""Saving and loading: safetensors for arrays, JSON for configs; nothing is ever unpickled.

Every write goes to a temporary file in the same folder and is then renamed over the target
(``os.replace`` is atomic), so an interrupted save leaves the previous file intact. Loading
checks that the file parses and that names, shapes and configs agree, and says exactly what
does not.

Every dtype a file may declare gets a named decision (``SUPPORTED_DTYPES`` / ``REFUSED_DTYPES``):
F32, F16, BF16 (decoded exactly) and F64 load; complex and 8-bit floats are refused by name. A
*model* refuses values beyond float32's range and NaN/inf (``Module.load_state_dict``).

A saved model is a folder with ``model.safetensors`` (every parameter) and ``config.json``
(the GPTConfig); a saved adapter (see ``peft``) is the same pair holding only its tensors.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from minipeft import backend as bk


class CheckpointError(ValueError):
    """A file is missing, truncated, corrupted or does not fit what it is loaded into."""


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> int:
    """Save name -> array (either backend) as safetensors; returns the file size in bytes."""
    host = {k: bk.np.ascontiguousarray(bk.to_numpy(v)) for k, v in tensors.items()}
    meta = {"minipeft": json.dumps(metadata or {})}
    data = st_save(host, metadata=meta)
    atomic_write_bytes(path, data)
    return len(data)


# What each dtype a safetensors file may declare becomes when loaded: a named decision for every
# one, never a KeyError or a silent cast. Float tensors are loaded into float32 parameters
# (``Module.load_state_dict`` then refuses values beyond the parameter's range, and NaN/inf).
SUPPORTED_DTYPES = ("F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U64", "U32", "U16",
                    "U8", "BOOL")
REFUSED_DTYPES = {
    "C64": "complex: a weight is real, and dropping the imaginary part would change it",
    "F8_E4M3": "8-bit float: not decoded here; convert it to F16/BF16/F32 first",
    "F8_E5M2": "8-bit float: not decoded here; convert it to F16/BF16/F32 first",
}


def _decode(raw: bytes, path) -> dict:
    """The tensors of a safetensors file as host arrays. BF16 (bfloat16: the upper 16 bits of a
    float32, which NumPy lacks) is read as uint16 and widened exactly to float32; every dtype
    outside SUPPORTED_DTYPES is refused by name."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    bf16 = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"the header entry for {name!r} is not a JSON object")
        dtype = entry.get("dtype")
        if dtype == "BF16":
            bf16.append(name)
        elif dtype not in SUPPORTED_DTYPES:
            why = REFUSED_DTYPES.get(dtype, "not a dtype minipeft knows")
            raise CheckpointError(f"{path}: tensor {name!r} is stored as {dtype}, which minipeft "
                                  f"refuses ({why}); supported: {', '.join(SUPPORTED_DTYPES)}")
    if bf16:                       # same byte size: only the header's dtype names change
        for name in bf16:
            header[name]["dtype"] = "U16"
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)                             # keep the data 8-aligned
        raw = len(text).to_bytes(8, "little") + text + raw[8 + n:]
    tensors = st_load(raw)
    for name in bf16:
        bits = tensors[name].astype(bk.np.uint32) << 16             # bf16 bits -> float32 bits
        tensors[name] = bits.view(bk.np.float32)
    return tensors


def load_tensors(path) -> tuple[dict, dict]:
    """Load a safetensors file as (name -> host array, metadata dict)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    raw = path.read_bytes()
    try:
        tensors = _decode(raw, path)
        meta = _read_metadata(raw)
    except CheckpointError:
        raise
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError,
            json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file "
                              f"(truncated or corrupted?): {exc}") from None
    return tensors, meta


def _read_metadata(raw: bytes) -> dict:
    """The JSON we stored under the ``minipeft`` key of the safetensors header."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return json.loads(header.get("__metadata__", {}).get("minipeft", "{}"))


def save_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def load_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


# ---------------------------------------------------------------------------- models
def save_model(model, folder) -> Path:
    """Write ``model.safetensors`` and ``config.json`` for a GPT into ``folder``."""
    folder = Path(folder)
    save_tensors(folder / "model.safetensors", model.state_dict(),
                 {"config": model.config.to_dict()})
    save_json(folder / "config.json", model.config.to_dict())
    return folder


def load_model(folder, seed: int = 0):
    """Rebuild a GPT from a folder written by ``save_model``; checks config and shapes."""
    from minipeft.nn import GPT, GPTConfig  # io sits beside nn; import late to keep it light

    folder = Path(folder)
    cfg_dict = load_json(folder / "config.json")
    try:
        cfg = GPTConfig(**cfg_dict)
    except (TypeError, ValueError) as exc:  # unknown keys, or values GPTConfig rejects
        raise CheckpointError(f"{folder / 'config.json'} is not a GPTConfig: {exc}") from None
    tensors, meta = load_tensors(folder / "model.safetensors")
    if meta.get("config", cfg_dict) != cfg_dict:
        raise CheckpointError(f"{folder}: config.json does not match the config stored with "
                              "the weights (files from two different models?)")
    model = GPT(cfg, seed=seed)
    try:
        model.load_state_dict(tensors)
    except ValueError as exc:  # StateDictError: names every missing or mis-shaped tensor
        raise CheckpointError(f"{folder}: cannot load the weights: {exc}") from None
    return model
