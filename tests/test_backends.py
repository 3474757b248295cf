"""``auto``'s attention dispatch on CUDA (engine/backends.py), decided from the GPU's compute capability.

The table is checked on the CPU with the device properties faked; on a GPU, the float32 choice is also
checked to be exact (float32 accuracy against float64, with TF32 switched on for matmuls or not).
"""
import math

import pytest
import torch

from conftest import requires_cuda
from rmt_fast.engine import backends

CUDA = torch.device("cuda")
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make torch report a GPU of the given compute capability (no GPU needed)."""
    def set_capability(major, minor):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    return set_capability


@pytest.mark.parametrize("capability", [(6, 1), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0)])
def test_float32_on_cuda_goes_to_sdpa_first_and_triton_last(fake_gpu, capability):
    fake_gpu(*capability)
    order = backends.priority(CUDA, torch.float32)
    assert order[0] == "sdpa" and order[-1] == "triton", order


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0)])
def test_half_types_on_tensor_core_gpus_go_to_triton_first(fake_gpu, capability, dtype):
    fake_gpu(*capability)
    assert backends.priority(CUDA, dtype) == ("triton", "sdpa", "matmul")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("capability", [(6, 1), (7, 0), (7, 5)])
def test_half_types_on_older_gpus_go_to_sdpa_first(fake_gpu, capability, dtype):
    fake_gpu(*capability)
    order = backends.priority(CUDA, dtype)
    assert order[0] == "sdpa" and order[-1] == "triton", order


def test_the_cpu_order_is_unchanged(fake_gpu):
    fake_gpu(9, 0)  # a GPU in the machine changes nothing for CPU tensors
    cpu = torch.device("cpu")
    assert backends.priority(cpu, torch.float32) == ("cpp", "sdpa", "matmul")
    assert backends.priority(cpu, torch.bfloat16) == ("cpp", "sdpa", "matmul")
    assert backends.priority(cpu, torch.float16) == ("sdpa", "matmul", "cpp")


class _FakeCudaTensor:
    """Just what ``select`` reads from q: its device, dtype and shape."""
    def __init__(self, dtype):
        self.device, self.dtype, self.shape = CUDA, dtype, (1, 2, 1, 64)


@pytest.mark.parametrize("dtype, capability, want", [
    (torch.float32, (9, 0), "sdpa"), (torch.bfloat16, (9, 0), "triton"), (torch.float16, (7, 5), "sdpa")])
def test_auto_takes_the_first_backend_that_can_run(fake_gpu, monkeypatch, dtype, capability, want):
    fake_gpu(*capability)
    monkeypatch.setattr(backends, "_WHY_NOT", {name: (lambda q, k, v, kl: None) for name in backends.BACKENDS})
    q = _FakeCudaTensor(dtype)
    assert backends.select("auto", q, q, q) == want
    # ... and moves on, quietly, past one that cannot.
    monkeypatch.setitem(backends._WHY_NOT, want, lambda q, k, v, kl: "planted: cannot run")
    assert backends.select("auto", q, q, q) == backends.priority(CUDA, dtype)[1]


@requires_cuda
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_sdpa_float32_on_cuda_is_exact(monkeypatch, allow_tf32):
    """The backend auto picks for float32 on CUDA keeps float32 accuracy (what the 1e-4 logit parity needs)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    b, t, h, d = 4, 512, 12, 64
    qkv = torch.randn(b, t, 3, h, d, device="cuda")
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    kl = torch.tensor([512, 300, 1, 499], device="cuda")
    got = backends.attention("sdpa", q, k, v, kl, scale=1 / math.sqrt(d)).double()
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
    s = qd @ kd.transpose(-1, -2) / math.sqrt(d)
    s = s.masked_fill((torch.arange(t, device="cuda")[None, :] >= kl[:, None])[:, None, None, :], float("-inf"))
    want = (torch.softmax(s, -1) @ vd).transpose(1, 2).reshape(b, t, h * d)
    err = (got - want).abs().max().item()
    assert err <= 2e-5, f"float32 SDPA on CUDA is off by {err} (TF32 products?)"
