#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${RMT_FAST_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# One intra-op thread per process: the suite starts subprocesses (DDP, sharded evaluation) and a 2-core
# machine oversubscribed with OpenMP threads slows each op by orders of magnitude. Tests check behaviour.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest -q "$@"
