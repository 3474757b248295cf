"""Every ``RMT_FAST_*`` environment variable, in one list (``rmt-fast info`` prints it).

Environment variables are for building, debugging and tests only; what a run does is chosen by
arguments (``Engine(...)``, ``RunOptions``, the CLI's flags). Each entry says who reads it and when.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class EnvVar:
    name: str
    kind: str        # 'build', 'debug' or 'test'
    what: str


ENV_VARS: Tuple[EnvVar, ...] = (
    EnvVar("RMT_FAST_SKIP_EXT", "build", "=1: setup.py builds no extension (the torch twins only)"),
    EnvVar("RMT_FAST_FORCE_CUDA", "build", "=1: setup.py fails unless the CUDA kernels can be built"),
    EnvVar("RMT_FAST_VENV", "build", "the virtualenv folder scripts/*.sh use (default .venv)"),
    EnvVar("RMT_FAST_NVCC12", "build", "a CUDA 12 nvcc for sm_61 compiles (benchmarks/kernel_report.py)"),
    EnvVar("RMT_FAST_EXT_VERBOSE", "debug", "=1: the traceback of why rmt_fast._C did not load"),
    EnvVar("RMT_FAST_CUDA_GRAPHS", "debug", "=0: no CUDA graphs, like Engine(cuda_graphs=False)"),
    EnvVar("RMT_FAST_TRITON_AUTOTUNE", "debug", "=1: autotune the Triton attention's block sizes"),
    EnvVar("RMT_FAST_ATTENTION_BF16_AS_FLOAT32", "debug", "=1: bfloat16 CPU attention by the float32 path (read once)"),
    EnvVar("RMT_FAST_INT8_NO_AVX512_BF16", "debug", "=1: int8 dequantize rounds bf16 without AVX512-BF16 (read once)"),
    EnvVar("RMT_FAST_CACHE", "debug", "where tokenized training corpora are cached (default ~/.cache/rmt_fast; '' off)"),
    EnvVar("RMT_FAST_CUDA12_WHEELS", "test", "where the CUDA 12 wheels for the sm_61 compile test are (default .venv/cuda12)"),
    EnvVar("RMT_FAST_AUTO_DTYPE", "test", "pins what dtype='auto' resolves to (tests/conftest.py: float32)"),
    EnvVar("RMT_FAST_TEST_SEED", "test", "salts every test's seed (tests/conftest.py)"),
    EnvVar("RMT_FAST_INT8_EXPECT_CAPABILITY", "test", "the ATen capability tests/test_int8_kernels.py's subprocess expects"),
)


def env_flag(name: str, default: bool) -> bool:
    """A registered 0/1 switch: '0' is False, '1' True, unset the default."""
    if name not in {v.name for v in ENV_VARS}:
        raise KeyError(f"{name} is not a registered rmt_fast environment variable (rmt_fast/envvars.py)")
    value = os.environ.get(name)
    return default if value is None else value != "0"


def describe() -> str:
    """One line per variable: name, kind, current value, what it does."""
    return "\n".join(f"{v.name:<34} {v.kind:<5} {os.environ.get(v.name, '(unset)'):<8} {v.what}" for v in ENV_VARS)
