"""Saving and loading: safetensors for arrays, JSON for configs; nothing is ever unpickled.

Every write goes to a temporary file in the same folder and is then renamed over the target
(``os.replace`` is atomic), so an interrupted save leaves the previous file intact. Loading
checks that the file parses and that names, shapes and configs agree, and says exactly what
does not.

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


def load_tensors(path) -> tuple[dict, dict]:
    """Load a safetensors file as (name -> host array, metadata dict)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    raw = path.read_bytes()
    try:
        tensors = st_load(raw)
        meta = _read_metadata(raw)
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
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
        raise CheckpointError(f"{folder}: weights do not fit config.json: {exc}") from None
    return model
