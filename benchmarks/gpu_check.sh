#!/usr/bin/env bash
# GPU check for a lent machine (an H200): install, run the GPU tests natively, run the benchmarks, and print
# a short table last. Whole run bounded by GPU_CHECK_BUDGET_S (default 470 s, under 8 minutes).
#
#   bash benchmarks/gpu_check.sh          # from anywhere; per-step logs, JSON and summary.txt go to
#                                         # $OUT if set, else to benchmarks/results/gpu_check/
#
# Layout: a few helpers, then one SECTION per check, then the SUMMARY. To add a check, copy a SECTION
# block above the SUMMARY: `step NAME TIMEOUT_S command...` runs it with a timeout (capped by what is left
# of the budget), logs to $RESULTS/NAME.log and adds a line to the summary. A failing step does not stop
# the later ones; the script exits non-zero if any step failed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"
RESULTS="${OUT:-$REPO/benchmarks/results/gpu_check}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
T0=$(date +%s)
SUMMARY=()
FAILED=0
SCRATCH="$(mktemp -d)"  # outside $OUT: symlinks there would not come back
trap 'rm -rf "$SCRATCH"' EXIT
export REPO RESULTS PY SCRATCH

elapsed() { echo $(( $(date +%s) - T0 )); }

# step NAME TIMEOUT_S command...: run a command under a timeout, log it, record its status.
step() {
    local name="$1" limit="$2"; shift 2
    local left=$(( BUDGET_S - $(elapsed) - 10 ))
    if (( left < 5 )); then
        SUMMARY+=("$(printf '%-28s %-8s %s' "$name" "SKIPPED" "no time left in the ${BUDGET_S}s budget")")
        FAILED=1
        return
    fi
    (( limit > left )) && limit=$left
    echo
    echo "======== [$(elapsed)s] $name (timeout ${limit}s) ========"
    local start=$(date +%s) rc
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
    rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - start )) status="ok"
    if (( rc == 124 || rc == 137 )); then status="TIMEOUT"; FAILED=1
    elif (( rc != 0 )); then status="FAIL($rc)"; FAILED=1; fi
    local note
    note=$(grep -E "passed|failed|error|Error|saved" "$RESULTS/$name.log" | tail -n 1 | cut -c1-70)
    SUMMARY+=("$(printf '%-28s %-8s %4ss  %s' "$name" "$status" "$took" "$note")")
}

# ======================================================================================================
# SECTION: environment and install
# ======================================================================================================
echo "gpu_check: repo $REPO, results $RESULTS, budget ${BUDGET_S}s, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
step env 60 "$PY" -c "
import torch, sys
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)
print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
import triton, pytest
print('triton', triton.__version__, 'pytest', pytest.__version__)
assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'
"

# The machine has no network: use its torch/triton, install nothing else. If the editable install fails,
# fall back to a symlinked tree on PYTHONPATH that maps kernels/ to rmt_fast/kernels as setup.py does.
install_repo() {
    RMT_FAST_SKIP_EXT=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e "$REPO" && return 0
    echo "pip install failed; using a symlinked tree on PYTHONPATH instead"
    local shadow="$SCRATCH/shadow"
    mkdir -p "$shadow"
    cp -rs "$REPO/rmt_fast" "$shadow/rmt_fast" && ln -s "$REPO/kernels" "$shadow/rmt_fast/kernels"
    echo "$shadow" > "$SCRATCH/pythonpath"
}
export -f install_repo
step install 120 bash -c install_repo
[[ -f "$SCRATCH/pythonpath" ]] && export PYTHONPATH="$(cat "$SCRATCH/pythonpath")${PYTHONPATH:+:$PYTHONPATH}"
step import 60 "$PY" -c "
from rmt_fast.kernels.attention import why_not; import torch
q = torch.empty(1, 1, 1, 64, device='cuda', dtype=torch.bfloat16)
print('triton attention here:', why_not(q, q, q) or 'available')"

# ======================================================================================================
# SECTION: Triton attention (issue 3) - correctness natively (no interpreter), then the benchmark
# ======================================================================================================
step attention_tests 200 env -u TRITON_INTERPRET "$PY" -m pytest -q -p no:cacheprovider \
    --junitxml="$RESULTS/attention_tests.xml" tests/test_triton_attention.py
step attention_bench 120 env -u TRITON_INTERPRET "$PY" benchmarks/bench_attention.py --cudagraph \
    --out "$RESULTS/attention.json"
step attention_bench_autotune 90 env -u TRITON_INTERPRET RMT_FAST_TRITON_AUTOTUNE=1 \
    "$PY" benchmarks/bench_attention.py --seqlens 522 --batches 1 32 --out "$RESULTS/attention_autotune.json"

# ======================================================================================================
# SECTION: the Engine (issue 2) - against the oracle on the GPU, then per-segment time vs the reference
# ======================================================================================================
step engine_tests 150 env -u TRITON_INTERPRET "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_engine.py tests/test_long.py
step engine_bench 150 "$PY" benchmarks/bench_segments.py --device cuda --segments 32 --batch-sizes 1,8,32 \
    --attention sdpa,triton --out "$RESULTS/segments.json"

# ======================================================================================================
# SECTION: the driver (issue 4) - graph replay vs eager, VRAM flat to 4096 segments, feeder on CUDA; bench
# ======================================================================================================
step driver_tests 120 env -u TRITON_INTERPRET "$PY" -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_feeder.py
step driver_bench 180 "$PY" benchmarks/bench_driver.py --device cuda --dtype bfloat16 --layers 12 --batch-sizes 1,32 \
    --segments 16 --memory-segments 1,16,256,4096 --docs 64 --doc-chars 20000 --e2e-batch-size 16 --workers 4 \
    --stream-chars 3000000 --out "$RESULTS/driver"

# ======================================================================================================
# (new sections go here, above the SUMMARY)
# ======================================================================================================

# ======================================================================================================
# SUMMARY: printed last
# ======================================================================================================
{
    echo
    echo "======== SUMMARY ($(elapsed)s of ${BUDGET_S}s; results in $RESULTS) ========"
    for line in "${SUMMARY[@]}"; do echo "$line"; done
    for json in "$RESULTS/attention.json" "$RESULTS/attention_autotune.json"; do
        [[ -f "$json" ]] && timeout 30 "$PY" benchmarks/bench_attention.py --summary "$json"
    done
} 2>&1 | tee "$RESULTS/summary.txt"
exit "$FAILED"
