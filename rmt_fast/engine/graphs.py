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

``StepRunner`` owns the static tensors of one slot count: the memory state, the result rows, and
the device ring of chunks the feeder copies into (steprows.py). A step reads its rows from the ring
at a device-side ``cursor`` that each step advances (``step_at``), so the feeder's copy lands in the
graph's own input and nothing is copied before a replay; the host sets the cursor once per chunk.
It replays a CUDA graph per (width, variant: with or without the key-padding mask). Capture is
preceded by warm-up steps (kernel selection, Triton compilation, cuBLAS workspaces) that run on
*scratch copies* of the state, results and cursor (``warm_up``, also on the CPU), so warming up
never changes a document's memory; capture itself records kernels without running them. Where
capture fails the runner says why (a logged warning and ``status``) and runs the same step eagerly.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Dict, Optional

import torch

from .. import _ext
from ..envvars import env_flag
from .steprows import BUSY, DEST, FIELDS, KEY_LEN, RESET, SLOT

log = logging.getLogger(__name__)
WARMUP_STEPS = 2


def step_all(plan, state: torch.Tensor, ids: torch.Tensor, meta: torch.Tensor, results: torch.Tensor,
             masked: bool) -> None:
    """One step for ``W`` rows, in place.

    state: [B, M, H] float32 memory of each slot; ids: [W, T] int64 segment ids; meta: [FIELDS, W]
    int64 (key length, result row, busy, starts, slot; steprows.py); results: [R, num_labels] float32.
    """
    key_len = meta[KEY_LEN] if masked else None                              # [W]
    busy = meta[BUSY] != 0                                                   # [W] bool
    start = (meta[RESET] != 0)[:, None, None]                                # [W, 1, 1]
    slot = meta[SLOT]                                                        # [W], -1 for idle rows
    memory = torch.where(start, plan.initial_memory, state[slot.clamp(min=0)])      # [W, M, H]
    logits, new_memory = plan.step(ids, memory, key_len)                     # [W, L], [W, M, H]
    _ext.memory_write(state, new_memory, 0, torch.where(busy, slot, -1))     # idle rows write nothing
    results.index_copy_(0, meta[DEST], logits)


def step_at(plan, state: torch.Tensor, ring_ids: torch.Tensor, ring_meta: torch.Tensor, cursor: torch.Tensor,
            results: torch.Tensor, width: int, masked: bool) -> None:
    """``step_all`` on the first ``width`` rows of step ``cursor`` of the ring, then ``cursor += 1``.

    ring_ids: [N, B, T] and ring_meta: [N, FIELDS, B] int64 (every step of the ring); cursor: [1]
    int64 on the device. Nothing here reads a value on the host, so it can be captured.
    """
    ids = ring_ids.index_select(0, cursor)[0, :width]                        # [W, T]
    meta = ring_meta.index_select(0, cursor)[0, :, :width]                   # [FIELDS, W]
    step_all(plan, state, ids, meta, results, masked)
    cursor.add_(1)


def why_not(device: torch.device) -> Optional[str]:
    """Why CUDA graphs cannot be used on ``device`` at all (None: they can be tried)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device} is not a CUDA GPU (eager; idle slots are left out of each step)"
    if not env_flag("RMT_FAST_CUDA_GRAPHS", True):
        return "disabled by RMT_FAST_CUDA_GRAPHS=0"
    return None


class StepRunner:
    """Static buffers for ``slots`` slots and a ring of ``ring`` chunks of ``steps`` steps, and the
    step's graphs. Result rows: one per (ring slot, step, row), plus the sink (the last)."""

    def __init__(self, plan, slots: int, steps: int, ring: int, use_graphs: bool, pool=None):
        cfg = plan.config
        dev = plan.device
        self.plan, self.slots, self.steps = plan, slots, steps
        self.state = plan.initial_memory.expand(slots, -1, -1).clone()                  # [B, M, H]
        self.results = torch.zeros(ring * steps * slots + 1, cfg.num_labels, device=dev)  # [R, L]
        self.ring_ids = torch.zeros(ring, steps, slots, cfg.input_size, dtype=torch.int64, device=dev)
        self.ring_meta = torch.zeros(ring, steps, FIELDS, slots, dtype=torch.int64, device=dev)
        self.cursor = torch.zeros(1, dtype=torch.int64, device=dev)   # the ring step the next step reads
        self.use_graphs = use_graphs and dev.type == "cuda"
        self.reason: Optional[str] = None if self.use_graphs else (why_not(dev) or "graphs turned off")
        self._graphs: Dict[tuple, Optional[torch.cuda.CUDAGraph]] = {}              # (width, masked) ->
        self._pool = pool              # a graph memory pool shared with the Engine's other runners

    @property
    def ring(self):
        """The device ring (ids, meta) the feeder copies chunks into."""
        return self.ring_ids, self.ring_meta

    @property
    def status(self) -> str:
        if self.use_graphs and self.reason is None:
            kinds = [f"{w} rows {'masked' if m else 'unmasked'}" for (w, m), g in sorted(self._graphs.items())
                     if g is not None]
            return f"on (batch {self.slots}; captured: {', '.join(kinds) or 'none yet'})"
        return f"eager: {self.reason}"

    def begin_chunk(self, ring_slot: int) -> None:
        """The next steps read chunk ``ring_slot`` of the ring, from its first step."""
        self.cursor.fill_(ring_slot * self.steps)

    def step(self, width: int, masked: bool) -> None:
        """Run the step at the cursor on its first ``width`` rows (stream-ordered after the ring's copy)."""
        graph = self._graph(width, masked) if self.use_graphs and self.reason is None else None
        if graph is None:
            self._step(self.state, self.results, self.cursor, width, masked)
        else:
            graph.replay()

    def _step(self, state, results, cursor, width: int, masked: bool) -> None:
        flat_ids = self.ring_ids.view(-1, *self.ring_ids.shape[2:])            # [ring * steps, B, T]
        flat_meta = self.ring_meta.view(-1, *self.ring_meta.shape[2:])         # [ring * steps, FIELDS, B]
        step_at(self.plan, state, flat_ids, flat_meta, cursor, results, width, masked)

    def warm_up(self, width: int, masked: bool) -> None:
        """Run the step at the cursor ``WARMUP_STEPS`` times on scratch copies of the state, results
        and cursor (on a side stream on CUDA): every kernel is chosen, nothing live changes."""
        state, results, cursor = self.state.clone(), self.results.clone(), self.cursor.clone()
        side = torch.cuda.Stream() if self.plan.device.type == "cuda" else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())          # after the ring's copy and the clones
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for _ in range(WARMUP_STEPS):
                cursor.copy_(self.cursor)
                self._step(state, results, cursor, width, masked)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)

    def _graph(self, width: int, masked: bool):
        key = (width, masked)
        if key not in self._graphs:
            self._graphs[key] = self._capture(width, masked)
        return self._graphs[key]

    def _capture(self, width: int, masked: bool):
        """The graph of one step of ``width`` rows, warmed up on the step at the cursor."""
        try:
            self.warm_up(width, masked)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: the feeder's thread keeps copying and syncing on its own stream meanwhile.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                self._step(self.state, self.results, self.cursor, width, masked)
            return graph
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager, loudly
            self.reason = f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            msg = f"rmt_fast: {self.reason}; running the step eagerly"
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            return None
