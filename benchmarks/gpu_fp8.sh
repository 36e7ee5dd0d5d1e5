#!/usr/bin/env bash
# FP8 linears on a GPU machine, one device call: the FP8 tests (failures named), whether torchao finds fbgemm's fused
# kernels (fbgemm-gpu-genai: one fused per-row quantization per activation in eager mode, where torchao's own path runs
# about six kernels per layer), and the step table at 2048², eager, and compiled for stock, FP8 linears and plan + FP8
# linears (what FP8 and the plan each add when compiled). Logs and JSON go to $OUT (or /tmp/fp8-out), written as they come.
#   pip download fbgemm-gpu-genai==1.6.0 --no-deps --python-version 3.12 --only-binary=:all: \
#       --platform manylinux_2_28_x86_64 -d .whl      # optional: the fused eager path (35 MB; the carry takes 64 MiB)
#   bash benchmarks/gpu_fp8.sh [sd3|flux] [compiled]  # on the GPU machine, .whl/ carried; about 9 minutes
# "compiled": the four compiled rows (stock, plan, FP8 linears, plan + FP8 linears) and no eager row.
set -uo pipefail
out=${OUT:-/tmp/fp8-out}
arch=${1:-sd3}
rows=(--compiled-rows stock "fp8 linears" "plan + fp8 linears")
[ "${2:-}" = compiled ] && rows=(--compiled-rows stock plan "fp8 linears" "plan + fp8 linears" --eager-rows)
mkdir -p "$out"
source benchmarks/gpu_prelude.sh "$out/pip.log"
timeout 120 python3 -m pytest -q -rfEs --tb=short -n 4 -p no:cacheprovider tests/test_fp8_linears.py \
  tests/test_artifact_weights.py >"$out/tests.log" 2>&1
echo "tests exit $? at $SECONDS s"
grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | tail -12
timeout 30 python3 - >"$out/fbgemm.log" 2>&1 <<'PY'
import torch
from torchao.utils import is_fbgemm_gpu_genai_available
print("torchao finds fbgemm-gpu-genai:", is_fbgemm_gpu_genai_available())
PY
cat "$out/fbgemm.log" | tail -3
left=$((560 - SECONDS))
timeout "$left" python3 benchmarks/fp8_linears.py --arch "$arch" --sizes 2048 --compile --warmup 2 --reps 5 \
  "${rows[@]}" --budget $((left - 60)) \
  --profile "$out/prof" --out "$out/fp8-linears-$arch.json" >"$out/fp8.log" 2>&1
echo "step table exit $? at $SECONDS s"
grep -E "^\[|^\||stopped" "$out/fp8.log"
