"""What a device can do: spec-sheet figures for known GPUs, a short probe of this CPU, the present GPU.

Every GPU figure is the vendor's dense (no sparsity) peak, with its source. float32 is the CUDA-core rate:
the engine's float32 path does not use TF32 (torch's matmul default, and the Triton kernel's "ieee" dots).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Dict, Optional

import torch

TFLOPS, GBPS, GiB = 1e12, 1e9, 2 ** 30


@dataclass(frozen=True)
class DeviceSpec:
    """Peak rates of one device. ``flops``: dtype name -> dense FLOP/s of matmuls (0 = not native)."""

    name: str
    kind: str                       # "cuda" or "cpu"
    flops: Dict[str, float]
    bandwidth: float                # bytes/s, device memory
    memory_bytes: int
    sm_count: int = 0
    max_smem_per_block: int = 0
    capability: Optional[int] = None  # 61, 75, 80, ... (CUDA)
    source: str = ""
    # Rates the engine's own kernels reach (measured by the CPU probe); None: derived from the peaks.
    attention_flops: Optional[Dict[str, float]] = None
    op_overhead_s: float = 0.0      # host cost per kernel or op launched eagerly
    measured: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _smem(cc: int) -> int:
    from ..kernels.targets import target_limits
    return target_limits(cc).smem_per_block


def _gpu(name, cc, fp32, fp16, bf16, bw_gbps, mem, sms, source):
    return DeviceSpec(name=name, kind="cuda", flops={"float32": fp32 * TFLOPS, "float16": fp16 * TFLOPS,
                                                     "bfloat16": bf16 * TFLOPS},
                      bandwidth=bw_gbps * GBPS, memory_bytes=int(mem), sm_count=sms, max_smem_per_block=_smem(cc),
                      capability=cc, source=source)


# Dense peaks (TFLOP/s: fp32 CUDA cores, fp16 / bf16 tensor cores), bandwidth GB/s, memory, SMs.
SPECS: Dict[str, DeviceSpec] = {s.name: s for s in (
    # GP102 at its 1582 MHz boost: 3584 cores x 2 FLOP; fp16 runs at 1/64 of fp32 on GP102, no bf16.
    _gpu("1080ti", 61, 11.34, 11.34 / 64, 0.0, 484, 11 * GiB, 28,
         "NVIDIA GeForce GTX 1080 Ti spec page; GP102 whitepaper (fp16 rate 1/64)"),
    _gpu("t4", 75, 8.1, 65.0, 0.0, 320, 16 * GiB, 40, "NVIDIA T4 Tensor Core GPU datasheet"),
    _gpu("a10", 86, 31.2, 125.0, 125.0, 600, 24 * GiB, 72, "NVIDIA A10 Tensor Core GPU datasheet"),
    _gpu("a100-40gb", 80, 19.5, 312.0, 312.0, 1555, 40 * GiB, 108,
         "NVIDIA A100 Tensor Core GPU datasheet (SXM4 40 GB)"),
    _gpu("a100-80gb", 80, 19.5, 312.0, 312.0, 2039, 80 * GiB, 108,
         "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80 GB)"),
    _gpu("l4", 89, 30.3, 121.0, 121.0, 300, 24 * GiB, 58, "NVIDIA L4 Tensor Core GPU datasheet (dense)"),
    _gpu("h100", 90, 67.0, 989.4, 989.4, 3350, 80 * GiB, 132, "NVIDIA H100 Tensor Core GPU datasheet (SXM5, dense)"),
    _gpu("h200", 90, 67.0, 989.4, 989.4, 4800, 141 * 10 ** 9, 132,
         "NVIDIA H200 Tensor Core GPU datasheet (SXM, dense)"),
)}
ALIASES = {"1080-ti": "1080ti", "gtx1080ti": "1080ti", "a100": "a100-80gb", "h100-sxm": "h100", "h200-sxm": "h200"}


def lookup(name: str) -> DeviceSpec:
    key = name.strip().lower().replace(" ", "").replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in SPECS:
        raise ValueError(f"--device {name!r} is not in the spec table; choose cpu, cuda or one of "
                         f"{', '.join(SPECS)}")
    return SPECS[key]


def _median_time(fn, repeats: int = 5) -> float:
    """The median, not the best: on a shared CPU the best run catches a quiet moment that a sustained run
    (the engine's) does not get."""
    fn()  # warm-up (oneDNN primitive creation, page faults)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@torch.inference_mode()
def probe_cpu(dtypes=("float32", "bfloat16"), hidden: int = 768, ffn: int = 3072, tokens: int = 512,
              heads: int = 12) -> DeviceSpec:
    """Measure this CPU with the engine's own kernels: a bert-base-sized FFN GEMM through the plan's
    Linear, the attention backend ``auto`` picks, a 64 MiB copy, and the cost of one small op (~1-2 s)."""
    from ..engine import backends
    from ..engine.linear import Linear, packing_available

    cpu = torch.device("cpu")
    gemm, attn = {}, {}
    for name in dtypes:
        dt = getattr(torch, name)
        x = torch.randn(tokens, hidden).to(dt)
        lin = Linear(torch.randn(ffn, hidden).to(dt) * 0.02, torch.zeros(ffn, dtype=dt),
                     pack=packing_available(cpu, dt) is None)
        gemm[name] = 2 * tokens * hidden * ffn / _median_time(lambda: lin(x))
        t = tokens + 10
        qkv = torch.randn(1, t, 3, heads, hidden // heads).to(dt)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        chosen = backends.select("auto", q, k, v)
        attn[name] = 4 * t * t * hidden / _median_time(lambda: backends.attention(chosen, q, k, v, scale=1.0))
    src = torch.empty(16 * 2 ** 20, dtype=torch.float32)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.nbytes / _median_time(lambda: dst.copy_(src))
    small = torch.zeros(8)
    overhead = _median_time(lambda: [small.add(1.0) for _ in range(200)]) / 200
    return DeviceSpec(name=f"cpu ({torch.get_num_threads()} threads)", kind="cpu", flops=gemm, bandwidth=bandwidth,
                      memory_bytes=_available_ram(), attention_flops=attn, op_overhead_s=overhead, measured=True,
                      source="probed: FFN GEMM through the engine's Linear, its attention backend, a 64 MiB copy")


def present_cuda(index: int = 0) -> DeviceSpec:
    """The present GPU: the spec table's figures when its name matches one, with the real memory and SMs."""
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA GPU is visible here")
    p = torch.cuda.get_device_properties(index)
    name = p.name.lower().replace(" ", "")
    table = {"1080ti": "1080ti", "t4": "t4", "a10": "a10", "a100": "a100-80gb" if p.total_memory > 48 * GiB
             else "a100-40gb", "l4": "l4", "h100": "h100", "h200": "h200"}
    match = next((v for k, v in table.items() if k in name and not (k == "a10" and "a100" in name)), None)
    if match is None:
        raise RuntimeError(f"--device cuda: {p.name} is not in the spec table; pass a table name "
                           f"({', '.join(SPECS)})")
    base = SPECS[match]
    return dataclasses.replace(base, name=f"{p.name} (cuda:{index})", memory_bytes=int(p.total_memory),
                               sm_count=p.multi_processor_count, capability=10 * p.major + p.minor,
                               source=base.source + "; memory and SMs read from the device")


def resolve(device: str) -> DeviceSpec:
    if device == "cpu":
        return probe_cpu()
    if device.startswith("cuda"):
        return present_cuda(int(device.split(":")[1]) if ":" in device else 0)
    return lookup(device)


__all__ = ["DeviceSpec", "SPECS", "lookup", "probe_cpu", "present_cuda", "resolve"]
