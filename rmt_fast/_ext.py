"""The custom ops of the segment loop, ``torch.ops.rmt_fast.*``, defined once here with torch.library.

- ``segment_embed``, ``memory_write`` and ``attention``: the schemas are in ``SCHEMAS`` below, and
  nowhere else. The compiled ``rmt_fast._C`` (csrc/, docs/EXTENSION.md) registers the CPU, CUDA and
  Meta kernels; where it is not built (or has no kernel for a device) the pure-torch twins (_ext_twins.py) are
  registered as the ops' implementations instead. Callers call one op either way.
- The compiled kernels check their inputs in C++ (csrc/ops.cpp); the twins (_ext_twins.py) check theirs themselves
  (``_check_args``, one table of shapes and dtypes per op) with messages of the same form.
- ``segment_embed(...)`` returns ``out`` (the op itself returns nothing: a custom op must not return an
  alias of an argument it mutates); ``memory_write(...)`` returns None; ``attention(...)`` a new tensor.

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

from ._ext_twins import (INT8_ACTIVATIONS, attention_torch, int8_dequantize_torch, int8_linear_torch,  # noqa: F401
                         int8_linear_vnni_torch, int8_quantize_rows_torch, int8_quantize_rows_asym_torch,
                         attention_int8_torch, memory_write_torch, segment_embed_torch)

__all__ = [
    "available", "why_unavailable", "built_with_cuda", "info", "SCHEMAS",
    "segment_embed", "segment_embed_torch", "memory_write", "memory_write_torch",
    "attention", "attention_op", "attention_torch", "attention_why_unavailable",
    "INT8_SCHEMAS", "int8_quantize_rows", "int8_quantize_rows_torch", "int8_quantize_rows_asym",
    "int8_quantize_rows_asym_torch", "int8_dequantize", "int8_dequantize_torch",
    "int8_linear", "int8_linear_torch", "int8_linear_vnni", "int8_linear_vnni_torch", "int8_kernels_compiled",
    "int8_vnni_compiled", "attention_int8", "attention_int8_torch",
]

SCHEMAS = {
    "segment_embed": "segment_embed(Tensor ids, Tensor memory, Tensor word_emb, Tensor pos_emb, "
                     "Tensor type_emb0, Tensor ln_weight, Tensor ln_bias, float eps, Tensor(a!) out) -> ()",
    "memory_write": "memory_write(Tensor(a!) state, Tensor hidden, int row_offset, Tensor slots) -> ()",
    # a new tensor (B, Tq, heads * D), contiguous, in q's dtype
    "attention": "attention(Tensor q, Tensor k, Tensor v, Tensor? key_lengths, float scale) -> Tensor",
}

# The passes around the int8 GEMM of engine/quant.py (csrc/cpu/int8.cpp; CPU kernels only, the twins
# elsewhere and where _C is missing). Kept apart from SCHEMAS, the segment loop's ops.
INT8_SCHEMAS = {
    # x [R, K] -> (q [R, K] int8, scale [R, 1] float32): symmetric per row, round half to even
    "int8_quantize_rows": "int8_quantize_rows(Tensor x) -> (Tensor, Tensor)",
    # x [R, K] -> (q [R, K] int8, scale [R, 1] float32, zero [R, 1] int32): asymmetric per row,
    # x ~ scale * (q - zero)
    "int8_quantize_rows_asym": "int8_quantize_rows_asym(Tensor x) -> (Tensor, Tensor, Tensor)",
    # out [R, N] = act((acc - row_zero * col_sum) * row_scale * col_scale + bias), act 'none', 'gelu' (erf)
    # or 'relu'; row_zero [R] and col_sum [N] int32 (the weight's column sums) for asymmetric rows only
    "int8_dequantize": "int8_dequantize(Tensor acc, Tensor row_scale, Tensor col_scale, Tensor bias, "
                       "str activation, Tensor(a!) out, Tensor? row_zero=None, Tensor? col_sum=None) -> ()",
    # out [R, N] = quantize, torch._int_mm (qweight_t [K, N] int8), dequantize, per block of row_block rows;
    # asymmetric rows where col_sum [N] int32 (qweight_t's column sums) is given
    "int8_linear": "int8_linear(Tensor x, Tensor qweight_t, Tensor weight_scale, Tensor bias, str activation, "
                   "int row_block, Tensor(a!) out, Tensor? col_sum=None) -> ()",
    # the same as int8_linear on oneDNN's u8 x s8 micro-kernel: packed [Np/64, Kp/4, 64, 4] int8 (quant.pack_vnni),
    # comp [N] int32 = 128 * the weight's column sums (csrc/cpu/int8_vnni.cpp); asymmetric rows where col_sum is given
    "int8_linear_vnni": "int8_linear_vnni(Tensor x, Tensor packed, Tensor comp, Tensor weight_scale, Tensor bias, "
                        "str activation, int row_block, Tensor(a!) out, Tensor? col_sum=None) -> ()",
    # attention with int8 q, k, v and uint8 probabilities on the same micro-kernel (csrc/cpu/attention_int8.cpp)
    "attention_int8": "attention_int8(Tensor q, Tensor k, Tensor v, Tensor? key_lengths, float scale) -> Tensor",
}
def _segment_embed_twin_kernel(*args) -> None:  # the schema returns nothing
    segment_embed_torch(*args)


_TWINS = {"segment_embed": _segment_embed_twin_kernel, "memory_write": memory_write_torch,
          "attention": attention_torch, "int8_quantize_rows": int8_quantize_rows_torch,
          "int8_quantize_rows_asym": int8_quantize_rows_asym_torch,
          "int8_dequantize": int8_dequantize_torch, "int8_linear": int8_linear_torch,
          "int8_linear_vnni": int8_linear_vnni_torch, "attention_int8": attention_int8_torch}


# --- loading rmt_fast._C and registering the twins where it has no kernel -------------------------

_C = None
_REASON: str | None = None
_ATTENTION_REASON: str | None = None
_INT8_COMPILED = False
_INT8_VNNI_COMPILED = False
_INT8_PASSES = ("int8_quantize_rows", "int8_quantize_rows_asym", "int8_dequantize", "int8_linear")    # int8_kernels_compiled()


def _load() -> None:
    global _C, _REASON
    rebuild = "rebuild it with `pip install --no-build-isolation -e .`"
    details = ""
    try:
        module = importlib.import_module(f"{__package__}._C")  # registers the kernels
    except ModuleNotFoundError as exc:
        if exc.name == f"{__package__}._C":
            _REASON = ("rmt_fast._C is not built (build it with `pip install --no-build-isolation -e .`;"
                       " RMT_FAST_SKIP_EXT=1 skips it)")
        else:
            _REASON = f"rmt_fast._C failed to import: {exc!r}"
        details = traceback.format_exc()
    except (ImportError, OSError) as exc:
        _REASON = (f"rmt_fast._C failed to load ({type(exc).__name__}: {exc}); it was probably built "
                   f"against another torch than this {torch.__version__}, or from older sources: {rebuild}")
        details = traceback.format_exc()
    except Exception as exc:  # a failing static initialiser must not break `import rmt_fast`
        _REASON = f"rmt_fast._C failed to load ({type(exc).__name__}: {exc}); {rebuild}"
        details = traceback.format_exc()
    else:
        built_for = getattr(module, "TORCH_VERSION", "?")
        if built_for != torch.__version__.split("+")[0]:
            _REASON = (f"rmt_fast._C was built for torch {built_for} but torch {torch.__version__} is "
                       f"installed: {rebuild}")
        elif not _has_kernel("segment_embed", "CPU"):
            _REASON = "rmt_fast._C loaded but registered no kernels for torch.ops.rmt_fast"
        else:
            _C = module
            return
    message = f"{_REASON}. Using the pure-torch paths instead."
    if os.environ.get("RMT_FAST_EXT_VERBOSE") == "1":
        message += "\n" + (details or f"(imported from {module.__file__})")
    else:
        message += " Set RMT_FAST_EXT_VERBOSE=1 for details."
    warnings.warn(message, RuntimeWarning, stacklevel=2)


def _has_kernel(name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rmt_fast::{name}", key)


def _register_twins() -> None:
    """The twins implement each op on every device (and Meta) the compiled library does not cover."""
    global _ATTENTION_REASON, _INT8_COMPILED, _INT8_VNNI_COMPILED
    attention_compiled = _C is not None and _has_kernel("attention", "CPU")
    _INT8_COMPILED = _C is not None and all(_has_kernel(n, "CPU") for n in _INT8_PASSES)
    _INT8_VNNI_COMPILED = _C is not None and all(_has_kernel(n, "CPU") for n in ("int8_linear_vnni", "attention_int8"))
    for name, twin in _TWINS.items():
        for key in ("CPU", "CUDA", "Meta"):
            if _C is None or not _has_kernel(name, key):
                _LIB.impl(name, twin, key)
    if _C is None:
        _ATTENTION_REASON = _REASON
    elif not attention_compiled:
        _ATTENTION_REASON = ("rmt_fast._C was built without the attention op (an older build): rebuild "
                             "it with `pip install --no-build-isolation -e .`")


def _define_ops() -> None:
    """Define each op from SCHEMAS, after rmt_fast._C has registered its kernels (the dispatcher takes
    kernels before the schema). A stale _C, built before the schemas moved here, defines them itself
    (TORCH_LIBRARY): they are then left as they are, with a warning to rebuild."""
    stale = []
    for name, schema in {**SCHEMAS, **INT8_SCHEMAS}.items():
        try:
            defined = torch._C._dispatch_find_schema_or_throw(f"rmt_fast::{name}", "").schema()
        except RuntimeError:
            _LIB.define(schema)
            continue
        stale.append(name if str(defined) == f"rmt_fast::{schema}" else f"{name} (as {defined})")
    if stale:
        warnings.warn(f"rmt_fast._C was built from older sources: it defines {', '.join(stale)} itself; "
                      "rebuild it with `pip install --no-build-isolation -e .`", RuntimeWarning, stacklevel=3)


_LIB = torch.library.Library("rmt_fast", "FRAGMENT")  # kept alive for the process: it owns the ops
_load()
_define_ops()
_register_twins()


def available() -> bool:
    """True when rmt_fast._C is loaded and its kernels are registered."""
    return _C is not None


def built_with_cuda() -> bool:
    """True when the loaded rmt_fast._C holds the CUDA kernels."""
    return _C is not None and bool(_C.WITH_CUDA)


def why_unavailable(device: torch.device | str | None = None) -> str | None:
    """Why the compiled kernels cannot run (on ``device``, if given), or None when they can."""
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


# --- the calls ------------------------------------------------------------------------------------

def segment_embed(ids, memory, word_emb, pos_emb, type_emb0, ln_weight, ln_bias, eps, out):
    """torch.ops.rmt_fast.segment_embed (semantics: segment_embed_torch); returns out."""
    torch.ops.rmt_fast.segment_embed(ids, memory, word_emb, pos_emb, type_emb0, ln_weight, ln_bias,
                                     float(eps), out)
    return out


def memory_write(state, hidden, row_offset, slots):
    """torch.ops.rmt_fast.memory_write (semantics: memory_write_torch); returns None."""
    torch.ops.rmt_fast.memory_write(state, hidden, int(row_offset), slots)


def attention(q, k, v, key_lengths=None, scale=None):
    """torch.ops.rmt_fast.attention (semantics: attention_torch); scale None means 1/sqrt(D)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return torch.ops.rmt_fast.attention(q, k, v, key_lengths, scale)


def attention_why_unavailable(device: torch.device | str | None = None) -> str | None:
    """Why the compiled attention kernel cannot run (on ``device``, if given), or None when it can.

    The op has a compiled CPU kernel only (elsewhere the twin implements it); a rmt_fast._C built
    before the op existed lacks it.
    """
    if _ATTENTION_REASON is not None:
        return _ATTENTION_REASON
    if device is not None and torch.device(device).type != "cpu":
        return f"the attention op has a CPU kernel only, not {torch.device(device).type.upper()} tensors"
    return None


def attention_op(q, k, v, key_lengths=None, scale=None):
    """The compiled attention kernel (the backend 'cpp'); raises where it is not built."""
    reason = attention_why_unavailable(q.device)
    if reason is not None:
        raise RuntimeError(f"rmt_fast.attention is not available: {reason}")
    return attention(q, k, v, key_lengths, scale)


def int8_quantize_rows(x):
    """torch.ops.rmt_fast.int8_quantize_rows (semantics: int8_quantize_rows_torch): (q, scale)."""
    return torch.ops.rmt_fast.int8_quantize_rows(x)


def int8_quantize_rows_asym(x):
    """torch.ops.rmt_fast.int8_quantize_rows_asym (semantics: int8_quantize_rows_asym_torch): (q, scale, zero)."""
    return torch.ops.rmt_fast.int8_quantize_rows_asym(x)


def int8_dequantize(acc, row_scale, col_scale, bias, activation, out, row_zero=None, col_sum=None):
    """torch.ops.rmt_fast.int8_dequantize (semantics: int8_dequantize_torch); returns out."""
    torch.ops.rmt_fast.int8_dequantize(acc, row_scale, col_scale, bias, activation, out, row_zero, col_sum)
    return out


def int8_linear(x, qweight_t, weight_scale, bias, activation, row_block, out, col_sum=None):
    """torch.ops.rmt_fast.int8_linear (semantics: int8_linear_torch); returns out."""
    torch.ops.rmt_fast.int8_linear(x, qweight_t, weight_scale, bias, activation, int(row_block), out, col_sum)
    return out


def int8_linear_vnni(x, packed, comp, weight_scale, bias, activation, row_block, out, col_sum=None):
    """torch.ops.rmt_fast.int8_linear_vnni (semantics: int8_linear_vnni_torch); returns out."""
    torch.ops.rmt_fast.int8_linear_vnni(x, packed, comp, weight_scale, bias, activation, int(row_block), out,
                                        col_sum)
    return out


def attention_int8(q, k, v, key_lengths=None, scale=None):
    """torch.ops.rmt_fast.attention_int8 (semantics: attention_int8_torch); scale None means 1/sqrt(D)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return torch.ops.rmt_fast.attention_int8(q, k, v, key_lengths, scale)


def int8_vnni_compiled() -> bool:
    """True when int8_linear_vnni and attention_int8 have their compiled CPU kernels (oneDNN's u8 x s8
    micro-kernel)."""
    return _INT8_VNNI_COMPILED


def int8_kernels_compiled() -> bool:
    """True when the int8 passes run the compiled CPU kernels (else the torch twins)."""
    return _INT8_COMPILED
