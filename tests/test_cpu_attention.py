"""torch.ops.rmt_fast.attention (the fused CPU op) and the attention backend 'cpp' built on it.

Against a float64 reference on fresh random inputs (conftest seeds every test anew and prints the
seed on failure): odd lengths, fewer queries than keys, several key blocks (the online softmax),
head_dim 32/64/128 and odd, padded and unpadded, strided views of a fused qkv tensor, each dtype with
a tolerance tied to it (bfloat16/float16: at most 2x torch SDPA's own error on the same inputs), the
Engine with attention='cpp' against the oracle, the checks and the backend's reasons. The op's cases
skip when the extension is not built (or was built before the op existed).
"""
import math
import types

import pytest
import torch

from attention_reference import attention_reference
from helpers import bert_base_cased_config, make_model, oracle, random_docs
from rmt_fast import Engine, _ext
from rmt_fast.engine import backends

REASON = _ext.attention_why_unavailable()
requires_op = pytest.mark.skipif(REASON is not None, reason=f"rmt_fast.attention unavailable: {REASON}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def fused_qkv(B, Tq, Tk, H, D, dtype, spread=1.0):
    """q, k, v as views of one [B, T, 3, H, D] projection, as the engine passes them (Tq <= Tk)."""
    qkv = (torch.randn(B, Tk, 3, H, D) * spread).to(dtype)
    return qkv[:, :Tq, 0], qkv[:, :, 1], qkv[:, :, 2]


def poisoned_op(q, k, v, key_lengths, scale):
    """The op with every at::empty it makes filled with NaN (torch's deterministic mode fills
    uninitialised memory): an output element it forgets to write, or scratch or packing padding it
    reads before writing, shows up as NaN."""
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        return torch.ops.rmt_fast.attention(q, k, v, key_lengths, scale)
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def check_against_reference(q, k, v, key_lengths, scale):
    got = poisoned_op(q, k, v, key_lengths, scale)
    B, Tq, H, D = q.shape
    assert got.shape == (B, Tq, H * D) and got.dtype == q.dtype and got.is_contiguous()
    assert torch.isfinite(got).all()
    want = attention_reference(q, k, v, key_lengths, scale)
    err = (got.double() - want).abs()
    # No worse than torch's own SDPA on the same inputs, max and mean: its error is the inputs'
    # conditioning (large scores amplify the products' rounding) plus, for 16-bit, mostly the final
    # rounding to the dtype. The floor: float32, a few ulps of the output's scale (a well-conditioned
    # case where SDPA happens to be nearly exact); 16-bit, far below one ulp (exact cases).
    sdpa = backends.sdpa_attention(q, k, v, key_lengths, scale)
    ref_err = (sdpa.double() - want).abs()
    eps = torch.finfo(q.dtype).eps
    floor = 64 * eps * max(1.0, want.abs().max().item()) if q.dtype == torch.float32 else eps * 1e-3
    assert err.max().item() <= max(2 * ref_err.max().item(), floor)
    assert err.mean().item() <= max(2 * ref_err.mean().item(), floor)
    if key_lengths is not None:
        assert (got[key_lengths == 0] == 0).all()
    return got


# --- the op against float64 -----------------------------------------------------------------------

@requires_op
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 2, 11, 100, 511, 512, 513])
def test_self_attention_odd_lengths(dtype, T):
    q, k, v = fused_qkv(2, T, T, 3, 64, dtype)
    check_against_reference(q, k, v, None, 1 / 8)


@requires_op
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 64, 128, 33, 80])
def test_head_dims(dtype, D):
    q, k, v = fused_qkv(2, 37, 70, 2, D, dtype)
    check_against_reference(q, k, v, torch.tensor([70, 41]), 1 / math.sqrt(D))


@requires_op
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Tq,Tk", [(11, 512), (11, 522), (1, 513), (100, 1100), (64, 1537), (513, 1025)])
def test_fewer_queries_and_several_key_blocks(dtype, Tq, Tk):
    """Tk > 512 takes several steps of the online softmax; Tq < Tk as in the engine's last layer."""
    q, k, v = fused_qkv(1, Tq, Tk, 2, 64, dtype)
    check_against_reference(q, k, v, None, 1 / 8)


@requires_op
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Tq,Tk,lengths", [
    (512, 512, [0, 1, 512, 300]),
    (513, 513, [513, 2, 0, 257]),
    (11, 522, [1, 522, 0, 64]),
    (100, 1100, [1100, 513, 512, 1]),
    (7, 5, [0, 0, 0, 0]),
    (3, 40, [1000, 39, 40, 41]),  # a length past Tk masks nothing
])
def test_padded(dtype, Tq, Tk, lengths):
    q, k, v = fused_qkv(4, Tq, Tk, 2, 64, dtype)
    check_against_reference(q, k, v, torch.tensor(lengths), 1 / 8)


@requires_op
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_peaked_softmax_and_scale(dtype):
    """Large scores (one key dominates, exp of very negative arguments) and a scale other than 1/sqrt(D)."""
    q, k, v = fused_qkv(2, 50, 600, 2, 64, dtype, spread=3.0)
    check_against_reference(q, k, v, torch.tensor([600, 333]), 0.7)
    check_against_reference(q, k, v, None, 1e-3)
    check_against_reference(q, k, v, torch.tensor([17, 600]), -0.3)  # the max of c * s with c < 0


@requires_op
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_other_strides(dtype):
    """Separate tensors, a [B, heads, T, D] layout transposed, and a batch-strided slice."""
    B, T, H, D = 3, 77, 4, 32
    q = torch.randn(B, H, T, D).to(dtype).transpose(1, 2)                  # heads-major storage
    k = torch.randn(B, T, H, D).to(dtype)
    v = torch.randn(2 * B, T, H, D).to(dtype)[::2]                         # every other batch row
    check_against_reference(q, k, v, torch.tensor([77, 10, 0]), 0.2)


@requires_op
def test_poisoning_reaches_the_op():
    """The NaN fill of poisoned_op does reach the op's own allocations (else the checks above are weaker)."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.utils.deterministic.fill_uninitialized_memory
        assert torch.isnan(torch.ops.aten.empty.memory_format([4], dtype=torch.float32)).all()
    finally:
        torch.use_deterministic_algorithms(was)


SCALAR_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from test_cpu_attention import check_against_reference, fused_qkv
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for B, Tq, Tk, D, kl in ((2, 37, 600, 64, [600, 0]), (1, 11, 77, 33, None), (2, 5, 1030, 32, [1, 1030])):
        q, k, v = fused_qkv(B, Tq, Tk, 2, D, dtype)
        check_against_reference(q, k, v, None if kl is None else torch.tensor(kl), D ** -0.5)
print("ok")
"""


def run_checks_with(env_var, value="1"):
    """SCALAR_SCRIPT's checks in a subprocess with ``env_var=value`` (the op reads its switches once
    per process)."""
    import os
    import subprocess
    import sys
    tests = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-c", SCALAR_SCRIPT.format(tests=tests)],
                         env=dict(os.environ, **{env_var: value}), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@requires_op
def test_scalar_paths_without_avx512():
    """ATEN_CPU_CAPABILITY=avx2 (torch's own switch, which the op follows): the row passes and packing
    without AVX-512, as on a CPU without it."""
    run_checks_with("ATEN_CPU_CAPABILITY", "avx2")


@requires_op
def test_bfloat16_through_the_float32_path():
    """RMT_FAST_ATTENTION_BF16_AS_FLOAT32=1: bfloat16 inputs converted and run by the float32
    micro-kernel, the path of CPUs with neither AMX nor AVX512-BF16; without it this CPU runs the bf16
    micro-kernel where it has one (the other tests)."""
    run_checks_with("RMT_FAST_ATTENTION_BF16_AS_FLOAT32")


@requires_op
def test_same_result_at_any_thread_count():
    q, k, v = fused_qkv(3, 300, 700, 4, 64, torch.bfloat16)
    kl = torch.tensor([700, 5, 513])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.rmt_fast.attention(q, k, v, kl, 0.125)
        torch.set_num_threads(max(2, threads))
        many = torch.ops.rmt_fast.attention(q, k, v, kl, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@requires_op
def test_empty_inputs():
    for shape_q, shape_kv in [((0, 5, 2, 32), (0, 5, 2, 32)), ((2, 0, 2, 32), (2, 5, 2, 32)),
                              ((2, 3, 2, 32), (2, 0, 2, 32))]:
        q, k = torch.randn(shape_q), torch.randn(shape_kv)
        out = poisoned_op(q, k, k, None, 1.0)
        assert out.shape == (shape_q[0], shape_q[1], 64)
        assert (out == 0).all()  # no keys: zeros


# --- checks, schema, dispatch ---------------------------------------------------------------------

@requires_op
@pytest.mark.parametrize("make,message", [
    (lambda q, k, v: (q[0], k, v, None), "q must be 4-D"),
    (lambda q, k, v: (q, k[:, :, :1], v, None), "k must have shape"),
    (lambda q, k, v: (q, k, v[:, :3], None), "v must have shape"),
    (lambda q, k, v: (q.double(), k, v, None), "q must be float32, bfloat16 or float16"),
    (lambda q, k, v: (q, k.half(), v, None), "k must be"),
    (lambda q, k, v: (q, k, v.transpose(1, 3).contiguous().transpose(1, 3), None),
     "v must have stride 1 in its last dimension"),
    (lambda q, k, v: (q, k, v, torch.tensor([3])), r"key_lengths must have shape \(B\)"),
    (lambda q, k, v: (q, k, v, torch.tensor([3, 4], dtype=torch.int32)), "key_lengths must be Long"),
    (lambda q, k, v: (q, k, v, torch.tensor([3, -1])), "key_lengths\\[1\\] = -1 is negative"),
])
def test_bad_inputs_raise(make, message):
    q, k, v = fused_qkv(2, 4, 6, 2, 32, torch.float32)
    with pytest.raises(RuntimeError, match="rmt_fast::attention: " + message):
        torch.ops.rmt_fast.attention(*make(q, k, v), 1.0)


@requires_op
def test_schema_and_opcheck():
    schema = str(torch.ops.rmt_fast.attention.default._schema)
    assert schema == ("rmt_fast::attention(Tensor q, Tensor k, Tensor v, Tensor? key_lengths, "
                      "float scale) -> Tensor")
    q, k, v = fused_qkv(2, 5, 9, 2, 32, torch.float32)
    for kl in (None, torch.tensor([9, 0])):
        torch.library.opcheck(torch.ops.rmt_fast.attention, (q, k, v, kl, 0.3))


@requires_op
def test_meta_kernel_shapes():
    q = torch.empty(2, 11, 12, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 512, 12, 64, device="meta", dtype=torch.bfloat16)
    out = torch.ops.rmt_fast.attention(q, k, k, None, 1.0)
    assert out.shape == (2, 11, 768) and out.dtype == torch.bfloat16 and out.device.type == "meta"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_twin_matches_reference(dtype):
    q, k, v = fused_qkv(3, 11, 40, 2, 32, dtype)
    kl = torch.tensor([40, 0, 1])
    got = _ext.attention_torch(q, k, v, kl, 0.25)
    want = attention_reference(q, k, v, kl, 0.25)
    assert got.dtype == dtype and got.shape == want.shape
    # 16-bit: one rounding of P and of the output dominate; float32: rounding accumulates over the keys.
    ulps = 32 if dtype == torch.float32 else 4
    assert (got.double() - want).abs().max().item() <= ulps * torch.finfo(dtype).eps * max(1, want.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_op_callers_call_matches_reference(dtype):
    """_ext.attention: the compiled kernel where built, else the twin registered as the op; either way
    against the float64 reference (not against the twin, which would compare the twin with itself)."""
    q, k, v = fused_qkv(2, 9, 20, 2, 32, dtype)
    kl = torch.tensor([20, 3])
    got = _ext.attention(q, k, v, kl)  # default scale 1/sqrt(D)
    want = attention_reference(q, k, v, kl, 1 / math.sqrt(32))
    assert got.dtype == dtype and got.shape == want.shape
    ulps = 32 if dtype == torch.float32 else 4
    assert (got.double() - want).abs().max().item() <= ulps * torch.finfo(dtype).eps * max(1, want.abs().max().item())


# --- the backend ----------------------------------------------------------------------------------

def test_backend_is_listed_and_says_why_not(monkeypatch):
    assert "cpp" in backends.BACKENDS
    q = torch.zeros(1, 2, 1, 64)
    assert backends.why_not("cpp", q, q, q) == REASON and (REASON is None or REASON.startswith(
        "the rmt_fast._C extension is not built: "))
    monkeypatch.setattr(_ext, "attention_why_unavailable", lambda device=None: "no library here")
    assert backends.why_not("cpp", q, q, q) == "the rmt_fast._C extension is not built: no library here"
    with pytest.raises(RuntimeError, match="attention backend 'cpp' cannot run here: the rmt_fast._C"):
        backends.select("cpp", q, q, q)
    assert backends.select("auto", q, q, q) != "cpp"


def test_priority_on_the_cpu():
    cpu = torch.device("cpu")
    assert backends.priority(cpu, torch.float32)[0] == "cpp"
    assert backends.priority(cpu, torch.bfloat16)[0] == "cpp"
    assert backends.priority(cpu, torch.float16)[0] == "sdpa"  # no AMX-FP16 here: slower than SDPA
    q = torch.zeros(1, 2, 1, 64)
    assert backends.select("auto", q, q, q) == ("cpp" if REASON is None else "sdpa")


@requires_op
def test_backend_refuses_other_devices_and_dtypes():
    cuda_like = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float16)
    assert "CUDA tensors" in backends.why_not("cpp", cuda_like, cuda_like, cuda_like)
    q = torch.zeros(1, 2, 1, 64, dtype=torch.float64)
    assert backends.why_not("cpp", q, q, q) == "dtype torch.float64 is not supported"
    assert backends.available(torch.device("cpu"))["cpp"] is None


@requires_op
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_matches_sdpa_backend(dtype):
    q, k, v = fused_qkv(2, 11, 522, 12, 64, dtype)
    kl = torch.tensor([522, 100])
    got = backends.attention("cpp", q, k, v, kl, scale=0.125)
    want = attention_reference(q, k, v, kl, 0.125)
    sdpa = backends.attention("sdpa", q, k, v, kl, scale=0.125)
    assert (got.double() - want).abs().max() <= 2 * (sdpa.double() - want).abs().max() + 1e-6


# --- the whole engine -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert2():
    """A 2-layer model of bert-base-cased's shape (hidden 768, 12 heads), as in test_engine.py."""
    torch.manual_seed(1234)
    return make_model(bert_base_cased_config(num_layers=2), num_mem_tokens=10, input_size=512)


@requires_op
def test_engine_with_cpp_attention_matches_oracle(bert2):
    docs = random_docs([7, 620, 1100], bert2.config.vocab_size)
    want = torch.stack([oracle(bert2, d) for d in docs])
    engine = Engine(bert2, attention="cpp")
    got = engine.classify(docs, batch_size=2)
    assert (got.double() - want).abs().max() <= 1e-4
    assert set(engine.plan._chosen.values()) == {"cpp"}


@requires_op
def test_engine_bfloat16_cpp_no_worse_than_sdpa(bert2):
    docs = random_docs([30, 700], bert2.config.vocab_size)
    want = torch.stack([oracle(bert2, d) for d in docs])
    err = {}
    for name in ("cpp", "sdpa"):
        got = Engine(bert2, dtype=torch.bfloat16, attention=name).classify(docs, batch_size=2)
        err[name] = (got.double() - want).abs().max().item()
    # the bf16 layers' rounding dominates; attention alone must not make it clearly worse
    assert err["cpp"] <= 2 * err["sdpa"] + 1e-3, err
