"""Device memory of an Engine run as a function of its slot count, and the most slots a budget fits.

Arithmetic only (no tensors): the pieces the Engine allocates, sized from the configs. The peak does not
grow with document length (the state is [slots, M, H], whatever the number of segments), so the slot
count chosen here holds for any length. This is a separate small module on purpose: the performance and
memory model of ``rmt-fast plan`` (rmt_fast/perfmodel.py, another engineer's) should take its memory
terms from here, or the two be reconciled.

Pieces (bytes), for ``slots`` rows of ``T = input_size`` tokens, hidden H, FFN width I, heads nh,
memory tokens M, element size e of the compute dtype:
- weights: word, position and type-0 tables, the embedding LayerNorm and the initial memory in float32
  (``plan.py`` keeps them float32); every layer's fused QKV, output, FFN and LayerNorms, the pooler and
  the classifier in the compute dtype.
- static: the float32 memory state [slots, M, H], the result rows [RING * C * slots + 1, labels] float32,
  and the static step inputs [w, T + 5] int64 for each power-of-two width w <= slots.
- ring: the feeder's device copies of the laid-out chunks, RING x [C, slots, T + 5] int64.
- activations, one step at width ``slots``, an upper bound: every [slots, T, .] intermediate of a layer
  held at once (x, QKV, attention out, output projection, residual sum, LayerNorm, FFN in and out,
  residual, LayerNorm: 11 H + I per token) plus the attention scores [slots, nh, T, T] in float32, as the
  matmul/SDPA-math path materialises them.
- graph pool (CUDA graphs): the captured steps' activations, kept by the graphs' private pool on top of
  the eager warm-up's (which the caching allocator keeps reserved): one more step of activations.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

import torch

from .steprows import FIELDS as EXTRA_COLS
from .runner import RING, steps_per_chunk

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: Union[str, int]) -> int:
    """'10GiB', '3.5 GB', '512MiB' or a number of bytes."""
    if isinstance(value, int) and value > 0:
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?b|b)?\s*", str(value).lower())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"max_memory {value!r} is not a size such as '10GiB', '3.5GB' or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


@dataclass(frozen=True)
class MemoryEstimate:
    slots: int
    weights: int
    static: int
    ring: int
    activations: int
    graph_pool: int

    @property
    def total(self) -> int:
        return self.weights + self.static + self.ring + self.activations + self.graph_pool

    def describe(self) -> str:
        gib = 2**30
        return (f"{self.slots} slot(s): {self.total / gib:.2f} GiB = weights {self.weights / gib:.2f} + static "
                f"{self.static / gib:.3f} + ring {self.ring / gib:.3f} + activations {self.activations / gib:.2f}"
                f" + graph pool {self.graph_pool / gib:.2f}")


def weight_bytes(rmt_config, bert_config, dtype: torch.dtype) -> int:
    H, I = bert_config.hidden_size, bert_config.intermediate_size
    V = rmt_config.vocab_size + rmt_config.num_mem_tokens          # the word table holds the memory rows too
    P, M, L = bert_config.max_position_embeddings, rmt_config.num_mem_tokens, rmt_config.num_labels
    e = torch.empty(0, dtype=dtype).element_size()
    float32 = 4 * (V * H + P * H + H + 2 * H + M * H)
    per_layer = (3 * H * H + 3 * H) + (H * H + H) + 2 * H + (I * H + I) + (H * I + H) + 2 * H
    head = (H * H + H) + (L * H + L)
    return float32 + e * (bert_config.num_hidden_layers * per_layer + head)


def estimate(rmt_config, bert_config, dtype: torch.dtype, slots: int, cuda_graphs: bool = True) -> MemoryEstimate:
    """Peak device memory of an Engine with ``slots`` slots (an upper bound on the activations)."""
    H, I, nh = bert_config.hidden_size, bert_config.intermediate_size, bert_config.num_attention_heads
    T, M, L = rmt_config.input_size, rmt_config.num_mem_tokens, rmt_config.num_labels
    e = torch.empty(0, dtype=dtype).element_size()
    C = steps_per_chunk(slots)
    widths = [1 << k for k in range(slots.bit_length()) if 1 << k <= slots]
    if widths[-1] != slots:
        widths.append(slots)
    static = 4 * slots * M * H + 4 * (RING * C * slots + 1) * L + 8 * (T + EXTRA_COLS) * sum(widths)
    ring = 8 * RING * C * slots * (T + EXTRA_COLS)
    activations = slots * T * (11 * H + I) * e + 4 * slots * nh * T * T
    return MemoryEstimate(slots, weight_bytes(rmt_config, bert_config, dtype), static, ring, activations,
                          activations if cuda_graphs else 0)


def max_slots(rmt_config, bert_config, dtype: torch.dtype, budget, cuda_graphs: bool = True,
              limit: int = 4096) -> MemoryEstimate:
    """The estimate for the most slots (<= ``limit``) whose peak fits ``budget``; raises if one does not."""
    budget = parse_bytes(budget)
    one = estimate(rmt_config, bert_config, dtype, 1, cuda_graphs)
    if one.total > budget:
        raise ValueError(f"max_memory {budget / 2**30:.2f} GiB cannot fit one slot: the minimum for this model "
                         f"in {str(dtype).replace('torch.', '')} is {one.total / 2**30:.2f} GiB "
                         f"({one.describe()})")
    best = one               # not quite monotonic in slots (chunk steps shrink as slots grow): scan
    for slots in range(2, limit + 1):
        est = estimate(rmt_config, bert_config, dtype, slots, cuda_graphs)
        if est.total <= budget:
            best = est
        elif est.activations > budget:
            break
    return best
