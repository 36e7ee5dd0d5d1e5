"""benchmarks/fp8_attention_error.py end to end on the embedded miniature model (one step, one layer)."""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import fp8_attention_error  # noqa: E402


def test_the_error_table_of_captured_attention(tmp_path, capsys):
    out = tmp_path / "err.json"
    assert fp8_attention_error.main(["--model", "mini-mmdit", "--steps", "1", "--layers", "0", "--no-random",
                                     "--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["input"] for r in rows] == ["captured step 0 layer 0"]
    row = rows[0]
    variants = [c for c in row if c not in ("input", "shape", "image_tokens", "text_tokens")]
    assert len(variants) == 1 + 2 * len(fp8_attention_error.VARIANTS)
    assert all(math.isfinite(row[c]) and 0 < row[c] < 0.5 for c in variants)
    assert row["bfloat16"] < min(row[c] for c in variants if c != "bfloat16")  # rounding to 8 bits costs more
    assert "| captured | 1 |" in capsys.readouterr().out
