"""The three kinds of run of ``rmt-fast bench``, each system on the same documents in turn:
points (equal-length documents at each length and batch size), the mixed workload, the memory timeline."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from ..baselines import BaselineStopped
from . import memory, workloads
from .systems import EngineSystem, System, stopper, time_point


class Limits:
    """What stops a baseline: ``budget_s`` per point, ``limit_bytes`` of RSS (CPU)."""

    def __init__(self, budget_s: Optional[float], limit_bytes: Optional[int]):
        self.budget_s, self.limit_bytes = budget_s, limit_bytes


def _row(system: System, workload: str, B: int, n_segments: int, segments_total: int, n_tokens: int,
         timed: dict, device: torch.device) -> dict:
    s = timed["seconds"]
    return {"system": system.name, "workload": workload, "batch_size": B, "segments": n_segments,
            "segments_total": segments_total, "dtype": str(system.dtype).replace("torch.", ""),
            "ms_per_segment": None if s is None else 1000 * s / segments_total,
            "tokens_per_s": None if s is None else n_tokens / s, "seconds": s,
            "peak_mib": timed["peak_mib"], "memory_measure": memory.measure_name(device),
            "stopped": timed["stopped"]}


def warm_up(systems: List[System], cfg, batch_size: int, gen: torch.Generator) -> None:
    docs = workloads.uniform_docs(cfg, 1, batch_size, gen)
    with torch.inference_mode():
        for system in systems:
            system.run(docs, batch_size)


def points(systems: List[System], cfg, segments: List[int], batch_sizes: List[int], device: torch.device,
           limits: Limits, gen: torch.Generator, tick: Callable[[dict], None]) -> List[dict]:
    """One row per (batch size, length, system); ``segments`` in a row counts per document, and
    ms_per_segment divides by every document's segments (batch x length)."""
    rows = []
    for B in batch_sizes:
        warm_up(systems, cfg, B, gen)
        stopped: Dict[str, dict] = {}
        for n in segments:
            docs = workloads.uniform_docs(cfg, n, B, gen)
            for system in systems:
                if system.name in stopped:      # stopped at a shorter length: longer ones are not run
                    row = {**stopped[system.name], "segments": n, "peak_mib": None, "seconds": None,
                           "stopped": {**stopped[system.name]["stopped"], "not_run": True}}
                else:
                    timed = time_point(system, docs, B, device, limits.budget_s, limits.limit_bytes)
                    row = _row(system, "uniform", B, n, n * B, n * B * cfg.segment_size, timed, device)
                    if row["stopped"]:
                        stopped[system.name] = row
                rows.append(row)
                tick(row)
    return rows


def mixed(systems: List[System], cfg, n_docs: int, max_segments: int, seed: int, batch_sizes: List[int],
          device: torch.device, limits: Limits, gen: torch.Generator, tick: Callable[[dict], None]):
    """Documents of log-uniform lengths: the Engine's slots (refilled as documents end) against the
    reference's batches padded to their longest document, at each batch size. Also the Engine run
    batch by batch (pad-to-longest with the Engine's kernels), which separates scheduling from kernels."""
    lengths = workloads.mixed_lengths(n_docs, max_segments, seed)
    docs = workloads.mixed_docs(cfg, lengths, gen)
    total, tokens = sum(lengths), sum(lengths) * cfg.segment_size
    rows = []
    for B in batch_sizes:
        warm_up(systems, cfg, B, gen)
        for system in systems:
            runs = [("slots", system)] if isinstance(system, EngineSystem) else [("pad-to-longest", system)]
            if isinstance(system, EngineSystem):
                runs.append(("pad-to-longest", _BatchByBatch(system)))
            for batching, runner in runs:
                timed = time_point(runner, docs, B, device, limits.budget_s, limits.limit_bytes)
                row = _row(system, "mixed", B, total, total, tokens, timed, device)
                if row["stopped"]:       # a padded batch's step counts once, however many documents it holds
                    row["stopped"]["unit"] = "steps"
                steps = (workloads.slot_steps if batching == "slots" else workloads.pad_to_longest_steps)(lengths, B)
                row.update(batching=batching, docs=n_docs, steps=steps,
                           row_utilization=total / (steps * B),
                           docs_per_s=None if timed["seconds"] is None else n_docs / timed["seconds"])
                rows.append(row)
                tick(row)
    return rows, lengths


class _BatchByBatch(System):
    """The Engine given the reference's batches one at a time: no slot is refilled before the batch ends."""

    def __init__(self, engine_system: EngineSystem):
        self.inner, self.name, self.dtype = engine_system, engine_system.name, engine_system.dtype

    def run(self, docs, batch_size: int, stop=None, on_step=None) -> None:
        for i in range(0, len(docs), batch_size):
            self.inner.run(docs[i:i + batch_size], batch_size)


def timeline(systems: List[System], cfg, n_segments: int, batch_size: int, device: torch.device,
             limits: Limits, gen: torch.Generator, tick: Callable[[dict], None]) -> Dict[str, dict]:
    """Memory above the start through one run of ``n_segments``: after every step for a baseline (stopped
    as a point is), sampled every 10 ms for the Engine with segments placed by elapsed time."""
    docs = workloads.uniform_docs(cfg, n_segments, batch_size, gen)
    warm_up(systems, cfg, batch_size, gen)
    out = {}
    for system in systems:
        memory.settle(device)
        base_alloc, base_res = memory.current(device)
        seg, alloc, res, stopped = [0], [0.0], [0.0], None

        def record(k, a, r):
            seg.append(k)
            alloc.append((a - base_alloc) / 2**20)
            res.append(0.0 if r is None else (r - base_res) / 2**20)

        with torch.inference_mode():
            if isinstance(system, EngineSystem):
                with memory.Sampler(device) as sampler:
                    system.run(docs, batch_size)
                end = sampler.samples[-1][0]
                for t, a, r in sampler.samples:
                    record(n_segments * t / end, a, r)
                how = "sampled every 10 ms; segments placed by elapsed time"
            else:
                try:
                    system.run(docs, batch_size, stop=stopper(device, limits.budget_s, limits.limit_bytes),
                               on_step=lambda k: record(k, *memory.current(device)))
                except BaselineStopped as e:
                    stopped = str(e)
                how = "after every step"
        out[system.name] = {"segments": seg, "allocated_mib": alloc,
                            "reserved_mib": res if device.type == "cuda" else None,
                            "measure": "cuda memory_allocated / memory_reserved" if device.type == "cuda"
                            else "process RSS", "how": how, "stopped": stopped}
        tick({"system": system.name, "timeline": True, "stopped": stopped,
              "peak_mib": max(alloc), "segments": seg[-1]})
    return out
