"""An independent LPT slot schedule (longest document first, to the slot free first): a test oracle for the feeder.

Documents are handed to ``slots`` batch rows longest first (LPT); a slot whose document ends takes
the next one on the following step. Nothing is padded to the longest document, and the whole plan is
known up front, so the device loop never waits on the host for a decision.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from rmt_fast.segmentation import Segments


@dataclass
class Schedule:
    table: torch.Tensor       # [n_steps, slots] int64: the segment (index into Segments) or -1 for an idle slot
    doc_slot: torch.Tensor    # [D] int64
    doc_start: torch.Tensor   # [D] int64, the step of each document's first segment

    @property
    def n_steps(self) -> int:
        return self.table.shape[0]

    @property
    def slots(self) -> int:
        return self.table.shape[1]


def make_schedule(segs: Segments, slots: int) -> Schedule:
    counts = segs.count.tolist()
    D = len(counts)
    slots = max(1, min(slots, D))
    doc_slot = torch.zeros(D, dtype=torch.int64)
    doc_start = torch.zeros(D, dtype=torch.int64)
    free = [(0, s) for s in range(slots)]  # (step at which the slot is free, slot)
    for d in sorted(range(D), key=lambda d: -counts[d]):
        t, s = heapq.heappop(free)
        doc_slot[d], doc_start[d] = s, t
        heapq.heappush(free, (t + counts[d], s))
    n_steps = max(t for t, _ in free) if D else 0
    table = torch.full((n_steps, slots), -1, dtype=torch.int64)
    step = doc_start[segs.doc] + segs.index
    table[step, doc_slot[segs.doc]] = torch.arange(len(segs))
    return Schedule(table=table, doc_slot=doc_slot, doc_start=doc_start)
