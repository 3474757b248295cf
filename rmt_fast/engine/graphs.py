"""The static-shape step over every slot, and its capture as CUDA graphs.

``step_all`` is one whole step of the slot loop for a fixed number of slots: memory reset of the
slots that start a document, the plan's segment step (embedding with the memory injected, every
layer, the pruned last layer, pooler and classifier), the memory write-back and the scatter of
logits into the result rows. Every slot computes every step; an idle slot computes an empty
segment whose memory is masked out (``torch.where``) and whose logits go to a sink row, so the
shapes never change, nothing allocates outside the graph's pool and nothing waits for the host.

``StepRunner`` owns the static tensors one batch shape needs (the memory state, one step's
input, the result rows) and replays a CUDA graph per variant (with or without the key-padding
mask). Capture is preceded by warm-up steps (kernel selection, Triton compilation, cuBLAS
workspaces) that run on *scratch copies* of the state and results, so warming up never changes
a document's memory; capture itself records kernels without running them. Where capture fails
the runner says why (a logged warning and ``status``) and runs the same step eagerly.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Dict, Optional

import torch

from .. import _ext
from .feeder import COL_ACTIVE, COL_DEST, COL_KEYLEN, COL_RESET, EXTRA_COLS

log = logging.getLogger(__name__)
WARMUP_STEPS = 2


def step_all(plan, state: torch.Tensor, inp: torch.Tensor, results: torch.Tensor, masked: bool) -> None:
    """One step for every slot, in place.

    state: [B, M, H] float32 memory of each slot; inp: [B, T + 4] int64, a step of a feeder chunk
    (ids, then key length, result row, busy, starts); results: [R, num_labels] float32.
    """
    T = inp.shape[1] - EXTRA_COLS
    ids = inp[:, :T]                                                         # [B, T]
    key_len = inp[:, T + COL_KEYLEN].contiguous() if masked else None        # [B]
    dest = inp[:, T + COL_DEST]                                              # [B]
    busy = inp[:, T + COL_ACTIVE] != 0                                       # [B] bool
    _ext.memory_reset(state, plan.initial_memory, inp[:, T + COL_RESET] != 0)
    logits, new_memory = plan.step(ids, state, key_len)                      # [B, L], [B, M, H]
    slots = torch.where(busy, torch.arange(busy.numel(), device=busy.device), -1)   # -1: write nothing
    _ext.memory_write(state, new_memory, 0, slots)
    results.index_copy_(0, dest, logits)


def why_not(device: torch.device) -> Optional[str]:
    """Why CUDA graphs cannot be used on ``device`` at all (None: they can be tried)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device} is not a CUDA GPU (eager; idle slots are left out of each step)"
    if os.environ.get("RMT_FAST_CUDA_GRAPHS", "1") == "0":
        return "disabled by RMT_FAST_CUDA_GRAPHS=0"
    return None


class StepRunner:
    """Static buffers for ``slots`` slots and ``result_rows`` result rows, and the step's graphs."""

    def __init__(self, plan, slots: int, result_rows: int, use_graphs: bool):
        cfg = plan.config
        dev = plan.device
        self.plan, self.slots = plan, slots
        self.state = plan.initial_memory.expand(slots, -1, -1).clone()              # [B, M, H]
        self.results = torch.zeros(result_rows, cfg.num_labels, device=dev)        # [R, L]
        self.inp = torch.zeros(slots, cfg.input_size + EXTRA_COLS, dtype=torch.int64, device=dev)
        self.inp[:, cfg.input_size + COL_DEST] = result_rows - 1                     # the sink
        self.use_graphs = use_graphs and dev.type == "cuda"
        self.reason: Optional[str] = None if self.use_graphs else (why_not(dev) or "graphs turned off")
        self._graphs: Dict[bool, Optional[torch.cuda.CUDAGraph]] = {}
        self._pool = None

    @property
    def status(self) -> str:
        if self.use_graphs and self.reason is None:
            kinds = [("masked" if m else "unmasked") for m, g in self._graphs.items() if g is not None]
            return f"on (batch {self.slots}; captured: {', '.join(kinds) or 'none yet'})"
        return f"eager: {self.reason}"

    def step(self, inp: torch.Tensor, masked: bool) -> None:
        """Run one step whose input ``inp`` [B, T + 4] lies on the device (stream-ordered)."""
        graph = self._graph(masked) if self.use_graphs and self.reason is None else None
        if graph is None:
            step_all(self.plan, self.state, inp, self.results, masked)
        else:
            self.inp.copy_(inp, non_blocking=True)
            graph.replay()

    def _graph(self, masked: bool):
        if masked not in self._graphs:
            self._graphs[masked] = self._capture(masked)
        return self._graphs[masked]

    def _capture(self, masked: bool):
        try:
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            # Warm up on scratch copies: this must not touch any document's memory or result.
            state, results = self.state.clone(), self.results.clone()
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    step_all(self.plan, state, self.inp, results, masked)
            current.wait_stream(side)
            del state, results
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: the feeder's thread keeps copying and syncing on its own stream meanwhile.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                step_all(self.plan, self.state, self.inp, self.results, masked)
            return graph
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager, loudly
            self.reason = f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            msg = f"rmt_fast: {self.reason}; running the step eagerly"
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            return None
