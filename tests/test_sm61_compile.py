"""Every ``.cu`` in csrc/ compiles for the GTX 1080 Ti (sm_61) with a CUDA 12 toolchain.

CUDA 13 cannot target anything below sm_75, so the ordinary nvcc here cannot check Pascal. NVIDIA's
``nvidia-cuda-nvcc-cu12`` wheels on PyPI (12.1 through 12.9, checked 2026-12-03) hold ``ptxas``, the
``crt`` headers and libdevice, but not the ``nvcc`` driver itself (Linux x86_64), so the device code is
compiled by clang (CUDA mode, Debian's ``clang-19``) against CUDA 12.6 headers from the PyPI wheels
(``nvidia-cuda-runtime-cu12``, ``nvidia-cuda-cccl-cu12``) and the torch headers, and assembled for sm_61
by CUDA 12.6's own ``ptxas``. That is the step that rejects an instruction Pascal lacks (a bf16
conversion, a half-precision atomic). scripts/setup.sh installs the wheels into ``.venv/cuda12``.
Skips cleanly without clang-19 or the wheels.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SOURCES = sorted(CSRC.rglob("*.cu"))
CLANG = shutil.which("clang++-19")
WHEELS = Path(os.environ.get("RMT_FAST_CUDA12_WHEELS", Path(sys.prefix) / "cuda12")) / "nvidia"
PARTS = {"headers": WHEELS / "cuda_runtime" / "include", "crt": WHEELS / "cuda_nvcc" / "include",
         "cccl": WHEELS / "cuda_cccl" / "include", "ptxas": WHEELS / "cuda_nvcc" / "bin" / "ptxas",
         "libdevice": WHEELS / "cuda_nvcc" / "nvvm" / "libdevice"}
MISSING = [name for name, p in PARTS.items() if not p.exists()]

pytestmark = [
    pytest.mark.skipif(CLANG is None, reason="clang++-19 is not installed (apt-get install clang-19)"),
    pytest.mark.skipif(bool(MISSING), reason=f"CUDA 12 wheels not in {WHEELS} (missing {MISSING}); "
                                             "scripts/setup.sh installs them"),
]


@pytest.fixture(scope="module")
def cuda12_root(tmp_path_factory):
    """A CUDA install tree as clang expects it, made of links into the PyPI wheels."""
    root = tmp_path_factory.mktemp("cuda12")
    include = root / "include"
    include.mkdir()
    for part in ("headers", "crt", "cccl"):
        for src in PARTS[part].iterdir():
            if not src.name.startswith("__") and not (include / src.name).exists():
                (include / src.name).symlink_to(src)
    # clang's CUDA wrapper header includes this curand header unconditionally; rmt_fast uses no curand.
    (include / "curand_mtgp32_kernel.h").write_text("// empty: curand is not used\n")
    (root / "bin").mkdir()
    (root / "bin" / "ptxas").symlink_to(PARTS["ptxas"])
    (root / "nvvm").mkdir()
    (root / "nvvm" / "libdevice").symlink_to(PARTS["libdevice"])
    (root / "lib64").mkdir()
    return root


def _compile(source: Path, cuda_root: Path, out: Path, arch: str = "sm_61"):
    from torch.utils.cpp_extension import include_paths
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    cmd = [CLANG, "-x", "cuda", "--cuda-device-only", f"--cuda-gpu-arch={arch}", f"--cuda-path={cuda_root}",
           "-std=c++17", "-O1", "-c", str(source), "-o", str(out), "-Xcuda-ptxas", "-v",
           "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DRMT_FAST_WITH_CUDA",
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-Wno-unknown-cuda-version", "-Wno-c++20-extensions",
           *includes]
    return cmd, subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_sources_are_found():
    assert SOURCES, f"no .cu under {CSRC}"


@pytest.mark.parametrize("source", SOURCES, ids=[str(p.relative_to(CSRC)) for p in SOURCES])
def test_compiles_for_sm61_with_cuda12(source, cuda12_root, tmp_path):
    cmd, proc = _compile(source, cuda12_root, tmp_path / "k.cubin")
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"
    assert "for 'sm_61'" in proc.stderr            # ptxas -v: CUDA 12's ptxas assembled it for Pascal
    assert (tmp_path / "k.cubin").read_bytes()[:4] == b"\x7fELF"


def test_the_toolchain_rejects_what_pascal_lacks(cuda12_root, tmp_path):
    """The check can fail: a bf16 conversion instruction (sm_80+) assembles for sm_80, not for sm_61."""
    probe = tmp_path / "probe.cu"
    probe.write_text('__global__ void k(float x, unsigned short* o) {\n'
                     '  unsigned short r; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x)); *o = r;\n}\n')
    _, ok = _compile(probe, cuda12_root, tmp_path / "a.cubin", arch="sm_80")
    assert ok.returncode == 0, ok.stderr[-3000:]
    _, bad = _compile(probe, cuda12_root, tmp_path / "b.cubin", arch="sm_61")
    assert bad.returncode != 0 and "sm_80" in bad.stderr, bad.stderr[-3000:]
