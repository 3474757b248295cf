"""Every C++/CUDA source in csrc/ compiles as C++17: torch 2.11, the GPU machine's, builds extensions with
-std=c++17 (later torch with C++20, so the ordinary build here would not notice a C++20 feature).

Sources are globbed at run time, so new files are covered as they appear. ``.cpp`` files are checked
with the host compiler (``-fsyntax-only``: parsing and template instantiation, no code generation),
``.cu`` files with nvcc (PTX for sm_90 only: the C++ front ends run, ptxas does not); each skips when its
compiler is absent. GCC accepts some C++20 constructs in C++17 mode with a warning: such a warning in
our own sources fails the test too (torch's headers may warn; they are not ours).
"""
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
SOURCES = sorted(p for p in CSRC.rglob("*") if p.suffix in (".cpp", ".cu"))
OWN_PROBLEM = re.compile(r"csrc[/\\][^:]*:\d+(:\d+)?:\s*(error|warning)|\berror\b.*csrc[/\\]")


def _includes():
    from torch.utils.cpp_extension import include_paths
    return [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]


def _command(source: Path, out: Path) -> list:
    defines = ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    if NVCC:                                   # what the GPU machine builds: the CUDA code paths too
        defines.append("-DRMT_FAST_WITH_CUDA")
    if source.suffix == ".cpp":
        return [CXX, "-std=c++17", "-fsyntax-only", "-fopenmp", "-fPIC", *defines, *_includes(), str(source)]
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    return [NVCC, "-c", str(source), "-o", str(out), "-std=c++17", "-O0", "-Xcompiler", "-fPIC",
            "-gencode=arch=compute_90,code=compute_90", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *defines,
            *COMMON_NVCC_FLAGS, *_includes()]


def test_sources_are_found():
    assert any(p.suffix == ".cpp" for p in SOURCES), f"no .cpp under {CSRC}"
    assert any(p.suffix == ".cu" for p in SOURCES), f"no .cu under {CSRC}"


@pytest.mark.parametrize("source", SOURCES, ids=[str(p.relative_to(CSRC)) for p in SOURCES])
def test_compiles_as_cxx17(source, tmp_path):
    if source.suffix == ".cu" and NVCC is None:
        pytest.skip("nvcc is not on PATH")
    if source.suffix == ".cpp" and CXX is None:
        pytest.skip("no C++ compiler (c++/g++) on PATH")
    cmd = _command(source, tmp_path / (source.name + ".o"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"
    own = [line for line in proc.stderr.splitlines() if OWN_PROBLEM.search(line)]
    assert not own, "our sources need more than C++17:\n" + "\n".join(own)
