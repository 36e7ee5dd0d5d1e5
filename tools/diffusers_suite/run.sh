#!/usr/bin/env bash
# Run diffusers' own SD3 and FLUX transformer test suites three times -- no plan, an all-full ditfa plan, a mixed
# ditfa plan (ditfa_plugin.py says how) -- against the INSTALLED diffusers, and print passed/failed/skipped per suite.
#
# usage: tools/diffusers_suite/run.sh DIFFUSERS_SRC [LOG_DIR]
#   DIFFUSERS_SRC  a diffusers source tree (at least its tests/) of the release matching the installed diffusers;
#                  docs/adapters.md says how to get it. A src/ there is not used: the plugin imports the installed
#                  diffusers before the tests' conftest.py puts src/ on sys.path.
#   LOG_DIR        where the pytest logs go (default: a new temporary folder)
# environment:
#   PYTHON            the interpreter with torch, diffusers and ditfa_optimum (default: the project's .venv/bin/python)
#   TEST_DEPS         a folder of test-only packages the suites import (accelerate, psutil; peft for the LoRA
#                     tests), e.g. made by `pip install --target DIR --no-deps accelerate psutil peft`; optional
#   VARIANTS, SUITES  subsets, e.g. VARIANTS="none mixed" SUITES=sd3
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
project="$(cd "$here/../.." && pwd)"
src="${1:?usage: run.sh DIFFUSERS_SRC [LOG_DIR]}"
src="$(cd "$src" && pwd)"
logs="${2:-$(mktemp -d -t ditfa-diffusers-suite.XXXXXX)}"
mkdir -p "$logs"
python="${PYTHON:-$project/.venv/bin/python}"
variants="${VARIANTS:-none full mixed}"
suites="${SUITES:-sd3 flux}"

for suite in $suites; do
  if [[ ! -f "$src/tests/models/transformers/test_models_transformer_$suite.py" ]]; then
    echo "run.sh: $src has no tests/models/transformers/test_models_transformer_$suite.py; give the root of a" \
         "diffusers source tree" >&2
    exit 2
  fi
done

export PYTHONPATH="$here${TEST_DEPS:+:$TEST_DEPS}${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1  # the suites' hub downloads (quantization, single-file) cannot run here; they skip on CPU

"$python" -c 'import diffusers, ditfa_optimum; print(f"diffusers {diffusers.__version__} ({diffusers.__file__})")'
echo "diffusers tests: $src"
echo "logs: $logs"
for suite in $suites; do
  for variant in $variants; do
    log="$logs/$suite-$variant.txt"
    echo "+ cd $src && DITFA_SUITE_PLAN=$variant $python -m pytest -q -rA -p ditfa_plugin -p no:cacheprovider" \
         "tests/models/transformers/test_models_transformer_$suite.py > $log"
    (cd "$src" && DITFA_SUITE_PLAN="$variant" "$python" -m pytest -q -rA -p ditfa_plugin -p no:cacheprovider \
      "tests/models/transformers/test_models_transformer_$suite.py" > "$log" 2>&1) || true  # failures are counted
  done
done

echo
printf '%-6s %-7s %7s %7s %7s %7s  %s\n' suite plan passed failed skipped errors other
for suite in $suites; do
  for variant in $variants; do
    line="$(grep -E '^[0-9]+ (passed|failed|skipped|error)|^(=+ )?[0-9]+ [a-z]+.* in [0-9.]+s' \
            "$logs/$suite-$variant.txt" | tail -1 || true)"
    count() { grep -oE "[0-9]+ $1" <<<"$line" | grep -oE '^[0-9]+' || echo 0; }
    other="$(grep -oE '[0-9]+ (xpassed|xfailed|deselected)' <<<"$line" | paste -sd, - || true)"
    printf '%-6s %-7s %7s %7s %7s %7s  %s\n' "$suite" "$variant" "$(count passed)" "$(count failed)" \
           "$(count skipped)" "$(count 'errors?')" "$other"
  done
done
echo
echo "failures by log (details in the logs):"
for suite in $suites; do
  for variant in $variants; do
    grep -E '^(FAILED|ERROR) [^ ]+::' "$logs/$suite-$variant.txt" | sed "s/ - .*//; s/^/  $suite-$variant: /" || true
  done
done
