"""The fused Triton attention kernel (kernels/attention.py) against a float64 reference.

On a CPU these run under Triton's interpreter (conftest sets TRITON_INTERPRET=1 before triton is imported),
in float32 and float16 only: the interpreter's bfloat16 tl.dot is broken (docs/DESIGN.md), so the bfloat16
tests need a GPU and skip here. Sizes are small on purpose; the interpreter runs one program at a time.
"""
import subprocess
import sys

import pytest
import torch

from attention_reference import attention_reference as reference
from conftest import HAS_CUDA, INTERPRET, requires_cuda

triton = pytest.importorskip("triton")

from rmt_fast.kernels import attention as attn_mod  # noqa: E402
from rmt_fast.kernels.attention import attention, why_not  # noqa: E402

DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
# (atol, rtol) against float64: float32 dots are IEEE (no TF32); half types lose precision in P @ V.
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
CPU_DTYPES = [torch.float32, torch.float16]
ODD_T = [1, 2, 11, 12, 100, 511, 512, 513]


def fused_qkv(b, t, h, d, dtype):
    """q, k, v as the engine sees them: strided views of one fused projection output [B, T, 3, H, D]."""
    qkv = torch.randn(b, t, 3, h, d, device=DEVICE, dtype=torch.float32).to(dtype)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def poisoned_out(b, tq, h, d, dtype):
    return torch.full((b, tq, h * d), float("nan"), device=DEVICE, dtype=dtype)


def run_and_check(q, k, v, key_lengths=None, scale=None):
    b, tq, h, d = q.shape
    out = poisoned_out(b, tq, h, d, q.dtype)
    got = attention(q, k, v, key_lengths=key_lengths, scale=scale, out=out)
    assert got is out
    assert got.dtype == q.dtype and got.shape == (b, tq, h * d)
    assert not torch.isnan(got).any(), "kernel left NaN (unwritten or 0/0) in the output"
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(got.double(), reference(q, k, v, key_lengths, scale), atol=atol, rtol=rtol)
    return got


def random_lengths(b, t):
    """Per-document key lengths in [1, t], the first one full (only a partial segment is padded)."""
    kl = torch.randint(1, t + 1, (b,), device=DEVICE, dtype=torch.int32)
    kl[0] = t
    return kl


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("t", ODD_T)
def test_odd_lengths(t, padded, dtype):
    q, k, v = fused_qkv(2, t, 2, 64, dtype)
    run_and_check(q, k, v, random_lengths(2, t) if padded else None)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_head_dims(head_dim, dtype):
    q, k, v = fused_qkv(2, 100, 2, head_dim, dtype)
    run_and_check(q, k, v, torch.tensor([100, 61], device=DEVICE))
    run_and_check(q[:, :64], k[:, :64], v[:, :64])  # full, divisible: the unmasked path


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_key_length_zero_and_one(dtype):
    q, k, v = fused_qkv(3, 12, 2, 32, dtype)
    kl = torch.tensor([0, 1, 12], device=DEVICE, dtype=torch.int64)
    got = run_and_check(q, k, v, kl)
    assert torch.all(got[0] == 0), "a row with no valid key must output zeros"
    torch.testing.assert_close(got[1], v[1, :1].reshape(1, -1).expand(12, -1))  # one key: softmax is 1


def test_padding_contents_never_leak():
    # Padded keys/values hold garbage in a real slot; masked loads must not read them (NaN * 0 = NaN).
    q, k, v = fused_qkv(2, 100, 2, 64, torch.float32)
    kl = torch.tensor([70, 100], device=DEVICE)
    want = reference(q, k, v, kl)
    k[0, 70:] = float("nan")
    v[0, 70:] = float("inf")
    out = attention(q, k, v, key_lengths=kl, out=poisoned_out(2, 100, 2, 64, torch.float32))
    torch.testing.assert_close(out.double(), want, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1])


def test_key_lengths_out_of_range_are_clamped():
    q, k, v = fused_qkv(2, 20, 1, 32, torch.float32)
    out = attention(q, k, v, key_lengths=torch.tensor([-3, 50], device=DEVICE))
    torch.testing.assert_close(out.double(), reference(q, k, v, torch.tensor([0, 20], device=DEVICE)),
                               atol=2e-5, rtol=2e-5)


def test_strided_key_lengths():
    """A key_lengths view with a stride (a column of a wider per-step table) is read correctly."""
    q, k, v = fused_qkv(3, 40, 2, 32, torch.float32)
    table = torch.tensor([[40, 7, 0], [13, 9, 1], [1, 5, 2]], device=DEVICE)
    run_and_check(q, k, v, key_lengths=table[:, 0])


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_query_subset(padded, dtype):
    # The last layer: queries for the first M + 1 rows (memory + [CLS]), keys and values over the block.
    q, k, v = fused_qkv(2, 512, 2, 64, dtype)
    kl = torch.tensor([512, 300], device=DEVICE) if padded else None
    run_and_check(q[:, :11], k, v, kl)
    run_and_check(q[:, :1], k, v, kl)


def test_long_block_head_dim_32():
    q, k, v = fused_qkv(1, 4096, 1, 32, torch.float16)
    run_and_check(q, k, v)
    run_and_check(q[:, :11], k, v, torch.tensor([4001], device=DEVICE))


def test_other_strides_and_scale():
    # Head-major storage [B, H, T, D] seen as [B, T, H, D], and an out that is a slice of a wider buffer.
    b, t, h, d = 2, 33, 3, 64
    q, k, v = (torch.randn(b, h, t, d, device=DEVICE).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    run_and_check(q, k, v, torch.tensor([33, 5], device=DEVICE), scale=0.3)
    wide = torch.full((b, t, h * d + 8), float("nan"), device=DEVICE)
    got = attention(q, k, v, out=wide[:, :, :h * d])
    torch.testing.assert_close(got.double(), reference(q, k, v), atol=2e-5, rtol=2e-5)
    assert torch.isnan(wide[:, :, h * d:]).all(), "wrote outside out"


def test_allocates_out_and_batch_invariance():
    q, k, v = fused_qkv(3, 40, 2, 32, torch.float32)
    kl = torch.tensor([40, 17, 3], device=DEVICE)
    whole = attention(q, k, v, key_lengths=kl)
    assert whole.is_contiguous() and whole.shape == (3, 40, 64)
    for i in range(3):
        alone = attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], key_lengths=kl[i:i + 1])
        torch.testing.assert_close(alone, whole[i:i + 1], atol=1e-6, rtol=1e-6)


def test_empty_inputs_return_out_untouched():
    q, k, v = fused_qkv(2, 8, 1, 32, torch.float32)
    got = attention(q[:, :0], k, v)
    assert got.shape == (2, 0, 32)


@requires_cuda
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("t", [1, 11, 100, 512, 513])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_bfloat16_gpu(head_dim, t, padded):
    q, k, v = fused_qkv(2, t, 2, head_dim, torch.bfloat16)
    kl = random_lengths(2, t) if padded else None
    run_and_check(q, k, v, kl)
    run_and_check(q[:, :min(t, 11)], k, v, kl)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_not_worse_than_torch_half_precision(dtype):
    # flash-attention's bound: the kernel's error within a small multiple of PyTorch's own in that dtype.
    q, k, v = fused_qkv(8, 512, 12, 64, dtype)
    kl = random_lengths(8, 512)
    want = reference(q, k, v, kl)
    pad = torch.arange(512, device=DEVICE)[None, :] >= kl[:, None]
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=~pad[:, None, None, :])
    torch_err = (sdpa.transpose(1, 2).reshape(want.shape).double() - want).abs().max().item()
    ours_err = (attention(q, k, v, key_lengths=kl).double() - want).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-5, (ours_err, torch_err)


@requires_cuda
def test_autotune_gpu(monkeypatch):
    monkeypatch.setenv(attn_mod.AUTOTUNE_ENV, "1")
    q, k, v = fused_qkv(2, 512, 4, 64, torch.float16)
    run_and_check(q, k, v, random_lengths(2, 512))
    run_and_check(q[:, :11], k, v)


@pytest.mark.parametrize("tq, tk, head_dim", [(512, 512, 64), (512, 512, 128), (11, 512, 64), (1, 4096, 32),
                                              (1, 1, 32), (40, 20, 128)])
def test_autotune_pruning(tq, tk, head_dim):
    # The autotuner itself needs a GPU; which configs it would time is plain Python.
    kept = attn_mod._prune_configs(attn_mod._attn_fwd_tuned.configs, {"Tq": tq, "Tk": tk}, HEAD_DIM=head_dim)
    assert 1 <= len(kept) <= 8
    for c in kept:
        bm, bn, _, _ = attn_mod._config_tuple(c)
        assert bm <= max(16, triton.next_power_of_2(tq)), "a query block far wider than Tq wastes work"
        assert bn <= max(32, triton.next_power_of_2(tk))
        assert not (head_dim == 128 and bm * bn > 128 * 64)
    if tq <= 16:
        assert all(c.kwargs["BLOCK_M"] == 16 for c in kept)


def test_autotune_key_includes_the_batch(monkeypatch):
    """Batch 32 must not reuse the configuration tuned at batch 1: each batch size is tuned on its own."""
    tuned = attn_mod._attn_fwd_tuned
    monkeypatch.setattr(attn_mod, "_autotune_enabled", lambda: True)   # the interpreter has no timer
    monkeypatch.setattr(tuned, "cache", {})
    timed_batches = []

    def fake_bench(*args, config, **kwargs):                            # deterministic "timings"
        timed_batches.append(args[tuned.arg_names.index("B")])
        return [float(config.kwargs["BLOCK_N"] + config.num_stages)]
    monkeypatch.setattr(tuned, "_bench", fake_bench)
    for b in (1, 3, 1):
        q, k, v = fused_qkv(b, 11, 1, 32, torch.float32)
        run_and_check(q, k, v)
    assert sorted(set(timed_batches)) == [1, 3], timed_batches          # tuned once per batch size
    assert len(tuned.cache) == 2 and sorted(key[0] for key in tuned.cache) == [1, 3], tuned.cache


def test_autotune_is_off_under_the_interpreter(monkeypatch):
    monkeypatch.setenv(attn_mod.AUTOTUNE_ENV, "1")
    assert attn_mod._autotune_enabled() == (not attn_mod._INTERPRETED)


# why_not and the launcher's errors ---------------------------------------------------------------

def test_why_not_accepts_supported_inputs():
    for d in (32, 64, 128):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            q, k, v = fused_qkv(2, 5, 2, d, dtype)
            assert why_not(q, k, v) is None
            assert why_not(q[:, :2], k, v, torch.tensor([5, 3], device=DEVICE)) is None


@pytest.mark.parametrize("case, words", [
    ("head_dim", "head_dim 48 is not supported"),
    ("dtype", "dtype torch.float64"),
    ("mixed_dtype", "dtypes differ"),
    ("stride", "stride is 2"),
    ("device", "different devices"),
    ("shape", "must be 4-D"),
    ("kv_shape", "disagree"),
    ("kl_dtype", "not int32 or int64"),
    ("kl_shape", "must have shape (2,)"),
    ("kl_device", "key_lengths is on meta"),
])
def test_why_not_reasons_and_launcher_errors(case, words):
    q, k, v = fused_qkv(2, 8, 2, 32, torch.float32)
    kl = None
    if case == "head_dim":
        q, k, v = fused_qkv(2, 8, 2, 48, torch.float32)
    elif case == "dtype":
        q, k, v = (t.double() for t in (q, k, v))
    elif case == "mixed_dtype":
        v = v.half()
    elif case == "stride":
        q = torch.randn(2, 8, 2, 64, device=DEVICE)[..., ::2]
    elif case == "device":
        k = torch.empty(k.shape, device="meta")
    elif case == "shape":
        q = q.reshape(2, 8, 64)
    elif case == "kv_shape":
        k = v = torch.randn(2, 8, 4, 32, device=DEVICE)
    elif case == "kl_dtype":
        kl = torch.tensor([8.0, 3.0], device=DEVICE)
    elif case == "kl_shape":
        kl = torch.tensor([8, 3, 1], device=DEVICE)
    elif case == "kl_device":
        kl = torch.empty(2, dtype=torch.int32, device="meta")
    reason = why_not(q, k, v, kl)
    assert reason is not None and words in reason, reason
    with pytest.raises(ValueError, match="Triton attention cannot run") as err:
        attention(q, k, v, key_lengths=kl)
    assert words in str(err.value)


@pytest.mark.parametrize("bad_out, words", [
    (lambda: torch.empty(2, 8, 32, device=DEVICE), "out must have shape"),
    (lambda: torch.empty(2, 8, 64, device=DEVICE, dtype=torch.float16), "out is torch.float16"),
    (lambda: torch.empty(2, 64, 8, device=DEVICE).transpose(1, 2), "stride must be 1"),
])
def test_launcher_rejects_bad_out(bad_out, words):
    q, k, v = fused_qkv(2, 8, 2, 32, torch.float32)
    with pytest.raises(ValueError, match=words):
        attention(q, k, v, out=bad_out())


def test_why_not_without_triton_or_device(monkeypatch):
    q, k, v = fused_qkv(1, 4, 1, 32, torch.float32)
    monkeypatch.setattr(attn_mod, "triton", None)
    assert why_not(q, k, v) == "triton is not installed"
    monkeypatch.undo()
    if DEVICE == "cpu":
        monkeypatch.setattr(attn_mod, "_INTERPRETED", False)
        reason = why_not(q, k, v)
        assert reason is not None and ("TRITON_INTERPRET" in reason or "CUDA device" in reason), reason


def test_import_needs_neither_triton_nor_cuda():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from rmt_fast.kernels.attention import attention, why_not\n"
        "q = torch.zeros(1, 4, 1, 32)\n"
        "assert why_not(q, q, q) == 'triton is not installed', why_not(q, q, q)\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
