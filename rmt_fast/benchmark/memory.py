"""Memory measures: peak above the start of a run, a limit that stops a baseline, and a timeline.

On CUDA the allocator's own counters (``memory_allocated`` / ``max_memory_allocated`` / ``memory_reserved``);
on the CPU the process's resident set size (RSS), sampled on a thread.
"""
from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from typing import List, Optional, Tuple

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int:
    """The kernel's estimate of memory available to start new work (MemAvailable), bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def settle(device: torch.device) -> None:
    """Let the previous run's freed memory go before the next baseline is taken: collect garbage and, on
    the CPU, hand glibc's free pages back (malloc_trim), else RSS drifts down through the next run."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: RSS is what it is
        pass


def measure_name(device: torch.device) -> str:
    if torch.device(device).type == "cuda":
        return "cuda max_memory_allocated above the start"
    return "process RSS above the start, sampled every 5 ms"


class PeakMemory:
    """Peak memory above the level at entry: the CUDA allocator's peak on a GPU, sampled RSS on the CPU."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval, self.peak = torch.device(device), interval, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = rss_bytes()
            self._max = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, rss_bytes())
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, rss_bytes()) - self._base
        return False


def current(device: torch.device) -> Tuple[int, Optional[int]]:
    """(allocated-or-RSS, reserved or None) bytes now."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    return rss_bytes(), None


class Sampler:
    """Memory every ``interval`` seconds on a thread, for a run that gives no per-segment hook (the
    Engine): ``samples`` holds (seconds since entry, allocated-or-RSS, reserved or None) bytes."""

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device, self.interval = torch.device(device), interval
        self.samples: List[Tuple[float, int, Optional[int]]] = []

    def __enter__(self):
        self._t0, self._stop = time.perf_counter(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while True:
            self.samples.append((time.perf_counter() - self._t0, *current(self.device)))
            if self._stop.wait(self.interval):
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter() - self._t0, *current(self.device)))
        return False
