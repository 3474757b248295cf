"""Crash-safe writes: a file or folder is either the old complete one or the new complete one.

Files are written to a temporary name beside the target, flushed to disk (fsync) and renamed over it.
A folder (a checkpoint) is replaced in steps that leave a complete copy at every instant: write
``X.new``, fsync it, rename ``X`` to ``X.old``, rename ``X.new`` to ``X``, remove ``X.old``.
``recover_dir`` finds the complete copy after a crash at any of those steps.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional


def fsync_dir(path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it is fsynced and renamed over
    ``path``, on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def fsync_tree(directory) -> None:
    """fsync every file under ``directory``, then every folder, deepest first."""
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            _fsync_file(os.path.join(root, name))
        fsync_dir(root)


def new_dir_path(target) -> Path:
    """Where the next version of folder ``target`` is written before ``replace_dir``."""
    target = Path(target)
    return target.with_name(target.name + ".new")


def _old_dir_path(target: Path) -> Path:
    return target.with_name(target.name + ".old")


def replace_dir(new, target) -> None:
    """Put the complete folder ``new`` in place of ``target``; a crash at any point leaves one complete
    copy, which ``recover_dir`` finds."""
    new, target = Path(new), Path(target)
    old = _old_dir_path(target)
    fsync_tree(new)
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.rename(target, old)
        fsync_dir(target.parent)
    os.rename(new, target)
    fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old)


def recover_dir(target, is_complete: Callable[[Path], bool]) -> Optional[str]:
    """After a crash inside ``replace_dir``: make ``target`` the newest complete copy.

    Returns None when ``target`` was already complete (leftovers are removed), else a sentence saying
    which copy was recovered; a missing target with no complete copy is left missing.
    """
    target = Path(target)
    new, old = new_dir_path(target), _old_dir_path(target)
    if target.exists() and is_complete(target):
        for leftover in (new, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        return None
    for candidate in (new, old):  # the newer one first
        if candidate.exists() and is_complete(candidate):
            if target.exists():
                shutil.rmtree(target)
            os.rename(candidate, target)
            fsync_dir(target.parent)
            other = old if candidate == new else new
            if other.exists():
                shutil.rmtree(other)
            return f"{target} was incomplete after an interrupted save; recovered it from {candidate.name}"
    return None
