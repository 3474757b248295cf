"""The feeder: documents in, per-step host chunks of segment ids out, prepared ahead of the compute.

A *chunk* is ``steps`` consecutive steps of the slot loop laid out in one int64 array
``[steps, slots, T + 5]``: per step and row a segment's ``T = input_size`` token ids
(``[CLS] mem [SEP] text [SEP] [PAD]...``), then five columns (``COL_*`` below, counted from T):
the key length, the result row its logits go to (a sink row unless it is its document's last
segment), 1 if the row is busy, 1 if it starts a document (its memory starts from the initial
memory), and its slot (the row of the memory state it reads and writes; -1 for an idle row).
While every slot is busy, row b is slot b. A step with idle slots is compacted: its busy rows come
first and only the first ``width`` rows run (``width``: the busy count rounded up to a power of
two, at most ``slots``), so the tail of a run does not compute idle slots, and a static-shape loop
needs only a few batch shapes. ``ChunkMeta`` repeats the decisions on the host, so the loops never
read anything back from the device.

Slots take documents in the order the source gives them, the lowest free slot first; given the
documents longest first this is exactly the LPT schedule (checked against tests/lpt_schedule.py).

Threads (``threaded=True``): one producer lays chunks out into a ring of ``ring`` host buffers
(pinned on CUDA) and copies each to the device on its own copy stream; events order that copy
after the compute that last read the device buffer, and the compute after the copy. Texts are
tokenized on a small worker pool, each document one piece at a time (a chain of short jobs that
never block, so no document can starve another), up to ``lookahead`` documents ahead of the
slots. Every queue is bounded by the ring, and a left-aligned document keeps at most a few
pieces of ids on the host. Errors in any thread reach the caller as ``DocumentError`` naming the
document; ``close()`` (also on an exception or Ctrl-C in the caller) stops every thread promptly.

Alignment and streaming: left alignment cuts at multiples of S from the start, so a segment is
known as soon as S tokens (plus one more, to know it is not the last) have arrived: such a
document streams. Right and center alignment need the length first (the remainder goes to the
first segment, or the step depends on it), so those documents are read and tokenized whole, on
the host, before they take a slot.
"""
from __future__ import annotations

import codecs
import contextlib
import copy
import io
import itertools
import os
import queue
import threading
import time
import unicodedata
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from .. import segmentation
from ..config import RMTConfig
from ..inputs import InvalidDocumentsError
from ..tokenize import text_chunks

COL_KEYLEN, COL_DEST, COL_ACTIVE, COL_RESET, COL_SLOT = 0, 1, 2, 3, 4
EXTRA_COLS = 5
_POLL_S = 0.05  # how often a blocked thread looks at the stop flag


class DocumentError(InvalidDocumentsError):
    """A document could not be read, tokenized or classified; ``index`` and ``name`` say which.

    An InvalidDocumentsError (``problems == {index: message}``), raised while the run is going.
    The original exception is the ``__cause__``.
    """

    def __init__(self, index: int, name: Optional[str], reason: str):
        self.index, self.name, self.reason = index, name, reason
        super().__init__({index: f"{name}: {reason}" if name else reason})


class FeederStopped(Exception):
    """Raised inside feeder threads when the feeder is closed; never reaches the caller."""


# ---------------------------------------------------------------------------------------------
# Documents as they arrive
# ---------------------------------------------------------------------------------------------

class Doc:
    """One document's cleaned token ids, read front to back as they arrive (a rolling buffer).

    seg_lengths: the text tokens of each segment when known up front (documents given as ids, and
    right/center-aligned texts once complete); None for a left-aligned document that streams.
    """

    def __init__(self, index: int, name: Optional[str] = None):
        self.index, self.name = index, name
        self.seg_lengths: Optional[List[int]] = None
        self.complete = False
        self.truncated = False
        self.received = 0                    # cleaned tokens received so far
        self._parts: deque = deque()
        self._head = 0                       # offset into _parts[0]
        self._available = 0
        self._error: Optional[BaseException] = None
        self._cond = threading.Condition()
        self.on_drain: Optional[Callable[[], None]] = None   # asks its tokenizer job for more
        self.high_water: Optional[int] = None                # tokens buffered before the job pauses

    @classmethod
    def from_ids(cls, index: int, ids: np.ndarray, seg_lengths: List[int]) -> "Doc":
        d = cls(index)
        d.push(ids)
        d.seg_lengths = seg_lengths
        d.complete = True
        return d

    # producer side (tokenizer jobs)
    def push(self, ids: np.ndarray) -> None:
        with self._cond:
            if ids.size:
                self._parts.append(ids)
                self._available += ids.size
                self.received += ids.size
            self._cond.notify_all()

    def finish(self, truncated: bool = False) -> None:
        with self._cond:
            self.complete, self.truncated = True, truncated
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self._error = exc
            self._cond.notify_all()

    def wants_more(self) -> bool:
        return self.high_water is None or self._available < self.high_water

    # consumer side (the chunk producer)
    @property
    def available(self) -> int:
        return self._available

    def wait(self, n: int, stop: threading.Event) -> None:
        """Block until ``n`` tokens are buffered or the document is complete; raise its error."""
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if self._available >= n or self.complete:
                    return
                if stop.is_set():
                    raise FeederStopped()
                self._cond.wait(_POLL_S)

    def read(self, n: int, out: np.ndarray) -> None:
        """Move the next ``n`` buffered tokens into ``out[:n]``."""
        with self._cond:
            assert n <= self._available
            got = 0
            while got < n:
                part = self._parts[0]
                take = min(n - got, part.size - self._head)
                out[got:got + take] = part[self._head:self._head + take]
                got += take
                self._head += take
                if self._head == part.size:
                    self._parts.popleft()
                    self._head = 0
            self._available -= n
            resume = self.on_drain if (self.on_drain is not None and self.wants_more()) else None
            if resume is not None:
                self.on_drain = None
        if resume is not None:
            resume()


# ---------------------------------------------------------------------------------------------
# Sources: where documents come from
# ---------------------------------------------------------------------------------------------

def ready(doc: Doc, config: RMTConfig) -> bool:
    """Whether a document's next segment can be laid out without waiting (or its error raised)."""
    if doc.seg_lengths is not None or doc.complete or doc._error is not None:
        return True
    return config.segment_alignment == "left" and doc.available >= config.segment_size + 1


class IdsSource:
    """Documents already tokenized and cleaned (``segmentation.Documents``), cut as ``segs``.

    Yields them longest first, which makes the feeder's slot assignment the LPT schedule.
    """

    def __init__(self, documents: segmentation.Documents, segs: segmentation.Segments):
        self.n_docs = len(documents)
        self.n_segments = len(segs)
        tokens = documents.tokens.numpy()
        counts = segs.count.tolist()
        lengths = segs.length.tolist()
        first = segs.first.tolist()
        starts, dlens = documents.starts.tolist(), documents.lengths.tolist()
        order = sorted(range(self.n_docs), key=lambda d: -counts[d])   # stable: ties keep input order
        self._docs = (Doc.from_ids(d, tokens[starts[d]:starts[d] + dlens[d]],
                                   lengths[first[d]:first[d] + counts[d]]) for d in order)

    def next_doc(self, stop: threading.Event) -> Optional[Doc]:
        return next(self._docs, None)

    def next_ready(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _safe_cut(buf: str) -> int:
    """The last position p in (0, len(buf)) where a WordPiece tokenization may be cut: after a
    whitespace not followed by a combining mark (see tokenize.py); 0 if there is none."""
    for p in range(len(buf) - 1, 0, -1):
        if buf[p - 1].isspace() and not unicodedata.combining(buf[p]):
            return p
    return 0


def _read_pieces(source, piece_chars: int, errors: str) -> Iterator[str]:
    """Text of a path, a binary or text file object, or an iterable of str/bytes pieces, in
    pieces of about ``piece_chars`` characters (UTF-8 with an optional BOM; the caller cuts)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            yield from _read_pieces(f, piece_chars, errors)
        return
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    fed = 0

    def decode(data: bytes, final: bool = False) -> str:
        nonlocal fed
        pending = len(decoder.getstate()[0])          # bytes of a character cut by the last block
        try:
            text = decoder.decode(data, final)
        except UnicodeDecodeError as e:
            at = fed - pending + e.start
            raise ValueError(f"not valid UTF-8 at byte {at} ({e.object[e.start:e.start + 1]!r}); re-encode it "
                             "or pass errors='replace'") from None
        fed += len(data)
        return text

    read = getattr(source, "read", None)
    if read is not None:
        blocks = iter(lambda: read(piece_chars), "" if isinstance(source, io.TextIOBase) else b"")
    else:
        blocks = iter(source)
    first = True
    for block in blocks:
        if isinstance(block, (bytes, bytearray, memoryview)):
            text = decode(bytes(block))
        elif isinstance(block, str):
            text = block
        else:
            raise TypeError(f"a text stream must give str or bytes pieces, got {type(block).__name__}")
        if first and text:
            text, first = (text[1:] if text[0] == "\ufeff" else text), False     # a leading BOM
        if text:
            yield text
    tail = decode(b"", final=True)
    if tail:
        yield tail


def stream_chunks(source, chunk_chars: int, chunks_per_piece: int, errors: str = "strict") -> Iterator[List[str]]:
    """Lists of text chunks cut where tokenization may be cut, read incrementally from ``source``.

    Concatenated, the chunks are the whole text; tokenizing them one by one gives the ids of the
    whole text (tokenize.py). A ``str`` source is a text in memory; anything else is read.
    """
    if isinstance(source, str):
        chunks = text_chunks(source, chunk_chars)
        for i in range(0, len(chunks), chunks_per_piece):
            yield chunks[i:i + chunks_per_piece]
        return
    piece_chars = chunk_chars * chunks_per_piece
    buf = ""
    for text in _read_pieces(source, piece_chars, errors):
        buf += text
        if len(buf) >= piece_chars:
            p = _safe_cut(buf)
            if p:
                yield text_chunks(buf[:p], chunk_chars)
                buf = buf[p:]
    if buf:
        yield text_chunks(buf, chunk_chars)


_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_COPIES_LOCK = threading.Lock()


@contextlib.contextmanager
def _private_copy(tokenizer):
    """A copy of ``tokenizer`` no other thread is using, kept for later runs.

    A fast tokenizer shared by threads raises "Already borrowed" when one call changes its
    padding or truncation state while another encodes; copies (~0.1 s each, made once) avoid it.
    """
    try:
        with _COPIES_LOCK:
            free = _COPIES.setdefault(tokenizer, [])
            tok = free.pop() if free else None
    except TypeError:          # not weak-referenceable: copy per use
        free = None
        tok = None
    if tok is None:
        try:
            tok = copy.deepcopy(tokenizer)
        except Exception:  # noqa: BLE001 - an uncopyable tokenizer is used as it is
            tok, free = tokenizer, None
    try:
        yield tok
    finally:
        if free is not None:
            with _COPIES_LOCK:
                free.append(tok)


class _Workers:
    """A few daemon threads running short jobs in submission order.

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so one blocked reading an
    idle pipe would hang the exit; these are daemons, and ``shutdown`` waits for them a bounded time.
    """

    def __init__(self, n: int, name: str):
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args = job
            fn(*args)                            # jobs handle their own errors

    def submit(self, fn, *args) -> None:
        if self._closed:
            raise RuntimeError("the workers are shut down")
        self._jobs.put((fn, args))

    def shutdown(self, timeout: float) -> None:
        """Drop queued jobs, let running ones finish (up to ``timeout`` seconds in all)."""
        self._closed = True
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))


class TextSource:
    """Documents as texts (or readable sources) tokenized on a worker pool, in input order.

    items: an iterable of (name, source); a source that is a ``str`` is a text held in memory, any
    other is read incrementally (see ``stream_chunks``). Up to ``lookahead`` documents are opened
    (and tokenized) ahead of the one a slot asks for next.
    """

    def __init__(self, items: Iterable[Tuple[Optional[str], object]], tokenizer, config: RMTConfig, *,
                 empty: str = "error", workers: int = 2, lookahead: int = 4, chunk_chars: int = 1 << 16,
                 chunks_per_piece: int = 8, errors: str = "strict", pieces_buffered: int = 3):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.config, self.empty, self.errors = config, empty, errors
        self.chunk_chars, self.chunks_per_piece = chunk_chars, chunks_per_piece
        self.lookahead = max(1, lookahead)
        self._items = enumerate(items)
        self._opened: deque = deque()
        self._exhausted = False
        self._pool = _Workers(workers, "rmt-tokenize")
        self._tokenizer = tokenizer
        self._stop = threading.Event()
        self._specials = np.array(config.special_token_ids, dtype=np.int64)
        self._limit = None if config.max_n_segments is None else config.segment_size * config.max_n_segments
        # A streaming document pauses its tokenization with this many tokens waiting (about
        # ``pieces_buffered`` pieces at ~5 characters a token); right/center documents never pause.
        # At least a few segments: the slot waits for S + 1 tokens, so pausing below that would deadlock.
        self._high_water = max((pieces_buffered * chunk_chars * chunks_per_piece) // 4, 4 * (config.segment_size + 1))

    # -- tokenizer jobs, on the pool ---------------------------------------------------------------
    def _tokenize(self, doc: Doc, chunks: List[str], position: int) -> np.ndarray:
        with _private_copy(self._tokenizer) as tok:
            enc = tok(chunks, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
        ids = np.fromiter(itertools.chain.from_iterable(enc["input_ids"]), dtype=np.int64)
        ids = ids[~np.isin(ids, self._specials)]
        V, M = self.config.vocab_size, self.config.num_mem_tokens
        bad = np.flatnonzero((ids < 0) | (ids >= V))
        if bad.size:
            pos, value = int(bad[0]), int(ids[bad[0]])
            what = (f"collides with the memory-token ids {V}..{V + M - 1}" if V <= value < V + M
                    else f"is outside the vocabulary [0, {V})")
            raise ValueError(f"the tokenizer gave id {value} at position {position + pos}, which {what}")
        return ids

    def _job(self, doc: Doc, pieces: Iterator[List[str]]) -> None:
        try:
            while not self._stop.is_set():
                chunks = next(pieces, None)
                if chunks is None:
                    doc.finish()
                    return
                ids = self._tokenize(doc, chunks, doc.received)
                if self._limit is not None and doc.received + ids.size >= self._limit:
                    keep = self._limit - doc.received
                    # Anything after the limit? Look at the rest of this piece, then the next one.
                    more = ids.size > keep or any(not c.isspace() for c in itertools.chain.from_iterable(
                        next(pieces, [])))
                    doc.push(ids[:keep])
                    doc.finish(truncated=more)
                    pieces.close()                  # read no further (closes a file now)
                    return
                doc.push(ids)
                with doc._cond:
                    if not doc.wants_more():      # the slot is behind: resume when it reads
                        doc.on_drain = lambda: self._submit(doc, pieces)
                        return
        except BaseException as e:  # noqa: BLE001 - handed to the caller with the document named
            doc.fail(e)

    def _submit(self, doc: Doc, pieces) -> None:
        if not self._stop.is_set():
            try:
                self._pool.submit(self._job, doc, pieces)
            except RuntimeError:  # the workers are shut down: the feeder is closing
                pass

    def _open(self) -> bool:
        try:
            item = next(self._items, None)
        except Exception as e:  # the caller's iterable of sources itself failed
            raise DocumentError(-1, None, f"the input sources raised {type(e).__name__}: {e}") from e
        if item is None:
            self._exhausted = True
            return False
        index, (name, source) = item
        doc = Doc(index, name if name is not None else f"text {index}")
        if self.config.segment_alignment == "left":
            doc.high_water = self._high_water
        self._opened.append(doc)
        self._submit(doc, stream_chunks(source, self.chunk_chars, self.chunks_per_piece, self.errors))
        return True

    # -- the chunk producer's side ---------------------------------------------------------------
    def next_doc(self, stop: threading.Event) -> Optional[Doc]:
        while not self._exhausted and len(self._opened) <= self.lookahead:
            if not self._open():
                break
        if not self._opened:
            return None
        return self._opened.popleft()

    def next_ready(self) -> bool:
        """Whether the document ``next_doc`` gives next can start without waiting."""
        return not self._opened or ready(self._opened[0], self.config)

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(timeout=2.0)   # a job mid-piece finishes it; one blocked on a pipe is left


# ---------------------------------------------------------------------------------------------
# Laying out chunks
# ---------------------------------------------------------------------------------------------

@dataclass
class ChunkMeta:
    """The host's copy of a chunk's decisions (the same as its aux columns)."""

    ring_slot: int
    steps: int = 0
    width: List[int] = field(default_factory=list)                   # per step: rows to run
    busy: List[Optional[List[int]]] = field(default_factory=list)    # per step: busy rows; None = all `width`
    masked: List[bool] = field(default_factory=list)                 # per step: any busy segment padded
    finished: List[Tuple[int, int]] = field(default_factory=list)    # (document, result row)
    started: List[int] = field(default_factory=list)                 # documents whose first segment is here, in order
    truncated: List[int] = field(default_factory=list)               # documents cut at max_n_segments
    failed: Dict[int, "DocumentError"] = field(default_factory=dict)  # on_error='nan': document -> error
    n_segments: int = 0
    n_tokens: int = 0


class _Slot:
    def __init__(self, doc: Doc):
        self.doc, self.k = doc, 0


class ChunkLayout:
    """Lays out chunks of ``steps`` steps for ``slots`` slots from a source, one at a time.

    Result rows: a document finishing at step c in slot b of a chunk in ring slot r has its logits
    scattered to row ``r * steps * slots + c * slots + b``; every other row goes to the sink
    ``ring * steps * slots``.
    """

    def __init__(self, source, config: RMTConfig, slots: int, steps: int, ring: int, empty: str = "error",
                 on_error: str = "raise"):
        self.source, self.config = source, config
        self.slots, self.steps, self.ring = slots, steps, ring
        self.empty, self.on_error = empty, on_error
        self.sink = ring * steps * slots
        T, M = config.input_size, config.num_mem_tokens
        self.T, self.M, self.S = T, M, config.segment_size
        tmpl = np.full(T + EXTRA_COLS, config.pad_token_id, dtype=np.int64)
        tmpl[0] = config.cls_token_id
        tmpl[1:M + 1] = np.arange(config.vocab_size, config.vocab_size + M)
        tmpl[M + 1] = config.sep_token_id
        tmpl[T:] = 0
        self._tmpl = tmpl
        idle = tmpl.copy()           # an idle slot: a valid empty segment whose results go nowhere
        idle[M + 2] = config.sep_token_id
        idle[T + COL_KEYLEN] = M + 3
        idle[T + COL_DEST] = self.sink
        idle[T + COL_SLOT] = -1
        self._idle = idle
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

    def _would_wait(self) -> bool:
        """Whether laying out the next step would wait for ids still being read or tokenized."""
        for slot in self._active:
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

    def fill(self, buf: np.ndarray, ring_slot: int, stop: threading.Event) -> Optional[ChunkMeta]:
        """Lay the next chunk out into ``buf`` [steps, slots, T + 4]; None when every document is done."""
        T, M, S, B = self.T, self.M, self.S, self.slots
        meta = ChunkMeta(ring_slot)
        base = ring_slot * self.steps * B
        for c in range(self.steps):
            if c and self._would_wait():
                break                            # hand over what is ready rather than wait with it
            busy, masked = [], False
            for b in range(B):
                row = buf[c, b]
                while True:
                    slot = self._active[b]
                    if slot is None:
                        doc = self._next_doc(stop)
                        if doc is None:
                            break
                        slot = self._active[b] = _Slot(doc)
                    try:
                        n, last = self._segment(slot, stop)
                    except FeederStopped:
                        raise
                    except BaseException as e:  # noqa: BLE001 - named, then raised or recorded
                        err = self._named(slot.doc, e)
                        if self.on_error == "raise":
                            raise err from e
                        meta.failed[slot.doc.index] = err
                        self._active[b] = None
                        continue
                    break
                if slot is None:
                    row[:] = self._idle
                    continue
                row[:T] = self._tmpl[:T]
                slot.doc.read(n, row[M + 2:M + 2 + n])
                row[M + 2 + n] = self.config.sep_token_id
                first = slot.k == 0
                if first:
                    meta.started.append(slot.doc.index)
                row[T + COL_KEYLEN] = M + 3 + n
                row[T + COL_DEST] = base + c * B + b if last else self.sink
                row[T + COL_ACTIVE] = 1
                row[T + COL_RESET] = int(first)
                row[T + COL_SLOT] = b
                busy.append(b)
                masked |= n < S
                meta.n_tokens += n
                slot.k += 1
                if last:
                    meta.finished.append((slot.doc.index, base + c * B + b))
                    if slot.doc.truncated:
                        meta.truncated.append(slot.doc.index)
                    self._active[b] = None
            if not busy:
                break
            meta.steps += 1
            meta.n_segments += len(busy)
            n = len(busy)
            width = min(B, 1 << (n - 1).bit_length())
            if width < B:                        # busy rows first, then idle ones up to the width
                buf[c, :n] = buf[c, busy]        # (fancy indexing copies first: no aliasing)
                buf[c, n:width] = self._idle
                busy = list(range(n))
            meta.width.append(width)
            meta.busy.append(None if n == width else busy)
            meta.masked.append(masked)
        if meta.steps == 0 and not meta.failed:
            return None
        return meta

    @staticmethod
    def _named(doc: Doc, e: BaseException) -> DocumentError:
        if isinstance(e, DocumentError):
            return e
        # Our own ValueErrors (bad bytes, empty, ids out of range) read well alone; others keep their type.
        ours = type(e) is ValueError
        return DocumentError(doc.index, doc.name, str(e) if ours else f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------
# The feeder: ring buffers, threads, streams
# ---------------------------------------------------------------------------------------------

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Feeder:
    """Chunks laid out ahead on a thread and copied to ``device`` ahead of use.

    Use as a context manager and iterator::

        with Feeder(layout, device) as feed:
            for meta, chunk in feed:   # chunk: [steps, slots, T + 4] int64 on the device
                ...enqueue the compute that reads chunk...
                feed.release(meta)     # after the last kernel that reads chunk is enqueued

    threaded=False lays out and copies on the caller's thread, in turn with the compute (the
    synchronous path, for tests and for the no-overlap benchmark).
    """

    def __init__(self, layout: ChunkLayout, device: torch.device, threaded: bool = True):
        self.layout, self.device, self.threaded = layout, torch.device(device), threaded
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        n, shape = layout.ring, (layout.steps, layout.slots, layout.T + EXTRA_COLS)
        self._host = [torch.zeros(shape, dtype=torch.int64, pin_memory=self.cuda) for _ in range(n)]
        self._host_np = [h.numpy() for h in self._host]
        if self.cuda:
            self._dev = [torch.zeros(shape, dtype=torch.int64, device=self.device) for _ in range(n)]
            self._copy_stream = torch.cuda.Stream(self.device)
            self._copied = [torch.cuda.Event() for _ in range(n)]
            self._consumed = [torch.cuda.Event() for _ in range(n)]
        else:
            self._dev = self._host
        self._stop = threading.Event()
        self._free: "queue.Queue[int]" = queue.Queue()
        for k in range(n):
            self._free.put(k)
        self._ready: "queue.Queue" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._next_slot = 0
        self._done = False

    # -- producer ---------------------------------------------------------------------------------
    def _produce(self, k: int):
        if self.cuda:
            self._copied[k].synchronize()          # the last copy out of host[k] is done
        meta = self.layout.fill(self._host_np[k], k, self._stop)
        if meta is None:
            return None
        if self.cuda:
            stream = self._copy_stream if self.threaded else torch.cuda.current_stream(self.device)
            with torch.cuda.stream(stream):
                stream.wait_event(self._consumed[k])   # the compute that last read dev[k] is done
                self._dev[k].copy_(self._host[k], non_blocking=True)
                self._copied[k].record(stream)
        return meta

    def _run(self):
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)
            while not self._stop.is_set():
                try:
                    k = self._free.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                meta = self._produce(k)
                self._ready.put(_END if meta is None else meta)
                if meta is None:
                    return
        except FeederStopped:
            pass
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            self._ready.put(_Failure(e))

    # -- consumer ---------------------------------------------------------------------------------
    def __enter__(self):
        if self.threaded:
            self._thread = threading.Thread(target=self._run, name="rmt-feeder", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __iter__(self):
        return self

    def __next__(self) -> Tuple[ChunkMeta, torch.Tensor]:
        if self._done:
            raise StopIteration
        if self.threaded:
            while True:
                try:
                    item = self._ready.get(timeout=_POLL_S)
                    break
                except queue.Empty:
                    if not self._thread.is_alive() and self._ready.empty():
                        raise RuntimeError("the feeder thread ended without a result") from None
        else:
            item = self._produce(self._free.get_nowait())
            item = _END if item is None else item
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.exc
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._copied[item.ring_slot])
        return item, self._dev[item.ring_slot]

    def release(self, meta: ChunkMeta) -> None:
        """The compute reading this chunk is enqueued: its ring slot may be refilled."""
        if self.cuda:
            self._consumed[meta.ring_slot].record(torch.cuda.current_stream(self.device))
        self._free.put(meta.ring_slot)

    def close(self) -> None:
        """Stop every thread; safe to call twice, and from a ``finally`` after Ctrl-C."""
        self._stop.set()
        self.layout.source.close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.cuda:
            # A copy still in flight must not land in device memory the allocator hands out again:
            # the device ring belongs to the compute stream, so order that stream after the copies.
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
