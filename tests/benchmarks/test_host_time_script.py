"""benchmarks/host_time.py on the CPU: the smoke run issues every row's calls through the runtime and reports them
(CPU times are compute, not host overhead: the GPU run measures that)."""

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_the_host_time_benchmark_reports_every_row(tmp_path):
    spec = importlib.util.spec_from_file_location("host_time_benchmark", BENCHMARKS / "host_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "host.json"
    assert module.main(["--tiny", "--calls", "3", "--reps", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["row"] for r in rows] == ["stock SDPA", "planned call, all full", "planned call, mixed",
                                        "planned call, all arrow 1/8"]
    assert all(r["us"] > 0 for r in rows)
