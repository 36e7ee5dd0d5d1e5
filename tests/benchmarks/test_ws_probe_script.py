"""benchmarks/ws_probe.py on the CPU: the probe kernel's arithmetic (bf16 and INT8 Q.K^T, with and without the warp
specialisation flag, which the interpreter ignores) against PyTorch's attention; the GPU run times it."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ws_probe.py"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs in Triton's interpreter")
def test_the_probe_kernel_computes_attention(tmp_path):
    spec = importlib.util.spec_from_file_location("ws_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--tiny", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "ws-probe.json").read_text())["rows"]
    assert [(r["int8"], r["warp_specialize"]) for r in rows] == [(False, False), (False, True), (True, False),
                                                                  (True, True)]
    for r in rows:  # against PyTorch on the same (dequantised) inputs, in fp16
        assert r["relative_error"] < 2e-3, r
