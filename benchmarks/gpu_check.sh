#!/usr/bin/env bash
# The GPU check (issue 12): run from the repository root on a lent GPU machine,
#     bash benchmarks/gpu_check.sh            # summary.txt, results.json, logs.tgz into $OUT
#     GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh    # the same driver on a CPU, tiny sizes (CI)
# benchmarks/gpu_check.py does the work (steps, timeouts, budget); see its docstring and docs/PERF.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -u benchmarks/gpu_check.py "$@"
