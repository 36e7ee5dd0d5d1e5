"""benchmarks/cuda_graphs.py on the CPU: tiny SD3 and FLUX, every row eager and from the CPU stand-in of a graph (the
plumbing: rows, counts, outputs; the GPU run measures the time)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run(argv: list[str]) -> int:
    sys.path.insert(0, str(BENCHMARKS))  # it imports e2e.py beside it
    try:
        spec = importlib.util.spec_from_file_location("cuda_graphs_benchmark", BENCHMARKS / "cuda_graphs.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main(argv)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_the_cuda_graphs_benchmark_writes_every_row(tmp_path):
    out = tmp_path / "graphs.json"
    assert run(["--tiny", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    names = ["stock", "all-full plan", "plan 50%", "plan 68%"]
    assert [(r["arch"], r["row"], r["graphs"]) for r in rows] == [
        (arch, name, graphed) for arch in ("sd3", "flux") for name in names for graphed in (False, True)]
    for r in rows:
        assert r["output_finite"] and r["ms_per_step"] > 0 and r["host_ms_per_step"] > 0 and r["idle_host_ms_per_step"] > 0
        if r["graphs"]:  # 3 trajectories of 28 calls (warm-up, timed, host): the first call eager, the second
            assert (r["eager_calls"], r["captures"], r["replays"]) == (1, 1, 83)  # captured, the rest replayed
            assert r["max_abs_diff_vs_eager"] < 1e-4


def test_chosen_eager_rows_with_a_diagnosis_of_the_host(tmp_path):
    out, diagnosis = tmp_path / "graphs.json", tmp_path / "diagnosis"
    assert run(["--tiny", "--arch", "sd3", "--rows", "plan 50%", "--no-graphs", "--diagnose", str(diagnosis),
                "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["row"], r["graphs"]) for r in rows] == [("stock", False), ("plan 50%", False)]  # stock: the baseline
    assert sorted(p.name for p in diagnosis.iterdir()) == ["sd3-128-plan-50.txt", "sd3-128-stock.txt"]
    text = (diagnosis / "sd3-128-plan-50.txt").read_text()
    assert "Ordered by: internal time" in text and "headwise.py" in text  # the profile reaches the plan's runtime
    assert "0 synchronising calls in 28 transformer calls" in text  # (the CPU has no CUDA synchronisation)


def test_an_unknown_row_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no row named"):
        run(["--tiny", "--arch", "sd3", "--rows", "plan 99%", "--out", str(tmp_path / "x.json")])
