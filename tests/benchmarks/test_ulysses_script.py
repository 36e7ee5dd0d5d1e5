"""benchmarks/ulysses.py on the CPU: two gloo processes run its tiny smoke mode; the plan under Ulysses-2 gives the
one-process output and every row is reported (its speeds say nothing on a CPU)."""

import json
import os
import socket
import sys
from pathlib import Path

import torch.multiprocessing as mp

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(BENCHMARKS))
    import ulysses

    ulysses.main(["--tiny", "--warmup", "0", "--reps", "1", "--cuts", "0.5", "--out", out])


def test_the_ulysses_benchmark_smoke_runs_on_two_cpu_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ulysses.json"
    mp.start_processes(_run, args=(port, str(out)), nprocs=2, join=True, start_method="spawn")
    report = json.loads(out.read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["stock", "plan 50%", "stock + ulysses-2", "plan 50% + ulysses-2"]
    assert report["world"] == 2 and rows["plan 50% + ulysses-2"]["ulysses"] == 2
    assert rows["plan 50% + ulysses-2"]["rel_err_vs_one_gpu"] < 1e-5
    assert rows["stock + ulysses-2"]["rel_err_vs_one_gpu"] < 1e-5
    assert rows["plan 50% + ulysses-2"]["of_product"] > 0
