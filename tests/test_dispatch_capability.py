"""Attention dispatch by the GPU's compute capability (engine/backends.py, ``cuda_why_not``/``cuda_choice``).

No GPU needed: the capability, and the architectures the torch build carries, are given or faked. The
table is what a GTX 1080 Ti (sm_61), a V100 (sm_70), a T4 (sm_75), an A100 (sm_80), an RTX 3090 (sm_86),
an H100 (sm_90) and a Blackwell (sm_100, sm_120) get, for each dtype and a supported and an
unsupported Triton head_dim.
"""
import pytest
import torch

from rmt_fast.engine import backends, device_policy

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]  # torch <= 2.14 cu126 wheels
CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]  # no Pascal, no Volta


@pytest.mark.parametrize("capability, dtype, head_dim, want", [
    ((6, 1), F32, 64, "sdpa"), ((6, 1), F16, 64, "sdpa"), ((6, 1), BF16, 64, None),
    ((6, 0), F32, 128, "sdpa"),
    ((7, 0), F16, 64, "sdpa"), ((7, 0), F32, 64, "sdpa"), ((7, 0), BF16, 64, None),
    ((7, 5), F16, 64, "sdpa"), ((7, 5), F16, 128, "sdpa"), ((7, 5), BF16, 32, None),
    ((8, 0), BF16, 64, "triton"), ((8, 0), F16, 64, "triton"), ((8, 0), F32, 64, "sdpa"),
    ((8, 0), BF16, 80, "sdpa"), ((8, 6), BF16, 128, "triton"), ((8, 6), F16, 96, "sdpa"),
    ((9, 0), BF16, 64, "triton"), ((9, 0), F32, 128, "sdpa"), ((9, 0), BF16, 256, "sdpa"),
])
def test_dispatch_table_with_a_cu126_torch(capability, dtype, head_dim, want):
    chosen, passed = backends.cuda_choice(dtype, capability, head_dim, arch_list=CU126)
    assert chosen == want, passed
    if capability < (8, 0):
        assert "8.0+" in backends.cuda_why_not("triton", dtype, capability, head_dim, CU126) \
            or "bfloat16" in backends.cuda_why_not("triton", dtype, capability, head_dim, CU126)
    if want is None:  # bfloat16 below sm_80: every backend says why, naming the capability
        sm = f"sm_{capability[0]}{capability[1]}"
        assert set(passed) == {"triton", "sdpa", "matmul"}
        assert all(sm in reason and "bfloat16" in reason for reason in passed.values()), passed
    assert backends.cuda_why_not("cpp", dtype, capability, head_dim, CU126) is not None


@pytest.mark.parametrize("capability, dtype, want", [
    ((6, 1), F32, None), ((7, 0), F16, None), ((7, 5), F16, "sdpa"), ((10, 0), BF16, "triton"),
    ((12, 0), BF16, "triton"), ((12, 1), F32, "sdpa"), ((13, 0), BF16, "triton")])   # 13.0: compute_120 PTX
def test_a_torch_without_kernels_for_the_gpu_picks_nothing(capability, dtype, want):
    chosen, passed = backends.cuda_choice(dtype, capability, 64, arch_list=CU130)
    assert chosen == want, passed
    if want is None:
        assert all("no kernels for sm_" in r and "cu126" in r for r in passed.values()), passed


def test_sm_compatibility_follows_cuda_rules():
    why = device_policy.torch_why_not
    assert why((6, 1), ["sm_60"]) is None               # a sm_60 cubin runs on sm_61
    assert why((6, 0), ["sm_61"]) is not None            # ... not the other way round
    assert why((7, 5), ["sm_61"]) is not None            # cubins do not cross majors
    assert why((9, 0), ["compute_80"]) is None           # PTX is JIT-compiled for newer GPUs
    assert why((7, 5), ["compute_80"]) is not None
    assert why((9, 0), ["sm_90a"]) is None


class _FakeCudaTensor:
    def __init__(self, dtype, head_dim=64):
        self.device, self.dtype, self.shape = torch.device("cuda"), dtype, (1, 2, 1, head_dim)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU of the given capability behind a cu126 torch; the backends' own tensor checks pass."""
    def make(major, minor):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(CU126))
        monkeypatch.setattr(backends, "_WHY_NOT", {n: (lambda q, k, v, kl: None) for n in backends.BACKENDS})
    return make


@pytest.mark.parametrize("capability, dtype, want", [
    ((6, 1), F32, "sdpa"), ((7, 5), F16, "sdpa"), ((8, 0), BF16, "triton"), ((9, 0), F16, "triton")])
def test_select_on_a_faked_gpu(fake_gpu, capability, dtype, want):
    fake_gpu(*capability)
    q = _FakeCudaTensor(dtype)
    assert backends.select("auto", q, q, q) == want


def test_an_explicit_triton_on_a_1080_ti_is_refused_with_the_reason(fake_gpu):
    fake_gpu(6, 1)
    q = _FakeCudaTensor(F32)
    with pytest.raises(RuntimeError, match=r"'triton' cannot run here: Triton.*8\.0\+.*sm_61"):
        backends.select("triton", q, q, q)
    with pytest.raises(RuntimeError, match="'cpp' cannot run here: .*CPU only"):
        backends.select("cpp", q, q, q)


def test_bfloat16_on_turing_has_no_backend(fake_gpu):
    fake_gpu(7, 5)
    q = _FakeCudaTensor(BF16)
    with pytest.raises(RuntimeError, match="no attention backend can run.*sm_75 has no native bfloat16"):
        backends.select("auto", q, q, q)
