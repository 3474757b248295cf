"""Asymmetric per-token activations for int8 (float32 plans; engine/quant.py, csrc/cpu/int8_rows.h):
quantize against a float64 oracle and the meaning of (scale, zero point), the zero-point correction in
dequantize, int8_linear and int8_linear_vnni bit-equal to their parts, the layer against float64, and the
Engine's choice of scheme. tests/test_int8_kernels.py runs this file's compiled cases again in a
subprocess without AVX-512 (the scalar code)."""
import pytest
import torch
import torch.nn.functional as F

from rmt_fast import _ext
from rmt_fast.engine import quant

COMPILED = _ext.int8_kernels_compiled()
VNNI = quant.vnni_problem()
QUANTIZE = {"compiled": lambda x: torch.ops.rmt_fast.int8_quantize_rows_asym(x),
            "twin": _ext.int8_quantize_rows_asym_torch}
DEQUANTIZE = {"compiled": lambda *a: torch.ops.rmt_fast.int8_dequantize(*a), "twin": _ext.int8_dequantize_torch}
LINEAR = {"compiled": lambda *a: torch.ops.rmt_fast.int8_linear(*a), "twin": _ext.int8_linear_torch}
impls = pytest.mark.parametrize("impl", [
    pytest.param("compiled", marks=pytest.mark.skipif(not COMPILED, reason=f"no compiled int8 kernels: "
                                                                           f"{_ext.why_unavailable()}")),
    "twin"])
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TINY = torch.finfo(torch.float32).tiny


def odd_rows(R, K, dtype, seed=0):
    """Rows of mixed magnitude and sign pattern: general, all positive (GELU-like), all negative, zeros,
    and one constant row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, K, generator=g) * torch.logspace(-2, 2, R)[:, None]
    if R >= 5:
        x[1] = x[1].abs() + 0.5
        x[2] = -x[2].abs()
        x[3] = 0
        x[4] = 0.7
    return x.to(dtype)


def oracle(x):
    """float64 with float32 roundings where the kernels round: (u, scale, z) with x ~ scale * (u - z)."""
    x64 = x.double()
    lo, hi = x64.amin(1, keepdim=True).clamp(max=0), x64.amax(1, keepdim=True).clamp(min=0)
    scale = ((hi - lo).float().double() / 255).float().double().clamp_min(TINY)
    zq = -lo / scale
    z = torch.round(zq).clamp(0, 255)
    v = x64 / scale
    u = (torch.round(v) + z).clamp(0, 255)
    return u, scale, z, v, zq


def near_tie(v):
    return (v - v.floor() - 0.5).abs() < 2 ** -21 * v.abs().clamp_min(1)


@impls
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,K", [(1, 1), (5, 15), (9, 33), (40, 773)])
def test_quantize_against_float64_oracle(impl, dtype, R, K):
    x = odd_rows(R, K, dtype)
    q, scale, zero = QUANTIZE[impl](x)
    assert (q.dtype, scale.dtype, zero.dtype) == (torch.int8, torch.float32, torch.int32)
    assert q.shape == (R, K) and scale.shape == (R, 1) and zero.shape == (R, 1)
    u, want_scale, z, v, zq = oracle(x)
    assert torch.equal(scale.double(), want_scale)                               # exact
    assert ((zero.double() + 128 == z) | near_tie(zq)).all()
    z = zero.double() + 128                                                       # the kernel's own z
    want_u = (torch.round(v) + z).clamp(0, 255)
    ok = (q.double() + 128 == want_u) | near_tie(v)
    assert ok.all(), f"{int((~ok).sum())} differ, e.g. {(~ok).nonzero()[0].tolist()}"


@impls
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_and_zero_point_mean_what_they_say(impl, dtype):
    """x ~ scale * (q - zero) within half a step; 0 is exact; the row's min and max use the range's ends
    (the step is (max(x, 0) - min(x, 0)) / 255, half the symmetric step for one-signed rows)."""
    x = odd_rows(40, 301, dtype, seed=3)
    x[7, ::3] = 0
    q, scale, zero = QUANTIZE[impl](x)
    back = scale.double() * (q.double() - zero.double())
    err = (back - x.double()).abs()
    assert (err <= scale.double() * (0.5 + 1e-4)).all()
    assert (back[x == 0] == 0).all()
    general = torch.ones(40, dtype=torch.bool)
    general[[3, 4]] = False                                                      # zeros; constant
    lo_hi = torch.stack([x.double().amin(1).clamp(max=0), x.double().amax(1).clamp(min=0)], 1)
    assert ((lo_hi[:, 1] - lo_hi[:, 0]) / 255 - scale[:, 0].double()).abs().div(scale[:, 0].double())[general].max() < 1e-6
    u = q.int() + 128              # the range's ends map to 0 and 255, give or take z's and x's own roundings
    assert (u.amax(1)[lo_hi[:, 1] > 0] >= 254).all() and (u.amin(1)[lo_hi[:, 0] < 0] <= 1).all()
    assert (q[3] == zero[3]).all() and scale[3].item() == TINY                     # an all-zero row
    sym_scale = _ext.int8_quantize_rows_torch(x)[1]
    assert (scale[1] < 0.51 * sym_scale[1]).all() and (scale[2] < 0.51 * sym_scale[2]).all()


@pytest.mark.skipif(not COMPILED, reason="no compiled int8 kernels")
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_quantize_is_its_twin(dtype):
    x = odd_rows(70, 773, dtype, seed=5)
    for a, b in zip(QUANTIZE["compiled"](x), QUANTIZE["twin"](x)):
        assert torch.equal(a, b)
    strided = odd_rows(9, 120, dtype)[1::2, 3:100]
    for a, b in zip(QUANTIZE["compiled"](strided), QUANTIZE["compiled"](strided.contiguous())):
        assert torch.equal(a, b)


@impls
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("N", [1, 33, 130])
def test_dequantize_subtracts_zero_times_column_sums(impl, activation, N):
    R, K = 7, 50
    qx = torch.randint(-128, 128, (R, K), dtype=torch.int8)
    qw = torch.randint(-127, 128, (K, N), dtype=torch.int8)
    zero = torch.randint(-128, 128, (R, 1), dtype=torch.int32)
    col_sum = qw.int().sum(0, dtype=torch.int32)
    acc = torch._int_mm(qx, qw) if R > 16 else (qx.int() @ qw.int())             # _int_mm wants > 16 rows
    sx, sw, bias = torch.rand(R, 1) * 1e-2, torch.rand(N) * 1e-2, torch.randn(N)
    out = torch.full((R, N), float("nan"))
    DEQUANTIZE[impl](acc, sx, sw, bias, activation, out, zero, col_sum)
    exact = ((qx.double() - zero.double()) @ qw.double()) * sx.double() * sw.double() + bias.double()
    exact = F.gelu(exact) if activation == "gelu" else exact
    assert ((out.double() - exact).abs() <= 1e-5 * (1 + exact.abs())).all()
    with pytest.raises(RuntimeError, match="int8_dequantize: row_zero and col_sum go together"):
        DEQUANTIZE[impl](acc, sx, sw, bias, activation, out, zero, None)
    with pytest.raises(RuntimeError, match="int8_dequantize: row_zero must be"):
        DEQUANTIZE[impl](acc, sx, sw, bias, activation, out, zero[:3], col_sum)
    with pytest.raises(RuntimeError, match="int8_dequantize: col_sum must"):
        DEQUANTIZE[impl](acc, sx, sw, bias, activation, out, zero, col_sum.long())


@impls
@pytest.mark.parametrize("R,row_block", [(1, 256), (40, 16), (300, 256)])
def test_int8_linear_with_col_sum_is_its_parts(impl, R, row_block):
    K, N = 33, 45
    x = odd_rows(R, K, torch.bfloat16)
    qw = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    col_sum = qw.int().sum(1, dtype=torch.int32)
    sw, bias = torch.rand(N) * 1e-2, torch.randn(N)
    want = torch.empty(R, N, dtype=torch.bfloat16)
    for r in range(0, R, row_block):
        q, s, z = QUANTIZE[impl](x[r:r + row_block])
        acc = torch._int_mm(q, qw.t()) if q.shape[0] > 16 else q.int() @ qw.t().int()
        DEQUANTIZE[impl](acc, s, sw, bias, "gelu", want[r:r + row_block], z, col_sum)
    out = torch.full((R, N), float("nan"), dtype=torch.bfloat16)
    LINEAR[impl](x, qw.t(), sw, bias, "gelu", row_block, out, col_sum)
    assert torch.equal(out, want)
    with pytest.raises(RuntimeError, match="int8_linear: col_sum must|col_sum must have shape"):
        LINEAR[impl](x, qw.t(), sw, bias, "gelu", row_block, out, col_sum[:5])


@pytest.mark.skipif(VNNI is not None, reason=f"int8_linear_vnni cannot run here: {VNNI}")
@pytest.mark.parametrize("activation", ["none", "gelu", "relu"])
@pytest.mark.parametrize("R,K,N", [(1, 15, 33), (7, 1, 1), (300, 773, 65), (40, 768, 777)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_vnni_asymmetric_bit_equal_to_int8_linear(activation, R, K, N, dtype):
    x = odd_rows(R, K, dtype)
    q, sw = quant.quantize_weight(torch.randn(N, K))
    bias = torch.randn(N)
    packed, comp = quant.pack_vnni(q.t())
    col_sum = q.int().sum(1, dtype=torch.int32)
    for row_block in (3, 256):
        want = torch.empty(R, N, dtype=dtype)
        torch.ops.rmt_fast.int8_linear(x, q.t(), sw, bias, activation, row_block, want, col_sum)
        got = torch.full((R, N), float("nan"), dtype=dtype)
        torch.ops.rmt_fast.int8_linear_vnni(x, packed, comp, sw, bias, activation, row_block, got, col_sum)
        assert torch.equal(got, want), row_block
        twin = torch.full((R, N), float("nan"), dtype=dtype)
        _ext.int8_linear_vnni_torch(x, packed, comp, sw, bias, activation, row_block, twin, col_sum)
        assert (twin.double() - want.double()).abs().max() <= 1e-5 * (1 + want.double().abs().max())


@pytest.mark.skipif(quant.int8_available(torch.device("cpu")) is not None, reason="no int8 here")
@pytest.mark.parametrize("kernel", ["vnni", "int_mm"])
@pytest.mark.parametrize("act", [None, "gelu", "gelu_new"])                  # gelu_new: not fused
@pytest.mark.parametrize("lead,K,N", [((1,), 33, 101), ((2, 300), 768, 2 * 768 + 3)])
def test_layer_against_float64(kernel, act, lead, K, N):
    """Int8Linear(activations="asymmetric"), float32 in and out: exact on integers (the float64 oracle
    of the same quantization), and within the dequantization error of the unquantized product."""
    from transformers.activations import ACT2FN
    if kernel == "vnni" and VNNI is not None:
        pytest.skip(VNNI)
    x = F.gelu(torch.randn(*lead, K) * 2)                                       # one-signed-ish, as FFN2 reads
    w = torch.randn(N, K) / K ** 0.5 * torch.logspace(-1, 1, N)[:, None]
    b = torch.randn(N)
    lin = quant.Int8Linear(w, b, act, out_dtype=torch.float32, kernel=kernel, activations="asymmetric")
    y = lin(x)
    assert y.dtype == torch.float32 and y.shape == (*lead, N)
    rows = x.reshape(-1, K)
    q, s, z = _ext.int8_quantize_rows_asym_torch(rows)
    qw = lin.qweight_t.double()
    want = ((q.double() - z.double()) @ qw) * s.double() * lin.weight_scale.double() + b.double()
    want = want if act is None else ACT2FN[act](want.float()).double()
    assert ((y.reshape(-1, N).double() - want).abs() <= 2e-5 * (1 + want.abs())).all()
    exact = F.linear(x.double(), w.double(), b.double())
    exact = exact if act is None else ACT2FN[act](exact)
    xs, ws = rows.double().abs(), w.double().abs()
    sw = lin.weight_scale.double()
    bound = (0.5 * sw * xs.sum(1, keepdim=True) + 0.5 * s.double() * ws.sum(1)).view(*lead, N)
    assert ((y.double() - exact).abs() <= bound * 1.001 + 1e-4).all()
    # asymmetric beats symmetric on these rows (half the step): the mean error is smaller
    sym = quant.Int8Linear(w, b, act, out_dtype=torch.float32, kernel=kernel)
    assert (y.double() - exact).abs().mean() < (sym(x).double() - exact).abs().mean()


def test_scheme_is_chosen_by_the_plan_dtype(monkeypatch):
    if quant.int8_available(torch.device("cpu")) is not None:
        pytest.skip("no int8 here")
    from helpers import bert_base_cased_config, make_model
    from rmt_fast import Engine
    model = make_model(bert_base_cased_config(num_layers=3, hidden_size=64, num_attention_heads=4,
                                              intermediate_size=160), num_mem_tokens=4, input_size=40)
    for dtype, scheme in (("float32", "asymmetric"), ("bfloat16", "symmetric")):
        plan = Engine(model, dtype=dtype, quantize="int8").plan
        layers = [getattr(w, n) for w in plan.layers for n in quant.GEMM_NAMES]
        int8 = [lin for lin in layers if isinstance(lin, quant.Int8Linear)]
        assert int8 and all(lin.activations == scheme for lin in int8)
        assert all((lin.col_sum is not None) == (scheme == "asymmetric") for lin in int8)
        assert f"{scheme} per-token activations" in plan.quantize_status
    monkeypatch.setattr(quant, "ACTIVATIONS", "symmetric")
    plan = Engine(model, dtype="float32", quantize="int8").plan
    assert "symmetric per-token" in plan.quantize_status and "asymmetric" not in plan.quantize_status
    with pytest.raises(ValueError, match="activations 'asym' is not one of"):
        quant.Int8Linear(torch.randn(4, 4), torch.randn(4), activations="asym")
