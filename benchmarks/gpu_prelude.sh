# Sourced by the benchmarks/gpu_*.sh scripts on the GPU machine: installs the carried wheels (.whl/, made by
#   bash ../shared/gpu/prepare-wheels.sh cache-dit==1.5.3 pytest-xdist execnet pytest-timeout hypothesis \
#       sortedcontainers attrs jsonschema jsonschema-specifications referencing rpds-py torchao==0.18.0 peft accelerate
# on this machine) into /tmp/site and puts them and the checkout on PYTHONPATH. The pip log goes to $1 when given.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"${1:-/dev/stderr}" 2>&1 || { [ -n "${1:-}" ] && tail -5 "$1"; echo "installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
