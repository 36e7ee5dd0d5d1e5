#!/usr/bin/env bash
# Issue 18's host time on a GPU machine, one device call: the GPU tests of the kernel and the runtime (8-bit heads
# included), the host time per attention call (`host_time.py`, with a profile of where it goes), then the eager
# step rows at 1024² (`e2e.py`, triton backend), where host time decides the speed-up. Logs and JSON go to $OUT
# (or /tmp/host-out), written as they come.
#   bash benchmarks/gpu_host.sh          # on the GPU machine, .whl/ carried; about 9 minutes
set -uo pipefail
out=${OUT:-/tmp/host-out}
mkdir -p "$out"
source benchmarks/gpu_prelude.sh "$out/pip.log"
# (the inductor compile tests, minutes on a GPU, are benchmarks/gpu_compile.sh's)
timeout 260 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider -k "not inductor" tests/kernels tests/runtime \
  tests/test_fp8_attention.py "tests/test_parallel.py::test_a_rank_runs_its_share_of_the_heads_as_the_whole_plan_does" \
  >"$out/gpu-tests.log" 2>&1
echo "GPU tests exit $? at $SECONDS s"
grep -E "^(FAILED|ERROR)|^E .{0,200}|passed|failed" "$out/gpu-tests.log" | head -15
python3 benchmarks/host_time.py --reps 3 --out "$out/host-time.json" >"$out/host-time.log" 2>&1
echo "host time exit $? at $SECONDS s"
cat "$out/host-time.log" | tail -12
python3 -m cProfile -s tottime benchmarks/host_time.py --reps 1 --calls 100 >"$out/host-profile.log" 2>&1
grep -A 30 "Ordered by" "$out/host-profile.log" | head -32
left=$((570 - SECONDS))
timeout "$left" python3 benchmarks/e2e.py --arch both --sizes 1024 --backends triton --warmup 3 --reps 10 \
  --share-reps 1 --budget $((left - 30)) --out "$out/e2e-1k.json" >"$out/e2e.log" 2>&1
echo "e2e exit $? at $SECONDS s"
grep -E "^\||stopped|Error" "$out/e2e.log" | head -20
