"""Resume a long classify run: per-document checkpoints of the carried memory, and finished logits.

With ``checkpoint_dir`` a run keeps one file per document, ``doc-KEY.safetensors`` (KEY: the
document's index in the call, or the key the caller files it under). Every ``every`` segments of a
document the loop copies that document's memory out of the state at the step boundary (the float32
``[M, H]`` row the loop carries: a resumed run is bit-identical to an uninterrupted one) and saves it
with its segment position; at its last segment the file is replaced by its logits. Each write is
atomic (temporary file, fsync, rename: ``files.py``), so a kill leaves the old complete file or the
new one. Writes run on a writer thread, in order, so the step loop never waits for a disk's fsync; a
write error is raised in the run, and the call waits for every queued write before it ends (but for a
call that returns and removes the files anyway: those still queued are dropped).

A rerun with the same arguments looks up each document as a slot takes it (``point``): no file, it
starts fresh; a memory file, the slot starts at that segment from that memory (the layout reads past
the segments already done, checking their ids); a logits file, the document is not computed at all.
What makes a file usable, checked with an error naming the file and what differs (never a silent
wrong resume): the format and checksum (a truncated or corrupt file is an error: delete it to
restart that document); the model (``memory_state.model_fingerprint``), the compute dtype, the
alignment, memory size and input size; the document's index; and the document itself: the count
and a sha256 of the token ids (with each segment's length) of the segments the file covers.

The files of the run's documents are removed when the call returns, unless ``keep``; then the
folder too, if that leaves it empty.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence

import numpy as np
import torch

from .. import files
from ..memory_state import read_tagged_safetensors

log = logging.getLogger(__name__)

FORMAT = "rmt_fast.RunCheckpoint/1"
_KEY = "rmt_fast_run_checkpoint"
DEFAULT_EVERY = 64                       # segments between saves when only a folder is given
_FIELDS = ("key", "index", "name", "finished", "segments", "tokens", "sha256", "checksum", "fingerprint", "dtype",
           "config", "every")
QUEUED_WRITES = 64                       # files serialized but not yet written: then save() waits
_SETTINGS = (("segment_alignment", "alignment"), ("num_mem_tokens", "memory size"), ("input_size", "input size"),
             ("num_labels", "number of labels"))


class RunCheckpointError(ValueError):
    """A checkpoint file that cannot be used for this run: unreadable, corrupt, or of another model,
    setting or document. It stops the run (never one document's NaN: the folder is the wrong one)."""


def check_options(checkpoint_dir, checkpoint_every, keep_checkpoints) -> None:
    """ValueError for options that cannot be met (named by their argument names)."""
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise ValueError(f"checkpoint_dir must be a path (str or os.PathLike), got {type(checkpoint_dir).__name__}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool)
                                         or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive int (segments), got {checkpoint_every!r}")
    if not isinstance(keep_checkpoints, bool):
        raise ValueError(f"keep_checkpoints must be True or False, got {keep_checkpoints!r}")
    if checkpoint_dir is None and (checkpoint_every is not None or keep_checkpoints):
        raise ValueError("checkpoint_every and keep_checkpoints need checkpoint_dir")


def identity(config, hidden: int, fingerprint: str, dtype: str) -> dict:
    """What a checkpoint must match to be resumed by a run of this model in this dtype."""
    return {"fingerprint": fingerprint, "dtype": dtype, "memory_shape": [config.num_mem_tokens, hidden],
            "config": {key: getattr(config, key) for key, _ in _SETTINGS}}


def file_name(key: int) -> str:
    return f"doc-{key}.safetensors"


class Prefix:
    """What a document's segments so far consumed: the segment count, the text ids, and a sha256 of
    each segment's length and ids (so the same ids cut elsewhere are another prefix)."""

    def __init__(self):
        self.segments, self.tokens = 0, 0
        self._hash = hashlib.sha256()

    def add(self, ids: np.ndarray) -> None:
        """One more segment's text ids [n] int64."""
        self._hash.update(struct.pack("<q", ids.size))
        self._hash.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
        self.segments += 1
        self.tokens += ids.size

    def digest(self) -> str:
        return self._hash.hexdigest()


@dataclass
class ResumePoint:
    """A document's checkpoint file, read and checked against this run's model and settings."""

    path: Path
    segments: int                          # segments done
    tokens: int                            # text ids those segments consumed
    sha256: str                            # Prefix.digest() of them
    memory: Optional[torch.Tensor]         # [M, H] float32 after segment ``segments`` (unfinished)
    logits: Optional[torch.Tensor]         # [num_labels] float32 (finished)

    @property
    def finished(self) -> bool:
        return self.logits is not None


def _checksum(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


class RunCheckpoints:
    """One run's checkpoint folder. ``identity``: fingerprint, dtype, and the config's settings above.
    keys: per document index the key its file is named by (default: the index)."""

    def __init__(self, directory, every: Optional[int], keep: bool, identity: dict,
                 keys: Optional[Sequence[int]] = None):
        self.directory = Path(directory)
        self.every = DEFAULT_EVERY if every is None else every
        self.keep, self.identity = keep, identity
        self._keys = None if keys is None else [int(k) for k in keys]
        if self._keys is not None and len(set(self._keys)) != len(self._keys):
            raise RunCheckpointError("checkpoint_keys must be distinct: two documents would share a file")
        if self.directory.exists() and not self.directory.is_dir():
            raise RunCheckpointError(f"checkpoint_dir {self.directory}: exists and is not a folder")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()            # points are read on the layout thread, saves on the loop's
        self._points: Dict[int, ResumePoint] = {}
        self._seen: Dict[int, Optional[str]] = {}   # this run's documents (their files are removed): names
        self.resumed: Dict[int, int] = {}        # index -> segment it resumed at
        self.restored: list = []                 # indices finished by an earlier run
        self.fresh: list = []                    # indices started from their first segment
        self.saved = 0                           # files written by this run
        self._writes: "queue.Queue" = queue.Queue(QUEUED_WRITES)   # (path, bytes), written in order
        self._writer: Optional[threading.Thread] = None
        self._write_error: Optional[BaseException] = None

    def key(self, index: int) -> int:
        if self._keys is None:
            return index
        if index >= len(self._keys):
            raise RunCheckpointError(f"checkpoint_keys has {len(self._keys)} keys; document {index} has none")
        return self._keys[index]

    def path(self, index: int) -> Path:
        return self.directory / file_name(self.key(index))

    # -- reading (the layout thread) ------------------------------------------------------------------
    def point(self, index: int, name: Optional[str] = None) -> Optional[ResumePoint]:
        """Document ``index``'s checkpoint, checked against this run (RunCheckpointError), or None."""
        path = self.path(index)
        with self._lock:
            self._seen[index] = name
        if not path.exists():
            with self._lock:
                self.fresh.append(index)
            return None
        point = self._load(path, index)
        with self._lock:
            self._points[index] = point
        return point

    def _load(self, path: Path, index: int) -> ResumePoint:
        meta, tensors = read_tagged_safetensors(path, _KEY, FORMAT, RunCheckpointError, "rmt_fast run checkpoint",
                                                hint="; delete it to restart that document")
        missing = sorted(set(_FIELDS) - set(meta))
        if missing:
            raise RunCheckpointError(f"{path}: the checkpoint's metadata lacks {', '.join(missing)} (corrupt); "
                                     f"delete it to restart that document")
        mine = self.identity
        for key, what in _SETTINGS:
            if meta["config"].get(key) != mine["config"][key]:
                raise RunCheckpointError(f"{path} was written with {key}={meta['config'].get(key)!r}; this model has "
                                         f"{key}={mine['config'][key]!r} ({what} differs): another run's folder?")
        if meta["fingerprint"] != mine["fingerprint"]:
            raise RunCheckpointError(f"{path} was written by another model (fingerprint {meta['fingerprint'][:12]}, "
                                     f"this model {mine['fingerprint'][:12]}: other weights or config)")
        if meta["dtype"] != mine["dtype"]:
            raise RunCheckpointError(f"{path} was computed in {meta['dtype']}; this run computes in {mine['dtype']}")
        if meta["key"] != self.key(index):            # the key a file is named by; the index is the call's
            raise RunCheckpointError(f"{path} holds document {meta['key']} ({meta['name']}), not document "
                                     f"{self.key(index)}: a renamed file, or another run's folder?")
        finished = bool(meta["finished"])
        name = "logits" if finished else "memory"
        tensor = tensors.get(name)
        want = (mine["config"]["num_labels"],) if finished else tuple(mine["memory_shape"])
        if tensor is None or tensor.dtype != torch.float32 or tuple(tensor.shape) != want:
            raise RunCheckpointError(f"{path}: {name} must be {list(want)} float32, got "
                                     f"{None if tensor is None else (tuple(tensor.shape), tensor.dtype)}")
        if _checksum(tensor) != meta["checksum"]:
            raise RunCheckpointError(f"{path}: the checksum does not match the tensor (the file is corrupt); "
                                     f"delete it to restart that document")
        return ResumePoint(path, int(meta["segments"]), int(meta["tokens"]), meta["sha256"],
                           None if finished else tensor, tensor if finished else None)

    def verify(self, index: int, name: Optional[str], point: ResumePoint, read: Prefix, ended: bool) -> None:
        """The segments just read past are the ones ``point`` covers (RunCheckpointError naming what differs)."""
        doc = f"document {index}" + (f" ({name})" if name else "")
        if read.segments != point.segments or ended != point.finished:
            now = f"ends after {read.segments} segments" if ended else f"has more than {read.segments} segments"
            was = f"{point.segments} segments, {'finished' if point.finished else 'unfinished'}"
            raise RunCheckpointError(f"{point.path} is for another document: it covers {was}, but {doc} {now}")
        if read.tokens != point.tokens or read.digest() != point.sha256:
            raise RunCheckpointError(f"{point.path} is for another document: its first {point.segments} segments "
                                     f"held {point.tokens} ids (sha256 {point.sha256[:12]}), {doc}'s hold "
                                     f"{read.tokens} (sha256 {read.digest()[:12]})")
        with self._lock:
            if point.finished:
                self.restored.append(index)
            else:
                self.resumed[index] = point.segments

    def memory(self, index: int) -> torch.Tensor:
        """[M, H] float32 (CPU): the memory document ``index`` resumes from (handed over once, then dropped)."""
        point = self._points[index]
        memory, point.memory = point.memory, None
        return memory

    def logits(self, index: int) -> torch.Tensor:
        """[num_labels] float32 (CPU): the logits of a document finished by an earlier run."""
        return self._points[index].logits

    # -- writing (the loop's thread) ------------------------------------------------------------------
    def save(self, index: int, position, *, memory: Optional[torch.Tensor] = None,
             logits: Optional[torch.Tensor] = None) -> None:
        """Document ``index``'s memory [M, H] after ``segments`` segments, or its logits [num_labels]
        once finished, atomically (temporary file, fsync, rename). position: (segments, tokens, sha256)."""
        from safetensors.torch import save
        segments, tokens, sha256 = position
        with self._lock:
            name = self._seen.get(index)
        finished = logits is not None
        tensor = (logits if finished else memory).detach().to("cpu", torch.float32).contiguous()
        meta = {"format": FORMAT, "key": self.key(index), "index": index, "name": name, "finished": finished,
                "segments": segments, "tokens": tokens, "sha256": sha256, "checksum": _checksum(tensor),
                "fingerprint": self.identity["fingerprint"], "dtype": self.identity["dtype"],
                "config": self.identity["config"], "every": self.every}
        data = save({"logits" if finished else "memory": tensor}, metadata={_KEY: json.dumps(meta)})
        self._raise_write_error()
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="rmt-checkpoints", daemon=True)
            self._writer.start()
        self._writes.put((self.path(index), data))

    def _write_loop(self) -> None:
        while True:
            item = self._writes.get()
            try:
                if item is None:
                    return
                if self._write_error is None:        # after a failure nothing more is written
                    files.write_bytes(*item)
                    with self._lock:
                        self.saved += 1
            except BaseException as e:  # noqa: BLE001 - raised on the loop's thread by the next save or flush
                self._write_error = e
            finally:
                self._writes.task_done()

    def _raise_write_error(self) -> None:
        if self._write_error is not None:
            raise RunCheckpointError(f"{self.directory}: a checkpoint could not be written "
                                     f"({type(self._write_error).__name__}: {self._write_error})") from self._write_error

    def flush(self, discard: bool = False) -> None:
        """Wait until every queued file is written (``discard``: dropped unwritten) and stop the writer;
        raise a write error."""
        if self._writer is not None:
            while discard:
                try:
                    self._writes.get_nowait()
                    self._writes.task_done()
                except queue.Empty:
                    break
            self._writes.join()
            self._writes.put(None)
            self._writer.join()
            self._writer = None
        self._raise_write_error()

    # -- the end ------------------------------------------------------------------------------------
    def report(self) -> dict:
        """The run's counts: documents resumed (index -> segment), skipped as finished, started fresh,
        segments not computed thanks to the files, files written, the folder and whether it was kept."""
        with self._lock:
            skipped = sum(self.resumed.values()) + sum(self._points[i].segments for i in self.restored)
            return {"resumed": dict(sorted(self.resumed.items())), "finished": sorted(self.restored),
                    "fresh": sorted(self.fresh), "segments_skipped": skipped, "checkpoints_written": self.saved,
                    "directory": str(self.directory), "kept": self.keep or self.directory.exists()}

    def close(self) -> None:
        """The run ended well: its documents' files are removed, then the folder if that leaves it empty
        (files still queued are dropped: they would be removed); with ``keep``, every file is written."""
        self.flush(discard=not self.keep)
        if not self.keep:
            remove(self.directory, [self.key(i) for i in self._seen])


@contextlib.contextmanager
def reporting(checkpoints: Optional[RunCheckpoints], report: Optional[dict]) -> Iterator[None]:
    """Around a run (a no-op without checkpoints): when it returns its files go (unless kept); when it
    raises every queued file is written first and all are kept; either way the counts are logged and
    put into the caller's ``report`` dict."""
    if checkpoints is None:
        yield
        return
    try:
        yield
        checkpoints.close()
    except BaseException:
        with contextlib.suppress(Exception):    # what was computed is kept; the first error is the one raised
            checkpoints.flush()
        raise
    finally:
        counts = checkpoints.report()
        log.info("rmt_fast: %s", summary(counts))
        if report is not None:
            report.update(counts)


def remove(directory, keys) -> None:
    """Remove the files of documents ``keys`` (and killed runs' temporary files), then the folder if empty."""
    directory = Path(directory)
    for key in keys:
        (directory / file_name(key)).unlink(missing_ok=True)
    for leftover in directory.glob(".doc-*.safetensors.tmp-*"):
        leftover.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        log.info("rmt_fast: %s holds other files; left in place", directory)


def _count(n: int, noun: str) -> str:
    """'1 document', '3 documents'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def summary(report: dict, name_of: Callable[[int], str] = str) -> str:
    """One line for people: what a rerun resumed (documents named by ``name_of(index)``), skipped and started."""
    resumed = report["resumed"]
    where = ", ".join(f"{name_of(i)} at segment {k}" for i, k in list(resumed.items())[:8])
    where += ", ..." if len(resumed) > 8 else ""
    return (f"checkpoints: {_count(len(resumed), 'document')} resumed{f' ({where})' if resumed else ''}, "
            f"{len(report['finished'])} skipped as finished, {len(report['fresh'])} started fresh, "
            f"{_count(report['segments_skipped'], 'segment')} skipped; "
            f"{_count(report['checkpoints_written'], 'file')} written; "
            f"{report['directory']} {'kept' if report['kept'] else 'removed'}")
