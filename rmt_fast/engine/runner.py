"""The Engine: the segment loop over slots, with the memory state kept on the device.

Per step, every busy slot runs one segment of its document through the plan; the new memory is
written back in place into one preallocated [slots, M, H] float32 state; a slot that starts a
document has its memory reset to the initial memory first; a document's logits are scattered into
result rows on its last segment. The feeder (``feeder.py``) lays segment ids and every per-step
decision out on the host a chunk of steps at a time, ahead, on a thread, and copies them to the
device ahead of use; the loop never reads anything back from the device within a chunk.

Two loops over the same chunks:
- static (CUDA): every row of a step's width computes, with fixed shapes (``graphs.step_all``),
  replayed from a CUDA graph per width; idle rows compute garbage that is never written back.
  The feeder compacts steps with idle slots to a power-of-two width, so the tail stays cheap.
- compact (CPU): each step runs only the busy rows, eagerly (idle rows would cost real time).

Results come back to the host a chunk late (a non-blocking copy and an event), so the host never
waits for the step it has just enqueued. See docs/DRIVER.md.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .. import _ext, segmentation
from ..inputs import InvalidDocumentsError, as_documents
from ..model import RMTForSequenceClassification
from . import device_policy, graphs
from .feeder import (COL_DEST, COL_KEYLEN, COL_RESET, COL_SLOT, ChunkLayout, DocumentError, Feeder, IdsSource,
                     TextSource)
from .plan import InferencePlan

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
STEPS_PER_CHUNK = 64          # steps laid out and copied at a time (fewer for wide batches)
RING = 3                      # chunk buffers in flight: one computing, one copied, one being laid out


def steps_per_chunk(slots: int) -> int:
    """About 512 segment rows per chunk (256 KiB of ids at T = 512), at least 8 steps."""
    return max(8, min(STEPS_PER_CHUNK, 512 // slots))


def resolve_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} was requested but no CUDA GPU is available "
                               f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type != "cpu":
        raise RuntimeError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda[:N]'")
    return dev


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype {dtype!r} is not supported; choose float32, bfloat16 or float16")


class Engine:
    """Fast inference for an ``RMTForSequenceClassification``.

    attention: 'auto' (fastest backend that can run, see ``engine.backends``), 'cpp' (the extension's
    fused CPU kernel), 'sdpa', 'matmul' or 'triton'.
    cuda_graphs: replay each step from a CUDA graph (None: on CUDA unless RMT_FAST_CUDA_GRAPHS=0).
    overlap: lay out (and tokenize, and copy) later steps on threads while the current ones compute;
    False does it in turn on the caller's thread (the same results, for benchmarks).
    packed_weights: oneDNN pre-packed linear weights, activation fused into the FFN GEMM (None: on the
    CPU in float32/bfloat16 where this torch has oneDNN; ``engine.plan.packed_weights_status`` says).
    """

    def __init__(self, model: RMTForSequenceClassification, device="cpu", dtype="auto",
                 attention: str = "auto", *, cuda_graphs: Optional[bool] = None, overlap: bool = True,
                 packed_weights: Optional[bool] = None):
        self.device = resolve_device(device)
        self.dtype = device_policy.resolve(dtype, self.device, resolve_dtype)
        self.config = model.config
        self.plan = InferencePlan(model.eval(), self.device, self.dtype, attention, packed_weights)
        reason = graphs.why_not(self.device)
        self.cuda_graphs = (reason is None) if cuda_graphs is None else bool(cuda_graphs and self.device.type == "cuda")
        self.overlap = overlap
        # The static all-slot loop: always on CUDA; settable on the CPU to test that loop there.
        self.static_loop = self.device.type == "cuda"
        self._runners: Dict[tuple, graphs.StepRunner] = {}
        self._graph_pool = None
        self._graphs_off_reason = None if self.cuda_graphs else (reason or "turned off (cuda_graphs=False)")

    @property
    def graphs_status(self) -> str:
        """Whether steps replay from CUDA graphs, and if not why (for ``rmt-fast info`` and logs)."""
        if not self.cuda_graphs:
            return f"off: {self._graphs_off_reason}"
        if not self._runners:
            return "on (captured on first use, per batch shape)"
        return "; ".join(r.status for r in self._runners.values())

    # -- public --------------------------------------------------------------------------------
    @torch.inference_mode()
    def classify(self, docs: Sequence, batch_size: int = 8, empty: str = "error",
                 progress: bool = False) -> torch.Tensor:
        """Logits [len(docs), num_labels] float32 (on the CPU), in input order.

        docs: 1-D integer id sequences of any lengths (tensors, numpy arrays or lists); special ids
        are removed and documents longer than ``max_n_segments`` segments keep their head, as in the
        reference. batch_size: how many documents run side by side (slots).
        empty: what a document with no tokens left gets: 'error' (default; nothing is computed and
        InvalidDocumentsError names every such document) or 'special' (one segment holding only
        [CLS], memory and two [SEP], i.e. the model's answer to an empty text).
        """
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
            return torch.zeros(0, cfg.num_labels)
        source = IdsSource(documents, segs)
        got = self._run(source, min(batch_size, D), empty, "raise", progress, total=len(segs))
        return torch.stack([got[d] for d in range(D)])

    def classify_texts(self, texts: Sequence[str], tokenizer, batch_size: int = 8, empty: str = "error",
                       progress: bool = False, chunk_chars: int = 1 << 16, workers: int = 2) -> torch.Tensor:
        """Tokenize texts on ``workers`` threads, ahead of the compute, and classify them.

        Each text is tokenized in chunks of about ``chunk_chars`` characters (the same ids as
        tokenizing it whole); with left alignment a text streams through the slots as it is
        tokenized. A text that cannot be tokenized raises DocumentError naming it.
        """
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidDocumentsError({i: f"expected a str, got {type(t).__name__}"})
        return self.classify_stream(texts, tokenizer, batch_size=batch_size, empty=empty, progress=progress,
                                    chunk_chars=chunk_chars, workers=workers, _texts=True)

    def classify_files(self, paths: Iterable, tokenizer, **kwargs) -> torch.Tensor:
        """``classify_stream`` of UTF-8 text files by path (errors name the file)."""
        return self.classify_stream([Path(p) for p in paths], tokenizer, **kwargs)

    @torch.inference_mode()
    def classify_stream(self, sources: Iterable, tokenizer, batch_size: int = 8, empty: str = "error",
                        progress: bool = False, chunk_chars: int = 1 << 16, workers: int = 2,
                        names: Optional[Sequence[str]] = None, errors: str = "strict",
                        on_error: str = "raise", failures: Optional[Dict[int, str]] = None,
                        lookahead: Optional[int] = None, _texts: bool = False) -> torch.Tensor:
        """Logits [n, num_labels] of documents read incrementally, in input order.

        sources: an iterable (read lazily) of documents, each a path (``pathlib.Path``), a binary or
        text file object (a pipe: ``sys.stdin.buffer``), or an iterable of str/bytes pieces of one
        text. Bytes are decoded as UTF-8 (a leading BOM dropped); errors='strict' rejects invalid
        bytes, 'replace' uses U+FFFD.
        Memory: token ids never all sit on the device. With ``segment_alignment='left'`` a document
        streams: the host holds a few pieces of its ids at a time, whatever its length. With right
        or center alignment the cut points depend on the length, so each document is tokenized
        whole on the host (up to ``lookahead`` documents ahead) before it takes a slot.
        on_error: 'raise' (a DocumentError naming the document stops the run) or 'nan' (that
        document gets NaN logits and the run goes on; the reasons go into ``failures``, a dict
        {index: why} the caller passes, or else into one warning per document).
        """
        self._check_options(batch_size, empty)
        if isinstance(sources, (str, bytes, os.PathLike)) or hasattr(sources, "read"):
            raise TypeError("sources must be an iterable of documents (e.g. a list of paths), not one document")
        if on_error not in ("raise", "nan"):
            raise ValueError(f"on_error must be 'raise' or 'nan', got {on_error!r}")
        if errors not in ("strict", "replace"):
            raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
        names = list(names) if names is not None else None
        if hasattr(sources, "__len__"):   # no more slots than documents: on CUDA every slot computes
            batch_size = max(1, min(batch_size, len(sources)))

        def items():
            for i, src in enumerate(sources):
                name = names[i] if names is not None and i < len(names) else (
                    None if _texts else str(src) if isinstance(src, (str, os.PathLike))
                    else getattr(src, "name", None) or f"stream {i}")
                if not _texts and isinstance(src, str):
                    src = Path(src)   # a str source names a file; in-memory texts go through classify_texts
                yield name, src

        source = TextSource(items(), tokenizer, self.config, empty=empty, workers=workers,
                            lookahead=batch_size + 2 if lookahead is None else lookahead, chunk_chars=chunk_chars,
                            errors=errors)
        failed: Dict[int, DocumentError] = {}
        got = self._run(source, batch_size, empty, on_error, progress, total=None, failed=failed)
        n = max([*got, *failed], default=-1) + 1
        out = torch.full((n, self.config.num_labels), float("nan"))
        for d, logits in got.items():
            out[d] = logits
        for d, err in sorted(failed.items()):
            if failures is not None:
                failures[d] = err.reason
            else:
                warnings.warn(f"document {d} gets NaN logits: {err}", RuntimeWarning, stacklevel=2)
        return out

    # -- the loop ---------------------------------------------------------------------------------
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
        cut = [i for i, d in enumerate(raw) if d.numel() > limit
               and int(documents.lengths[i]) == limit and d.numel() - int(documents.lengths[i]) > 0]
        if cut:
            self._warn_cut(cut, stacklevel=4)

    def _warn_cut(self, cut: List[int], stacklevel: int) -> None:
        cfg = self.config
        limit = cfg.segment_size * cfg.max_n_segments
        warnings.warn(f"documents {cut[:10]}{'...' if len(cut) > 10 else ''} exceed max_n_segments="
                      f"{cfg.max_n_segments} ({limit} tokens) and keep only their head, as the reference does",
                      stacklevel=stacklevel)

    def _runner(self, slots: int, result_rows: int) -> graphs.StepRunner:
        key = (slots, result_rows)
        if key not in self._runners:
            if self.cuda_graphs and self._graph_pool is None:
                # One pool for every batch shape's graphs: replays are sequential on one stream.
                self._graph_pool = torch.cuda.graph_pool_handle()
            self._runners[key] = graphs.StepRunner(self.plan, slots, result_rows, self.cuda_graphs,
                                                   pool=self._graph_pool)
        return self._runners[key]

    def _run(self, source, slots: int, empty: str, on_error: str, progress: bool, total: Optional[int],
             failed: Optional[Dict[int, DocumentError]] = None) -> Dict[int, torch.Tensor]:
        """Run every document of ``source``; logits [num_labels] (CPU) by document index."""
        cfg, plan, dev = self.config, self.plan, self.device
        C = steps_per_chunk(slots)
        layout = ChunkLayout(source, cfg, slots, C, RING, empty=empty, on_error=on_error)
        rows = RING * C * slots + 1                                            # + the sink
        cuda = dev.type == "cuda"
        if self.static_loop:
            runner = self._runner(slots, rows)
            results = runner.results
        else:
            runner = None
            state = plan.initial_memory.expand(slots, -1, -1).clone()          # [B, M, H] float32
            results = torch.zeros(rows, cfg.num_labels, device=dev)
        host_results = torch.zeros(RING, C * slots, cfg.num_labels, pin_memory=cuda)
        harvested = [torch.cuda.Event() for _ in range(RING)] if cuda else None
        got: Dict[int, torch.Tensor] = {}
        truncated: List[int] = []
        bar = tqdm(total=total, unit="seg", disable=not progress, desc="segments", dynamic_ncols=True)
        t0, n_seg, n_tok = time.perf_counter(), 0, 0
        pending = None

        def collect(meta):
            k = meta.ring_slot
            if cuda:
                harvested[k].synchronize()
            base = k * C * slots
            for d, row in meta.finished:
                got[d] = host_results[k, row - base].clone()

        try:
            with Feeder(layout, dev, threaded=self.overlap) as feed:
                for meta, chunk in feed:
                    T = cfg.input_size
                    for c in range(meta.steps):
                        rows = chunk[c, :meta.width[c]]
                        if runner is not None:
                            runner.step(rows, meta.masked[c])
                        else:
                            self._compact_step(state, results, rows, T, meta, c)
                    feed.release(meta)
                    k = meta.ring_slot
                    host_results[k].copy_(results[k * C * slots:(k + 1) * C * slots], non_blocking=cuda)
                    if cuda:
                        harvested[k].record()
                    if pending is not None:
                        collect(pending)            # the previous chunk: done by now or soon
                    pending = meta
                    truncated += meta.truncated
                    if failed is not None:
                        failed.update(meta.failed)
                    n_seg += meta.n_segments
                    n_tok += meta.n_tokens
                    if progress:
                        dt = max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix_str(f"{n_seg / dt:.1f} seg/s, {n_tok / dt:,.0f} tok/s", refresh=False)
                        bar.update(meta.n_segments)
                if pending is not None:
                    collect(pending)
        finally:
            bar.close()
        if truncated:
            self._warn_cut(sorted(set(truncated)), stacklevel=4)
        return got

    def _compact_step(self, state, results, step, T: int, meta, c: int) -> None:
        """One step of the busy rows only (the CPU loop). step: [W, T + 5] int64 (feeder layout)."""
        plan = self.plan
        busy = meta.busy[c]
        if busy is not None:
            step = step[torch.tensor(busy)]
        # Column views are strided; kernels get contiguous key lengths (the Triton launcher assumes so).
        ids, key_len, dest = step[:, :T], step[:, T + COL_KEYLEN].contiguous(), step[:, T + COL_DEST]
        slot = step[:, T + COL_SLOT].to(state.device)
        start = (step[:, T + COL_RESET] != 0).to(state.device)[:, None, None]
        memory = torch.where(start, plan.initial_memory, state[slot])           # [b, M, H]
        logits, new_mem = plan.step(ids, memory, key_len if meta.masked[c] else None)
        _ext.memory_write(state, new_mem, 0, slot)
        results.index_copy_(0, dest, logits)
