"""What fits a GPU target: per-SM limits by compute capability, and whether an attention config fits them.

Pure Python (torch only for dtype sizes): the Triton attention launcher's default config and autotune prune
use it on a GPU, and benchmarks/kernel_report.py checks it against the compiled kernels for each target.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["TargetLimits", "TARGET_LIMITS", "TENSOR_CORE_TILE_REGS", "FMA_TILE_REGS", "SPILLED_IN_REPORT",
           "target_limits", "uses_tensor_cores", "tile_registers", "shared_memory_estimate", "config_fits"]


@dataclass(frozen=True)
class TargetLimits:
    """Per-SM limits of one compute capability (CUDA C Programming Guide, "Technical Specifications per
    Compute Capability"; shared memory per block is the opt-in maximum)."""

    smem_per_block: int
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    smem_reserved_per_block: int = 0   # the driver keeps 1 KiB per block from sm_80 on


TARGET_LIMITS = {
    61: TargetLimits(48 * 1024, 96 * 1024),
    75: TargetLimits(64 * 1024, 64 * 1024, max_threads_per_sm=1024, max_blocks_per_sm=16),
    80: TargetLimits(163 * 1024, 164 * 1024, smem_reserved_per_block=1024),
    86: TargetLimits(99 * 1024, 100 * 1024, max_threads_per_sm=1536, max_blocks_per_sm=16,
                     smem_reserved_per_block=1024),
    89: TargetLimits(99 * 1024, 100 * 1024, max_threads_per_sm=1536, max_blocks_per_sm=24,
                     smem_reserved_per_block=1024),
    90: TargetLimits(227 * 1024, 228 * 1024, smem_reserved_per_block=1024),
}

# Registers a thread may give to the tiles it holds (the float32 accumulator and scores, the query operand),
# out of 255: the rest goes to addresses, the softmax and software pipelining. Set from the compiled
# kernel's ptxas counts (benchmarks/kernel_report.py, docs/KERNELS.md): with tensor cores (float16/bfloat16
# on sm_80+) 80 tile registers compile without spills and 128 spill; without them (float32 "ieee" dots, and
# Triton's pre-Ampere code) the dot broadcasts its operands: 20 spilled on sm_90 (16x32 tiles, 4 warps), 18 did not.
TENSOR_CORE_TILE_REGS = 96
FMA_TILE_REGS = 18
# The estimate above misses ptxas' own choices: tensor-core configs inside the budget that the kernel report
# saw spill, as {capability: {(head_dim, (BLOCK_M, BLOCK_N, num_warps, num_stages)), ...}} (docs/KERNELS.md).
SPILLED_IN_REPORT = {
    80: {(128, (64, 32, 8, 2)), (128, (16, 128, 4, 2)), (128, (16, 128, 4, 3))},
    86: {(128, (16, 64, 4, 2)), (128, (16, 64, 4, 3))},
    89: {(128, (16, 64, 4, 2)), (128, (16, 64, 4, 3))},
    90: {(128, (16, 128, 4, 2)), (128, (16, 128, 4, 3))},
}


def target_limits(capability: int) -> TargetLimits:
    """The limits of the newest listed capability <= ``capability`` (e.g. 87 -> sm_86's)."""
    known = [cc for cc in TARGET_LIMITS if cc <= capability]
    if not known:
        raise ValueError(f"compute capability {capability} is older than any listed ({sorted(TARGET_LIMITS)})")
    return TARGET_LIMITS[max(known)]


def uses_tensor_cores(dtype: torch.dtype, capability: Optional[int]) -> bool:
    """Whether the kernel's dots run on mma (float16/bfloat16 from sm_80; float32 is 'ieee', never TF32)."""
    return dtype != torch.float32 and (capability is None or capability >= 80)


def tile_registers(block_m: int, block_n: int, num_warps: int, head_dim: int, elem_bytes: int) -> float:
    """32-bit registers per thread holding the accumulator [M, D] and scores [M, N] (float32), and q [M, D]."""
    words = block_m * head_dim + block_m * block_n + block_m * head_dim * elem_bytes / 4
    return words / (32 * num_warps)


def shared_memory_estimate(block_m: int, block_n: int, num_stages: int, head_dim: int, elem_bytes: int) -> int:
    """An upper bound on the kernel's shared memory: K and V tiles per pipeline stage, plus one float32
    [M, N] tile of layout-conversion scratch (checked against the compiled size by the kernel report)."""
    return num_stages * 2 * block_n * head_dim * elem_bytes + block_m * block_n * 4


def config_fits(block_m: int, block_n: int, num_warps: int, num_stages: int, head_dim: int,
                dtype: torch.dtype, capability: int) -> Optional[str]:
    """None if the config fits the target's shared memory and register budget, else why not."""
    elem = torch.tensor([], dtype=dtype).element_size()
    smem = shared_memory_estimate(block_m, block_n, num_stages, head_dim, elem)
    limit = target_limits(capability).smem_per_block
    if smem > limit:
        return f"shared memory {smem} B > sm_{capability}'s {limit} B per block"
    budget = TENSOR_CORE_TILE_REGS if uses_tensor_cores(dtype, capability) else FMA_TILE_REGS
    regs = tile_registers(block_m, block_n, num_warps, head_dim, elem)
    if regs > budget:
        return f"{regs:.0f} tile registers per thread > {budget} (it would spill)"
    if uses_tensor_cores(dtype, capability) and \
            (head_dim, (block_m, block_n, num_warps, num_stages)) in SPILLED_IN_REPORT.get(capability, ()):
        return f"spilled on sm_{capability} in the kernel report (it would spill)"
    return None


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
