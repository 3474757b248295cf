"""The systems a benchmark compares, each timed on the same documents: the Engine, and the reference's
way (eager float32, every step's outputs kept) and the tuned baseline (the same loop, SDPA, bf16/fp16),
both from ``rmt_fast.baselines``. A baseline that passes its time budget or memory limit is stopped."""
from __future__ import annotations

import time
from typing import Callable, List, Optional

import torch

from ..baselines import BaselineStopped, ReferenceBaseline, reference_segments
from . import memory

BASELINES = ("reference", "tuned")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class System:
    """One way of classifying a batch of documents: ``run(docs, batch_size, stop, on_step)``."""

    name: str
    dtype: torch.dtype

    def run(self, docs, batch_size: int, stop=None, on_step=None) -> None:
        raise NotImplementedError


class EngineSystem(System):
    name = "engine"

    def __init__(self, engine):
        self.engine, self.dtype = engine, engine.dtype

    def run(self, docs, batch_size: int, stop=None, on_step=None) -> None:
        self.engine.classify(docs, batch_size=batch_size)                     # slots refilled as docs end


class BaselineSystem(System):
    """The reference's batching: ``batch_size`` documents at a time in input order, each batch padded to
    its longest document. ``stop`` sees the segments done over the whole call."""

    def __init__(self, name: str, model, device: torch.device, engine_dtype: torch.dtype):
        self.name = name
        if name == "reference":
            self.dtype, keep, attn = torch.float32, True, "eager"
        else:   # the same loop tuned: SDPA in the half precision asked for (bfloat16 unless float16)
            self.dtype = torch.float16 if engine_dtype == torch.float16 else torch.bfloat16
            keep, attn = False, "sdpa"
        self.baseline = ReferenceBaseline(model, self.dtype, keep, attn, device)

    def run(self, docs, batch_size: int, stop=None, on_step=None) -> None:
        done = 0
        for i in range(0, len(docs), batch_size):
            offset = done
            reason = stop(done) if stop is not None and done > 0 else None
            if reason is not None:
                raise BaselineStopped(done, reason)
            try:
                self.baseline.run(docs[i:i + batch_size],
                                  stop=None if stop is None else (lambda k: stop(offset + k)),
                                  on_step=None if on_step is None else (lambda k: on_step(offset + k)))
            except BaselineStopped as e:
                raise BaselineStopped(offset + e.segments, e.reason) from None
            done = offset + self._steps(docs[i:i + batch_size])

    def _steps(self, docs) -> int:
        return max(len(reference_segments(d, self.baseline.cfg)) for d in docs)


def stopper(device: torch.device, budget_s: Optional[float], limit_bytes: Optional[int]) -> Callable:
    """stop(segments_done) for a baseline: 'time' past ``budget_s`` from now, 'memory' past
    ``limit_bytes`` of RSS (on CUDA running out of memory stops it instead)."""
    t0 = time.perf_counter()

    def stop(_segments: int) -> Optional[str]:
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            return "time"
        if limit_bytes is not None and device.type == "cpu" and memory.rss_bytes() > limit_bytes:
            return "memory"
        return None
    return stop


def time_point(system: System, docs: List[torch.Tensor], batch_size: int, device: torch.device,
               budget_s: Optional[float] = None, limit_bytes: Optional[int] = None) -> dict:
    """Seconds and peak memory of ``system`` on ``docs``; ``stopped`` holds {segments, reason} when a
    baseline was given up (its time is then not reported: never extrapolated)."""
    stop = None if isinstance(system, EngineSystem) else stopper(device, budget_s, limit_bytes)
    stopped = None
    memory.settle(device)
    with torch.inference_mode(), memory.PeakMemory(device) as peak:
        t0 = time.perf_counter()
        try:
            system.run(docs, batch_size, stop=stop)
        except BaselineStopped as e:
            stopped = {"segments": e.segments, "reason": e.reason}
        _sync(device)
        seconds = time.perf_counter() - t0
    return {"seconds": None if stopped else seconds, "peak_mib": peak.peak / 2**20, "stopped": stopped}
