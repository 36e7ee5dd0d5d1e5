#!/usr/bin/env bash
# Issue 16 on a GPU machine, one device call: the 8-bit tests (kernel, pre-pass, runtime; failures named), the kernel
# table (`fp8_kernel.py --quick`: 8-bit heads against bf16 heads at 2K, with the pre-pass) and the eager step rows of
# the 50% and 68% plans with and without their full heads in 8 bits (`e2e.py --int8`). Logs and JSON go to $OUT (or
# /tmp/int8-out), written as they come.
#   bash benchmarks/gpu_int8.sh [sd3|flux|both] [SIZE ...]   # on the GPU machine, .whl/ carried; about 8 minutes
set -uo pipefail
out=${OUT:-/tmp/int8-out}
arch=${1:-both}
shift || true
sizes=${*:-2048}
mkdir -p "$out"
source benchmarks/gpu_prelude.sh "$out/pip.log"
timeout 150 python3 -m pytest -q -rfEs --tb=short -n 4 -p no:cacheprovider tests/kernels/test_quantized_heads.py \
  tests/runtime/test_int8_heads.py tests/test_fp8_attention.py >"$out/tests.log" 2>&1
echo "tests exit $? at $SECONDS s"
grep -E "^(FAILED|ERROR)|^E .{0,200}|passed|failed" "$out/tests.log" | head -12
timeout 200 python3 benchmarks/fp8_kernel.py --quick --out "$out" >"$out/fp8-kernel.log" 2>&1
echo "kernel table exit $? at $SECONDS s"
grep -E "^\||correctness|pre-pass D" "$out/fp8-kernel.log" | head -16
left=$((560 - SECONDS))
# shellcheck disable=SC2086  # sizes is a list
timeout "$left" python3 benchmarks/e2e.py --int8 --arch "$arch" --sizes $sizes --backends triton --warmup 3 --reps 5 \
  --share-reps 1 --budget $((left - 60)) --out "$out/e2e-int8.json" >"$out/e2e.log" 2>&1
echo "e2e exit $? at $SECONDS s"
grep -E "^\||stopped|Error" "$out/e2e.log" | head -24
