#!/usr/bin/env bash
# The whole test suite on a CUDA machine: every device-dependent test runs on the CPU and on CUDA (tests/conftest.py
# `device`), the fused kernel compiles for the GPU. Run from the repository root:
#   bash ../shared/gpu/prepare-wheels.sh cache-dit==1.5.3 pytest-xdist execnet hypothesis sortedcontainers attrs \
#       jsonschema jsonschema-specifications referencing rpds-py      # wheels the GPU image lacks, into .whl/
#   bash benchmarks/gpu_tests.sh [pytest arguments]                  # on the GPU machine, .whl/ carried along
set -uo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
python3 - <<'EOF'
import diffusers, torch, triton
print(f"torch {torch.__version__}, triton {triton.__version__}, diffusers {diffusers.__version__}, "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}")
EOF
workers=${DITFA_TEST_WORKERS:-8}
start=$(date +%s)
python3 -m pytest -q -n "$workers" -p no:cacheprovider --durations=15 "${@:-tests}"
status=$?
echo "suite exit status $status in $(( $(date +%s) - start )) s with $workers workers"
exit $status
