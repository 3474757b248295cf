"""Fused Triton attention over RMT's memory-plus-segment block (forward only, non-causal).

Three layers, as in STYLE.md:
  ``_attn_fwd_kernel``  the ``@triton.jit`` kernel: one program per (BLOCK_M query rows, batch, head)
  ``attention_forward`` the launcher: validates, picks block sizes, launches; ``ValueError`` on what it can't run
  ``attention``         the function the engine calls (``why_not`` says beforehand whether it can)

Q, K and V are read in place from the fused QKV projection's output (any batch/time/head strides, the
head_dim stride must be 1) and the output is written as ``[B, Tq, heads * head_dim]``, the layout the
output projection reads. Tq < Tk is the query-subset mode (the last layer reads only the memory rows and
[CLS]). See docs/KERNELS.md for the design and what was tested where.

Importing this module never touches CUDA and works without triton (``why_not`` then says so). Whether the
kernel runs under Triton's interpreter is fixed when this module is imported: TRITON_INTERPRET=1 must be
set before that.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch

from .targets import (FMA_TILE_REGS, SPILLED_IN_REPORT, TARGET_LIMITS, TENSOR_CORE_TILE_REGS,  # noqa: F401
                      TargetLimits, _next_pow2, config_fits, shared_memory_estimate, target_limits, tile_registers,
                      uses_tensor_cores)

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backends still work; why_not() reports it
    triton = None
    tl = None

__all__ = ["attention", "attention_forward", "why_not", "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES"]

SUPPORTED_HEAD_DIMS = (32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
AUTOTUNE_ENV = "RMT_FAST_TRITON_AUTOTUNE"
_LOG2E = 1.4426950408889634
_MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1, which carries batch * heads

if triton is not None:
    # jit() picks the interpreter or the compiler at decoration time, so this is what the kernel really is.
    _INTERPRETED = bool(triton.knobs.runtime.interpret)

    @triton.jit
    def _online_softmax_step(q, k, v, qk_scale, m_i, l_i, acc, valid, MASKED: tl.constexpr,
                             DOT_PRECISION: tl.constexpr):
        """One key block of the online softmax (base 2); MASKED: keys where ``valid`` is False get -inf."""
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if MASKED:
            qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        return m_new, l_i, acc

    # Sizes appear only in bounds and index math, so specialising on them (==1, %16) would only multiply
    # compilations; strides stay specialised, since their divisibility lets loads vectorise.
    @triton.jit(do_not_specialize=["B", "H", "Tq", "Tk"])
    def _attn_fwd_kernel(
        Q, K, V, KL, Out,
        stride_qb, stride_qt, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_ob, stride_ot,
        B, H, Tq, Tk,  # B only keys the autotuner: the grid's axis 1 carries batch * heads
        qk_scale,  # softmax scale * log2(e): the kernel works in base 2
        HEAD_DIM: tl.constexpr,
        HAS_KL: tl.constexpr,  # per-batch key lengths in KL (else all Tk keys are valid)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        EVEN_M: tl.constexpr,  # Tq % BLOCK_M == 0: no query-row masks
        EVEN_N: tl.constexpr,  # no key lengths and Tk % BLOCK_N == 0: no key masks at all
        DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32), None otherwise
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = (pid_bh // H).to(tl.int64)
        off_h = (pid_bh % H).to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)

        q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
        k_base = K + off_b * stride_kb + off_h * stride_kh + offs_d[None, :]
        v_base = V + off_b * stride_vb + off_h * stride_vh + offs_d[None, :]

        if EVEN_M:
            q = tl.load(q_ptrs)  # [BLOCK_M, HEAD_DIM]
        else:
            q = tl.load(q_ptrs, mask=offs_m[:, None] < Tq, other=0.0)

        if HAS_KL:
            kv_len = tl.load(KL + off_b).to(tl.int32)
            kv_len = tl.minimum(tl.maximum(kv_len, 0), Tk)
        else:
            kv_len = Tk

        # Online softmax in float32: running row max m_i, running row sum l_i, unnormalised output acc.
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        # Key blocks that lie wholly inside kv_len need no mask; under EVEN_N that is every block.
        if EVEN_N:
            n_full = Tk
        else:
            n_full = (kv_len // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            rows_n = start_n + offs_n
            k = tl.load(k_base + rows_n[:, None] * stride_kt)  # [BLOCK_N, HEAD_DIM]
            v = tl.load(v_base + rows_n[:, None] * stride_vt)
            m_i, l_i, acc = _online_softmax_step(q, k, v, qk_scale, m_i, l_i, acc, offs_n, False,
                                                 DOT_PRECISION)

        if not EVEN_N:
            # The one partial block, if any; it holds at least one valid key, so m_new stays finite.
            # Masked loads give 0, never the padding's contents (which may be NaN).
            if n_full < kv_len:
                rows_n = n_full + offs_n
                valid = rows_n < kv_len
                k = tl.load(k_base + rows_n[:, None] * stride_kt, mask=valid[:, None], other=0.0)
                v = tl.load(v_base + rows_n[:, None] * stride_vt, mask=valid[:, None], other=0.0)
                m_i, l_i, acc = _online_softmax_step(q, k, v, qk_scale, m_i, l_i, acc, valid, True,
                                                     DOT_PRECISION)

        # A row with no valid key saw no block: acc is 0 and l_i is 0, so it outputs 0, not 0/0.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]

        o_ptrs = Out + off_b * stride_ob + offs_m[:, None] * stride_ot + off_h * HEAD_DIM + offs_d[None, :]
        if EVEN_M:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty))
        else:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < Tq)

    _HEURISTICS = {
        "EVEN_M": lambda a: a["Tq"] % a["BLOCK_M"] == 0,
        "EVEN_N": lambda a: (not a["HAS_KL"]) and a["Tk"] % a["BLOCK_N"] == 0,
    }
    _attn_fwd_fixed = triton.heuristics(_HEURISTICS)(_attn_fwd_kernel)

    # (BLOCK_M, BLOCK_N, num_warps, num_stages). Long query blocks: the neighbourhood of the defaults, as in
    # Triton's fused-attention tutorial. Short ones (subset mode): the smallest BLOCK_M covering Tq. Small:
    # the only tiles that fit the register budget of a dot without tensor cores (float32 "ieee", pre-Ampere).
    _TUNE_LONG = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3),
                  (128, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 4),
                  (128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2)]
    _TUNE_SHORT = [(bm, bn, 4, s) for bm in (16, 32, 64) for bn in (32, 64, 128) for s in (2, 3)]
    _TUNE_SMALL = [(16, 16, 4, 2), (16, 32, 4, 2), (16, 16, 8, 2), (16, 32, 8, 2)]

    def _config_tuple(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)

    def _target_of(named_args):
        """(compute capability as 80/90/..., dtype) of the launch's inputs, or None without a GPU target."""
        q = named_args.get("Q")
        if q is None or _INTERPRETED or not getattr(q, "is_cuda", False):
            return None
        major, minor = torch.cuda.get_device_capability(q.device)
        return 10 * major + minor, q.dtype

    def _prune_configs(configs, named_args, **kwargs):
        """Keep the configs that fit the shape and the GPU's limits: at most 8 are benchmarked per key."""
        target = _target_of(named_args)
        cc, dtype = target if target is not None else (None, None)
        kept_tuples = prune_for_target([_config_tuple(c) for c in configs], named_args["Tq"], named_args["Tk"],
                                       kwargs["HEAD_DIM"], dtype, cc)
        kept = [c for c in configs if _config_tuple(c) in kept_tuples]
        if kept:
            return kept
        cfg = _default_config(named_args["Tq"], _MAX_GRID_Y, kwargs["HEAD_DIM"], None, dtype or torch.float16, cc)
        return [triton.Config({"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}, num_warps=cfg["num_warps"],
                              num_stages=cfg["num_stages"])]

    # Keyed on (Tk, head_dim) as issue 3 asks, plus Tq: subset mode (Tq = M + 1) and full blocks want
    # different BLOCK_M, and an engine sees only those two Tq per Tk; plus the batch: at batch 1 a block
    # of 512 rows is 4-8 programs per head and occupancy decides, at batch 32 it is not (the engine sees
    # a few widths: its slot count and the powers of two below). The autotuner adds the dtypes itself.
    _attn_fwd_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                 for bm, bn, w, s in dict.fromkeys(_TUNE_LONG + _TUNE_SHORT + _TUNE_SMALL)],
        key=["B", "Tq", "Tk", "HEAD_DIM"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(triton.heuristics(_HEURISTICS)(_attn_fwd_kernel))
else:
    _INTERPRETED = False


def _autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0") == "1" and not _INTERPRETED


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def prune_for_target(configs, tq: int, tk: int, head_dim: int, dtype: Optional[torch.dtype] = None,
                     capability: Optional[int] = None) -> list:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples worth timing for this shape on this target.

    Without a target (``capability`` None: no GPU) only the shape decides, as before.
    """
    bm_fit = max(16, min(128, _next_pow2(tq)))
    bn_max = max(32, min(128, _next_pow2(tk)))
    small = capability is not None and not uses_tensor_cores(dtype, capability)
    kept = []
    for bm, bn, warps, stages in configs:
        if small:
            fits = (bm, bn, warps, stages) in _TUNE_SMALL
        elif bm_fit == 128:
            fits = (bm, bn, warps, stages) in _TUNE_LONG
        else:
            fits = bm == bm_fit and (bm, bn, warps, stages) in _TUNE_SHORT
        if not fits or bn > bn_max:
            continue
        if capability is None:
            fits = not (head_dim == 128 and bm * bn > 128 * 64)  # shape only: the old smem/register guard
        else:
            fits = config_fits(bm, bn, warps, stages, head_dim, dtype, capability) is None
        if fits:
            kept.append((bm, bn, warps, stages))
    return kept[:8]


def _default_config(tq: int, bh: int, head_dim: int, device: Optional[torch.device],
                    dtype: torch.dtype = torch.float16, capability: Optional[int] = None) -> dict:
    """Fixed block sizes when not autotuning (always, under the interpreter).

    On a GPU (or for an explicit ``capability``, as the kernel report asks) the tiles are shrunk until they
    fit the target's register budget and shared memory; without a target only the shape decides.
    """
    on_gpu = device is not None and device.type == "cuda" and not _INTERPRETED
    if capability is None and on_gpu:
        major, minor = torch.cuda.get_device_capability(device)
        capability = 10 * major + minor
    block_n = 64
    block_m = max(16, min(128, _next_pow2(tq)))
    # Few programs (batch 1) leave SMs idle at BLOCK_M=128: halve it to double the programs.
    if block_m == 128 and on_gpu:
        if -(-tq // 128) * bh < _sm_count(device.index if device.index is not None else 0):
            block_m = 64
    num_stages = 2 if head_dim == 128 else 3
    if capability is None:
        num_warps = 8 if (block_m == 128 and head_dim == 128) else 4
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}
    if not uses_tensor_cores(dtype, capability):
        block_m, block_n, num_stages = 16, (32 if head_dim <= 64 else 16), 2
    elem = torch.tensor([], dtype=dtype).element_size()
    limit = target_limits(capability).smem_per_block
    while shared_memory_estimate(block_m, block_n, num_stages, head_dim, elem) > limit and num_stages > 1:
        num_stages -= 1
    # More warps before smaller tiles: a tile that fits in 8 warps keeps its K/V reuse.
    while True:
        num_warps = next((w for w in (4, 8) if config_fits(block_m, block_n, w, num_stages, head_dim, dtype,
                                                           capability) is None), 8)
        if config_fits(block_m, block_n, num_warps, num_stages, head_dim, dtype, capability) is None or block_m == 16:
            break
        block_m //= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}


def why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            key_lengths: Optional[torch.Tensor] = None) -> Optional[str]:
    """None if ``attention`` can run these inputs here, else a short reason it cannot.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads, headdim); key_lengths: (batch,)
    """
    if triton is None:
        return "triton is not installed"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} is not a tensor"
        if t.dim() != 4:
            return f"{name} must be 4-D [batch, seq, heads, head_dim], got shape {tuple(t.shape)}"
    if k.shape != v.shape:
        return f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}"
    b, _, h, d = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, h, d):
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, heads or head_dim"
    if d not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {d} is not supported (only {', '.join(map(str, SUPPORTED_HEAD_DIMS))})"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (only float16, bfloat16, float32)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1:
            return f"{name}'s head_dim stride is {t.stride(3)}, must be 1"
    if k.device != q.device or v.device != q.device:
        return f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}"
    if b * h > _MAX_GRID_Y:
        return f"batch * heads = {b * h} exceeds the launch grid's {_MAX_GRID_Y}"
    if key_lengths is not None:
        if not isinstance(key_lengths, torch.Tensor):
            return "key_lengths must be a tensor or None"
        if key_lengths.dtype not in (torch.int32, torch.int64):
            return f"key_lengths dtype {key_lengths.dtype} is not int32 or int64"
        if tuple(key_lengths.shape) != (b,):
            return f"key_lengths must have shape ({b},), got {tuple(key_lengths.shape)}"
        if key_lengths.device != q.device:
            return f"key_lengths is on {key_lengths.device}, q on {q.device}"
    if not _INTERPRETED:
        if q.device.type != "cuda":
            if not torch.cuda.is_available():
                return "no GPU here and TRITON_INTERPRET was not set when rmt_fast.kernels.attention was imported"
            return f"inputs are on {q.device}; the compiled kernel needs them on a CUDA device"
    return None


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_lengths: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launcher: validate, pick block sizes, launch. Raises ValueError saying what it cannot run."""
    reason = why_not(q, k, v, key_lengths)
    if reason is not None:
        raise ValueError(f"Triton attention cannot run this input: {reason}")
    b, tq, h, d = q.shape
    tk = k.shape[1]
    if out is None:
        out = torch.empty((b, tq, h * d), dtype=q.dtype, device=q.device)
    else:
        if tuple(out.shape) != (b, tq, h * d):
            raise ValueError(f"Triton attention cannot run this input: out must have shape {(b, tq, h * d)}, "
                             f"got {tuple(out.shape)}")
        if out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"Triton attention cannot run this input: out is {out.dtype} on {out.device}, "
                             f"needs {q.dtype} on {q.device}")
        if out.stride(2) != 1:
            raise ValueError("Triton attention cannot run this input: out's last dim stride must be 1")
    if b == 0 or tq == 0:
        return out
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"Triton attention cannot run this input: scale {scale} is not finite")

    has_kl = key_lengths is not None
    if has_kl:
        key_lengths = key_lengths.contiguous()  # the kernel indexes it as a dense (batch,) vector
    args = (
        q, k, v, key_lengths if has_kl else q, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1),
        b, h, tq, tk,
        scale * _LOG2E,
    )
    consts = dict(HEAD_DIM=d, HAS_KL=has_kl, DOT_PRECISION="ieee" if q.dtype == torch.float32 else None)

    # Triton launches on the current device; inputs on another GPU need it switched (a no-op otherwise).
    if q.is_cuda and not _INTERPRETED and q.device.index != torch.cuda.current_device():
        with torch.cuda.device(q.device):
            _launch(args, consts, tq, b * h, d, q.device)
    else:
        _launch(args, consts, tq, b * h, d, q.device)
    return out


def _launch(args: tuple, consts: dict, tq: int, bh: int, head_dim: int, device: torch.device) -> None:
    if _autotune_enabled():
        grid = lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]), bh)  # noqa: E731
        _attn_fwd_tuned[grid](*args, **consts)
    else:
        cfg = _default_config(tq, bh, head_dim, device, args[0].dtype)
        grid = (triton.cdiv(tq, cfg["BLOCK_M"]), bh)
        _attn_fwd_fixed[grid](*args, **consts, **cfg)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_lengths: Optional[torch.Tensor] = None, scale: Optional[float] = None,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Non-causal softmax(q k^T * scale) v over the memory-plus-segment block, fused.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads, headdim), any strides with
       headdim stride 1 (views of the fused QKV output). seqlen_q < seqlen_k is the query-subset mode.
    key_lengths: None (all keys valid) or int32/int64 (batch,) on q's device: keys at positions
       >= key_lengths[b] are ignored. A row with no valid key outputs zeros.
    scale: None means 1/sqrt(headdim).
    out: optional (batch, seqlen_q, nheads * headdim) tensor to write into (last dim stride 1).
    returns out: (batch, seqlen_q, nheads * headdim) in q's dtype; softmax accumulated in float32.
    """
    return attention_forward(q, k, v, key_lengths=key_lengths, scale=scale, out=out)
