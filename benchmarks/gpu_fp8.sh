#!/usr/bin/env bash
# FP8 linears on a GPU machine, one device call: the FP8 tests (failures named), the step table (SD3-medium and
# FLUX.1-dev at 2048², eager and compiled) and the mini-mmdit quality rows. Logs and JSON go to $OUT (or /tmp/fp8-out).
#   bash ../shared/gpu/prepare-wheels.sh cache-dit==1.5.3 pytest-xdist execnet pytest-timeout hypothesis \
#       sortedcontainers attrs jsonschema jsonschema-specifications referencing rpds-py torchao==0.18.0
#   bash benchmarks/gpu_fp8.sh                       # on the GPU machine, .whl/ carried; about 9 minutes
set -uo pipefail
out=${OUT:-/tmp/fp8-out}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
timeout 90 python3 -m pytest -q -rfE --tb=short -n 4 -p no:cacheprovider tests/test_fp8_linears.py \
  tests/test_artifact_weights.py 2>&1 | tail -25
echo "tests done at $SECONDS s"
timeout 120 python3 benchmarks/quality.py --out "$out" --tag fp8 --prompts 16 --batch 16 --curves fp8 \
  >"$out/quality.log" 2>&1
echo "quality exit $? at $SECONDS s"
grep -E "^(bf16|fp8)" "$out/quality.log"
left=$((560 - SECONDS))
timeout "$left" python3 benchmarks/fp8_linears.py --sizes 2048 --compile --warmup 2 --reps 5 \
  --budget $((left - 90)) --out "$out/fp8-linears.json" >"$out/fp8.log" 2>&1
echo "step table exit $? at $SECONDS s"
grep -E "^\[|^\|" "$out/fp8.log"
