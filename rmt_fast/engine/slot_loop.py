"""The slot loop: documents run through the slots a step at a time, results yielded as they complete.

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
waits for the step it has just enqueued. See docs/DRIVER.md. The Engine (runner.py) owns the plan,
the cached static runners and the public calls; this module only runs a source through the slots.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from .. import _ext
from ..chunking import RING, steps_per_chunk
from .feeder import Feeder
from .schedule import ChunkLayout, ChunkMeta
from .sources import DocumentError
from .steprows import DEST, DOC, KEY_LEN, RESET, SLOT

OnResult = Callable[[int, torch.Tensor, Optional[str]], None]


def run(plan, source, slots: int, empty: str, on_error: str, progress: bool, total: Optional[int], *,
        overlap: bool = True, runner=None, on_done: Optional[Callable] = None,
        start_memory: Optional[torch.Tensor] = None, final_memory: Optional[torch.Tensor] = None,
        segment_logits: Optional[list] = None, checkpoints=None) -> Tuple[Dict[int, torch.Tensor], List[int]]:
    """Run every document of ``source``: (logits [num_labels] (CPU) by document index, the documents
    cut at max_n_segments).

    runner: a ``graphs.StepRunner`` for ``slots`` slots runs the static loop; None the compact loop.
    overlap: lay out chunks on a thread, ahead (False: in turn on this thread).
    on_done(index, logits, error) is called for each document as soon as its logits are on the
    host (after its step on the CPU, a chunk later on CUDA) or it failed (logits None).
    start_memory: [n_docs, M, H] float32 on the device: document d starts from start_memory[d]
    instead of the initial memory. final_memory: [n_docs + 1, M, H] float32 on the device, row d
    written with document d's memory after its last segment (the extra row is a sink). Either needs
    the compact loop (memory_state.py's read/ask: the static loop's graphs hold no such inputs).
    segment_logits: a list that gets, per step, (its rows' documents [n], their logits [n, num_labels])
    on the device; also needs the compact loop.
    checkpoints: a ``run_checkpoints.RunCheckpoints`` (either loop): a resumed document's saved memory is
    copied into its slot's state row before its first step here; every ``every`` segments a document's
    state row is copied out at the step boundary and saved (on CUDA a device copy, saved a chunk later
    when the chunk's results are read); a finished document's logits are queued for saving before
    ``on_done`` sees them; a document finished by an earlier run gets its saved logits without a step.
    """
    cfg, dev = plan.config, plan.device
    C = steps_per_chunk(slots)
    layout = ChunkLayout(source, cfg, slots, C, RING, empty=empty, on_error=on_error, checkpoints=checkpoints)
    cuda = dev.type == "cuda"
    if runner is not None:
        state, results, ring = runner.state, runner.results, runner.ring        # [B, M, H] float32, ...
    else:
        ring = None
        state = plan.initial_memory.expand(slots, -1, -1).clone()          # [B, M, H] float32
        results = torch.zeros(RING * C * slots + 1, cfg.num_labels, device=dev)
    host_results = torch.zeros(RING, C * slots, cfg.num_labels, pin_memory=True) if cuda else None
    harvested = [torch.cuda.Event() for _ in range(RING)] if cuda else None
    got: Dict[int, torch.Tensor] = {}
    truncated: List[int] = []
    bar = tqdm(total=total, unit="seg", disable=not progress, desc="segments", dynamic_ncols=True)
    t0, n_seg, n_tok = time.perf_counter(), 0, 0
    pending: Optional[Tuple[ChunkMeta, List[tuple]]] = None   # CUDA: the chunk whose results come next
    snapshots: List[tuple] = []                    # CUDA: (document, position, memory [M, H] on the device)

    def finish(d: int, logits: torch.Tensor, chunk: Optional[ChunkMeta] = None) -> None:
        if checkpoints is not None and chunk is not None:      # on file before anyone sees it
            checkpoints.save(d, chunk.ends[d], logits=logits)
        got[d] = logits
        if on_done is not None:
            on_done(d, logits, None)

    def collect(chunk: ChunkMeta, saves: List[tuple]) -> None:   # CUDA: a chunk's results, read one chunk late
        k = chunk.ring_slot
        harvested[k].synchronize()
        for d, position, memory in saves:
            checkpoints.save(d, position, memory=memory)
        for d, row in chunk.finished:
            finish(d, host_results[k, row - k * C * slots].clone(), chunk)

    try:
        with Feeder(layout, dev, threaded=overlap, ring=ring) as feed:
            for chunk, ids, meta in feed:           # [C, B, T], [C, FIELDS, B] on the device
                if on_done is not None:
                    for d, err in sorted(chunk.failed.items()):
                        on_done(d, None, err)
                by_step: Dict[int, list] = {}
                for d, row in chunk.finished:
                    by_step.setdefault((row - chunk.ring_slot * C * slots) // slots, []).append((d, row))
                resumes, saves = _by_step(chunk.resumed), _by_step(chunk.saves)
                for d in chunk.restored:
                    finish(d, checkpoints.logits(d))
                if runner is not None:
                    runner.begin_chunk(chunk.ring_slot)
                for c in range(chunk.steps):
                    for b, d in resumes.get(c, ()):       # before the step: the slot's memory is the saved one
                        state[b].copy_(checkpoints.memory(d))
                    if runner is not None:
                        runner.step(chunk.width[c], chunk.masked[c])
                    else:
                        n = chunk.n_busy[c]
                        compact_step(plan, state, results, ids[c, :n], meta[c, :, :n], chunk.masked[c],
                                     start_memory, final_memory, layout.sink, segment_logits)
                    for b, d, position in saves.get(c, ()):   # after the step: the state at its boundary
                        if cuda:
                            snapshots.append((d, position, state[b].clone()))
                        else:
                            checkpoints.save(d, position, memory=state[b])
                    if not cuda:                     # on the host already: out at once
                        for d, row in by_step.get(c, ()):
                            finish(d, results[row].clone(), chunk)
                feed.release(chunk)
                if cuda:
                    k = chunk.ring_slot
                    host_results[k].copy_(results[k * C * slots:(k + 1) * C * slots], non_blocking=True)
                    harvested[k].record()
                    if pending is not None:
                        collect(*pending)           # the previous chunk: done by now or soon
                    pending, snapshots = (chunk, snapshots), []
                truncated += chunk.truncated
                n_seg += chunk.n_segments
                n_tok += chunk.n_tokens
                if progress:
                    dt = max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"{n_seg / dt:.1f} seg/s, {n_tok / dt:,.0f} tok/s", refresh=False)
                    bar.update(chunk.n_segments)
            if pending is not None:
                collect(*pending)
    finally:
        bar.close()
    return got, sorted(set(truncated))


def _by_step(rows: List[tuple]) -> Dict[int, List[tuple]]:
    """(step, rest...) rows -> {step: [(rest...), ...]}."""
    out: Dict[int, List[tuple]] = {}
    for step, *rest in rows:
        out.setdefault(step, []).append(tuple(rest))
    return out


def compact_step(plan, state, results, ids, meta, masked: bool, start_memory=None, final_memory=None,
                 sink: int = -1, segment_logits: Optional[list] = None) -> None:
    """One step of the busy rows only (the CPU loop). ids: [n, T], meta: [FIELDS, n] int64 (steprows.py).
    start_memory, final_memory, segment_logits: as in ``run``; sink: the result row of no document."""
    slot = meta[SLOT]                                                          # [n]
    start = (meta[RESET] != 0)[:, None, None]                                  # [n, 1, 1]
    initial = plan.initial_memory if start_memory is None else start_memory[meta[DOC].clamp(min=0)]
    memory = torch.where(start, initial, state[slot])                          # [n, M, H]
    logits, new_mem = plan.step(ids, memory, meta[KEY_LEN] if masked else None)
    _ext.memory_write(state, new_mem, 0, slot)
    results.index_copy_(0, meta[DEST], logits)
    if segment_logits is not None:    # meta is a ring buffer the feeder reuses: keep a copy
        segment_logits.append((meta[DOC].clone(), logits))
    if final_memory is not None:      # a document's last segment: DEST is its result row, not the sink
        row = torch.where(meta[DEST] != sink, meta[DOC], final_memory.shape[0] - 1)
        final_memory.index_copy_(0, row, new_mem.float())


def by_document(rows: List[Tuple[torch.Tensor, torch.Tensor]], n_docs: int) -> List[torch.Tensor]:
    """Per-step (documents [n], logits [n, C]) -> per document its logits [n_segments_d, C] (CPU), in
    step order: a document's segments run in order, and a stable sort keeps that order."""
    docs = torch.cat([d for d, _ in rows]).cpu()                                  # [S]
    logits = torch.cat([x for _, x in rows]).cpu()                                # [S, C]
    order = torch.sort(docs, stable=True).indices
    return list(logits[order].split(torch.bincount(docs, minlength=n_docs).tolist()))


class InOrder:
    """Hands results to ``callback(index, logits, error)`` in input order, each as soon as it and every
    earlier one are known (a failed document: NaN logits and its reason)."""

    def __init__(self, callback: Optional[OnResult], num_labels: int):
        self.callback, self.num_labels = callback, num_labels
        self.next, self.waiting = 0, {}

    def add(self, index: int, logits: Optional[torch.Tensor], error: Optional[DocumentError]) -> None:
        if self.callback is None:
            return
        if logits is None:
            logits = torch.full((self.num_labels,), float("nan"))
        self.waiting[index] = (logits, None if error is None else error.reason)
        while self.next in self.waiting:
            logits, reason = self.waiting.pop(self.next)
            self.callback(self.next, logits, reason)
            self.next += 1


def peek(items: Iterator, n: int) -> Tuple[Iterator, Optional[int]]:
    """(all the items again, their count if fewer than ``n``, else None): the first n are read now, to
    size the slots by the documents there are; an error from the iterator is raised in its turn."""
    head, error = [], None
    try:
        while len(head) < n:
            head.append(next(items))
    except StopIteration:
        return iter(head), len(head)
    except Exception as e:  # noqa: BLE001 - raised where the source reads it, after the documents before
        error = e

    def again():
        yield from head
        if error is not None:
            raise error
        yield from items
    return again(), (len(head) if error is not None else None)
