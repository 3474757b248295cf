"""The feeder: chunks of steps laid out ahead on a thread, in a ring of host buffers copied to the device.

Threads (``threaded=True``): one producer lays chunks out (``ChunkLayout.fill``, schedule.py) into
a ring of ``ring`` host buffers (pinned on CUDA) and copies each to the device on its own copy
stream; events order that copy after the compute that last read the device buffer, and the compute
after the copy. Every queue is bounded by the ring. Errors in any thread reach the caller (a
``DocumentError`` names the document); ``close()`` (also on an exception or Ctrl-C in the caller)
stops every thread promptly.

The device ring may be given (``ring=``): the static loop's ``StepRunner`` owns it, so the copy
lands straight in the buffers its CUDA graphs read, and on the CPU the layout writes into them.
"""
from __future__ import annotations

import queue
import threading
from typing import Optional, Tuple

import torch

from .schedule import ChunkLayout, ChunkMeta
from .sources import POLL_S, DocumentError, FeederStopped  # noqa: F401 - DocumentError: its old home
from .steprows import FIELDS

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Feeder:
    """Chunks laid out ahead on a thread and copied to ``device`` ahead of use.

    Use as a context manager and iterator::

        with Feeder(layout, device) as feed:
            for chunk, ids, meta in feed:   # ids [steps, slots, T], meta [steps, FIELDS, slots] on the device
                ...enqueue the compute that reads them...
                feed.release(chunk)         # after the last kernel that reads them is enqueued

    ring: optional (ids [ring, steps, slots, T], meta [ring, steps, FIELDS, slots]) int64 tensors on
    ``device`` to use as the device ring (on the CPU the layout writes into them directly).
    threaded=False lays out and copies on the caller's thread, in turn with the compute (the
    synchronous path, for tests and for the no-overlap benchmark).
    """

    def __init__(self, layout: ChunkLayout, device: torch.device, threaded: bool = True,
                 ring: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        self.layout, self.device, self.threaded = layout, torch.device(device), threaded
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        n, C, B = layout.ring, layout.steps, layout.slots
        shapes = ((n, C, B, layout.T), (n, C, FIELDS, B))
        if ring is not None and tuple(ring[0].shape) + tuple(ring[1].shape) != shapes[0] + shapes[1]:
            raise ValueError(f"ring buffers {tuple(ring[0].shape)}, {tuple(ring[1].shape)} do not fit {shapes}")
        if self.cuda:
            self._host = [torch.zeros(s, dtype=torch.int64, pin_memory=True) for s in shapes]
            self._dev = list(ring) if ring is not None else [torch.empty(s, dtype=torch.int64, device=self.device)
                                                             for s in shapes]
            self._copy_stream = torch.cuda.Stream(self.device)
            # The device ring may have just been allocated, filled or read on the compute stream
            # (by an earlier run): the first copies into it come after that work.
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            self._copied = [torch.cuda.Event() for _ in range(n)]
            self._consumed = [torch.cuda.Event() for _ in range(n)]
        else:
            self._host = list(ring) if ring is not None else [torch.zeros(s, dtype=torch.int64) for s in shapes]
            self._dev = self._host
        self._host_np = [t.numpy() for t in self._host]
        self._stop = threading.Event()
        self._free: "queue.Queue[int]" = queue.Queue()
        for k in range(n):
            self._free.put(k)
        self._ready: "queue.Queue" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._done = False

    # -- producer ---------------------------------------------------------------------------------
    def _produce(self, k: int) -> Optional[ChunkMeta]:
        if self.cuda:
            self._copied[k].synchronize()          # the last copy out of host[k] is done
        chunk = self.layout.fill(self._host_np[0][k], self._host_np[1][k], k, self._stop)
        if chunk is None:
            return None
        if self.cuda:
            stream = self._copy_stream if self.threaded else torch.cuda.current_stream(self.device)
            with torch.cuda.stream(stream):
                stream.wait_event(self._consumed[k])   # the compute that last read dev[k] is done
                for dev, host in zip(self._dev, self._host):
                    dev[k].copy_(host[k], non_blocking=True)
                self._copied[k].record(stream)
        return chunk

    def _run(self):
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)
            while not self._stop.is_set():
                try:
                    k = self._free.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                chunk = self._produce(k)
                self._ready.put(_END if chunk is None else chunk)
                if chunk is None:
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

    def __next__(self) -> Tuple[ChunkMeta, torch.Tensor, torch.Tensor]:
        if self._done:
            raise StopIteration
        if self.threaded:
            while True:
                try:
                    item = self._ready.get(timeout=POLL_S)
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
        k = item.ring_slot
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._copied[k])
        return item, self._dev[0][k], self._dev[1][k]

    def release(self, chunk: ChunkMeta) -> None:
        """The compute reading this chunk is enqueued: its ring slot may be refilled."""
        if self.cuda:
            self._consumed[chunk.ring_slot].record(torch.cuda.current_stream(self.device))
        self._free.put(chunk.ring_slot)

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
