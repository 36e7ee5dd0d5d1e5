"""benchmarks/cuda_graphs.py on the CPU: tiny SD3 and FLUX, every row eager and from the CPU stand-in of a graph (the
plumbing: rows, counts, outputs; the GPU run measures the time)."""

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_the_cuda_graphs_benchmark_writes_every_row(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))  # it imports e2e.py beside it
    try:
        spec = importlib.util.spec_from_file_location("cuda_graphs_benchmark", BENCHMARKS / "cuda_graphs.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = tmp_path / "graphs.json"
        assert module.main(["--tiny", "--out", str(out)]) == 0
    finally:
        sys.path.remove(str(BENCHMARKS))
    rows = json.loads(out.read_text())["rows"]
    names = ["stock", "all-full plan", "plan 50%", "plan 68%"]
    assert [(r["arch"], r["row"], r["graphs"]) for r in rows] == [
        (arch, name, graphed) for arch in ("sd3", "flux") for name in names for graphed in (False, True)]
    for r in rows:
        assert r["output_finite"] and r["ms_per_step"] > 0 and r["host_ms_per_step"] > 0 and r["idle_host_ms_per_step"] > 0
        if r["graphs"]:  # 3 trajectories of 28 calls (warm-up, timed, host): the first call eager, the second
            assert (r["eager_calls"], r["captures"], r["replays"]) == (1, 1, 83)  # captured, the rest replayed
            assert r["max_abs_diff_vs_eager"] < 1e-4
