"""The pure-torch twins of the custom ops in rmt_fast/_ext.py: each op's obviously-right implementation,
registered as the op where rmt_fast._C has no kernel, with input checks whose messages have the same form
as the compiled kernels' (csrc/ops.cpp): one table of shapes and dtypes per op (``_check_args``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

INT8_ACTIVATIONS = ("none", "gelu", "relu")

_HALF_OR_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
_FLOATING = _HALF_OR_FLOAT + (torch.float64,)
_DTYPE_NAMES = {_HALF_OR_FLOAT: "float32, bfloat16 or float16", _FLOATING: "float32, bfloat16, float16 or float64"}


# --- the twins' input checks ----------------------------------------------------------------------

def _fail(op: str, message: str):
    raise RuntimeError(f"rmt_fast::{op}: {message}")


def _check_args(op: str, spec, device_of: str) -> dict:
    """Check each (name, tensor, dims, dtypes) of ``spec`` in order and return the sizes by symbol.

    dims: one symbol per dimension ("B T H"); a symbol's first appearance binds it, later ones must
    match. dtypes: a tuple of allowed dtypes, or the name of an earlier argument whose dtype must
    be matched. Then every tensor must be on the device of the argument ``device_of``.
    """
    sizes, seen = {}, {}
    for name, x, dims, dtypes in spec:
        dims = dims.split()
        if x.dim() != len(dims):
            _fail(op, f"{name} must be {len(dims)}-D, got shape {list(x.shape)}")
        for symbol, n in zip(dims, x.shape):
            sizes.setdefault(symbol, n)
        want = [sizes[s] for s in dims]
        if list(x.shape) != want:
            _fail(op, f"{name} must have shape ({', '.join(dims)}) = {want}, got {list(x.shape)}")
        if isinstance(dtypes, str):
            if x.dtype != seen[dtypes].dtype:
                _fail(op, f"{name} must be {seen[dtypes].dtype} like {dtypes}, got {x.dtype}")
        elif x.dtype not in dtypes:
            _fail(op, f"{name} must be {_DTYPE_NAMES.get(dtypes, dtypes[0])}, got {x.dtype}")
        seen[name] = x
    device = seen[device_of].device
    for name, x in seen.items():
        if x.device != device:
            _fail(op, f"{name} is on {x.device} but {device_of} is on {device}; all tensors must be "
                      "on one device")
    return sizes


def _check_written_in_place(op, name, x):
    if not x.is_contiguous():
        _fail(op, f"{name} must be contiguous (it is written in place), got strides {list(x.stride())}")


# --- the twins ------------------------------------------------------------------------------------

def segment_embed_torch(ids, memory, word_emb, pos_emb, type_emb0, ln_weight, ln_bias, eps, out):
    """BERT's embedding of one segment per row with the RMT memory injected as word embeddings.

    ids: (B, T) int64; memory: (B, M, H) float32; word_emb: (V, H); pos_emb: (P >= T, H);
    type_emb0, ln_weight, ln_bias: (H,), all four tables and the two LayerNorm vectors of one dtype
    (float32, bfloat16 or float16); out: (B, T, H) float32/bfloat16/float16, contiguous.
    Row t of segment b: e = (memory[b, t-1] if 1 <= t <= M else word_emb[ids[b, t]]) + pos_emb[t]
    + type_emb0, then LayerNorm over H in float32 (biased variance, eps inside the square root),
    rounded once to out's dtype. ids at the memory rows are never read; every other id must lie in
    [0, V) (checked on the CPU; on CUDA the gather's device-side assert fires). Writes out; returns out.
    """
    op = "segment_embed"
    sz = _check_args(op, [
        ("ids", ids, "B T", (torch.int64,)), ("word_emb", word_emb, "V H", _HALF_OR_FLOAT),
        ("memory", memory, "B M H", (torch.float32,)), ("pos_emb", pos_emb, "P H", "word_emb"),
        ("type_emb0", type_emb0, "H", "word_emb"), ("ln_weight", ln_weight, "H", "word_emb"),
        ("ln_bias", ln_bias, "H", "word_emb"), ("out", out, "B T H", _HALF_OR_FLOAT),
    ], device_of="out")
    B, T, M, H, V, P = (sz[s] for s in "BTMHVP")
    if P < T:
        _fail(op, f"pos_emb has P = {P} positions but the segment has T = {T} rows (need P >= T)")
    _check_written_in_place(op, "out", out)
    if not eps >= 0:
        _fail(op, f"eps must be >= 0, got {eps}")
    m = max(0, min(M, T - 1))  # memory rows present in this segment: 1 .. m
    gather = ids
    if m:
        gather = ids.clone()
        gather[:, 1:1 + m] = 0  # never read, whatever they hold
    if ids.device.type == "cpu" and gather.numel():
        bad = (gather < 0) | (gather >= V)
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            _fail(op, f"ids[{b}, {t}] = {int(ids[b, t])} is out of range for word_emb with V = {V} rows")
    e = F.embedding(gather, word_emb).float()  # [B, T, H]
    if m:
        e[:, 1:1 + m] = memory[:, :m]
    e = e + pos_emb[:T].float() + type_emb0.float()
    out.copy_(F.layer_norm(e, (H,), ln_weight.float(), ln_bias.float(), eps))
    return out


def memory_write_torch(state, hidden, row_offset, slots):
    """state[slots[b]] = hidden[b, row_offset:row_offset + M].float() for every b with slots[b] >= 0.

    state: (S, M, H) float32, contiguous, written in place; hidden: (B, R, H) float32/bfloat16/
    float16/float64, any strides; row_offset: int with row_offset + M <= R; slots: (B,) int64, a
    negative entry meaning "this row writes nothing" (that slot keeps its memory). Non-negative slots
    must be < S and distinct (checked on the CPU; on CUDA an out-of-range slot trips a device-side
    assert and duplicates leave either row's values). Returns None.
    """
    op = "memory_write"
    sz = _check_args(op, [("state", state, "S M H", (torch.float32,)), ("slots", slots, "B", (torch.int64,)),
                          ("hidden", hidden, "B R H", _FLOATING)], device_of="state")
    S, M, H, B, R = (sz[s] for s in "SMHBR")
    _check_written_in_place(op, "state", state)
    if not (row_offset >= 0 and row_offset + M <= R):
        _fail(op, f"rows row_offset .. row_offset + M - 1 = {row_offset} .. {row_offset + M - 1} "
                  f"must lie within hidden's R = {R} rows")
    if slots.device.type == "cpu":
        writer = {}
        for b, s in enumerate(slots.tolist()):
            if s < 0:
                continue
            if s >= S:
                _fail(op, f"slots[{b}] = {s} is out of range for state with S = {S} slots")
            if s in writer:
                _fail(op, f"slots[{writer[s]}] and slots[{b}] both write slot {s}; each slot may be "
                          "written by one row only")
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


def _check_attention(op, q, k, v, key_lengths, scale):
    """The attention ops' argument checks; returns (B, Tq, heads, D, scale)."""
    spec = [("q", q, "B Tq heads D", _HALF_OR_FLOAT), ("k", k, "B Tk heads D", "q"), ("v", v, "B Tk heads D", "q")]
    if key_lengths is not None:
        spec.append(("key_lengths", key_lengths, "B", (torch.int64,)))
    sz = _check_args(op, spec, device_of="q")
    B, Tq, Hh, D = (sz[s] for s in ("B", "Tq", "heads", "D"))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not math.isfinite(scale):
        _fail(op, f"scale must be finite, got {scale}")
    if key_lengths is not None and key_lengths.device.type == "cpu" and bool((key_lengths < 0).any()):
        b = int((key_lengths < 0).nonzero()[0])
        _fail(op, f"key_lengths[{b}] = {int(key_lengths[b])} is negative")
    return B, Tq, Hh, D, scale


def attention_torch(q, k, v, key_lengths=None, scale=None):
    """softmax(scale * q k^T + key padding mask) v in float32, as torch.ops.rmt_fast.attention.

    q: (B, Tq, heads, D); k, v: (B, Tk, heads, D), one dtype (float32, bfloat16 or float16), any
    strides; key_lengths: None or (B,) int64, keys at positions >= key_lengths[b] masked, a row with
    no key gives zeros; scale: float (None: 1/sqrt(D)). Returns (B, Tq, heads * D) contiguous in q's
    dtype.
    """
    B, Tq, Hh, D, scale = _check_attention("attention", q, k, v, key_lengths, scale)
    qh, kh, vh = (x.float().transpose(1, 2) for x in (q, k, v))               # [B, Hh, T, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale                   # [B, Hh, Tq, Tk]
    if key_lengths is not None:
        mask = torch.arange(k.shape[1], device=q.device)[None, :] < key_lengths[:, None]
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    out = torch.matmul(probs, vh).transpose(1, 2).reshape(B, Tq, Hh * D)
    return out.to(q.dtype).contiguous()


def int8_quantize_rows_torch(x):
    """x [R, K] float32/bfloat16/float16 -> (q [R, K] int8, scale [R, 1] float32), per row (token):
    scale = max(amax_k |x[r, k]|, float32 tiny) / 127 in float32, q = round-half-even(x / scale)."""
    sz = _check_args("int8_quantize_rows", [("x", x, "R K", _HALF_OR_FLOAT)], device_of="x")
    xf = x.to(torch.float32, copy=True)                                        # divided in place below
    amax = xf.abs().amax(dim=1, keepdim=True) if sz["K"] else xf.new_zeros(sz["R"], 1)
    scale = amax.clamp_min_(torch.finfo(torch.float32).tiny).div_(127)
    return xf.div_(scale).round_().to(torch.int8), scale


def int8_quantize_rows_asym_torch(x):
    """x [R, K] float32/bfloat16/float16 -> (q [R, K] int8, scale [R, 1] float32, zero [R, 1] int32),
    asymmetric per row: lo = min(x, 0), hi = max(x, 0), scale = max((hi - lo) / 255, float32 tiny),
    z = round(-lo / scale), u = clamp(round(x / scale) + z, 0, 255); q = u - 128, zero = z - 128, so that
    x ~ scale * (q - zero). All in float32, rounding half to even."""
    sz = _check_args("int8_quantize_rows_asym", [("x", x, "R K", _HALF_OR_FLOAT)], device_of="x")
    xf = x.to(torch.float32, copy=True)                                        # divided in place below
    if sz["K"]:
        lo, hi = xf.amin(dim=1, keepdim=True).clamp_(max=0), xf.amax(dim=1, keepdim=True).clamp_(min=0)
    else:
        lo = hi = xf.new_zeros(sz["R"], 1)
    scale = ((hi - lo) / 255).clamp_min_(torch.finfo(torch.float32).tiny)
    z = torch.round(-lo / scale).clamp_(0, 255)
    u = xf.div_(scale).round_().add_(z).clamp_(0, 255)
    return (u - 128).to(torch.int8), scale, (z - 128).to(torch.int32)


def int8_dequantize_torch(acc, row_scale, col_scale, bias, activation, out, row_zero=None, col_sum=None):
    """out [R, N] = act((acc - row_zero[r] * col_sum[n]) * row_scale[r] * col_scale[n] + bias[n]) in
    float32, rounded once to out's dtype; acc [R, N] int32, row_scale R float32 values ([R] or [R, 1]),
    col_scale and bias [N] float32, act 'none', 'gelu' (erf) or 'relu'; row_zero (R int32 values) and
    col_sum ([N] int32) together or neither (then 0). Writes out; returns None."""
    op = "int8_dequantize"
    _check_args(op, [("acc", acc, "R N", (torch.int32,)), ("col_scale", col_scale, "N", (torch.float32,)),
                     ("bias", bias, "N", (torch.float32,)), ("out", out, "R N", _HALF_OR_FLOAT)], device_of="acc")
    if row_scale.dtype != torch.float32 or row_scale.numel() != acc.shape[0]:
        _fail(op, f"row_scale must be float32 with R = {acc.shape[0]} values, got {row_scale.dtype} "
                  f"of shape {list(row_scale.shape)}")
    if activation not in INT8_ACTIVATIONS:
        _fail(op, f"activation must be 'none', 'gelu' or 'relu', got '{activation}'")
    if (row_zero is None) != (col_sum is None):
        _fail(op, "row_zero and col_sum go together (asymmetric rows), got only "
                  f"{'row_zero' if col_sum is None else 'col_sum'}")
    if row_zero is not None:
        if row_zero.dtype != torch.int32 or row_zero.numel() != acc.shape[0]:
            _fail(op, f"row_zero must be int32 with R = {acc.shape[0]} values, got {row_zero.dtype} "
                      f"of shape {list(row_zero.shape)}")
        _check_args(op, [("acc", acc, "R N", (torch.int32,)), ("col_sum", col_sum, "N", (torch.int32,))],
                    device_of="acc")
        acc = acc - row_zero.reshape(-1, 1) * col_sum                          # exact in int32
    y = acc.float().mul_(row_scale.reshape(-1, 1))      # a same-dtype multiply is vectorized
    y = torch.addcmul(bias, y, col_scale, out=y)
    if activation != "none":
        y = F.gelu(y) if activation == "gelu" else F.relu(y)
    out.copy_(y)


def int8_linear_torch(x, qweight_t, weight_scale, bias, activation, row_block, out, col_sum=None):
    """out [R, N] = dequantize(torch._int_mm(quantize_rows(x), qweight_t)) per block of ``row_block``
    rows: x [R, K] float, qweight_t [K, N] int8, weight_scale and bias [N] float32; with col_sum
    (qweight_t's column sums, [N] int32) the rows are quantized asymmetrically. Returns None."""
    if row_block < 1:
        _fail("int8_linear", f"row_block must be >= 1, got {row_block}")
    if activation not in INT8_ACTIVATIONS:
        _fail("int8_linear", f"activation must be 'none', 'gelu' or 'relu', got '{activation}'")
    for r in range(0, x.shape[0], row_block):
        if col_sum is None:
            q, scale = int8_quantize_rows_torch(x[r:r + row_block])
            zero = None
        else:
            q, scale, zero = int8_quantize_rows_asym_torch(x[r:r + row_block])
        int8_dequantize_torch(torch._int_mm(q, qweight_t), scale, weight_scale, bias, activation,
                              out[r:r + row_block], zero, col_sum)


def int8_linear_vnni_torch(x, packed, comp, weight_scale, bias, activation, row_block, out, col_sum=None):
    """int8_linear with the weight in the micro-kernel's layout: packed [Np/64, Kp/4, 64, 4] int8 holds
    w [K, N] (packed[n // 64, k // 4, n % 64, k % 4] = w[k, n], zeros in the padding to Kp = K rounded
    up to 4 and Np = N rounded up to 64), comp [N] int32 = 128 * w.sum(0) (the kernel's zero-point
    correction); asymmetric rows where col_sum is given, as int8_linear's. Returns None."""
    op = "int8_linear_vnni"
    K, N = x.shape[1], out.shape[1]
    want = (-(-N // 64), -(-K // 4), 64, 4)
    if packed.dtype != torch.int8 or tuple(packed.shape) != want:
        _fail(op, f"packed has shape {list(packed.shape)} ({packed.dtype}) but x has K = {K} and out N = {N} "
                  f"columns: want {list(want)} int8")
    if comp.dtype != torch.int32 or tuple(comp.shape) != (N,):
        _fail(op, f"comp must be int32, of shape (N) = [{N}], got {comp.dtype} of shape {list(comp.shape)}")
    w = packed.permute(1, 3, 0, 2).reshape(want[1] * 4, want[0] * 64)[:K, :N]       # [K, N] int8
    int8_linear_torch(x, w, weight_scale, bias, activation, row_block, out, col_sum)


_LOG2_255 = torch.tensor(7.99435343685885793, dtype=torch.float32)


def attention_int8_torch(q, k, v, key_lengths=None, scale=None, kv_block=512):
    """torch.ops.rmt_fast.attention_int8's arithmetic (csrc/cpu/attention_int8.cpp) with torch ops:
    q and k quantized per row (token, head), v per column over the keys, int32-exact products, an
    online softmax over blocks of ``kv_block`` keys whose probabilities are rounded to multiples of
    1/255 of the running row max. Arguments and result as attention_torch."""
    B, Tq, Hh, D, scale = _check_attention("attention_int8", q, k, v, key_lengths, scale)
    Tk = k.shape[1]
    c = torch.tensor(scale * 1.4426950408889634, dtype=torch.float32)
    out = torch.zeros(B, Hh, Tq, D, dtype=torch.float32, device=q.device)
    for b in range(B):
        L = Tk if key_lengths is None else min(int(key_lengths[b]), Tk)
        if L == 0:
            continue
        qi, sq = int8_quantize_rows_torch(q[b].reshape(Tq * Hh, D))                # [Tq*Hh, D], [Tq*Hh, 1]
        ki, sk = int8_quantize_rows_torch(k[b, :L].reshape(L * Hh, D))
        qi, sq = qi.view(Tq, Hh, D).transpose(0, 1), sq.view(Tq, Hh, 1).transpose(0, 1)   # [Hh, Tq, D], [Hh, Tq, 1]
        ki, skc = ki.view(L, Hh, D).transpose(0, 1), (sk * c).view(L, Hh).t()[:, None, :]  # [Hh, L, D], [Hh, 1, L]
        vf = v[b, :L].float().transpose(0, 1)                                      # [Hh, L, D]
        sv = vf.abs().amax(dim=1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny).div_(127)   # [Hh, 1, D]
        vi = (vf / sv).round_()
        y = (qi.double() @ ki.double().transpose(1, 2)).float() * skc             # [Hh, Tq, L], exact sums
        m = l = o = None
        for s in range(0, L, kv_block):
            yb = y[:, :, s:s + kv_block]
            m_blk = sq * yb.amax(-1, keepdim=True)                                 # sq > 0: the max of sq * y
            m_new = m_blk if m is None else torch.maximum(m, m_blk)
            pu = torch.exp2(torch.addcmul(-(m_new - _LOG2_255), yb, sq)).round_()  # 255 * 2^(x - m), [Hh, Tq, len]
            add = (pu.double() @ vi[:, s:s + kv_block].double()).float() * sv     # [Hh, Tq, D]
            if m is None:
                l, o = pu.sum(-1, keepdim=True), add
            else:
                alpha = torch.exp2(m - m_new)
                l, o = l * alpha + pu.sum(-1, keepdim=True), o * alpha + add
            m = m_new
        out[b] = o / l
    return out.transpose(1, 2).reshape(B, Tq, Hh * D).to(q.dtype)
