"""Where documents come from: ids already cleaned, or texts read and tokenized on a worker pool.

A ``Doc`` is one document's cleaned token ids, read front to back as they arrive (a rolling buffer
that tokenizer jobs push into and the slot schedule reads from). A source hands documents out one at
a time (``next_doc``): ``IdsSource`` longest first (which makes the schedule LPT), ``TextSource`` in
input order, each text tokenized on a small pool of daemon threads, one piece at a time (a chain of
short jobs that never block, so no document can starve another), up to ``lookahead`` documents ahead.
A left-aligned text streams: its job pauses while a few pieces of ids wait unread. Errors reach the
caller as ``DocumentError`` naming the document.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import os
import queue
import threading
import time
import weakref
from collections import deque
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from .. import segmentation
from ..config import RMTConfig
from ..inputs import InvalidDocumentsError
from ..text import stream_chunks
from ..tokenize import max_word_chars

POLL_S = 0.05  # how often a blocked thread looks at the stop flag


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


class SourcesError(DocumentError):
    """The iterable of sources itself raised, so the documents after that point are unknown.

    ``results``: logits [n, num_labels] of the n documents it gave before failing (NaN rows for
    documents that failed or were not finished), set by the Engine; ``failures``: {index: reason}.
    """

    def __init__(self, exc: BaseException):
        super().__init__(-1, None, f"the input sources raised {type(exc).__name__}: {exc}")
        self.results: Optional[torch.Tensor] = None
        self.failures: dict = {}


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
        self.live = False          # read from a stream that may stall (a pipe): its slot may sit steps out
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
                self._cond.wait(POLL_S)

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
# Sources
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

    def next_stalled(self) -> bool:
        return False

    def close(self) -> None:
        pass


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
                 chunks_per_piece: int = 8, errors: str = "strict", pieces_buffered: int = 3,
                 on_error: str = "raise"):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.config, self.empty, self.errors, self.on_error = config, empty, errors, on_error
        self.failure: Optional[SourcesError] = None      # on_error='nan': the sources iterable raised
        self.chunk_chars, self.chunks_per_piece = chunk_chars, chunks_per_piece
        self.lookahead = max(1, lookahead)
        self._items = enumerate(items)
        self._opened: deque = deque()
        self._exhausted = False
        self._pool = _Workers(workers, "rmt-tokenize")
        self._tokenizer = tokenizer
        self._max_word_chars = max_word_chars(tokenizer)
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
                    more = ids.size > keep or self._tokens_follow(doc, pieces)
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

    def _tokens_follow(self, doc: Doc, pieces: Iterator[List[str]]) -> bool:
        """Whether any token is left in ``pieces`` once special ids are removed (read until one is)."""
        for chunks in pieces:
            if self._stop.is_set() or self._tokenize(doc, chunks, self._limit).size:
                return True
        return False

    def _submit(self, doc: Doc, pieces) -> None:
        if not self._stop.is_set():
            try:
                self._pool.submit(self._job, doc, pieces)
            except RuntimeError:  # the workers are shut down: the feeder is closing
                pass

    def _open(self) -> bool:
        try:
            item = next(self._items, None)
        except Exception as e:  # the caller's iterable of sources itself failed: no document after it
            if self.on_error == "raise":
                raise SourcesError(e) from e
            self.failure = SourcesError(e)
            self.failure.__cause__ = e
            item = None
        if item is None:
            self._exhausted = True
            return False
        index, (name, source) = item
        doc = Doc(index, name if name is not None else f"text {index}")
        doc.live = not isinstance(source, (str, os.PathLike))    # texts and files never stall for long
        if self.config.segment_alignment == "left":
            doc.high_water = self._high_water
        self._opened.append(doc)
        self._submit(doc, stream_chunks(source, self.chunk_chars, self.chunks_per_piece, self.errors,
                                        self._max_word_chars))
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

    def next_stalled(self) -> bool:
        """Whether the document ``next_doc`` gives next waits for a stream (see ``Doc.live``)."""
        return bool(self._opened) and self._opened[0].live and not ready(self._opened[0], self.config)

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(timeout=2.0)   # a job mid-piece finishes it; one blocked on a pipe is left


