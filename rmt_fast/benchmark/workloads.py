"""The documents a benchmark runs: equal lengths (one point per length), or a seeded long-tailed mix."""
from __future__ import annotations

import math
from typing import List

import numpy as np
import torch


def _ordinary_ids(cfg, n_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """[n_tokens] random ids above every special id, so each document is exactly as long as asked."""
    return torch.randint(max(cfg.special_token_ids) + 1, cfg.vocab_size, (n_tokens,), generator=generator)


def uniform_docs(cfg, n_segments: int, batch_size: int, generator: torch.Generator) -> List[torch.Tensor]:
    """``batch_size`` random documents of exactly ``n_segments`` full segments."""
    return [_ordinary_ids(cfg, n_segments * cfg.segment_size, generator) for _ in range(batch_size)]


def mixed_lengths(n_docs: int, max_segments: int, seed: int) -> List[int]:
    """Document lengths in segments, log-uniform on [1, max_segments]: exp(U(0, ln(max_segments + 1)))
    rounded down, so every power-of-two band up to the maximum holds about the same number of documents."""
    rng = np.random.default_rng(seed)
    draws = np.exp(rng.uniform(0.0, math.log(max_segments + 1), size=n_docs))
    return [int(min(max_segments, max(1, math.floor(x)))) for x in draws]


def mixed_docs(cfg, lengths: List[int], generator: torch.Generator) -> List[torch.Tensor]:
    return [_ordinary_ids(cfg, n * cfg.segment_size, generator) for n in lengths]


def pad_to_longest_steps(lengths: List[int], batch_size: int) -> int:
    """Steps the reference's batching takes: batches in input order, each as long as its longest document."""
    return sum(max(lengths[i:i + batch_size]) for i in range(0, len(lengths), batch_size))


def slot_steps(lengths: List[int], batch_size: int) -> int:
    """Steps of slots refilled as documents finish (in input order): the longest slot's total."""
    slots = [0] * min(batch_size, len(lengths))
    for n in lengths:
        k = slots.index(min(slots))
        slots[k] += n
    return max(slots) if slots else 0


def describe_lengths(lengths: List[int]) -> dict:
    a = np.asarray(lengths)
    return {"n": int(a.size), "total_segments": int(a.sum()), "min": int(a.min()), "max": int(a.max()),
            "mean": round(float(a.mean()), 2),
            "percentiles": {str(p): float(np.percentile(a, p)) for p in (10, 25, 50, 75, 90)}}
