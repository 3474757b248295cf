"""Attention backends behind one dispatch point.

Every backend computes softmax(q k^T * scale + key padding mask) v for
q: [B, Tq, heads, D] and k, v: [B, Tk, heads, D] (strided views of a fused projection are fine),
with keys at positions >= key_lengths[b] masked, and returns [B, Tq, heads * D].

- ``sdpa``: torch's scaled_dot_product_attention (flash / memory-efficient kernels on CUDA).
- ``matmul``: the three steps as batched matmuls, the plain statement of the math. On this project's
  CPUs it is slower than SDPA in every dtype (the softmax pass dominates; docs/PERF.md).
- ``triton``: the fused kernel in ``rmt_fast.kernels.attention`` (CUDA, or Triton's interpreter).
- ``cpp``: the fused CPU op ``torch.ops.rmt_fast.attention`` of the compiled extension (blocked
  online softmax, oneDNN/AMX micro-kernel products; docs/EXTENSION.md). CPU tensors only.

Each backend can say why it cannot run an input. ``auto`` picks the first that can, quietly; an
explicitly requested backend that cannot run raises with its reason.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "matmul", "triton", "cpp")


def _padding_mask(key_lengths: Optional[torch.Tensor], Tk: int, device) -> Optional[torch.Tensor]:
    if key_lengths is None:
        return None
    return torch.arange(Tk, device=device)[None, :] < key_lengths[:, None]          # [B, Tk]


def sdpa_attention(q, k, v, key_lengths=None, scale=None):
    B, Tq, Hh, D = q.shape
    mask = _padding_mask(key_lengths, k.shape[1], q.device)
    if mask is not None:
        mask = mask[:, None, None, :]                                                # [B, 1, 1, Tk]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)               # [B, Hh, Tq, D]
    out = out.transpose(1, 2).reshape(B, Tq, Hh * D)
    if key_lengths is not None:
        out = out.masked_fill((key_lengths == 0)[:, None, None], 0)  # a row with no key: zeros, not NaN
    return out


def matmul_attention(q, k, v, key_lengths=None, scale=None):
    B, Tq, Hh, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)             # [B, Hh, T, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2))                                  # [B, Hh, Tq, Tk]
    mask = _padding_mask(key_lengths, k.shape[1], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.mul_(scale), dim=-1)
    if key_lengths is not None:
        probs = probs.nan_to_num_(0.0)
    return torch.matmul(probs, vh).transpose(1, 2).reshape(B, Tq, Hh * D)


def _triton_why_not(q, k, v, key_lengths):
    try:
        from ..kernels.attention import why_not
    except ImportError as e:
        return f"the Triton kernel cannot be imported ({e})"
    return why_not(q, k, v, key_lengths)


def _triton_attention(q, k, v, key_lengths=None, scale=None):
    from ..kernels.attention import attention
    return attention(q, k, v, key_lengths=key_lengths, scale=scale)


def _cpp_why_not(q, k, v, key_lengths):
    from .. import _ext
    reason = _ext.attention_why_unavailable()
    if reason is not None:
        return f"the rmt_fast._C extension is not built: {reason}"
    if q.device.type != "cpu":
        return f"the cpp backend runs on the CPU only, not on {q.device.type.upper()} tensors"
    return _dtype_ok(q)


def _cpp_attention(q, k, v, key_lengths=None, scale=None):
    from .. import _ext
    return _ext.attention_op(q, k, v, key_lengths, scale)


def _dtype_ok(q):
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} is not supported"
    return None


_IMPLS: Dict[str, Callable] = {"sdpa": sdpa_attention, "matmul": matmul_attention, "triton": _triton_attention,
                               "cpp": _cpp_attention}
_WHY_NOT: Dict[str, Callable] = {
    "sdpa": lambda q, k, v, kl: _dtype_ok(q),
    "matmul": lambda q, k, v, kl: _dtype_ok(q),
    "triton": _triton_why_not,
    "cpp": _cpp_why_not,
}


def cuda_priority(dtype: torch.dtype, capability: Tuple[int, int]) -> tuple:
    """``auto``'s order on a CUDA GPU of compute ``capability`` (major, minor).

    float32 is the checking dtype, so exact first: SDPA's memory-efficient kernel computes float32 with
    3xTF32 tensor-core products on sm_80+ (CUTLASS's OpMultiplyAddFastF32) and plain FFMA below, float32
    accuracy either way and whatever ``allow_tf32`` says. The Triton kernel's float32 path (IEEE dots, no
    tensor cores) spills heavily and compiles for seconds per variant (issue 21's report), and ``matmul``
    materialises the scores (and follows ``allow_tf32``). Half types: the Triton kernel is built for the
    tensor cores of sm_80 and newer; below that it spills (or, bf16, cannot run) and SDPA goes first.
    """
    if dtype == torch.float32:
        return ("sdpa", "matmul", "triton")
    if tuple(capability) >= (8, 0):
        return ("triton", "sdpa", "matmul")
    return ("sdpa", "matmul", "triton")


def priority(device: torch.device, dtype: torch.dtype) -> tuple:
    """The order ``auto`` tries backends in, fastest first for this device and dtype (see docs/PERF.md)."""
    if device.type == "cuda":
        return cuda_priority(dtype, torch.cuda.get_device_capability(device))
    # cpp (the fused op) beats SDPA on the CPU in float32 and bfloat16 at 1 and 2 threads
    # (docs/EXTENSION.md, "Fused CPU attention"); without the extension select() moves on to sdpa.
    # float16 runs float32 products with scalar conversions there (no AMX-FP16 here): slower.
    if dtype in (torch.float32, torch.bfloat16):
        return ("cpp", "sdpa", "matmul")
    return ("sdpa", "matmul", "cpp")


def why_not(name: str, q, k, v, key_lengths=None) -> Optional[str]:
    if name not in _IMPLS:
        return f"unknown attention backend {name!r}; choose from {BACKENDS} or 'auto'"
    return _WHY_NOT[name](q, k, v, key_lengths)


def select(requested: str, q, k, v, key_lengths=None) -> str:
    """The backend to use: ``requested`` if it can run (else raise), or for 'auto' the first that can."""
    if requested != "auto":
        reason = why_not(requested, q, k, v, key_lengths)
        if reason:
            raise RuntimeError(f"attention backend {requested!r} cannot run here: {reason}")
        return requested
    reasons = []
    for name in priority(q.device, q.dtype):
        reason = why_not(name, q, k, v, key_lengths)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    raise RuntimeError("no attention backend can run this input: " + "; ".join(reasons))


def attention(name: str, q, k, v, key_lengths=None, scale=None) -> torch.Tensor:
    """Run backend ``name`` (already chosen with ``select``)."""
    return _IMPLS[name](q, k, v, key_lengths=key_lengths, scale=scale)


def available(device: torch.device, dtype: torch.dtype = torch.float32) -> Dict[str, Optional[str]]:
    """For ``rmt-fast info``: each backend and why it cannot run a typical block here (None = it can)."""
    q = torch.zeros(1, 2, 1, 64, device=device, dtype=dtype)
    return {name: why_not(name, q, q, q, None) for name in BACKENDS}
