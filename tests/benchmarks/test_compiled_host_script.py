"""benchmarks/compiled_host.py on the CPU: a tiny FLUX with compiled blocks, stock and planned, each row timed and
profiled (CPU times are compute, not host overhead: the GPU run measures that)."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_the_compiled_host_benchmark_profiles_stock_and_the_plan(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))  # it imports e2e.py beside it
    try:
        spec = importlib.util.spec_from_file_location("compiled_host_benchmark", BENCHMARKS / "compiled_host.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = tmp_path / "host.json"
        assert module.main(["--tiny", "--arch", "flux", "--reps", "1", "--top", "5", "--out", str(out)]) == 0
    finally:
        sys.path.remove(str(BENCHMARKS))
        torch._dynamo.reset()
    data = json.loads(out.read_text())
    assert list(data["rows"]) == ["stock", "plan 68%"] and data["device"] == "cpu"
    for row in data["rows"].values():
        assert row["host_ms"] > 0 and "Ordered by: internal time" in row["profile"]
