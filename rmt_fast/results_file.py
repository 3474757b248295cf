"""The results file of ``rmt-fast classify --output``: one JSON line per input, in input order, resumable.

Line i answers input i (``{"index": i, "input": name, ...}``). Lines are appended and fsynced one at a
time, so a killed run loses at most the documents in flight; a partial last line (a kill mid-write) is
cut off when the file is next opened. A rerun skips the inputs already answered.

Under torchrun each rank appends its own results, in its own order, to ``OUT.part-RANK``; rank 0 folds
the part files into ``OUT`` in input order at the end. Folding is idempotent: a record whose index is
already in ``OUT`` is skipped, so a crash at any point while folding loses and duplicates nothing. A
rerun (any number of processes) folds what it finds first and computes only what no file answers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterator, List, Sequence

from . import files

OVERWRITE_HINT = "give the same inputs in the same order to resume, or --overwrite to start over"


def _complete_lines(path: Path) -> List[dict]:
    """The records of ``path``'s complete lines; a partial last line is cut off the file (durably)."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
    records = []
    for n, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("index"), int) or "input" not in rec:
            raise ValueError(f"--output {path}: line {n} is not a classify result; {OVERWRITE_HINT}")
        records.append(rec)
    return records


class _Appender:
    """Appends JSON lines to a file, each flushed and fsynced before the next (a kill loses none written)."""

    def __init__(self, path: Path):
        new = not path.exists()
        self._f = open(path, "ab")
        if new:
            files.fsync_dir(path.parent)

    def write(self, record: dict) -> None:
        self._f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


class _InOrderWriter:
    """Writes records to ``OUT`` in input order: each as soon as every earlier input is answered,
    by this run or by a part file of an earlier one (``known``)."""

    def __init__(self, appender: _Appender, next_index: int, known: Dict[int, dict]):
        self._out, self.next, self._known = appender, next_index, dict(known)

    def write(self, record: dict) -> None:
        self._known[record["index"]] = record
        while self.next in self._known:
            self._out.write(self._known.pop(self.next))
            self.next += 1

    def close(self) -> None:
        self._out.close()


class ResultsFile:
    """``OUT`` and its part files for the inputs ``names`` (input order)."""

    def __init__(self, path, names: Sequence[str]):
        self.path, self.names = Path(path), list(names)

    def part_path(self, rank: int) -> Path:
        return self.path.with_name(f"{self.path.name}.part-{rank}")

    def _part_paths(self) -> List[Path]:
        return sorted(self.path.parent.glob(f"{self.path.name}.part-*"))

    # -- reading ------------------------------------------------------------------------------------
    def _check(self, rec: dict, where: str) -> None:
        i = rec["index"]
        if not 0 <= i < len(self.names):
            raise ValueError(f"--output {where}: answers input {i + 1}, but there are {len(self.names)} inputs; "
                             + OVERWRITE_HINT)
        if rec["input"] != self.names[i]:
            raise ValueError(f"--output {where}: answers {rec['input']!r} as input {i + 1}, which is "
                             f"{self.names[i]!r}; " + OVERWRITE_HINT)

    def answered(self) -> int:
        """How many inputs ``OUT`` answers (its lines are inputs 0, 1, ... in order)."""
        if not self.path.exists():
            return 0
        records = _complete_lines(self.path)
        for n, rec in enumerate(records):
            if rec["index"] != n:
                raise ValueError(f"--output {self.path}: line {n + 1} answers input {rec['index'] + 1}; "
                                 + OVERWRITE_HINT)
            self._check(rec, f"{self.path} line {n + 1}")
        return len(records)

    def _part_records(self, start: int) -> Dict[int, dict]:
        """Records of the part files for inputs from ``start`` on (the first of any repeated one)."""
        out: Dict[int, dict] = {}
        for part in self._part_paths():
            for rec in _complete_lines(part):
                self._check(rec, str(part))
                if rec["index"] >= start:
                    out.setdefault(rec["index"], rec)
        return out

    def records(self) -> Iterator[dict]:
        return iter(_complete_lines(self.path)) if self.path.exists() else iter(())

    # -- the steps of a run -------------------------------------------------------------------------
    def start(self, overwrite: bool) -> None:
        """Before any compute (rank 0 only): start over, or fold what earlier runs left in part files."""
        if overwrite:
            for p in [self.path, *self._part_paths()]:
                p.unlink(missing_ok=True)
            files.fsync_dir(self.path.parent)
            return
        self.fold()

    def fold(self) -> int:
        """Append to ``OUT`` the part files' records that extend it in order; remove the part files
        once ``OUT`` holds all they answer. Returns how many inputs ``OUT`` answers."""
        done = self.answered()
        parts = self._part_records(done)
        if parts and done in parts:
            writer = _InOrderWriter(_Appender(self.path), done, parts)
            writer.write(parts[done])
            writer.close()
            done = writer.next
        if all(i < done for i in parts):
            for p in self._part_paths():
                p.unlink()
            files.fsync_dir(self.path.parent)
        return done

    def pending(self) -> List[int]:
        """Indices of the inputs no file answers yet, in input order."""
        done = self.answered()
        parts = self._part_records(done)
        return [i for i in range(done, len(self.names)) if i not in parts]

    def writer(self, rank: int, world: int):
        """Where this process writes its records: ``OUT`` in order alone, else its own part file."""
        if world == 1:
            done = self.answered()
            return _InOrderWriter(_Appender(self.path), done, self._part_records(done))
        return _Appender(self.part_path(rank))

    def finish(self) -> None:
        """After every rank is done (rank 0 only): fold the part files; every input must be answered."""
        done = self.fold()
        if done != len(self.names):
            raise RuntimeError(f"--output {self.path}: {len(self.names) - done} inputs have no result after the run "
                               f"(from input {done + 1} on); rerun the same command to compute them")
