"""The static-shape step, and its capture as CUDA graphs.

``step_all`` is one whole step of the slot loop for a fixed number of rows (every slot, or a
step's busy rows compacted by the feeder to a power-of-two width): each row's memory (its slot's
state, or the initial memory for a row that starts a document), the plan's segment step
(embedding with the memory injected, every layer, the pruned last layer, pooler and classifier),
the memory write-back (``memory_write`` from ``rmt_fast._ext``: the compiled op where built, else
its torch twin; slot -1 writes nothing) and the scatter of logits into the result rows. Every row
computes; an idle row computes an empty segment that is never written back and whose logits go to
a sink row, so shapes never change, nothing allocates outside the graph's pool and nothing waits
for the host.

``StepRunner`` owns the static tensors of one slot count (the memory state, the result rows, one
step's input per width) and replays a CUDA graph per (width, variant: with or without the
key-padding mask). Capture is preceded by warm-up steps (kernel selection, Triton compilation,
cuBLAS workspaces) that run on *scratch copies* of the state and results, so warming up never
changes a document's memory; capture itself records kernels without running them. Where capture
fails the runner says why (a logged warning and ``status``) and runs the same step eagerly.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Dict, Optional

import torch

from .. import _ext
from .feeder import COL_ACTIVE, COL_DEST, COL_KEYLEN, COL_RESET, COL_SLOT, EXTRA_COLS

log = logging.getLogger(__name__)
WARMUP_STEPS = 2


def step_all(plan, state: torch.Tensor, inp: torch.Tensor, results: torch.Tensor, masked: bool) -> None:
    """One step for ``W`` rows, in place.

    state: [B, M, H] float32 memory of each slot; inp: [W, T + 5] int64, a step of a feeder chunk
    (ids, then key length, result row, busy, starts, slot); results: [R, num_labels] float32.
    """
    T = inp.shape[1] - EXTRA_COLS
    ids = inp[:, :T]                                                         # [W, T]
    key_len = inp[:, T + COL_KEYLEN].contiguous() if masked else None        # [W]
    dest = inp[:, T + COL_DEST]                                              # [W]
    busy = inp[:, T + COL_ACTIVE] != 0                                       # [W] bool
    start = (inp[:, T + COL_RESET] != 0)[:, None, None]                      # [W, 1, 1]
    slot = inp[:, T + COL_SLOT]                                              # [W], -1 for idle rows
    memory = torch.where(start, plan.initial_memory, state[slot.clamp(min=0)])      # [W, M, H]
    logits, new_memory = plan.step(ids, memory, key_len)                     # [W, L], [W, M, H]
    _ext.memory_write(state, new_memory, 0, torch.where(busy, slot, -1))     # idle rows write nothing
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

    def __init__(self, plan, slots: int, result_rows: int, use_graphs: bool, pool=None):
        cfg = plan.config
        dev = plan.device
        self.plan, self.slots = plan, slots
        self.state = plan.initial_memory.expand(slots, -1, -1).clone()              # [B, M, H]
        self.results = torch.zeros(result_rows, cfg.num_labels, device=dev)        # [R, L]
        self._inp: Dict[int, torch.Tensor] = {}                                     # width -> [W, T + 5]
        self.use_graphs = use_graphs and dev.type == "cuda"
        self.reason: Optional[str] = None if self.use_graphs else (why_not(dev) or "graphs turned off")
        self._graphs: Dict[tuple, Optional[torch.cuda.CUDAGraph]] = {}              # (width, masked) ->
        self._pool = pool              # a graph memory pool shared with the Engine's other runners

    def _static_input(self, width: int) -> torch.Tensor:
        if width not in self._inp:
            cfg = self.plan.config
            inp = torch.zeros(width, cfg.input_size + EXTRA_COLS, dtype=torch.int64, device=self.plan.device)
            inp[:, cfg.input_size + COL_DEST] = self.results.shape[0] - 1               # the sink
            inp[:, cfg.input_size + COL_SLOT] = -1                                      # idle
            self._inp[width] = inp
        return self._inp[width]

    @property
    def status(self) -> str:
        if self.use_graphs and self.reason is None:
            kinds = [f"{w} rows {'masked' if m else 'unmasked'}" for (w, m), g in sorted(self._graphs.items())
                     if g is not None]
            return f"on (batch {self.slots}; captured: {', '.join(kinds) or 'none yet'})"
        return f"eager: {self.reason}"

    def step(self, inp: torch.Tensor, masked: bool) -> None:
        """Run one step whose input ``inp`` [W, T + 5] lies on the device (stream-ordered)."""
        width = inp.shape[0]
        graph = self._graph(inp, masked) if self.use_graphs and self.reason is None else None
        if graph is None:
            step_all(self.plan, self.state, inp, self.results, masked)
        else:
            self._inp[width].copy_(inp, non_blocking=True)
            graph.replay()

    def _graph(self, example: torch.Tensor, masked: bool):
        key = (example.shape[0], masked)
        if key not in self._graphs:
            self._graphs[key] = self._capture(example, masked)
        return self._graphs[key]

    def _capture(self, example: torch.Tensor, masked: bool):
        """The graph of one step for ``example``'s width [W, T + 5], warmed up on ``example``."""
        try:
            current = torch.cuda.current_stream()
            inp = self._static_input(example.shape[0])
            inp.copy_(example)
            # Warm up on scratch copies: this must not touch any document's memory or result.
            state, results = self.state.clone(), self.results.clone()
            side = torch.cuda.Stream()
            side.wait_stream(current)          # after the copies above
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    step_all(self.plan, state, inp, results, masked)
            current.wait_stream(side)
            del state, results
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: the feeder's thread keeps copying and syncing on its own stream meanwhile.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                step_all(self.plan, self.state, inp, self.results, masked)
            return graph
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager, loudly
            self.reason = f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            msg = f"rmt_fast: {self.reason}; running the step eagerly"
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            return None
