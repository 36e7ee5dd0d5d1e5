"""The kernel experiments kept in benchmarks/ still compute the right function (they are evidence in the docs)."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the CPU check runs under Triton's interpreter")
def test_the_chunk_stream_experiment_matches_the_reference():
    load("kernel_persistent").cpu_check()  # asserts error < 1e-4 and skipped heads untouched, four layouts


def test_the_chunk_stream_schedule_balances_and_covers_every_tile():
    stream = load("kernel_persistent")
    widths = torch.tensor([[2, 2, 0, 16]])  # 16 image blocks of 64 tokens: the last head is full
    chunks, starts = stream.chunk_stream(widths, 1024, 77, False, 64, 64, 64, 7)
    assert starts[0] == 0 and starts[-1] == len(chunks) and len(starts) == 8
    firsts, lasts = (chunks[:, 3] & 1).sum(), ((chunks[:, 3] >> 1) & 1).sum()
    tiles_per_head = 2 + 1024 // 64  # two text tiles of 64 rows, sixteen image tiles
    assert firsts == lasts == 3 * tiles_per_head  # every tile of the three computed heads, once
    assert not (chunks[:, 0] == 2).any()  # the skipped head has no chunk
    loads = (starts[1:] - starts[:-1]).tolist()
    assert max(loads) - min(loads) <= 2 + 1024 // 64  # longest first: within one longest tile (18 chunks)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("overlap", [False, True])
def test_the_warp_specialised_hopper_experiment_compiles_for_sm90_without_spills(head_dim, overlap):
    pytest.importorskip("triton.experimental.gluon")  # Gluon has no interpreter: compile only (Triton's ptxas)
    import json
    import subprocess
    import sys

    # in a fresh process without TRITON_INTERPRET: the interpreter patches Triton's language, which breaks Gluon
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import json, kernel_hopper; print(json.dumps(kernel_hopper.compile_for_hopper({head_dim}, {overlap})))"
    run = subprocess.run([sys.executable, "-c", code], cwd=BENCHMARKS, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert any("0 bytes spill stores" in line for line in info), info


def test_the_hopper_experiment_refuses_what_it_cannot_run():
    hopper = load("kernel_hopper")
    q = torch.zeros(1, 2, 256, 64, dtype=torch.float16)
    if not torch.cuda.is_available():
        assert "Hopper" in hopper.check_inputs(q, q, q, 128)
    with pytest.raises(ValueError, match="headwise_attention_hopper"):
        hopper.headwise_attention_hopper(q, q, q, torch.ones(1, 2, dtype=torch.int32), 128, 128, False, 128)


def test_ncu_regions_cuts_the_sass_at_its_loops(tmp_path):
    """The profile summariser: prologue / loop / between / epilogue, try-wait stubs after EXIT count with their loop."""
    regions = load("ncu_regions")
    sass = [("0x1000", "LDG.E R0, desc[UR4][R2.64]", 10), ("0x1010", "STS.128 [R0], R4", 5),   # prologue
            ("0x1020", "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR7]", 3),                        # loop 1 head
            ("0x1030", "@!P0 BRA 0x10a0", 1), ("0x1040", "HGMMA.64x128x16.F32.BF16 R24", 40),
            ("0x1050", "@P1 BRA 0x1020", 2),                                                   # back to the head
            ("0x1060", "BAR.SYNC.DEFER_BLOCKING 0x0", 4), ("0x1070", "@P2 BRA 0x1060", 1),    # loop 2
            ("0x1080", "STG.E desc[UR4][R2.64], R7", 6), ("0x1090", "EXIT", 0),              # epilogue
            ("0x10a0", "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR7]", 8), ("0x10b0", "@!P0 BRA 0x1020", 0)]
    path = tmp_path / "source.csv"
    with open(path, "w") as f:
        f.write('"Kernel Name","k",\n"Address","Source","Warp Stall Sampling (All Samples)","stall_wait"\n')
        for addr, src, n in sass:
            f.write(f'"{addr}","{src}","{n}","{n}"\n')
    rows = regions.read(str(path))
    assert regions.regions(rows) == ["prologue"] * 2 + ["loop 1"] * 4 + ["loop 2"] * 2 + ["epilogue"] * 2 + [
        "loop 1"] * 2
