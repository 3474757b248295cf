"""``dtype="auto"`` (engine/device_policy.py) on each GPU generation and on the CPU, and the refusal of
bfloat16 on GPUs without it. GPU properties are faked; no GPU needed."""
import pytest
import torch

from helpers import tiny_model
from rmt_fast.engine import backends, device_policy
from rmt_fast.engine.device_policy import resolve_dtype
from rmt_fast.engine.runner import Engine

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("capability, want", [
    ((6, 0), torch.float32), ((6, 1), torch.float32), ((7, 0), torch.float16), ((7, 2), torch.float16),
    ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((8, 6), torch.bfloat16), ((8, 9), torch.bfloat16),
    ((9, 0), torch.bfloat16), ((10, 0), torch.bfloat16), ((12, 0), torch.bfloat16)])
def test_auto_on_each_gpu_generation(capability, want):
    dtype, why = device_policy.auto_dtype(CUDA, capability)
    assert dtype == want and f"sm_{capability[0]}{capability[1]}" in why


@pytest.mark.parametrize("native, want", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_the_cpu_follows_its_bf16_instructions(native, want):
    assert device_policy.auto_dtype(CPU, cpu_bf16=lambda: native)[0] == want


def test_the_pin_is_honoured_and_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    monkeypatch.setenv(device_policy.PIN_VAR, "bfloat16")
    assert device_policy.resolve("auto", CPU, resolve_dtype) == torch.bfloat16
    with pytest.raises(ValueError, match="bfloat16 needs .* sm_61"):   # a pin is still checked on the GPU
        device_policy.resolve("auto", CUDA, resolve_dtype)
    monkeypatch.setenv(device_policy.PIN_VAR, "int8")
    with pytest.raises(ValueError, match="RMT_FAST_AUTO_DTYPE='int8'"):
        device_policy.resolve("auto", CPU, resolve_dtype)
    assert device_policy.resolve("float16", CPU, resolve_dtype) == torch.float16   # only auto is pinned


def test_cpu_capability_names_with_bf16():
    assert device_policy.cpu_has_native_bf16("AMX_BF16")
    assert device_policy.cpu_has_native_bf16("AVX512_BF16")


@pytest.mark.parametrize("capability", [(6, 1), (7, 0), (7, 5)])
def test_explicit_bfloat16_below_sm80_is_a_clear_error(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    sm = f"sm_{capability[0]}{capability[1]}"
    with pytest.raises(ValueError, match=rf"bfloat16 needs .* 8\.0 or newer; cuda is {sm}"):
        device_policy.resolve("bf16", CUDA, resolve_dtype)
    for ok in ("float32", "float16", torch.float32):
        assert device_policy.resolve(ok, CUDA, resolve_dtype) == resolve_dtype(ok)


@pytest.mark.parametrize("capability, want", [((6, 1), torch.float32), ((7, 5), torch.float16),
                                              ((9, 0), torch.bfloat16)])
def test_resolve_auto_on_a_faked_gpu(monkeypatch, capability, want):
    monkeypatch.delenv(device_policy.PIN_VAR)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert device_policy.resolve("auto", CUDA, resolve_dtype) == want
    assert device_policy.resolve("AUTO", CUDA, resolve_dtype) == want
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert device_policy.resolve(torch.bfloat16, CUDA, resolve_dtype) == torch.bfloat16


@pytest.mark.parametrize("native, want", [(True, torch.bfloat16), (False, torch.float32)])
def test_engine_defaults_to_auto(monkeypatch, native, want):
    monkeypatch.delenv(device_policy.PIN_VAR)
    monkeypatch.setattr(device_policy, "cpu_has_native_bf16", lambda: native)
    engine = Engine(tiny_model())
    assert engine.dtype == want and engine.plan.dtype == want
    assert Engine(tiny_model(), dtype="float32").dtype == torch.float32


def test_describe_names_the_dtype_and_why():
    lines = backends.describe_auto(CPU)
    assert "RMT_FAST_AUTO_DTYPE=float32 pins" in lines[0], lines     # the suite's pin, said


@pytest.mark.parametrize("capability, dtype, backend", [((6, 1), "float32", "sdpa"), ((7, 5), "float16", "sdpa"),
                                                        ((9, 0), "bfloat16", "triton")])
def test_describe_on_a_faked_gpu(monkeypatch, capability, dtype, backend):
    monkeypatch.delenv(device_policy.PIN_VAR)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_60", "sm_70", "sm_75", "sm_80", "sm_90"])
    sm = f"sm_{capability[0]}{capability[1]}"
    dtype_line, attention_line = backends.describe_auto(CUDA)
    assert dtype_line.startswith(f"dtype auto cuda ({sm}): {dtype} ("), dtype_line
    assert attention_line.startswith(f"attention auto cuda ({sm})/{dtype}: {backend}"), attention_line
