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
import os
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import device_policy

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


# Triton's README lists "NVIDIA GPUs (Compute Capability 8.0+)" as its supported hardware (section
# "Compatibility", since triton-lang/triton PR #5066, Nov 2024, which dropped pre-Ampere MMA for an FMA
# fallback). The installed Triton 3.9 agrees in code: backends/nvidia/compiler.py pipelines loads and
# uses tensor-core MMA only for capability 8.x and up (make_ttgir), and torch's own Triton gate is
# only >= 7.0 (torch/utils/_triton.py), which is not a promise from Triton. Below 8.0 the kernel would
# run its dots on FMA units untuned and untested (and bfloat16 not at all): not chosen there.
TRITON_MIN_CAPABILITY = (8, 0)


def cuda_why_not(name: str, dtype: torch.dtype, capability: Tuple[int, int], head_dim: int,
                 arch_list=None) -> Optional[str]:
    """Why backend ``name`` cannot run ``dtype`` attention on a GPU of ``capability`` (None: it can).

    Decided from the device and the installed libraries alone (no tensors), so a table of GPUs can be
    checked without one; ``why_not`` asks this first for CUDA inputs, then the backend's own checks.
    """
    sm = device_policy.sm_name(capability)
    reason = device_policy.torch_why_not(capability, arch_list)
    if reason:
        return reason
    if name == "cpp":
        return "the cpp backend runs on the CPU only, not on CUDA tensors"
    if dtype == torch.bfloat16 and tuple(capability) < device_policy.BF16_MIN_CAPABILITY:
        return f"{sm} has no native bfloat16 (compute capability 8.0+ needed)"
    if name == "triton":
        if tuple(capability) < TRITON_MIN_CAPABILITY:
            version = _triton_version()
            return (f"Triton{' ' + version if version else ''} supports NVIDIA GPUs of compute capability 8.0+ "
                    f"(its README), not {sm}")
        from ..kernels.attention import SUPPORTED_HEAD_DIMS
        if head_dim not in SUPPORTED_HEAD_DIMS:
            return f"head_dim {head_dim} is not supported (only {', '.join(map(str, SUPPORTED_HEAD_DIMS))})"
    return None


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__


def cuda_choice(dtype: torch.dtype, capability: Tuple[int, int], head_dim: int, arch_list=None):
    """(backend auto picks, {backend passed over: why}) on a GPU of ``capability``; (None, ...) if none can."""
    passed = {}
    for name in cuda_priority(dtype, capability):
        reason = cuda_why_not(name, dtype, capability, head_dim, arch_list)
        if reason is None:
            return name, passed
        passed[name] = reason
    return None, passed


def _capability(device: torch.device) -> Optional[Tuple[int, int]]:
    """The GPU's compute capability; None where torch cannot say (a CPU build: the backends' own checks
    then give the reason)."""
    try:
        return tuple(torch.cuda.get_device_capability(device))
    except (AssertionError, RuntimeError):
        return None


def why_not(name: str, q, k, v, key_lengths=None) -> Optional[str]:
    if name not in _IMPLS:
        return f"unknown attention backend {name!r}; choose from {BACKENDS} or 'auto'"
    capability = _capability(q.device) if q.device.type == "cuda" else None
    if capability is not None:
        reason = cuda_why_not(name, q.dtype, capability, q.shape[-1])
        if reason:
            return reason
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


def describe_auto(device: torch.device, head_dim: int = 64) -> list:
    """Lines for ``rmt-fast info``: the dtype auto picks on ``device``, and auto's attention backend."""
    dtype, why = device_policy.auto_dtype(device)
    if os.environ.get(device_policy.PIN_VAR, "").strip():
        why += f"; but {device_policy.PIN_VAR}={os.environ[device_policy.PIN_VAR].strip()} pins what auto resolves to"
    sm = device_policy.sm_name(torch.cuda.get_device_capability(device)) if device.type == "cuda" else ""
    name = str(device) if device.type == "cpu" else f"{device} ({sm})"
    lines = [f"dtype auto {name}: {str(dtype).replace('torch.', '')} ({why})"]
    if device.type == "cuda":
        chosen, reasons = cuda_choice(dtype, torch.cuda.get_device_capability(device), head_dim)
        passed = "; ".join(f"{k}: {v}" for k, v in reasons.items())
        lines.append(f"attention auto {name}/{str(dtype).replace('torch.', '')}: {chosen}"
                     + (f" (passed over: {passed})" if passed else ""))
    return lines
