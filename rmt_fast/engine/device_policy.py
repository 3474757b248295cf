"""What a device can run: the device and dtype names an Engine takes, the compute dtype ``dtype="auto"`` resolves to, and whether this torch build
has kernels for a GPU at all. One small rule, written down in docs/ARCHITECTURE.md ("dtype auto").

- CUDA, compute capability 8.0+ (Ampere and newer): bfloat16, which those GPUs compute natively.
- CUDA 7.x (Volta, Turing): float16 (tensor cores; the memory state stays float32, as for every dtype).
- CUDA below 7.0 (Pascal, e.g. the GTX 1080 Ti, sm_61): float32. GP102 runs float16 arithmetic at
  1/64 of its float32 rate and has no bfloat16 at all.
- CPU: bfloat16 where the CPU has native bfloat16 instructions (AVX512-BF16 or AMX-BF16), else
  float32. Measured on this project's CPU (AVX512-BF16, no AMX): a 2-layer bert-base Engine runs
  bfloat16 2.0x faster than float32 (docs/ARCHITECTURE.md, "dtype auto").

An explicit bfloat16 request on a GPU below 8.0 is refused with the capability named: torch would
emulate it there, slowly, and the Triton kernel cannot run it at all.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Tuple

import torch

BF16_MIN_CAPABILITY = (8, 0)      # native bfloat16 arithmetic (Ampere)
FP16_MIN_CAPABILITY = (7, 0)      # float16 tensor cores (Volta); Pascal's fp16 is 1/64 rate on GP102
# Pins what "auto" resolves to on every device (e.g. float32): the test suite sets float32, the dtype its
# oracle checks use, so Engine(model) keeps meaning float32 there.
PIN_VAR = "RMT_FAST_AUTO_DTYPE"


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} was requested but no CUDA GPU is available "
                               f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type != "cpu":
        raise RuntimeError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda[:N]'")
    return dev


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype {dtype!r} is not supported; choose auto, float32, bfloat16 or float16")


def sm_name(capability: Tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def cpu_has_native_bf16(cpu_capability: Optional[str] = None) -> bool:
    """True where torch's CPU kernels can use bfloat16 instructions (AVX512-BF16 / AMX-BF16)."""
    if cpu_capability is None:
        cpu_capability = torch.backends.cpu.get_cpu_capability()
    if cpu_capability in ("AVX512_BF16", "AMX_BF16", "AVX512_AMX"):
        return True
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
                or getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def auto_dtype(device: torch.device, capability: Optional[Tuple[int, int]] = None,
               cpu_bf16: Optional[Callable[[], bool]] = None) -> Tuple[torch.dtype, str]:
    """(dtype, why) for ``dtype="auto"`` on ``device``; ``capability`` defaults to the GPU's own."""
    if device.type == "cuda":
        cap = tuple(capability or torch.cuda.get_device_capability(device))
        if cap >= BF16_MIN_CAPABILITY:
            return torch.bfloat16, f"{sm_name(cap)} computes bfloat16 natively (sm_80+)"
        if cap >= FP16_MIN_CAPABILITY:
            return torch.float16, (f"{sm_name(cap)} has float16 tensor cores but no native bfloat16; "
                                   "the memory state stays float32")
        return torch.float32, (f"{sm_name(cap)} (pre-Volta) runs float16 at a small fraction of its "
                               "float32 rate and has no bfloat16")
    native = (cpu_bf16 or cpu_has_native_bf16)()
    if native:
        return torch.bfloat16, "this CPU has native bfloat16 instructions (AVX512-BF16/AMX)"
    return torch.float32, "this CPU has no native bfloat16 instructions"


def check_dtype_on_device(dtype: torch.dtype, device: torch.device,
                          capability: Optional[Tuple[int, int]] = None) -> None:
    """Raise if ``dtype`` was asked for on a GPU that cannot compute it natively."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return
    cap = tuple(capability or torch.cuda.get_device_capability(device))
    if cap < BF16_MIN_CAPABILITY:
        raise ValueError(f"dtype bfloat16 needs a GPU of compute capability 8.0 or newer; {device} is "
                         f"{sm_name(cap)} ({cap[0]}.{cap[1]}). Use dtype 'auto' "
                         f"({auto_dtype(device, cap)[0]} there) or float32")


def resolve(dtype, device: torch.device, parse: Callable) -> torch.dtype:
    """The Engine's dtype: ``"auto"`` by the rule above (or as $RMT_FAST_AUTO_DTYPE pins it), else
    ``parse(dtype)``; either checked against the GPU."""
    if isinstance(dtype, str) and dtype.lower() == "auto":
        pinned = os.environ.get(PIN_VAR, "").strip()
        if not pinned:
            return auto_dtype(device)[0]
        try:
            dtype = parse(pinned)
        except ValueError as e:
            raise ValueError(f"{PIN_VAR}={pinned!r}: {e}") from None
    resolved = parse(dtype)
    check_dtype_on_device(resolved, device)
    return resolved


def torch_why_not(capability: Tuple[int, int], arch_list: Optional[Sequence[str]] = None) -> Optional[str]:
    """None if this torch build carries kernels for a GPU of ``capability``, else why not.

    A cubin for sm_XY runs on sm_XZ with Z >= Y; PTX for compute_XY is JIT-compiled for any newer GPU.
    """
    if arch_list is None:
        arch_list = torch.cuda.get_arch_list()
    if not arch_list:
        return None  # a CPU build (nothing to check against) or an unknown build: let torch say
    major, minor = capability
    for arch in arch_list:
        kind, _, num = arch.partition("_")
        num = num.rstrip("af")
        if not num.isdigit():
            continue
        a_major, a_minor = int(num[:-1]), int(num[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return None
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return None
    return (f"this torch {torch.__version__} (CUDA {torch.version.cuda}) has no kernels for "
            f"{sm_name(capability)} (built for {' '.join(arch_list)}); for a Pascal GPU such as the "
            "GTX 1080 Ti install torch <= 2.14 from the cu126 index (README, 'GTX 1080 Ti')")
