#!/usr/bin/env bash
# Issue 18 on a GPU machine, one device call: the CUDA-graph GPU tests (tiny SD3 and FLUX pipelines, fused kernel and
# reference, real captures), then `cuda_graphs.py` (whole 28-step trajectories, stock and plans, eager and from
# graphs). Logs and JSON go to $OUT (or /tmp/graphs-out), written as they come.
#   bash benchmarks/gpu_graphs.sh [sd3|flux|both] [SIZE ...]     # on the GPU machine, .whl/ carried; ~6 min at 1024
set -uo pipefail
out=${OUT:-/tmp/graphs-out}
arch=${1:-both}
shift || true
sizes=${*:-1024}
mkdir -p "$out"
source benchmarks/gpu_prelude.sh "$out/pip.log"
if [ "${TESTS:-1}" != 0 ]; then
  timeout 200 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider tests/runtime/test_cuda_graphs.py \
    >"$out/graph-tests.log" 2>&1
  echo "graph tests exit $? at $SECONDS s"
  grep -E "^(FAILED|ERROR)|^E .{0,200}|passed|failed" "$out/graph-tests.log" | head -12
fi
left=$((${BUDGET:-570} - SECONDS))  # BUDGET: seconds this script may take; REPS: timed trajectories per row
# shellcheck disable=SC2086  # sizes is a list
timeout "$left" python3 benchmarks/cuda_graphs.py --arch "$arch" --sizes $sizes --budget $((left - 100)) --reps "${REPS:-3}" \
  --out "$out/cuda-graphs.json" >"$out/graphs.log" 2>&1
echo "graphs exit $? at $SECONDS s"
grep -E "^\||stopped|Error" "$out/graphs.log" | head -24
