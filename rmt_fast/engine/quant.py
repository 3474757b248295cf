"""int8 linear layers for the CPU plan: int8 x int8 products accumulated in int32.

- Weights are quantized once, when the plan is built: symmetric, one scale per output channel
  (``w ~ scale_w[n] * q_w[n, k]``, ``q_w`` in [-127, 127]).
- Activations are quantized at run time, one scale per token (row): symmetric in bfloat16 plans,
  ``x ~ scale_x[r] * q_x[r, k]``, and asymmetric in float32 plans, ``x ~ scale_x[r] * (q_x[r, k] - z[r])``
  with 256 levels between the row's min(x, 0) and max(x, 0) (``activation_scheme``; measured, docs/PERF.md).
- ``y[r, n] = scale_x[r] * scale_w[n] * (sum_k q_x[r, k] q_w[n, k] - z[r] * sum_k q_w[n, k]) + bias[n]``:
  the sums are exact (int32), the rest in float32, rounded once to the plan's dtype at the end (after the
  activation, as the bf16 path's fused GELU does).
- Two kernels give the same bits (``INT8_KERNELS``; docs/ARCHITECTURE.md, "int8"): ``vnni``, oneDNN's
  u8 x s8 micro-kernel on a weight packed once (``pack_vnni``), each output tile dequantized in cache
  (csrc/cpu/int8_vnni.cpp), where ``vnni_problem()`` finds it runs; else ``int_mm``, ``torch._int_mm``
  between fused passes (quantize per token; dequantize + scales + bias + GELU/ReLU + cast;
  csrc/cpu/int8.cpp). Where the extension is not built their torch twins run the same arithmetic as
  several torch ops (slower; same integers).

Why not fbgemm's dynamic linear (``torch.ops.quantized.linear_dynamic``) nor
oneDNN's ``qlinear_pointwise``: fbgemm quantizes activations with one scale for the whole tensor
(asymmetric uint8), not per token, and oneDNN's op takes one activation scale as well and ran a slow
reference path for signed int8 input here. Measurements: docs/ARCHITECTURE.md and docs/PERF.md.

Which GEMMs run in int8 is decided by ``int8_gemm`` (measured drift, docs/PERF.md): every GEMM of
every layer but the last; in the last layer only the key/value projection (it reads every row of
the segment; the other GEMMs there compute [CLS] and the memory rows only, which feed the next
segment's memory and the logits directly). The pooler and classifier stay in the plan's dtype.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import torch

from .. import _ext
from .linear import Linear

QMAX = 127                                    # symmetric: -127..127 (never -128)
ROW_BLOCK = 256                               # rows quantized, multiplied and dequantized at a time
INT8_KERNELS = ("vnni", "int_mm")
# The GEMM kernel of new Int8Linear layers: None picks "vnni" where it runs (vnni_problem() is None),
# else "int_mm"; benchmarks/bench_int8.py sets it to compare the two.
KERNEL: Optional[str] = None
QUANTIZE_MODES = (None, "int8")
ACTIVATION_SCHEMES = ("symmetric", "asymmetric")
# How activations are quantized: None picks by the plan's dtype (activation_scheme); benchmarks/bench_int8.py
# sets it to measure the other scheme.
ACTIVATIONS: Optional[str] = None
# GEMMs of the last layer that stay in the plan's dtype (they compute [CLS] and the memory rows only);
# benchmarks/bench_int8.py empties it to measure the drift of int8 there.
LAST_LAYER_KEPT = ("q", "out", "ffn_in", "ffn_out")
# Attention in int8 (csrc/cpu/attention_int8.cpp) in every layer but the last, whose queries are [CLS]
# and the memory rows. Off: measured, its 8-bit probabilities made the shipped model lose a fact that
# float32 and the int8 GEMMs keep (docs/PERF.md, "int8 attention"); bench_int8.py's int8-attn variant
# turns it on to measure.
INT8_ATTENTION = False


def quantize_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q [N, K] int8, scale [N] float32), symmetric per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / QMAX      # [N]
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def quantize_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] (float32/bfloat16/float16) -> (q [R, K] int8, scale [R, 1] float32), symmetric per row
    (token): scale = amax / 127 in float32, q = round-half-even(x / scale); a row of zeros gets q = 0.

    One pass of the extension's kernel (csrc/cpu/int8.cpp) where it is built, else its torch twin.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _ext.int8_quantize_rows(x)


@lru_cache(maxsize=None)
def _int_mm_problem() -> Optional[str]:
    """None if ``torch._int_mm`` runs on the CPU and is exact on a small odd problem, else why not."""
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randint(-127, 128, (5, 37), generator=g, dtype=torch.int8)
        b = torch.randint(-127, 128, (11, 37), generator=g, dtype=torch.int8)
        got = torch._int_mm(a, b.t())
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        return f"torch._int_mm failed on the CPU: {str(e).splitlines()[0]}"
    want = a.long() @ b.long().t()
    if got.dtype != torch.int32 or not torch.equal(got.long(), want):
        return "torch._int_mm disagrees with an integer matmul"
    return None


def pack_vnni(qweight_t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """qweight_t [K, N] int8 -> (packed [Np/64, Kp/4, 64, 4] int8, comp [N] int32): the layout of
    oneDNN's u8 x s8 micro-kernel in panels of 64 columns (packed[n // 64, k // 4, n % 64, k % 4] =
    w[k, n]; zeros pad K to a multiple of 4 and N to one of 64) and 128 * the column sums, which undo
    the activations' zero point 128."""
    K, N = qweight_t.shape
    Kp, Np = -(-K // 4) * 4, -(-N // 64) * 64
    w = torch.zeros(Kp, Np, dtype=torch.int8)
    w[:K, :N] = qweight_t
    packed = w.view(Kp // 4, 4, Np // 64, 64).permute(2, 0, 3, 1).contiguous()  # [Np/64, Kp/4, 64, 4]
    comp = (qweight_t.sum(0, dtype=torch.int32) * 128).to(torch.int32)        # [N]
    return packed, comp


def unpack_vnni(packed: torch.Tensor, K: int, N: int) -> torch.Tensor:
    """packed [Np/64, Kp/4, 64, 4] int8 -> qweight_t [K, N] int8 (the inverse of pack_vnni)."""
    P, K4 = packed.shape[:2]
    return packed.permute(1, 3, 0, 2).reshape(K4 * 4, P * 64)[:K, :N]


@lru_cache(maxsize=None)
def vnni_problem() -> Optional[str]:
    """None if the "vnni" kernel (oneDNN's u8 x s8 micro-kernel, csrc/cpu/int8_vnni.cpp) runs here and
    is exact on a small odd problem, else why not."""
    if not _ext.int8_vnni_compiled():
        return "rmt_fast._C has no int8_linear_vnni kernel (not built, or built before it existed)"
    if cpu_int8_isa() not in ("avx512_vnni", "amx_int8"):
        return f"the CPU has no AVX512-VNNI/AMX int8 instructions ({cpu_int8_isa() or 'none'})"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(19, 37, generator=g)
    q, scale = quantize_weight(torch.randn(21, 37, generator=g))
    bias, want, got = torch.randn(21, generator=g), torch.empty(19, 21), torch.empty(19, 21)
    try:
        _ext.int8_linear(x, q.t(), scale, bias, "none", 8, want)
        _ext.int8_linear_vnni(x, *pack_vnni(q.t()), scale, bias, "none", 8, got)
    except RuntimeError as e:
        return f"int8_linear_vnni failed: {str(e).splitlines()[0]}"
    return None if torch.equal(got, want) else "int8_linear_vnni disagrees with int8_linear"


@lru_cache(maxsize=None)
def cpu_int8_isa() -> Optional[str]:
    """The CPU's int8 dot-product instructions ('amx_int8', 'avx512_vnni', 'avx_vnni'), None without."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return next((isa for isa in ("amx_int8", "avx512_vnni", "avx_vnni") if isa in flags), None)


def int8_available(device: torch.device) -> Optional[str]:
    """None if int8 linear layers run on ``device``, else the reason."""
    if torch.device(device).type != "cpu":
        return f"int8 runs on the CPU only (device {device})"
    return _int_mm_problem()


def check_quantize(quantize: Optional[str], device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """Validate ``quantize``; raise where int8 cannot run. Returns the status line of a plan of ``dtype``."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize={quantize!r} is not supported; choose None or 'int8'")
    if quantize is None:
        return "off"
    why_not = int8_available(device)
    if why_not:
        raise ValueError(f"int8 (quantize='int8', --quantize int8) is not possible here: {why_not}")
    isa = cpu_int8_isa()
    passes = ("fused quantize/dequantize kernels" if _ext.int8_kernels_compiled() else
              "quantize/dequantize as torch ops: rmt_fast._C is not built, slower")
    rest = f"{activation_scheme(dtype)} per-token activations; {str(dtype).replace('torch.', '')} attention"
    if isa is None:
        return ("int8 (torch._int_mm; this CPU has no VNNI/AMX int8 instructions: oneDNN's slower int8 "
                f"path, likely slower than bfloat16; {passes}; {rest})")
    if vnni_problem() is not None:
        return f"int8 (torch._int_mm, {isa}; {passes}; {rest}: {vnni_problem()})"
    gemm = ("oneDNN's u8 x s8 micro-kernel, dequantized in its tiles" if (KERNEL or "vnni") == "vnni" else
            f"torch._int_mm, {passes}")
    if INT8_ATTENTION:
        rest += ", int8 but in the last layer"
    return f"int8 ({isa}; {gemm}; {rest})"


def activation_scheme(dtype: torch.dtype) -> str:
    """How a plan of ``dtype`` quantizes activations. Asymmetric in float32 plans: with float32 everywhere
    else it kept every label of 100 documents at 1,024 segments where symmetric flipped one (max logit gap
    0.010 against 13.3); in bf16 plans it did not help (bf16's own rounding dominates; docs/PERF.md)."""
    if ACTIVATIONS is not None:
        return ACTIVATIONS
    return "asymmetric" if dtype == torch.float32 else "symmetric"


def int8_gemm(name: str, last_layer: bool) -> bool:
    """Whether the GEMM ``name`` (qkv, q, kv, out, ffn_in, ffn_out) runs in int8 (docs/PERF.md)."""
    return not (last_layer and name in LAST_LAYER_KEPT)


def int8_attention(last_layer: bool) -> bool:
    """Whether a layer's attention runs in int8 (``attention_int8``) under quantize="int8"."""
    return INT8_ATTENTION and not last_layer and vnni_problem() is None


class Int8Linear:
    """y = act(x @ weight.T + bias) with int8 weights and per-token int8 activations, int32 sums.

    weight: [N, K], bias: [N] (any float dtype); output in ``out_dtype``.
    """

    packed = False
    quantized = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, act: Optional[str] = None,
                 out_dtype: torch.dtype = torch.bfloat16, kernel: Optional[str] = None,
                 activations: str = "symmetric"):
        self.out_features, self.in_features = weight.shape
        if activations not in ACTIVATION_SCHEMES:
            raise ValueError(f"activations {activations!r} is not one of {ACTIVATION_SCHEMES}")
        self.activations = activations
        q, self.weight_scale = quantize_weight(weight)                          # [N, K] int8, [N] f32
        self.kernel = kernel or KERNEL or ("vnni" if vnni_problem() is None else "int_mm")
        if self.kernel not in INT8_KERNELS:
            raise ValueError(f"int8 kernel {self.kernel!r} is not one of {INT8_KERNELS}")
        if self.kernel == "vnni":
            self.packed, self.comp = pack_vnni(q.t())                           # [Np/64, Kp/4, 64, 4], [N]
        else:
            self._qweight_t = q.t()                                             # [K, N] view
        # the weight's column sums, [N] int32: the zero-point correction of asymmetric rows
        self.col_sum = q.sum(1, dtype=torch.int32) if activations == "asymmetric" else None
        self.bias = bias.detach().float().contiguous()                          # [N] float32
        self.out_dtype = out_dtype
        # activations the dequantize kernel applies itself (HF "gelu" is the exact, erf GELU); any
        # other runs after it, on a float32 copy
        self._fused = {None: "none", "gelu": "gelu", "relu": "relu"}.get(act)
        self._act = None
        if self._fused is None:
            from transformers.activations import ACT2FN
            self._act = ACT2FN[act]

    @property
    def qweight_t(self) -> torch.Tensor:
        """The int8 weight, [K, N] (a view, or unpacked from the "vnni" layout)."""
        if self.kernel == "vnni":
            return unpack_vnni(self.packed, self.in_features, self.out_features)
        return self._qweight_t

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the layer holds (int8 weight, scales, bias)."""
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N] in ``out_dtype``."""
        lead, rows = x.shape[:-1], x.reshape(-1, self.in_features)             # [R, K]
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.empty(rows.shape[0], self.out_features, dtype=self.out_dtype, device=x.device)
        # Blocks of rows keep the int32 sums in cache (measured: a batch of 8 segments in one piece
        # took 2.3x the CPU time of 8 single segments, docs/PERF.md); at most ROW_BLOCK rows, fewer
        # where that leaves a thread without a block.
        block = min(ROW_BLOCK, max(16, -(-rows.shape[0] // torch.get_num_threads())))
        if self._act is None and self.kernel == "vnni":   # one op, the dequantize in the GEMM's tiles
            _ext.int8_linear_vnni(rows, self.packed, self.comp, self.weight_scale, self.bias, self._fused, block, out,
                                  self.col_sum)
        elif self._act is None:              # one op: quantize, GEMM, dequantize + activation + cast
            _ext.int8_linear(rows, self.qweight_t, self.weight_scale, self.bias, self._fused, block, out,
                             self.col_sum)
        else:
            for r in range(0, rows.shape[0], block):
                self._block(rows[r:r + block], out[r:r + block])
        return out.view(*lead, self.out_features)

    def _block(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        """rows: [R, K] -> out [R, N] (``out_dtype``, written in place), an activation the kernel lacks."""
        zero = None
        if self.col_sum is None:
            qx, sx = quantize_rows(rows)                                         # [R, K], [R, 1]
        else:
            qx, sx, zero = _ext.int8_quantize_rows_asym(rows)                     # [R, K], [R, 1], [R, 1]
        acc = torch._int_mm(qx, self.qweight_t)                                 # [R, N] int32
        y = _ext.int8_dequantize(acc, sx, self.weight_scale, self.bias, "none",
                                 torch.empty(out.shape, dtype=torch.float32), zero, self.col_sum)  # [R, N] f32
        out.copy_(self._act(y))


GEMM_NAMES = ("qkv", "q", "kv", "out", "ffn_in", "ffn_out")


def make_linear(quantize: Optional[str], name: str, last_layer: bool, weight: torch.Tensor, bias: torch.Tensor,
                act: Optional[str], pack: bool, dtype: torch.dtype):
    """The plan's linear layer ``name``: an Int8Linear where ``quantize`` and ``int8_gemm`` say so."""
    if quantize == "int8" and int8_gemm(name, last_layer):
        return Int8Linear(weight, bias, act, out_dtype=dtype, activations=activation_scheme(dtype))
    return Linear(weight, bias, act=act, pack=pack)


def int8_gemms(layers) -> list:
    """'layer I NAME' of every int8 GEMM in a plan's layers (``InferencePlan.int8_gemms``)."""
    return [f"layer {i} {n}" for i, w in enumerate(layers) for n in GEMM_NAMES
            if isinstance(getattr(w, n), Int8Linear)]
