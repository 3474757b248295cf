"""The slot schedule: which document's which segment each slot runs at each step, laid out a chunk at a time.

Slots take documents in the order the source gives them, the lowest free slot first; given the
documents longest first this is exactly the LPT schedule (checked against tests/lpt_schedule.py).
A chunk is ``steps`` steps written into ``ids`` [steps, slots, T] and ``meta`` [steps, FIELDS,
slots] (steprows.py). A step's busy rows come first and only its first ``width`` rows run
(``width``: the busy count rounded up to a power of two, at most ``slots``), so the tail of a run
does not compute idle slots and a static-shape loop needs only a few batch shapes. ``ChunkMeta``
repeats the decisions on the host, so the loops never read anything back from the device.

A chunk ends early, with the steps it has, when the next step would wait for ids still being read
or tokenized: a stalled source never holds back segments that are ready.

With run checkpoints (``run_checkpoints.py``) a slot that takes a document with a checkpoint reads
past the segments it covers (checking their ids) and starts at the next one from the saved memory
(``ChunkMeta.resumed``), or, for a finished one, computes nothing (``ChunkMeta.restored``); every
``every`` segments a document's position is listed in ``ChunkMeta.saves``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import segmentation
from ..config import RMTConfig
from .run_checkpoints import Prefix, RunCheckpointError
from .sources import Doc, DocumentError, FeederStopped, ready
from .steprows import BUSY, DEST, DOC, FIELDS, KEY_LEN, RESET, SLOT


@dataclass
class ChunkMeta:
    """The host's copy of a chunk's decisions (the same as its ``meta`` block)."""

    ring_slot: int
    steps: int = 0
    width: List[int] = field(default_factory=list)                   # per step: rows to run
    n_busy: List[int] = field(default_factory=list)                  # per step: busy rows (the first ones)
    masked: List[bool] = field(default_factory=list)                 # per step: any busy segment padded
    finished: List[Tuple[int, int]] = field(default_factory=list)    # (document, result row)
    started: List[int] = field(default_factory=list)                 # documents whose first segment is here, in order
    truncated: List[int] = field(default_factory=list)               # documents cut at max_n_segments
    failed: Dict[int, DocumentError] = field(default_factory=dict)   # on_error='nan': document -> error
    # run checkpoints: (step, slot, document) rows that resume from a saved memory (RESET is 0 there);
    # (step, slot, document, Prefix state) after which a document's memory is saved; document -> Prefix
    # state at its last segment; documents finished by an earlier run (nothing to compute)
    resumed: List[Tuple[int, int, int]] = field(default_factory=list)
    saves: List[Tuple[int, int, int, Tuple[int, int, str]]] = field(default_factory=list)
    ends: Dict[int, Tuple[int, int, str]] = field(default_factory=dict)
    restored: List[int] = field(default_factory=list)
    n_segments: int = 0
    n_tokens: int = 0


class _Slot:
    def __init__(self, doc: Doc, checkpointed: bool = False):
        self.doc, self.k = doc, 0
        self.prefix = Prefix() if checkpointed else None     # what its segments so far consumed
        self.resumes = False          # its next segment starts from a saved memory


class ChunkLayout:
    """Lays out chunks of ``steps`` steps for ``slots`` slots from a source, one at a time.

    Result rows: a document finishing at step c in row b of a chunk in ring slot r has its logits
    scattered to row ``r * steps * slots + c * slots + b``; every other row goes to the sink
    ``ring * steps * slots``.
    """

    def __init__(self, source, config: RMTConfig, slots: int, steps: int, ring: int, empty: str = "error",
                 on_error: str = "raise", checkpoints=None):
        self.source, self.config = source, config
        self.checkpoints = checkpoints          # a run_checkpoints.RunCheckpoints, or None
        self.slots, self.steps, self.ring = slots, steps, ring
        self.empty, self.on_error = empty, on_error
        self.sink = ring * steps * slots
        T, M = config.input_size, config.num_mem_tokens
        self.T, self.M, self.S = T, M, config.segment_size
        tmpl = np.full(T, config.pad_token_id, dtype=np.int64)
        tmpl[0] = config.cls_token_id
        tmpl[1:M + 1] = np.arange(config.vocab_size, config.vocab_size + M)
        tmpl[M + 1] = config.sep_token_id
        self._tmpl = tmpl
        self._idle_ids = tmpl.copy()      # an idle row: a valid empty segment whose results go nowhere
        self._idle_ids[M + 2] = config.sep_token_id
        self._idle_meta = np.zeros(FIELDS, dtype=np.int64)
        self._idle_meta[[KEY_LEN, DEST, SLOT, DOC]] = M + 3, self.sink, -1, -1
        self._active: List[Optional[_Slot]] = [None] * slots
        self._exhausted = False

    def _next_doc(self, stop) -> Optional[Doc]:
        if self._exhausted:
            return None
        doc = self.source.next_doc(stop)
        if doc is None:
            self._exhausted = True
        return doc

    def _segment(self, slot: _Slot, stop) -> Tuple[int, bool]:
        """(text tokens, is last) of the slot's next segment; its tokens are then read."""
        doc, S = slot.doc, self.S
        if doc.seg_lengths is None and self.config.segment_alignment != "left":
            doc.wait(1 << 62, stop)             # right/center cuts need the length: all of it
            if doc.received == 0:
                self._check_empty()
            one = segmentation.Documents(torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                                         torch.tensor([doc.received]))
            doc.seg_lengths = segmentation.cut(one, self.config, empty_as_one_segment=True).length.tolist()
        if doc.seg_lengths is not None:
            return doc.seg_lengths[slot.k], slot.k == len(doc.seg_lengths) - 1
        doc.wait(S + 1, stop)                   # one token past the segment says it is not the last
        n = doc.available
        if doc.complete and n <= S:
            if n == 0 and slot.k == 0:
                self._check_empty()
            return n, True
        return S, False

    def _stalled(self, b: int) -> bool:
        """Whether slot b waits for ids from a stream that may stall (a pipe): it sits the step out."""
        slot = self._active[b]
        if slot is None:
            return not self._exhausted and self.source.next_stalled()
        return slot.doc.live and not ready(slot.doc, self.config)

    def _would_wait(self) -> bool:
        """Whether laying out the next step would wait for ids still being read or tokenized (slots
        that wait for a stream sit the step out instead)."""
        for b, slot in enumerate(self._active):
            if self._stalled(b):
                continue
            if slot is None:
                if not self._exhausted and not self.source.next_ready():
                    return True
            elif not ready(slot.doc, self.config):
                return True
        return False

    def _check_empty(self) -> None:
        if self.empty == "error":
            raise ValueError("no tokens left after removing special ids (empty document); "
                             "pass empty='special' to classify it as an empty text")

    def _take(self, b: int, meta: ChunkMeta, stop) -> Tuple[Optional[_Slot], int, bool]:
        """Slot b's document and its next segment (text tokens, is last); (None, 0, False) when idle."""
        while True:
            slot = self._active[b]
            new = slot is None
            if new:
                doc = self._next_doc(stop)
                if doc is None:
                    return None, 0, False
                slot = self._active[b] = _Slot(doc, self.checkpoints is not None)
            try:
                if new and self.checkpoints is not None and self._resume(slot, meta, stop):
                    self._active[b] = None       # finished by an earlier run: its logits are on file
                    continue
                n, last = self._segment(slot, stop)
                return slot, n, last
            except (FeederStopped, RunCheckpointError):     # a wrong checkpoint folder stops the run
                raise
            except Exception as e:  # noqa: BLE001 - named, then raised or recorded (Ctrl-C is not a document's)
                err = self._named(slot.doc, e)
                if self.on_error == "raise":
                    raise err from e
                meta.failed[slot.doc.index] = err
                self._active[b] = None

    def _resume(self, slot: _Slot, meta: ChunkMeta, stop) -> bool:
        """Read past the segments the document's checkpoint covers, checking them; True if it is finished."""
        doc = slot.doc
        point = self.checkpoints.point(doc.index, doc.name)
        if point is None:
            return False
        scratch = np.empty(self.S, dtype=np.int64)
        last = False
        while slot.k < point.segments and not last:
            n, last = self._segment(slot, stop)
            doc.read(n, scratch[:n])
            slot.prefix.add(scratch[:n])
            slot.k += 1
        self.checkpoints.verify(doc.index, doc.name, point, slot.prefix, ended=last)
        if point.finished:
            meta.restored.append(doc.index)
            if doc.truncated:
                meta.truncated.append(doc.index)
            return True
        slot.resumes = True
        return False

    def _lay_step(self, step_ids: np.ndarray, step_meta: np.ndarray, first_row: int, meta: ChunkMeta, stop,
                  wait: bool) -> Tuple[List[int], bool]:
        """One step's rows into ``step_ids`` [B, T] and ``step_meta`` [FIELDS, B]: (busy rows, any padded).
        wait=False leaves out the slots that wait for a stream."""
        M, S = self.M, self.S
        busy, masked = [], False
        for b in range(self.slots):
            if not wait and self._stalled(b):
                continue
            slot, n, last = self._take(b, meta, stop)
            if slot is None:
                continue
            row = step_ids[b]
            row[:] = self._tmpl
            slot.doc.read(n, row[M + 2:M + 2 + n])
            row[M + 2 + n] = self.config.sep_token_id
            first = slot.k == 0
            if first:
                meta.started.append(slot.doc.index)
            f = step_meta[:, b]                                           # [FIELDS], a view
            f[KEY_LEN], f[DEST], f[SLOT] = M + 3 + n, (first_row + b if last else self.sink), b
            f[BUSY], f[RESET], f[DOC] = 1, first, slot.doc.index
            busy.append(b)
            masked |= n < S
            meta.n_tokens += n
            slot.k += 1
            if slot.prefix is not None:
                self._checkpoint(slot, b, row[M + 2:M + 2 + n], last, meta)
            if last:
                meta.finished.append((slot.doc.index, first_row + b))
                if slot.doc.truncated:
                    meta.truncated.append(slot.doc.index)
                self._active[b] = None
        return busy, masked

    def _checkpoint(self, slot: _Slot, b: int, text: np.ndarray, last: bool, meta: ChunkMeta) -> None:
        """A checkpointed run's bookkeeping for the segment just laid out in slot b (its ids ``text``)."""
        d = slot.doc.index
        if slot.resumes:                          # this row reads the saved memory (copied into slot b)
            meta.resumed.append((meta.steps, b, d))
            slot.resumes = False
        p = slot.prefix
        p.add(text)
        if last:
            meta.ends[d] = (p.segments, p.tokens, p.digest())
        elif slot.k % self.checkpoints.every == 0:
            meta.saves.append((meta.steps, b, d, (p.segments, p.tokens, p.digest())))

    def fill(self, ids: np.ndarray, rows: np.ndarray, ring_slot: int, stop: threading.Event) -> Optional[ChunkMeta]:
        """Lay the next chunk out into ``ids`` [steps, slots, T] and ``rows`` [steps, FIELDS, slots]
        (the meta block); None when every document is done."""
        B = self.slots
        meta = ChunkMeta(ring_slot)
        base = ring_slot * self.steps * B
        for c in range(self.steps):
            if c and self._would_wait():
                break                            # hand over what is ready rather than wait with it
            step_ids, step_meta = ids[c], rows[c]      # [B, T], [FIELDS, B]
            # A slot waiting for a stream sits the step out (its memory waits untouched), so a stalled
            # pipe does not hold up the others; when every slot with work waits on one, this waits.
            busy, masked = self._lay_step(step_ids, step_meta, base + c * B, meta, stop, wait=False)
            if not busy and (not self._exhausted or any(slot is not None for slot in self._active)):
                if c:
                    break
                busy, masked = self._lay_step(step_ids, step_meta, base + c * B, meta, stop, wait=True)
            if not busy:
                break
            n = len(busy)
            width = min(B, 1 << (n - 1).bit_length())
            if n < B:                            # busy rows first, then idle ones up to the width
                step_ids[:n] = step_ids[busy]    # (fancy indexing copies first: no aliasing)
                step_meta[:, :n] = step_meta[:, busy]
                step_ids[n:width] = self._idle_ids
                step_meta[:, n:width] = self._idle_meta[:, None]
            meta.steps += 1
            meta.n_segments += n
            meta.width.append(width)
            meta.n_busy.append(n)
            meta.masked.append(masked)
        if meta.steps == 0 and not meta.failed and not meta.restored:
            return None
        return meta

    @staticmethod
    def _named(doc: Doc, e: BaseException) -> DocumentError:
        if isinstance(e, DocumentError):
            return e
        # Our own ValueErrors (bad bytes, empty, ids out of range) read well alone; others keep their type.
        ours = type(e) is ValueError
        return DocumentError(doc.index, doc.name, str(e) if ours else f"{type(e).__name__}: {e}")
