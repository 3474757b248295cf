"""int8_linear_vnni (csrc/cpu/int8_vnni.cpp): the int8 linear layer on oneDNN's u8 x s8 micro-kernel with
the dequantize in its tiles. Bit-equal to int8_linear (quantize, torch._int_mm, dequantize) at odd
shapes, dtypes, activations and thread counts; the weight packing and its inverse; argument checks."""
import pytest
import torch

from rmt_fast import _ext
from rmt_fast.engine import quant

VNNI = quant.vnni_problem()
compiled = pytest.mark.skipif(VNNI is not None, reason=f"int8_linear_vnni cannot run here: {VNNI}")


def packed_inputs(R, K, N, dtype=torch.bfloat16):
    x = (torch.randn(R, K) * torch.logspace(-2, 2, R)[:, None]).to(dtype)    # rows of every magnitude
    q, sw = quant.quantize_weight(torch.randn(N, K))                           # [N, K] int8, [N]
    return x, q.t(), sw, torch.randn(N)


def test_the_kernel_runs_where_the_cpu_and_build_have_it():
    """On a build with the op and a CPU with AVX512-VNNI/AMX the probe must pass (else a broken kernel
    would only show as every test here skipping, and the Engine quietly on the slower kernel)."""
    if not _ext.int8_vnni_compiled() or quant.cpu_int8_isa() not in ("avx512_vnni", "amx_int8"):
        pytest.skip(f"no compiled int8_linear_vnni or no VNNI/AMX here: {VNNI}")
    assert VNNI is None


@pytest.mark.parametrize("K,N", [(1, 1), (15, 33), (33, 15), (773, 65), (768, 130)])
def test_pack_layout_and_its_inverse(K, N):
    w = torch.randint(-127, 128, (K, N), dtype=torch.int8)
    packed, comp = quant.pack_vnni(w)
    Kp, Np = -(-K // 4) * 4, -(-N // 64) * 64
    assert packed.shape == (Np // 64, Kp // 4, 64, 4) and packed.is_contiguous()
    k, n = torch.randint(0, K, (50,)), torch.randint(0, N, (50,))
    assert torch.equal(packed[n // 64, k // 4, n % 64, k % 4], w[k, n])          # the layout, element by element
    full = torch.zeros(Kp, Np, dtype=torch.int8)
    full[:K, :N] = w
    assert int(packed.abs().sum()) == int(full.abs().sum())                      # zeros in the padding
    assert torch.equal(comp, 128 * w.int().sum(0)) and comp.dtype == torch.int32
    assert torch.equal(quant.unpack_vnni(packed, K, N), w)


@compiled
@pytest.mark.parametrize("activation", ["none", "gelu", "relu"])
@pytest.mark.parametrize("R,K,N", [(1, 15, 33), (7, 1, 1), (300, 773, 65), (257, 64, 130), (40, 768, 777)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bit_equal_to_int8_linear(activation, R, K, N, dtype):
    x, qw_t, sw, bias = packed_inputs(R, K, N, dtype)
    packed, comp = quant.pack_vnni(qw_t)
    for row_block in (3, 256):
        want = torch.empty(R, N, dtype=dtype)
        torch.ops.rmt_fast.int8_linear(x, qw_t, sw, bias, activation, row_block, want)
        got = torch.full((R, N), float("nan"), dtype=dtype)
        torch.ops.rmt_fast.int8_linear_vnni(x, packed, comp, sw, bias, activation, row_block, got)
        assert torch.equal(got, want), row_block


@compiled
def test_output_dtype_may_differ_and_rows_may_be_strided():
    x, qw_t, sw, bias = packed_inputs(50, 96, 70, torch.float32)
    big = torch.randn(50, 200)
    big[:, 10:106] = x
    want = torch.empty(50, 70, dtype=torch.bfloat16)
    torch.ops.rmt_fast.int8_linear(x, qw_t, sw, bias, "gelu", 16, want)
    out = torch.empty(50, 100, dtype=torch.bfloat16)
    torch.ops.rmt_fast.int8_linear_vnni(big[:, 10:106], *quant.pack_vnni(qw_t), sw, bias, "gelu", 16, out[:, 5:75])
    assert torch.equal(out[:, 5:75], want)


@compiled
@pytest.mark.parametrize("R", [1, 33, 600])
def test_same_result_at_any_thread_count(R):
    """One row block on two threads splits the columns into groups; many blocks split the rows."""
    x, qw_t, sw, bias = packed_inputs(R, 130, 300)
    packed, comp = quant.pack_vnni(qw_t)
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = torch.empty(R, 300, dtype=torch.bfloat16)
            torch.ops.rmt_fast.int8_linear_vnni(x, packed, comp, sw, bias, "gelu", 256, out)
            results.append(out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*results)


@pytest.mark.parametrize("impl", [pytest.param("compiled", marks=compiled), "twin"])
def test_bad_inputs_raise_naming_the_argument(impl):
    op = torch.ops.rmt_fast.int8_linear_vnni if impl == "compiled" else _ext.int8_linear_vnni_torch
    x, qw_t, sw, bias = packed_inputs(5, 20, 30)
    packed, comp = quant.pack_vnni(qw_t)
    out = torch.empty(5, 30, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="int8_linear_vnni: packed"):
        op(x, quant.pack_vnni(qw_t[:16])[0], comp, sw, bias, "none", 8, out)
    with pytest.raises(RuntimeError, match="int8_linear_vnni: comp must be int32, "):
        op(x, packed, comp.long(), sw, bias, "none", 8, out)
    if impl == "compiled":
        with pytest.raises(RuntimeError, match="int8_linear_vnni: weight_scale must be"):
            op(x, packed, comp, sw[:7], bias, "none", 8, out)
        with pytest.raises(RuntimeError, match="int8_linear_vnni: activation must be"):
            op(x, packed, comp, sw, bias, "tanh", 8, out)
        with pytest.raises(RuntimeError, match="int8_linear_vnni: row_block must be >= 1"):
            op(x, packed, comp, sw, bias, "none", 0, out)


def test_twin_is_int8_linear_on_the_unpacked_weight():
    x, qw_t, sw, bias = packed_inputs(37, 45, 70)
    want, got = torch.empty(37, 70), torch.empty(37, 70)
    _ext.int8_linear_torch(x, qw_t, sw, bias, "relu", 16, want)
    _ext.int8_linear_vnni_torch(x, *quant.pack_vnni(qw_t), sw, bias, "relu", 16, got)
    assert torch.equal(got, want)


@compiled
@pytest.mark.parametrize("act", [None, "gelu"])
def test_layer_kernels_agree_and_the_layer_calls_one_op(act):
    from torch.profiler import profile
    w, b = torch.randn(70, 48), torch.randn(70)
    x = torch.randn(3, 200, 48).to(torch.bfloat16)
    vnni, int_mm = (quant.Int8Linear(w, b, act, kernel=k) for k in ("vnni", "int_mm"))
    assert quant.Int8Linear(w, b, act).kernel == "vnni"                          # the default where it runs
    assert torch.equal(vnni.qweight_t, int_mm.qweight_t)
    with profile() as prof:
        y = vnni(x)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("rmt_fast::int8_linear_vnni") == 1 and "aten::_int_mm" not in calls
    assert torch.equal(y, int_mm(x))
    with pytest.raises(ValueError, match="int8 kernel 'vnn' is not one of"):
        quant.Int8Linear(w, b, act, kernel="vnn")


@compiled
def test_opcheck():
    from torch.library import opcheck
    x, qw_t, sw, bias = packed_inputs(7, 33, 40)
    for col_sum in (None, qw_t.int().sum(0, dtype=torch.int32)):
        opcheck(torch.ops.rmt_fast.int8_linear_vnni.default,
                (x, *quant.pack_vnni(qw_t), sw, bias, "gelu", 4, torch.empty(7, 40, dtype=torch.bfloat16), col_sum))
