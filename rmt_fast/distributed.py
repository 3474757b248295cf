"""torchrun helpers shared by training and evaluation: join the process group, rank, sums across ranks."""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist


def rank_and_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_process_group(device) -> bool:
    """Join the torchrun process group if launched by torchrun; True if this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return True


def all_reduce(values: Sequence[float], device="cpu", op: str = "sum") -> List[float]:
    """Element-wise sum (or max) of ``values`` over the ranks, in float64 (exact for counts < 2**53)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if rank_and_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def destroy_process_group(created: bool) -> None:
    """Leave the process group if ``init_process_group`` created it."""
    if created:
        dist.destroy_process_group()
