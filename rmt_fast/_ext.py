"""The compiled extension ``rmt_fast._C``, imported if it can be, and pure-torch twins of its ops.

Three ops live in ``torch.ops.rmt_fast`` once ``rmt_fast._C`` is loaded (docs/EXTENSION.md). Each
comes here three ways, with one signature:

- ``<op>_op``: calls ``torch.ops.rmt_fast.<op>``; raises if the extension is not loaded.
- ``<op>_torch``: plain torch with the same semantics, checks and messages; never synchronises with
  the host on CUDA, so it can be captured in a CUDA graph too.
- ``<op>``: the op where the extension supports the tensors' device, else the torch twin.

``import rmt_fast._ext`` never fails: if ``rmt_fast._C`` cannot be loaded it warns once (set
``RMT_FAST_EXT_VERBOSE=1`` for the traceback) and ``why_unavailable()`` says why.
"""
from __future__ import annotations

import importlib
import math
import os
import traceback
import warnings

import torch
import torch.nn.functional as F

__all__ = [
    "available", "why_unavailable", "built_with_cuda", "info",
    "segment_embed", "segment_embed_op", "segment_embed_torch",
    "memory_write", "memory_write_op", "memory_write_torch",
    "memory_reset", "memory_reset_op", "memory_reset_torch",
    "attention", "attention_op", "attention_torch", "attention_why_unavailable",
]

_C = None
_REASON: str | None = None


def _load() -> None:
    global _C, _REASON
    rebuild = "rebuild it with `pip install --no-build-isolation -e .`"
    details = ""
    try:
        module = importlib.import_module(f"{__package__}._C")  # registers torch.ops.rmt_fast.*
    except ModuleNotFoundError as exc:
        if exc.name == f"{__package__}._C":
            _REASON = ("rmt_fast._C is not built (build it with `pip install --no-build-isolation -e .`;"
                       " RMT_FAST_SKIP_EXT=1 skips it)")
        else:
            _REASON = f"rmt_fast._C failed to import: {exc!r}"
        details = traceback.format_exc()
    except (ImportError, OSError) as exc:
        _REASON = (f"rmt_fast._C failed to load ({type(exc).__name__}: {exc}); it was probably built "
                   f"against another torch than this {torch.__version__}: {rebuild}")
        details = traceback.format_exc()
    except Exception as exc:  # a failing static initialiser must not break `import rmt_fast`
        _REASON = f"rmt_fast._C failed to load ({type(exc).__name__}: {exc})"
        details = traceback.format_exc()
    else:
        built_for = getattr(module, "TORCH_VERSION", "?")
        if built_for != torch.__version__.split("+")[0]:
            _REASON = (f"rmt_fast._C was built for torch {built_for} but torch {torch.__version__} is "
                       f"installed: {rebuild}")
        elif not hasattr(torch.ops.rmt_fast, "segment_embed"):
            _REASON = "rmt_fast._C loaded but registered no ops in torch.ops.rmt_fast"
        else:
            _C = module
            return
    message = f"{_REASON}. Using the pure-torch paths instead."
    if os.environ.get("RMT_FAST_EXT_VERBOSE") == "1":
        message += "\n" + (details or f"(imported from {module.__file__})")
    else:
        message += " Set RMT_FAST_EXT_VERBOSE=1 for details."
    warnings.warn(message, RuntimeWarning, stacklevel=2)


_load()


def available() -> bool:
    """True when rmt_fast._C is loaded and its ops are registered."""
    return _C is not None


def built_with_cuda() -> bool:
    """True when the loaded rmt_fast._C holds the CUDA kernels."""
    return _C is not None and bool(_C.WITH_CUDA)


def why_unavailable(device: torch.device | str | None = None) -> str | None:
    """Why the ops cannot run (on ``device``, if given), or None when they can."""
    if _C is None:
        return _REASON
    if device is None:
        return None
    kind = torch.device(device).type
    if kind == "cpu" or (kind == "cuda" and built_with_cuda()):
        return None
    if kind == "cuda":
        return "rmt_fast._C was built without CUDA kernels (torch was a CPU build or nvcc was missing)"
    return f"rmt_fast._C has no kernels for device type {kind!r}"


def info() -> dict:
    """What was built, for `rmt-fast info`."""
    return {
        "available": available(),
        "reason": _REASON,
        "built_with_cuda": built_with_cuda(),
        "built_for_torch": getattr(_C, "TORCH_VERSION", None),
        "path": getattr(_C, "__file__", None),
    }


def _require() -> None:
    if _C is None:
        raise RuntimeError(f"rmt_fast._C is not available: {_REASON}")


# --- input checks of the torch twins: the same rules and messages as csrc/ops.cpp ------------------

_HALF_OR_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
_FLOATING = _HALF_OR_FLOAT + (torch.float64,)


def _fail(op: str, message: str):
    raise RuntimeError(f"rmt_fast::{op}: {message}")


def _check_dim(op, name, x, dim):
    if x.dim() != dim:
        _fail(op, f"{name} must be {dim}-D, got shape {list(x.shape)}")


def _check_dtype(op, name, x, dtype):
    if x.dtype != dtype:
        _fail(op, f"{name} must be {dtype}, got {x.dtype}")


def _check_shape(op, name, x, names, shape):
    if tuple(x.shape) != tuple(shape):
        _fail(op, f"{name} must have shape ({names}) = {list(shape)}, got {list(x.shape)}")


def _check_devices(op, ref_name, ref, **tensors):
    for name, x in tensors.items():
        if x.device != ref.device:
            _fail(op, f"{name} is on {x.device} but {ref_name} is on {ref.device}; "
                      "all tensors must be on one device")


def _check_segment_embed(ids, memory, word_emb, pos_emb, type_emb0, ln_weight, ln_bias, eps, out):
    op = "segment_embed"
    _check_dim(op, "ids", ids, 2)
    _check_dtype(op, "ids", ids, torch.int64)
    _check_dim(op, "word_emb", word_emb, 2)
    _check_dim(op, "memory", memory, 3)
    (B, T), (V, H), M = ids.shape, word_emb.shape, memory.shape[1]
    if H < 1:
        _fail(op, f"hidden size H = word_emb.size(1) must be >= 1, got {H}")
    _check_shape(op, "memory", memory, "B, M, H", (B, M, H))
    _check_dtype(op, "memory", memory, torch.float32)
    _check_dim(op, "pos_emb", pos_emb, 2)
    if pos_emb.shape[1] != H:
        _fail(op, f"pos_emb must have shape (P, H) with H = {H}, got {list(pos_emb.shape)}")
    if pos_emb.shape[0] < T:
        _fail(op, f"pos_emb has P = {pos_emb.shape[0]} positions but the segment has T = {T} rows "
                  "(need P >= T)")
    for name, x in (("type_emb0", type_emb0), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        _check_shape(op, name, x, "H", (H,))
    if word_emb.dtype not in _HALF_OR_FLOAT:
        _fail(op, f"word_emb must be float32, bfloat16 or float16, got {word_emb.dtype}")
    for name, x in (("pos_emb", pos_emb), ("type_emb0", type_emb0), ("ln_weight", ln_weight),
                    ("ln_bias", ln_bias)):
        _check_dtype(op, name, x, word_emb.dtype)
    _check_shape(op, "out", out, "B, T, H", (B, T, H))
    if out.dtype not in _HALF_OR_FLOAT:
        _fail(op, f"out must be float32, bfloat16 or float16, got {out.dtype}")
    if not out.is_contiguous():
        _fail(op, f"out must be contiguous (it is written in place), got strides {list(out.stride())}")
    if not eps >= 0:
        _fail(op, f"eps must be >= 0, got {eps}")
    _check_devices(op, "out", out, ids=ids, memory=memory, word_emb=word_emb, pos_emb=pos_emb,
                   type_emb0=type_emb0, ln_weight=ln_weight, ln_bias=ln_bias)
    return B, T, M, H, V


def _check_state(op, state):
    _check_dim(op, "state", state, 3)
    _check_dtype(op, "state", state, torch.float32)
    if not state.is_contiguous():
        _fail(op, f"state must be contiguous (it is written in place), got strides "
                  f"{list(state.stride())}")


def _check_memory_write(state, hidden, row_offset, slots):
    op = "memory_write"
    _check_state(op, state)
    _check_dim(op, "slots", slots, 1)
    _check_dtype(op, "slots", slots, torch.int64)
    _check_dim(op, "hidden", hidden, 3)
    (S, M, H), B, R = state.shape, slots.shape[0], hidden.shape[1]
    if hidden.shape[0] != B or hidden.shape[2] != H:
        _fail(op, f"hidden must have shape (B, R, H) with B = slots.size(0) = {B} and "
                  f"H = state.size(2) = {H}, got {list(hidden.shape)}")
    if hidden.dtype not in _FLOATING:
        _fail(op, f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if not (row_offset >= 0 and row_offset + M <= R):
        _fail(op, f"rows row_offset .. row_offset + M - 1 = {row_offset} .. {row_offset + M - 1} "
                  f"must lie within hidden's R = {R} rows")
    _check_devices(op, "state", state, hidden=hidden, slots=slots)
    return S, M, H, B, R


def _check_memory_reset(state, init, reset):
    op = "memory_reset"
    _check_state(op, state)
    S, M, H = state.shape
    _check_shape(op, "init", init, "M, H", (M, H))
    if init.dtype not in _FLOATING:
        _fail(op, f"init must be float32, bfloat16, float16 or float64, got {init.dtype}")
    _check_shape(op, "reset", reset, "S", (S,))
    _check_dtype(op, "reset", reset, torch.bool)
    _check_devices(op, "state", state, init=init, reset=reset)
    return S, M, H


# --- segment_embed --------------------------------------------------------------------------------

def segment_embed_torch(ids, memory, word_emb, pos_emb, type_emb0, ln_weight, ln_bias, eps, out):
    """BERT's embedding of one segment per row with the RMT memory injected as word embeddings.

    ids: (B, T) int64; memory: (B, M, H) float32; word_emb: (V, H); pos_emb: (P >= T, H);
    type_emb0, ln_weight, ln_bias: (H,), all four tables and the two LayerNorm vectors of one dtype
    (float32, bfloat16 or float16); out: (B, T, H) float32/bfloat16/float16, contiguous.
    Row t of segment b: e = (memory[b, t-1] if 1 <= t <= M else word_emb[ids[b, t]]) + pos_emb[t]
    + type_emb0, then LayerNorm over H in float32 (biased variance, eps inside the square root),
    cast to out's dtype. ids at the memory rows are never read; every other id must lie in [0, V)
    (checked on the CPU; on CUDA the gather's device-side assert fires). Writes out; returns out.
    """
    B, T, M, H, V = _check_segment_embed(ids, memory, word_emb, pos_emb, type_emb0, ln_weight,
                                         ln_bias, eps, out)
    m = max(0, min(M, T - 1))  # memory rows present in this segment: 1 .. m
    gather = ids
    if m:
        gather = ids.clone()
        gather[:, 1:1 + m] = 0  # never read, whatever they hold
    if ids.device.type == "cpu" and gather.numel():
        bad = (gather < 0) | (gather >= V)
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            _fail("segment_embed", f"ids[{b}, {t}] = {int(ids[b, t])} is out of range for word_emb "
                                   f"with V = {V} rows")
    e = F.embedding(gather, word_emb).float()  # [B, T, H]
    if m:
        e[:, 1:1 + m] = memory[:, :m]
    e = e + pos_emb[:T].float() + type_emb0.float()
    out.copy_(F.layer_norm(e, (H,), ln_weight.float(), ln_bias.float(), eps))
    return out


def segment_embed_op(ids, memory, word_emb, pos_emb, type_emb0, ln_weight, ln_bias, eps, out):
    """segment_embed through torch.ops.rmt_fast (see segment_embed_torch for the semantics)."""
    _require()
    torch.ops.rmt_fast.segment_embed(ids, memory, word_emb, pos_emb, type_emb0, ln_weight, ln_bias,
                                     float(eps), out)
    return out


def segment_embed(ids, memory, word_emb, pos_emb, type_emb0, ln_weight, ln_bias, eps, out):
    """segment_embed by the extension where it runs on out's device, else by plain torch."""
    impl = segment_embed_op if why_unavailable(out.device) is None else segment_embed_torch
    return impl(ids, memory, word_emb, pos_emb, type_emb0, ln_weight, ln_bias, eps, out)


# --- memory_write ---------------------------------------------------------------------------------

def memory_write_torch(state, hidden, row_offset, slots):
    """state[slots[b]] = hidden[b, row_offset:row_offset + M].float() for every b with slots[b] >= 0.

    state: (S, M, H) float32, contiguous, written in place; hidden: (B, R, H) float32/bfloat16/
    float16/float64, any strides; row_offset: int with row_offset + M <= R; slots: (B,) int64, a
    negative entry meaning "this row writes nothing" (that slot keeps its memory). Non-negative slots
    must be < S and distinct (checked on the CPU; on CUDA an out-of-range slot trips a device-side
    assert and duplicates leave either row's values). Returns None.
    """
    S, M, H, B, _ = _check_memory_write(state, hidden, row_offset, slots)
    if slots.device.type == "cpu":
        writer = {}
        for b, s in enumerate(slots.tolist()):
            if s < 0:
                continue
            if s >= S:
                _fail("memory_write", f"slots[{b}] = {s} is out of range for state with S = {S} slots")
            if s in writer:
                _fail("memory_write", f"slots[{writer[s]}] and slots[{b}] both write slot {s}; each "
                                      "slot may be written by one row only")
            writer[s] = b
    if B == 0 or M * H == 0:
        return
    rows = hidden[:, row_offset:row_offset + M].float()  # [B, M, H]
    # owner[s] = the row that writes slot s, or -1; negative slots scatter into a spare entry S.
    # Built on the device so that nothing here waits for the host.
    target = torch.where(slots >= 0, slots, S)
    owner = torch.full((S + 1,), -1, dtype=torch.int64, device=slots.device)
    owner.scatter_(0, target, torch.arange(B, device=slots.device))
    owner = owner[:S]
    state.copy_(torch.where((owner >= 0)[:, None, None], rows[owner.clamp(min=0)], state))


def memory_write_op(state, hidden, row_offset, slots):
    """memory_write through torch.ops.rmt_fast (see memory_write_torch for the semantics)."""
    _require()
    torch.ops.rmt_fast.memory_write(state, hidden, int(row_offset), slots)


def memory_write(state, hidden, row_offset, slots):
    """memory_write by the extension where it runs on state's device, else by plain torch."""
    impl = memory_write_op if why_unavailable(state.device) is None else memory_write_torch
    impl(state, hidden, row_offset, slots)


# --- memory_reset ---------------------------------------------------------------------------------

def memory_reset_torch(state, init, reset):
    """state[s] = init (cast to float32) for every s with reset[s].

    state: (S, M, H) float32, contiguous, written in place; init: (M, H) float32/bfloat16/float16/
    float64; reset: (S,) bool. Returns None.
    """
    _check_memory_reset(state, init, reset)
    state.copy_(torch.where(reset[:, None, None], init.float(), state))


def memory_reset_op(state, init, reset):
    """memory_reset through torch.ops.rmt_fast (see memory_reset_torch for the semantics)."""
    _require()
    torch.ops.rmt_fast.memory_reset(state, init, reset)


def memory_reset(state, init, reset):
    """memory_reset by the extension where it runs on state's device, else by plain torch."""
    impl = memory_reset_op if why_unavailable(state.device) is None else memory_reset_torch
    impl(state, init, reset)


# --- attention ------------------------------------------------------------------------------------

def attention_why_unavailable(device: torch.device | str | None = None) -> str | None:
    """Why torch.ops.rmt_fast.attention cannot run (on ``device``, if given), or None when it can.

    The op has a CPU kernel only; a rmt_fast._C built before the op existed lacks it.
    """
    if _C is None:
        return _REASON
    if not hasattr(torch.ops.rmt_fast, "attention"):
        return ("rmt_fast._C was built without the attention op (an older build): rebuild it with "
                "`pip install --no-build-isolation -e .`")
    if device is not None and torch.device(device).type != "cpu":
        return f"the attention op has a CPU kernel only, not {torch.device(device).type.upper()} tensors"
    return None


def attention_torch(q, k, v, key_lengths=None, scale=None):
    """softmax(scale * q k^T + key padding mask) v in float32, as torch.ops.rmt_fast.attention.

    q: (B, Tq, heads, D); k, v: (B, Tk, heads, D), one dtype (float32, bfloat16 or float16), any
    strides; key_lengths: None or (B,) int64, keys at positions >= key_lengths[b] masked, a row with
    no key gives zeros; scale: float (None: 1/sqrt(D)). Returns (B, Tq, heads * D) contiguous in q's
    dtype.
    """
    B, Tq, Hh, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qh, kh, vh = (x.float().transpose(1, 2) for x in (q, k, v))               # [B, Hh, T, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale                   # [B, Hh, Tq, Tk]
    if key_lengths is not None:
        mask = torch.arange(k.shape[1], device=q.device)[None, :] < key_lengths[:, None]
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    out = torch.matmul(probs, vh).transpose(1, 2).reshape(B, Tq, Hh * D)
    return out.to(q.dtype).contiguous()


def attention_op(q, k, v, key_lengths=None, scale=None):
    """attention through torch.ops.rmt_fast (see attention_torch for the semantics)."""
    reason = attention_why_unavailable()
    if reason is not None:
        raise RuntimeError(f"rmt_fast.attention is not available: {reason}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return torch.ops.rmt_fast.attention(q, k, v, key_lengths, scale)


def attention(q, k, v, key_lengths=None, scale=None):
    """attention by the extension where it runs on q's device (the CPU), else by plain torch."""
    impl = attention_op if attention_why_unavailable(q.device) is None else attention_torch
    return impl(q, k, v, key_lengths, scale)
