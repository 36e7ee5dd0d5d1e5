#!/usr/bin/env bash
# Issue 18 on a GPU machine, one device call: the GPU compile tests (inductor with the fused kernel, SD3 and FLUX),
# then the compiled step rows (stock, all-full plan, 50% and 68% plans) timed per call and back to back
# (`e2e.py --compile --overlap`). Logs and JSON go to $OUT (or /tmp/compile-out), written as they come.
#   bash benchmarks/gpu_compile.sh [whole|blocks] [sd3|flux] [SIZE ...]   # on the GPU machine, .whl/ carried; ~9 min
# whole: torch.compile of the transformer; blocks: each block compiled (ditfa_optimum.compile_blocks, regional).
# A whole FLUX.1-dev row compiles the 57-block model from scratch (about a minute): one size per call for FLUX.
# TESTS=0 skips the GPU compile tests (about 5 minutes).
set -uo pipefail
out=${OUT:-/tmp/compile-out}
mode=${1:-whole}
shift || true
arch=${1:-sd3}
shift || true
sizes=${*:-1024}
mkdir -p "$out"
source benchmarks/gpu_prelude.sh "$out/pip.log"
if [ "${TESTS:-1}" != 0 ]; then
  timeout 330 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider tests/runtime/test_compile.py \
    -k "inductor or tables" >"$out/compile-tests.log" 2>&1
  echo "compile tests exit $? at $SECONDS s"
  grep -E "^(FAILED|ERROR)|^E .{0,200}|passed|failed" "$out/compile-tests.log" | head -12
fi
left=$((${BUDGET:-560} - SECONDS))  # BUDGET: seconds this script may take (default 560)
# shellcheck disable=SC2086  # sizes is a list
timeout "$left" python3 benchmarks/e2e.py --compile "$mode" --overlap --arch "$arch" --sizes $sizes --backends triton \
  --warmup 3 --reps 5 --share-reps 1 --budget $((left - 90)) --out "$out/e2e-compiled-$mode-$arch.json" >"$out/e2e.log" 2>&1
echo "e2e exit $? at $SECONDS s"
grep -E "^\||stopped|Error" "$out/e2e.log" | head -20
