"""The Engine: the public API (classify, classify_stream, read/ask, ...) over one inference plan.

It keeps the plan current (rebuilt when the source model changes), checks each call's options and
documents, picks the slots and the loop (the static loop's runners and CUDA graphs are cached here,
per slot count) and hands the documents to the slot loop (``slot_loop.py``), which runs them through
the slots a step at a time. See docs/DRIVER.md.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from .. import segmentation
from ..chunking import RING, STEPS_PER_CHUNK, steps_per_chunk  # noqa: F401 (re-exported)
from ..inputs import InvalidDocumentsError, as_documents
from ..memory_state import MemoryState
from ..model import RMTForSequenceClassification
from ..perfmodel import estimate, parse_size
from . import device_policy, graphs, reading, run_checkpoints, slot_loop
from .device_policy import resolve_device, resolve_dtype
from .options import RunOptions
from .plan import InferencePlan
from .slot_loop import OnResult
from .sources import DocumentError, IdsSource, SourcesError, TextSource
from .source_watch import SourceWatch

log = logging.getLogger(__name__)

DEFAULT_BATCH = 8             # slots when neither batch_size nor max_memory says


def _optional_bool(name: str, value) -> Optional[bool]:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be True, False or None, got {value!r}")
    return value


_INTERNAL = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(torch.__file__))


def _user_stacklevel() -> int:
    """The ``stacklevel`` (for a warn() in the caller of this) of the first frame outside rmt_fast and
    torch (whose decorators wrap the public calls): a warning then names the user's line."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def _public_call(method):
    """A public entry point: runs on a plan that is current and stays the same for the whole call."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._call():
            return method(self, *args, **kwargs)
    return call


class Engine:
    """Fast inference for an ``RMTForSequenceClassification``.

    attention: 'auto' (fastest backend that can run, see ``engine.backends``), 'cpp' (the extension's
    fused CPU kernel), 'sdpa', 'matmul' or 'triton'.
    cuda_graphs: replay each step from a CUDA graph (None: on CUDA unless RMT_FAST_CUDA_GRAPHS=0).
    overlap: lay out (and tokenize, and copy) later steps on threads while the current ones compute;
    False does it in turn on the caller's thread (the same results, for benchmarks).
    packed_weights: oneDNN pre-packed linear weights, activation fused into the FFN GEMM (None: on the
    CPU in float32/bfloat16 where this torch has oneDNN; ``engine.plan.packed_weights_status`` says).
    quantize: None, or 'int8' (CPU only): the GEMMs ``engine.plan.int8_gemms`` lists run on int8 weights
    (per output channel) and per-token int8 activations, summed in int32; the rest as in ``dtype``
    (``engine.plan.quantize_status`` says which kernel; see ``engine.quant``).

    max_memory: a device memory budget ('10GiB', '500MB' or bytes). The Engine takes the most slots
    whose predicted peak device memory fits it (``perfmodel.estimate.memory_parts``: weights, state,
    ring, one step's activations, graph pool, CUDA context; the peak does not grow with document length),
    exposed as ``max_slots`` and logged. A call without batch_size then runs ``max_slots`` slots; a
    batch_size above ``max_slots`` raises ValueError (an explicit request the budget cannot meet). A
    budget below one slot's peak raises ValueError naming that minimum.

    An option set explicitly (True, or a named backend) that cannot be met here raises ValueError or
    RuntimeError at construction; None/'auto' choose quietly.

    The model: read, never changed (its train/eval mode included). The Engine keeps a reference to
    it and notices, at the start of every call and in microseconds, any change to its weights, their
    dtype or device (``source_watch.py`` says how); the plan is then rebuilt before the call runs.

    Threads: one Engine may be shared. Each call runs on the plan that was current when it started,
    with its own buffers; on the CPU calls run concurrently. The static loop (CUDA) replays runners
    and graphs that hold one memory state each, so its calls take turns (a lock held for the call).
    """

    def __init__(self, model: RMTForSequenceClassification, device="cpu", dtype="auto",
                 attention: str = "auto", *, cuda_graphs: Optional[bool] = None, overlap: bool = True,
                 packed_weights: Optional[bool] = None, quantize: Optional[str] = None, max_memory=None):
        self.device = resolve_device(device)
        self.dtype = device_policy.resolve(dtype, self.device, resolve_dtype)
        cuda_graphs = _optional_bool("cuda_graphs", cuda_graphs)
        packed_weights = _optional_bool("packed_weights", packed_weights)
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be True or False, got {overlap!r}")
        reason = graphs.why_not(self.device)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True is not possible here: {reason}")
        # An explicit True overrides the RMT_FAST_CUDA_GRAPHS switch, which only changes the default.
        self.cuda_graphs = (reason is None) if cuda_graphs is None else cuda_graphs
        self.overlap = overlap
        # The static all-slot loop: always on CUDA; settable on the CPU to test that loop there.
        self.static_loop = self.device.type == "cuda"
        self._graphs_off_reason = None if self.cuda_graphs else (reason or "turned off (cuda_graphs=False)")
        self._model, self._plan_options = model, (attention, packed_weights, quantize)
        # Checked before the plan puts the weights on the device.
        self.max_memory = None if max_memory is None else parse_size(max_memory, "max_memory (--max-memory)")
        self.max_slots: Optional[int] = None if max_memory is None else self._slots_within(self.max_memory)
        self._lock = threading.RLock()          # rebuilding the plan; a static-loop call (shared runners)
        self._bound = threading.local()         # .plan: the plan of the call running on this thread
        self._watch = SourceWatch(model)        # recorded before the plan reads the weights
        self._plan = InferencePlan(model, self.device, self.dtype, *self._plan_options)
        self._runners: Dict[tuple, graphs.StepRunner] = {}
        self._graph_pool = None

    # -- the plan, kept current -----------------------------------------------------------------
    @property
    def plan(self) -> InferencePlan:
        """The plan of the call running on this thread, else the current one."""
        bound = getattr(self._bound, "plan", None)
        return self._plan if bound is None else bound

    @property
    def config(self):
        return self.plan.config

    def refresh(self, force: bool = False) -> Optional[str]:
        """Rebuild the plan if the model changed since it was built (or if ``force``); says why, or None.

        Every call does this first. ``force`` is for edits the watch cannot see: a write through
        ``p.data`` that changes none of the sampled elements (see ``source_watch.py``).
        """
        reason = "forced" if force else self._changed()
        if reason is None:
            return None
        with self._lock:                        # one rebuild; static-loop calls finish on the old plan first
            if not force:
                reason = self._changed()        # another thread may have rebuilt meanwhile
                if reason is None:
                    return None
            watch = SourceWatch(self._model)    # before reading: a change during the build shows next call
            self._plan = InferencePlan(self._model, self.device, self.dtype, *self._plan_options)
            self._watch = watch
            self._runners, self._graph_pool = {}, None   # they hold the old plan
            if self.max_memory is not None:             # the config may have changed
                self.max_slots = self._slots_within(self.max_memory)
        log.info("rmt_fast: the model changed (%s); plan rebuilt", reason)
        return reason

    def _changed(self) -> Optional[str]:
        if self._model.config is not self._plan.config:
            return "its RMTConfig was replaced"
        return self._watch.changed()

    @contextlib.contextmanager
    def _call(self):
        """Around every public call: refresh, then bind the current plan to this thread for the call."""
        if getattr(self._bound, "plan", None) is not None:   # nested (classify_files -> classify_stream)
            yield                                           # the outer call's plan throughout
            return
        self.refresh()
        with self._lock if self.static_loop else contextlib.nullcontext():
            self._bound.plan = self._plan
            try:
                yield
            finally:
                self._bound.plan = None

    def describe(self) -> dict:
        """What runs: the plan's device, dtype, linear layers and each layer's attention backend so
        far (``InferencePlan.describe``), and the CUDA graphs: the step widths captured per batch
        shape (every step of a captured width replays its graph), or why steps run eagerly."""
        return {**self.plan.describe(), "cuda_graphs": self.graphs_status}

    @property
    def graphs_status(self) -> str:
        """Whether steps replay from CUDA graphs, and if not why (for ``rmt-fast info`` and logs)."""
        if not self.cuda_graphs:
            return f"off: {self._graphs_off_reason}"
        runners = list(self._runners.values())       # a snapshot: another thread's call may add one
        if not runners:
            return "on (captured on first use, per batch shape)"
        return "; ".join(r.status for r in runners)

    # -- public --------------------------------------------------------------------------------
    @_public_call
    @torch.inference_mode()
    def classify(self, docs: Sequence, batch_size: Optional[int] = None, empty: str = "error",
                 progress: bool = False, per_segment: bool = False, *, checkpoint_dir=None,
                 checkpoint_every: Optional[int] = None, keep_checkpoints: bool = False,
                 checkpoint_report: Optional[dict] = None):
        """Logits [len(docs), num_labels] float32 (on the CPU), in input order.

        docs: 1-D integer id sequences of any lengths (tensors, numpy arrays or lists); special ids
        are removed and documents longer than ``max_n_segments`` segments keep their head, as in the
        reference. batch_size: how many documents run side by side (slots; default ``max_slots`` with a
        max_memory, else 8).
        empty: what a document with no tokens left gets: 'error' (default; nothing is computed and
        InvalidDocumentsError names every such document) or 'special' (one segment holding only
        [CLS], memory and two [SEP], i.e. the model's answer to an empty text).
        per_segment: instead, per document its logits after every segment, first to last: a list of
        [n_segments_d, num_labels] float32 (CPU); the last row is what the default returns. Runs the
        compact loop (on CUDA too: the static loop's graphs keep no per-segment rows).
        checkpoint_dir, checkpoint_every, keep_checkpoints: resume a long run (see ``RunOptions``;
        document d's file is ``doc-d.safetensors``). checkpoint_report: a dict the caller passes, filled
        with the run's counts (``RunCheckpoints.report``: resumed, finished, fresh, segments_skipped, ...).
        """
        if not isinstance(per_segment, bool):
            raise ValueError(f"per_segment must be True or False, got {per_segment!r}")
        run_checkpoints.check_options(checkpoint_dir, checkpoint_every, keep_checkpoints)
        if per_segment and checkpoint_dir is not None:
            raise ValueError("per_segment=True cannot resume from checkpoints (the skipped segments' logits are "
                             "not kept); leave checkpoint_dir out")
        batch_size = self._batch(batch_size)
        self._check_options(batch_size, empty)
        cfg = self.config
        raw = as_documents(docs, cfg)
        documents = segmentation.clean_and_truncate(raw, cfg)
        if empty == "error":
            empties = (documents.lengths == 0).nonzero().flatten().tolist()
            if empties:
                raise InvalidDocumentsError({i: "no tokens left after removing special ids (empty document); "
                                                "pass empty='special' to classify it as an empty text"
                                             for i in empties})
        self._warn_truncated(raw, documents)
        segs = segmentation.cut(documents, cfg, empty_as_one_segment=True)
        D = len(documents)
        if D == 0:
            return [] if per_segment else torch.zeros(0, cfg.num_labels)
        source = IdsSource(documents, segs)
        rows: Optional[list] = [] if per_segment else None
        checkpoints = self._checkpoints(checkpoint_dir, checkpoint_every, keep_checkpoints)
        with run_checkpoints.reporting(checkpoints, checkpoint_report):
            got = self._run(source, min(batch_size, D), empty, "raise", progress, total=len(segs),
                            segment_logits=rows, checkpoints=checkpoints)
        if per_segment:
            return slot_loop.by_document(rows, D)
        return torch.stack([got[d] for d in range(D)])

    @_public_call
    def classify_texts(self, texts: Sequence[str], tokenizer, batch_size: Optional[int] = None,
                       empty: Optional[str] = None, progress: Optional[bool] = None, *,
                       options: Optional[RunOptions] = None, on_result: Optional[OnResult] = None,
                       checkpoint_report: Optional[dict] = None, **option_kwargs) -> torch.Tensor:
        """Tokenize texts on ``workers`` threads, ahead of the compute, and classify them.

        Each text is tokenized in chunks of about ``chunk_chars`` characters (the same ids as
        tokenizing it whole); with left alignment a text streams through the slots as it is
        tokenized. A text that cannot be tokenized raises DocumentError naming it. Options and
        ``on_result``, checkpoints and ``checkpoint_report`` as in ``classify_stream``.
        """
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be a list of str, not one str: classify_texts([text], tokenizer)")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidDocumentsError({i: f"expected a str, got {type(t).__name__}"})
        opts = RunOptions.merge(options, batch_size=self._batch(batch_size, options), empty=empty,
                                progress=progress, **option_kwargs)
        return self._stream(iter([(None, t) for t in texts]), len(texts), tokenizer, opts, None, on_result,
                            report=checkpoint_report)

    @_public_call
    def classify_files(self, paths: Iterable, tokenizer, **kwargs) -> torch.Tensor:
        """``classify_stream`` of UTF-8 text files by path (errors name the file)."""
        return self.classify_stream([Path(p) for p in paths], tokenizer, **kwargs)

    @_public_call
    @torch.inference_mode()
    def classify_stream(self, sources: Iterable, tokenizer, batch_size: Optional[int] = None,
                        empty: Optional[str] = None, progress: Optional[bool] = None, *,
                        options: Optional[RunOptions] = None, names: Optional[Sequence[str]] = None,
                        failures: Optional[Dict[int, str]] = None, on_result: Optional[OnResult] = None,
                        checkpoint_keys: Optional[Sequence[int]] = None, checkpoint_report: Optional[dict] = None,
                        **option_kwargs) -> torch.Tensor:
        """Logits [n, num_labels] of documents read incrementally, in input order.

        sources: an iterable (read lazily) of documents, each a path (``pathlib.Path`` or str), a
        binary or text file object (a pipe: ``sys.stdin.buffer``), or an iterable of str/bytes
        pieces of one text. Bytes are decoded as UTF-8 (a leading BOM dropped). names: what errors
        call each document (default: its path or file name).
        options: a ``RunOptions``; its fields may also be given as keyword arguments (batch_size,
        empty, progress, chunk_chars, workers, errors, on_error, lookahead), which override it.
        Memory: token ids never all sit on the device. With ``segment_alignment='left'`` a document
        streams: the host holds a few pieces of its ids at a time, whatever its length. With right
        or center alignment the cut points depend on the length, so each document is tokenized
        whole on the host (up to ``lookahead`` documents ahead) before it takes a slot. Slots are
        never more than the documents: up to batch_size sources are read ahead to count them.
        on_error='raise': a DocumentError naming the document stops the run; 'nan': that document
        gets NaN logits and the run goes on; the reasons go into ``failures`` (a dict {index: why}
        the caller passes), or else into one warning per document.
        on_result(index, logits, error): called in input order as soon as a document and every one
        before it are done (logits [num_labels], NaN with error the reason where it failed).
        If the iterable of sources itself raises, the documents before that point are finished
        and a ``SourcesError`` carries their ``results``.
        checkpoint_dir, checkpoint_every, keep_checkpoints (options): resume a long run: every N segments
        each document's memory is saved (atomically) in checkpoint_dir, and its logits once finished; a
        rerun with the same arguments resumes each unfinished document where it was saved and skips the
        finished ones, with the logits of an uninterrupted run. A file of another model, dtype, alignment,
        memory size or document, or a damaged one, raises RunCheckpointError naming it. checkpoint_keys:
        per source the int its file is named by (default its index: a caller that drops answered inputs
        from a rerun passes their original indices). checkpoint_report: a dict filled with the counts.
        """
        if isinstance(sources, (str, bytes, os.PathLike)) or hasattr(sources, "read"):
            raise TypeError("sources must be an iterable of documents (e.g. a list of paths), not one document")
        opts = RunOptions.merge(options, batch_size=self._batch(batch_size, options), empty=empty,
                                progress=progress, **option_kwargs)
        names = list(names) if names is not None else None
        n = len(sources) if hasattr(sources, "__len__") else None

        def items():
            for i, src in enumerate(sources):
                name = names[i] if names is not None and i < len(names) else (
                    str(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "name", None) or f"stream {i}")
                yield name, Path(src) if isinstance(src, str) else src   # a str names a file
        return self._stream(items(), n, tokenizer, opts, failures, on_result, checkpoint_keys, checkpoint_report)

    # -- memory states: read once, ask many (reading.py) ---------------------------------------------
    @_public_call
    @torch.inference_mode()
    def read(self, doc, state: Optional[MemoryState] = None, tokenizer=None, progress: bool = False) -> MemoryState:
        """Read a document (1-D ids, or a str with ``tokenizer``), going on from ``state`` if given.

        Full left-aligned segments are read; the ids after the last full one are kept as the state's
        tail. Reading A then B gives the state of reading A+B (ids; text is tokenized per call).
        """
        return reading.read_many(self, [doc], tokenizer, 1, [state], progress)[0]

    @_public_call
    @torch.inference_mode()
    def read_many(self, docs: Sequence, tokenizer=None, batch_size: int = 8,
                  progress: bool = False) -> List[MemoryState]:
        """``read`` of each document from the start, batched through the slots like ``classify``."""
        return reading.read_many(self, docs, tokenizer, batch_size, None, progress)

    @_public_call
    @torch.inference_mode()
    def ask(self, state: MemoryState, questions: Sequence, tokenizer=None, batch_size: int = 8,
            progress: bool = False) -> torch.Tensor:
        """Logits [len(questions), num_labels] float32 (CPU): per question, the document read into
        ``state`` followed by the question; questions run side by side, each from the stored memory.
        With ``segment_alignment='left'`` this is ``classify([doc + question])``; for right/center
        alignment see reading.py. A state of another model, alignment or dtype raises MemoryStateError."""
        return reading.ask(self, state, questions, tokenizer, batch_size, progress)

    @torch.inference_mode()
    def _stream(self, items: Iterator[Tuple[Optional[str], object]], n_items: Optional[int], tokenizer,
                opts: RunOptions, failures: Optional[Dict[int, str]], on_result: Optional[OnResult],
                keys: Optional[Sequence[int]] = None, report: Optional[dict] = None) -> torch.Tensor:
        """Classify (name, source) items; a source that is a str is a text in memory."""
        checkpoints = self._checkpoints(opts.checkpoint_dir, opts.checkpoint_every, opts.keep_checkpoints, keys)
        with run_checkpoints.reporting(checkpoints, report):
            return self._stream_run(items, n_items, tokenizer, opts, failures, on_result, checkpoints)

    def _stream_run(self, items, n_items: Optional[int], tokenizer, opts: RunOptions,
                    failures: Optional[Dict[int, str]], on_result: Optional[OnResult], checkpoints) -> torch.Tensor:
        if n_items is None:             # no more slots than documents: on CUDA every slot computes
            items, n_items = slot_loop.peek(items, opts.batch_size)
        slots = opts.batch_size if n_items is None else max(1, min(opts.batch_size, n_items))
        source = TextSource(items, tokenizer, self.config, empty=opts.empty, workers=opts.workers,
                            lookahead=slots + 2 if opts.lookahead is None else opts.lookahead,
                            chunk_chars=opts.chunk_chars, errors=opts.errors, on_error=opts.on_error)
        got: Dict[int, torch.Tensor] = {}
        failed: Dict[int, DocumentError] = {}
        in_order = slot_loop.InOrder(on_result, self.config.num_labels)

        def done(d: int, logits: Optional[torch.Tensor], err: Optional[DocumentError]) -> None:
            if err is None:
                got[d] = logits
            else:
                failed[d] = err
            in_order.add(d, logits, err)

        try:
            self._run(source, slots, opts.empty, opts.on_error, opts.progress, total=None, on_done=done,
                      checkpoints=checkpoints)
        except SourcesError as e:      # on_error='raise': what was finished goes with the error
            e.results, e.failures = self._collected(got, failed), {d: f.reason for d, f in failed.items()}
            raise
        out = self._collected(got, failed)
        for d, err in sorted(failed.items()):
            if failures is not None:
                failures[d] = err.reason
            else:
                warnings.warn(f"document {d} gets NaN logits: {err}", RuntimeWarning, stacklevel=3)
        if source.failure is not None:
            source.failure.results, source.failure.failures = out, {d: f.reason for d, f in failed.items()}
            raise source.failure
        return out

    def _collected(self, got: Dict[int, torch.Tensor], failed: Dict[int, DocumentError]) -> torch.Tensor:
        n = max([*got, *failed], default=-1) + 1
        out = torch.full((n, self.config.num_labels), float("nan"))
        for d, logits in got.items():
            out[d] = logits
        return out

    # -- the loop ---------------------------------------------------------------------------------
    def _slots_within(self, budget: int) -> int:
        """The most slots whose predicted peak device memory fits ``budget`` bytes."""
        dims = estimate.dims_of(self._model.config, self._model.model.config)   # unfused FFN: the larger
        dtype, cuda = str(self.dtype).replace("torch.", ""), self.device.type == "cuda"
        slots = estimate.max_batch(dims, dtype, cuda, budget, graphs=self.cuda_graphs)
        if slots == 0:
            need = estimate.peak_bytes(dims, 1, dtype, cuda, self.cuda_graphs)
            raise ValueError(f"max_memory (--max-memory) {budget} bytes ({budget / 2**30:.2f} GiB) cannot fit "
                             f"one slot: this model in {dtype} on {self.device} needs at least {need} bytes "
                             f"({need / 2**30:.2f} GiB)")
        peak = estimate.peak_bytes(dims, slots, dtype, cuda, self.cuda_graphs)
        log.info("rmt_fast: max_memory %.2f GiB holds %d slots: batch %d (predicted peak %.2f GiB)",
                 budget / 2**30, slots, slots, peak / 2**30)
        return slots

    def _batch(self, batch_size: Optional[int], options: Optional[RunOptions] = None) -> Optional[int]:
        """The slots a call asks for: ``batch_size``, else the options', else ``max_slots`` or 8. A request
        above ``max_slots`` raises (a batch the budget cannot hold must not run quietly smaller)."""
        if batch_size is None:
            if options is None:
                return DEFAULT_BATCH if self.max_slots is None else self.max_slots
            batch_size = options.batch_size
        if self.max_slots is not None and isinstance(batch_size, int) and batch_size > self.max_slots:
            raise ValueError(f"batch_size (--batch-size) {batch_size} does not fit max_memory (--max-memory) "
                             f"{self.max_memory} bytes ({self.max_memory / 2**30:.2f} GiB), which holds at most "
                             f"{self.max_slots} slots; pass batch_size <= {self.max_slots} or leave it out")
        return batch_size

    @staticmethod
    def _check_options(batch_size, empty) -> None:
        if empty not in ("error", "special"):
            raise ValueError(f"empty must be 'error' or 'special', got {empty!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    def _warn_truncated(self, raw, documents) -> None:
        cfg = self.config
        if cfg.max_n_segments is None:
            return
        limit = cfg.segment_size * cfg.max_n_segments
        specials = torch.tensor(cfg.special_token_ids, dtype=torch.int64)
        # Cut: more than ``limit`` ordinary tokens (special ids are removed anyway, cutting nothing).
        cut = [i for i, d in enumerate(raw) if int(documents.lengths[i]) == limit and d.numel() > limit
               and int((~torch.isin(d, specials)).sum()) > limit]
        if cut:
            self._warn_cut(cut)

    def _warn_cut(self, cut: List[int]) -> None:
        cfg = self.config
        limit = cfg.segment_size * cfg.max_n_segments
        warnings.warn(f"documents {cut[:10]}{'...' if len(cut) > 10 else ''} exceed max_n_segments="
                      f"{cfg.max_n_segments} ({limit} tokens) and keep only their head, as the reference does",
                      stacklevel=_user_stacklevel())

    def _checkpoints(self, directory, every: Optional[int], keep: bool,
                     keys: Optional[Sequence[int]] = None) -> Optional[run_checkpoints.RunCheckpoints]:
        """This call's checkpoint folder (created now, before any compute), or None."""
        if directory is None:
            return None
        identity = run_checkpoints.identity(self.config, self.plan.hidden, reading.fingerprint(self),
                                            reading._dtype_name(self))
        return run_checkpoints.RunCheckpoints(directory, every, keep, identity, keys)

    def _runner(self, slots: int) -> graphs.StepRunner:
        if slots not in self._runners:
            if self.cuda_graphs and self._graph_pool is None:
                # One pool for every batch shape's graphs: replays are sequential on one stream.
                self._graph_pool = torch.cuda.graph_pool_handle()
            self._runners[slots] = graphs.StepRunner(self.plan, slots, steps_per_chunk(slots), RING,
                                                     self.cuda_graphs, pool=self._graph_pool)
        return self._runners[slots]

    def _run(self, source, slots: int, empty: str, on_error: str, progress: bool, total: Optional[int],
             on_done: Optional[Callable] = None, start_memory: Optional[torch.Tensor] = None,
             final_memory: Optional[torch.Tensor] = None,
             segment_logits: Optional[list] = None, checkpoints=None) -> Dict[int, torch.Tensor]:
        """Run every document of ``source`` through ``slots`` slots (``slot_loop.run``, which says what
        each argument does); logits [num_labels] (CPU) by document index. The static loop's runner is
        the cached one of this slot count; per-document inputs or outputs take the compact loop
        (checkpoints work in either)."""
        per_doc = start_memory is not None or final_memory is not None or segment_logits is not None
        runner = self._runner(slots) if self.static_loop and not per_doc else None
        got, truncated = slot_loop.run(self.plan, source, slots, empty, on_error, progress, total,
                                       overlap=self.overlap, runner=runner, on_done=on_done,
                                       start_memory=start_memory, final_memory=final_memory,
                                       segment_logits=segment_logits, checkpoints=checkpoints)
        if truncated:
            self._warn_cut(truncated)
        return got
