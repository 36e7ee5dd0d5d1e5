"""benchmarks/fp8_linears.py on the CPU (--tiny: the tiny SD3 model, the FP8 conversion without the GPU check): every
row is measured, the FP8 rows convert the blocks' linear layers, and the plan rows cut attention FLOPs."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchao")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.cpu_fp8
def test_tiny_run_measures_every_row(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import fp8_linears as script
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = tmp_path / "fp8.json"
    assert script.main(["--tiny", "--arch", "sd3", "--reps", "1", "--warmup", "0", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["row"] for r in rows] == ["stock", "plan 68%", "fp8 linears", "plan 68% + fp8 linears"]
    assert all(r["output_finite"] and r["ms"] > 0 for r in rows)
    assert [r["fp8_linears"] > 0 for r in rows] == [False, False, True, True]
    assert all(abs(r["attention_cut"] - 0.68) < 0.011 for r in rows if r["row"].startswith("plan"))
    assert 0 < rows[2]["rel_diff_vs_stock"] < 0.5  # FP8 changes the output a little, not wholesale
