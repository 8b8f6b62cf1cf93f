"""An adapter on disk: a folder with ``adapter_model.safetensors`` (the tensors, with the config
in their metadata) and ``adapter_config.json`` (the same config, for people and tools).

Saving replaces the folder as a whole (``save_folder``), so the pair of files always switches
together; reading checks everything a file could get wrong before any model changes
(``read_adapter``): damaged or foreign files, another base model, an unknown method, config
fields of the wrong type or range, NaN or inf.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from minipeft import backend as bk
from minipeft.io import CheckpointError, load_json, load_tensors
from minipeft.peft.config import CONFIG_CLASSES, PeftConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _siblings(folder: Path) -> tuple[Path, Path, Path]:
    """Where a save of ``folder`` writes (new), what it commits (ready) and the old copy."""
    return tuple(folder.parent / f".{folder.name}.{s}" for s in ("new", "ready", "old"))


def save_folder(folder, write) -> int:
    """Replace ``folder`` as a whole by what ``write(tmp_folder)`` writes; returns its result.

    1. write every file into ``.NAME.new`` (a kill here leaves the old folder untouched);
    2. rename it to ``.NAME.ready`` (the commit: it is complete);
    3. move the old folder aside to ``.NAME.old``, and ``.NAME.ready`` into place;
    4. delete the old copy.
    A kill between the renames of step 3 leaves no ``NAME`` but a complete ``.NAME.ready``,
    which ``read_adapter`` loads (and the next save finishes). Other plain files in the old
    folder (a tokenizer, notes) are carried over by hard links.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_adapter: {folder} is a file, not a folder")
    if folder.is_dir():
        sub = [p.name for p in folder.iterdir() if not p.is_file() or p.is_symlink()]
        if sub:
            raise ValueError(f"save_adapter: {folder} holds folders or links ({sub[:3]}); an "
                             "adapter folder is replaced as a whole, so give it one of its own")
    new, ready, old = _siblings(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if not folder.exists() and ready.is_dir():       # finish a save cut in step 3
        os.rename(ready, folder)
    for stale in (new, ready, old):
        if stale.exists():
            shutil.rmtree(stale)
    new.mkdir()
    try:
        result = write(new)
        if folder.is_dir():
            for p in folder.iterdir():
                if not (new / p.name).exists():
                    os.link(p, new / p.name)
        os.rename(new, ready)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if folder.exists():
        os.rename(folder, old)
    os.rename(ready, folder)
    shutil.rmtree(old, ignore_errors=True)
    return result


def _source(folder: Path) -> Path:
    """The folder to read: ``folder``, or the complete new copy a cut save left beside it."""
    ready = _siblings(folder)[1]
    return ready if not folder.exists() and ready.is_dir() else folder


def read_adapter_config(folder) -> dict:
    """The JSON config of a saved adapter (method, config, base config)."""
    return load_json(_source(Path(folder)) / ADAPTER_CONFIG)


def read_adapter(folder, model) -> tuple[PeftConfig, dict]:
    """Read and check a saved adapter: (its config, name -> host array). Raises
    CheckpointError for a missing, corrupted, foreign or mismatched file."""
    folder = Path(folder)
    src = _source(folder)
    meta = load_json(src / ADAPTER_CONFIG)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or \
            not isinstance(meta.get("base_config", {}), dict):
        raise CheckpointError(f"{folder}: {ADAPTER_CONFIG} is not an adapter config (a JSON "
                              "object with 'method', 'config' and 'base_config')")
    tensors, file_meta = load_tensors(src / ADAPTER_WEIGHTS)
    if file_meta != meta:
        raise CheckpointError(f"{folder}: {ADAPTER_CONFIG} does not match the weights file")
    base_cfg = meta.get("base_config", {})
    if base_cfg != model.config.to_dict():
        diff = {k: (v, base_cfg.get(k)) for k, v in model.config.to_dict().items()
                if base_cfg.get(k) != v}
        raise CheckpointError(f"{folder}: adapter was trained on another base model; "
                              f"differences (this base, adapter's base): {diff}")
    method = meta.get("method")
    if not isinstance(method, str) or method not in CONFIG_CLASSES:
        raise CheckpointError(f"{folder}: unknown PEFT method {method!r}; known: "
                              f"{sorted(CONFIG_CLASSES)}")
    try:
        config = CONFIG_CLASSES[method].from_dict(meta["config"])
    except (TypeError, ValueError) as exc:       # unknown fields, or values the config refuses
        raise CheckpointError(f"{folder}: {ADAPTER_CONFIG} holds no valid {method} config: "
                              f"{exc}") from None
    bad = sorted(k for k, v in tensors.items()
                 if v.dtype.kind in "fc" and not bool(bk.np.isfinite(v).all()))
    if bad:
        raise CheckpointError(f"{folder}: tensors {bad} hold NaN or inf values")
    return config, tensors
