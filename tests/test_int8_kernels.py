"""The int8 passes of the extension (csrc/cpu/int8.cpp): quantize per token and dequantize + scales +
bias (+ GELU/ReLU) + cast, against float64 oracles of the same quantization; the compiled kernels
(AVX-512, and the scalar code in a subprocess with ATEN_CPU_CAPABILITY=avx2) and their torch twins."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmt_fast import _ext

ROOT = Path(__file__).resolve().parents[1]
COMPILED = _ext.int8_kernels_compiled()
IMPLS = {
    "compiled": (lambda x: torch.ops.rmt_fast.int8_quantize_rows(x),
                 lambda *a: torch.ops.rmt_fast.int8_dequantize(*a)),
    "twin": (_ext.int8_quantize_rows_torch, _ext.int8_dequantize_torch),
}
impls = pytest.mark.parametrize("impl", [
    pytest.param("compiled", marks=pytest.mark.skipif(not COMPILED, reason=f"no compiled int8 kernels: "
                                                                           f"{_ext.why_unavailable()}")),
    "twin"])
ROWS = (1, 7, 499)
COLS = (1, 15, 33, 773)                  # none but 1 a multiple of 16: every masked tail
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def oracle_quantize(x: torch.Tensor):
    """float64: scale = amax / 127 rounded once to float32 (as stored), q = round-half-even(x / scale)."""
    x64 = x.double()
    amax = x64.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    scale = (amax / 127).float().double()
    return torch.round(x64 / scale), scale


def near_tie(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Where x / scale lies within float32 rounding of a .5 tie (the float32 quotient may round either way)."""
    v = x.double() / scale
    return (v - v.floor() - 0.5).abs() < 2 ** -22 * v.abs().clamp_min(1)


def mixed_rows(R, K, dtype):
    """Rows whose magnitudes differ by up to 1e4, one row all zeros."""
    x = torch.randn(R, K) * torch.logspace(-2, 2, R)[:, None]
    x[R // 2] = 0
    return x.to(dtype)


@impls
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R", ROWS)
@pytest.mark.parametrize("K", COLS)
def test_quantize_rows_against_float64_oracle(impl, dtype, R, K):
    x = mixed_rows(R, K, dtype)
    q, scale = IMPLS[impl][0](x)
    want_q, want_scale = oracle_quantize(x)
    assert q.dtype == torch.int8 and q.shape == (R, K) and scale.dtype == torch.float32 and scale.shape == (R, 1)
    assert torch.equal(scale.double(), want_scale)                            # exact
    ok = (q.double() == want_q) | near_tie(x, want_scale)
    assert ok.all(), f"{int((~ok).sum())} integers differ, e.g. row/col {(~ok).nonzero()[0].tolist()}"
    assert (q[R // 2] == 0).all() and (q.abs().amax(1)[torch.arange(R) != R // 2] == 127).all()


@impls
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_rounds_half_to_even(impl, dtype):
    """With amax = 127 the scale is exactly 1: x.5 values are exact ties, rounded to the even integer."""
    row = torch.tensor([127, -127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -125.5, 0.49, 2.51] * 3)
    q, scale = IMPLS[impl][0](row[None].to(dtype))
    assert scale.item() == 1.0
    want = torch.tensor([127, -127, 0, 2, 2, 0, -2, -2, 4, 126, -126, 0, 3] * 3, dtype=torch.int8)
    assert torch.equal(q[0], want)


@impls
def test_quantize_reads_strided_rows(impl):
    base = torch.randn(9, 50).to(torch.bfloat16)
    x = base[1::2, 3:40]                                                     # row stride 100, last 1
    q, scale = IMPLS[impl][0](x)
    q2, scale2 = IMPLS[impl][0](x.contiguous())
    assert torch.equal(q, q2) and torch.equal(scale, scale2)


def bf16_half_ulp(w: torch.Tensor) -> torch.Tensor:
    """Half a unit in the last place of bfloat16 (8 significant bits) at |w| (float64)."""
    e = torch.floor(torch.log2(w.abs().clamp_min(2.0 ** -126)))
    return torch.exp2(e - 8)


def oracle_dequantize(acc, sx, sw, bias, activation):
    y = acc.double() * sx.double().reshape(-1, 1) * sw.double() + bias.double()
    if activation == "gelu":
        y = torch.nn.functional.gelu(y)
    elif activation == "relu":
        y = torch.relu(y)
    return y


def dequantize_inputs(R, N):
    """int32 sums of K = 768 products of int8 values, row scales of mixed size, per-channel scales and
    a bias of the same order as the products."""
    acc = torch.randint(-127 * 127 * 28, 127 * 127 * 28, (R, N), dtype=torch.int32)
    sx = torch.rand(R, 1) * torch.logspace(-4, -2, R)[:, None]
    sw = torch.rand(N) * 1e-3 + 1e-4
    bias = torch.randn(N) * 2
    return acc, sx, sw, bias


@impls
@pytest.mark.parametrize("activation", ["none", "gelu", "relu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R", ROWS)
@pytest.mark.parametrize("N", COLS)
def test_dequantize_against_float64_oracle(impl, activation, dtype, R, N):
    acc, sx, sw, bias = dequantize_inputs(R, N)
    out = torch.full((R, N), float("nan"), dtype=dtype)
    IMPLS[impl][1](acc, sx, sw, bias, activation, out)
    want = oracle_dequantize(acc, sx, sw, bias, activation)
    # float32 arithmetic: a few ulps of the terms (|acc sx sw| + |bias|), GELU's erf polynomial (absolute
    # error 1.5e-7, times |y| / 2), then one rounding to the output: half its ulp (bfloat16, float16).
    terms = (acc.double() * sx.double() * sw.double()).abs() + bias.double().abs()
    f32 = 4 * 2.0 ** -24 * terms + (2e-7 * terms if activation == "gelu" else 0)
    half_ulp = {torch.float32: 2.0 ** -24 * want.abs(), torch.bfloat16: bf16_half_ulp(want),
                torch.float16: torch.maximum(2.0 ** -11 * want.abs(), torch.full_like(want, 2.0 ** -25))}[dtype]
    err = (out.double() - want).abs()
    bad = err > half_ulp * (1 + 2 ** -10) + f32 * (2 if dtype != torch.float32 else 1)
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} off; worst at {err.argmax().item()}: got "
                           f"{out.double().flatten()[err.argmax()].item()}, want {want.flatten()[err.argmax()].item()}")


@impls
def test_dequantize_writes_a_row_block_of_a_larger_output(impl):
    """Int8Linear writes each block of rows into its slice of one output; rows outside stay as they were."""
    acc, sx, sw, bias = dequantize_inputs(5, 40)
    full = torch.zeros(9, 40, dtype=torch.bfloat16)
    IMPLS[impl][1](acc, sx, sw, bias, "gelu", full[2:7])
    alone = torch.empty(5, 40, dtype=torch.bfloat16)
    IMPLS[impl][1](acc, sx, sw, bias, "gelu", alone)
    assert torch.equal(full[2:7], alone) and (full[:2] == 0).all() and (full[7:] == 0).all()


@impls
def test_bad_inputs_raise_naming_the_argument(impl):
    quantize, dequantize = IMPLS[impl]
    acc, sx, sw, bias = dequantize_inputs(3, 8)
    out = torch.empty(3, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="int8_quantize_rows: x must be 2-D"):
        quantize(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match="int8_quantize_rows: x"):
        quantize(torch.randint(0, 5, (2, 3), dtype=torch.int32))
    with pytest.raises(RuntimeError, match="int8_dequantize: activation must be 'none', 'gelu' or 'relu', got 'tanh'"):
        dequantize(acc, sx, sw, bias, "tanh", out)
    with pytest.raises(RuntimeError, match=r"int8_dequantize: acc must be (torch\.)?int32"):
        dequantize(acc.float(), sx, sw, bias, "none", out)
    with pytest.raises(RuntimeError, match=r"int8_dequantize: out must have shape \(R, N\) = \[3, 8\]"):
        dequantize(acc, sx, sw, bias, "none", torch.empty(3, 9))
    with pytest.raises(RuntimeError, match="int8_dequantize: col_scale must"):
        dequantize(acc, sx, sw[:7], bias, "none", out)
    with pytest.raises(RuntimeError, match="int8_dequantize: bias must be"):
        dequantize(acc, sx, sw, bias.double(), "none", out)
    with pytest.raises(RuntimeError, match="int8_dequantize: row_scale must be"):
        dequantize(acc, sx[:2], sw, bias, "none", out)


@pytest.mark.skipif(not COMPILED, reason="no compiled int8 kernels")
def test_same_result_at_any_thread_count():
    x = mixed_rows(499, 773, torch.bfloat16)
    acc, sx, sw, bias = dequantize_inputs(499, 773)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            out = torch.empty(499, 773, dtype=torch.bfloat16)
            torch.ops.rmt_fast.int8_dequantize(acc, sx, sw, bias, "gelu", out)
            results.append((*torch.ops.rmt_fast.int8_quantize_rows(x), out))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.skipif(not COMPILED, reason="no compiled int8 kernels")
def test_opcheck():
    from torch.library import opcheck
    x = torch.randn(7, 33).to(torch.bfloat16)
    opcheck(torch.ops.rmt_fast.int8_quantize_rows.default, (x,))
    opcheck(torch.ops.rmt_fast.int8_quantize_rows_asym.default, (x,))
    acc, sx, sw, bias = dequantize_inputs(7, 33)
    opcheck(torch.ops.rmt_fast.int8_dequantize.default, (acc, sx, sw, bias, "gelu", torch.empty(7, 33)))
    qw = torch.randint(-127, 128, (40, 33), dtype=torch.int8)                 # [N, K]
    opcheck(torch.ops.rmt_fast.int8_linear.default,
            (x, qw.t(), torch.rand(40) * 1e-2, torch.randn(40), "relu", 4, torch.empty(7, 40, dtype=torch.bfloat16)))
    opcheck(torch.ops.rmt_fast.int8_linear.default,
            (x, qw.t(), torch.rand(40) * 1e-2, torch.randn(40), "relu", 4, torch.empty(7, 40, dtype=torch.bfloat16),
             qw.int().sum(1, dtype=torch.int32)))
    opcheck(torch.ops.rmt_fast.int8_dequantize.default,
            (acc, sx, sw, bias, "none", torch.empty(7, 33), torch.randint(-128, 128, (7, 1), dtype=torch.int32),
             torch.randint(-5000, 5000, (33,), dtype=torch.int32)))


@pytest.mark.skipif(not COMPILED, reason="no compiled int8 kernels")
def test_compiled_kernels_back_the_ops():
    """The CPU kernels are the compiled ones (not the twins), and the layer calls the ops."""
    files = {"int8_linear_vnni": "int8_vnni.cpp", "attention_int8": "attention_int8.cpp"}
    for name in _ext.INT8_SCHEMAS:
        want = files.get(name, "int8.cpp")
        assert want in torch._C._dispatch_dump(f"rmt_fast::{name}").split("CPU:")[1].splitlines()[0], name


@pytest.mark.parametrize("switch,capability", [
    ("ATEN_CPU_CAPABILITY=avx2", "AVX2"),                  # the scalar loops
    ("RMT_FAST_INT8_NO_AVX512_BF16=1", None),              # AVX-512 without its AVX512-BF16 rounding
])
def test_other_code_paths_in_a_subprocess(switch, capability):
    """This file's compiled cases in a subprocess with a switch the kernels read once: torch's
    ATEN_CPU_CAPABILITY=avx2 (as on a CPU without AVX-512: the scalar code) and
    RMT_FAST_INT8_NO_AVX512_BF16=1 (bfloat16 rounded by integer ops, as on AVX-512 CPUs without BF16)."""
    if not COMPILED:
        pytest.skip("no compiled int8 kernels")
    name, value = switch.split("=")
    env = dict(os.environ, **{name: value})
    if capability:
        env["RMT_FAST_INT8_EXPECT_CAPABILITY"] = capability
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                          str(Path(__file__)), str(Path(__file__).with_name("test_int8_asymmetric.py")),
                          "-k", "(compiled or capability) and not subprocess"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


def test_capability_in_subprocess():
    """In the subprocess above, ATen (and so the kernels) really runs without AVX-512."""
    want = os.environ.get("RMT_FAST_INT8_EXPECT_CAPABILITY")
    if want is None:
        pytest.skip("checked in the subprocess of test_other_code_paths_in_a_subprocess")
    assert torch.backends.cpu.get_cpu_capability() == want


def int8_linear_oracle(lin, x, act):
    """float64: the oracle's quantization of x (where x / scale is within float32 rounding of a tie,
    the layer's own integer, either being right; bfloat16 inputs make such near-ties common), the
    layer's int8 weight, exact sums, dequantization, then act."""
    from transformers.activations import ACT2FN
    rows = x.reshape(-1, lin.in_features)
    qx, sx = oracle_quantize(rows)
    tie = near_tie(rows, sx)
    q_layer = _ext.int8_quantize_rows(rows)[0].double()
    assert (q_layer == qx)[~tie].all()
    qx = torch.where(tie, q_layer, qx)
    acc = qx @ lin.qweight_t.double()                                           # exact in float64
    y = acc * sx * lin.weight_scale.double() + lin.bias.double()
    return y if act is None else ACT2FN[act](y)


@pytest.mark.parametrize("act", [None, "gelu", "gelu_new"])                  # gelu_new: not fused
def test_int8_linear_runs_on_the_ops(act, monkeypatch):
    """Int8Linear through the ops (compiled where built) and through the twins (as without rmt_fast._C):
    both within one bfloat16 rounding of the float64 oracle of the same quantization, at 600 rows
    (three row blocks) and an odd width."""
    from rmt_fast.engine.quant import Int8Linear, int8_available
    if int8_available(torch.device("cpu")):
        pytest.skip(int8_available(torch.device("cpu")))
    x = torch.randn(2, 300, 77).to(torch.bfloat16)
    lin = Int8Linear(torch.randn(45, 77), torch.randn(45), act, out_dtype=torch.bfloat16)
    got = {"ops": (lin(x), int8_linear_oracle(lin, x, act).view(2, 300, 45))}
    monkeypatch.setattr(_ext, "int8_quantize_rows", _ext.int8_quantize_rows_torch)
    monkeypatch.setattr(_ext, "int8_dequantize", lambda *a: _ext.int8_dequantize_torch(*a) or a[5])   # out
    monkeypatch.setattr(_ext, "int8_linear", lambda *a: _ext.int8_linear_torch(*a) or a[6])
    monkeypatch.setattr(_ext, "int8_linear_vnni", lambda *a: _ext.int8_linear_vnni_torch(*a) or a[7])
    got["twins"] = (lin(x), int8_linear_oracle(lin, x, act).view(2, 300, 45))
    for name, (y, want) in got.items():
        err = (y.double() - want).abs()
        assert (err <= bf16_half_ulp(want) * 1.01 + 1e-6).all(), (name, err.max().item())


@pytest.mark.skipif(not COMPILED, reason="no compiled int8 kernels")
def test_int8_linear_calls_the_fused_kernels_only():
    """One op per layer call (quantize, GEMM and dequantize per row block inside it), and no torch-level
    elementwise pass (the point)."""
    from torch.profiler import profile

    from rmt_fast.engine.quant import Int8Linear
    lin = Int8Linear(torch.randn(64, 48), torch.randn(64), "gelu", out_dtype=torch.bfloat16, kernel="int_mm")
    x = torch.randn(600, 48).to(torch.bfloat16)
    with profile() as prof:
        lin(x)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("rmt_fast::int8_linear") == 1
    for op in ("aten::gelu", "aten::addcmul", "aten::mul_", "aten::div_", "aten::abs", "aten::copy_",
               "rmt_fast::int8_quantize_rows", "rmt_fast::int8_dequantize"):
        assert op not in calls, op


@impls
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("R,row_block", [(1, 256), (7, 3), (499, 64), (600, 256)])
def test_int8_linear_op_is_its_parts_per_row_block(impl, activation, R, row_block):
    """int8_linear = quantize, torch._int_mm, dequantize on each block of rows: bit-equal to the parts,
    at 1 and 2 threads (blocks on different threads)."""
    op = torch.ops.rmt_fast.int8_linear if impl == "compiled" else _ext.int8_linear_torch
    K, N = 33, 45
    x = torch.randn(R, K).to(torch.bfloat16)
    qw = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    sw, bias = torch.rand(N) * 1e-2, torch.randn(N)
    want = torch.empty(R, N, dtype=torch.bfloat16)
    for r in range(0, R, row_block):
        q, s = IMPLS[impl][0](x[r:r + row_block])
        IMPLS[impl][1](torch._int_mm(q, qw.t()), s, sw, bias, activation, want[r:r + row_block])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = torch.full((R, N), float("nan"), dtype=torch.bfloat16)
            op(x, qw.t(), sw, bias, activation, row_block, out)
            assert torch.equal(out, want), n
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="int8_linear: row_block must be >= 1"):
        op(x, qw.t(), sw, bias, activation, 0, out)
