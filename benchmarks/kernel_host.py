"""Host time per call of the fused kernel against its device time: are the short calls launch-bound?

At 1024^2 one attention call lasts 0.1-0.2 ms on an H100, and `benchmarks/kernel.py` has timed the same launch up to
2x apart between runs. This script times, per case and plan (autotuned first):

* ``do_bench``: what `kernel.py` reports (back-to-back calls, events around the whole series);
* ``host``: the Python time to issue one call (200 calls, no synchronisation inside; the launch queue never fills);
* ``graph``: one call's device time alone, replayed from a CUDA graph of 20 calls (no host work at all).

If ``host`` exceeds ``graph``, back-to-back calls are limited by the host, and ``do_bench`` measures the host.

    python benchmarks/kernel_host.py [--out DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends import CASES, PLANS, bench, case_inputs, head_methods, save_results, setup, widths_for  # noqa: E402

from ditfa_optimum.runtime import get_backend  # noqa: E402


def host_us(fn, calls: int = 200) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def graph_ms(fn, calls: int = 20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return bench(graph.replay) / calls


def main():
    args, device = setup(__doc__)
    triton_backend = get_backend("triton", device)
    rows = []
    for case in CASES:
        n_img, n_txt, image_first, _ = CASES[case]
        layout, q, k, v, dense_ms = case_inputs(case, device)
        for plan in [p for p in PLANS if p != "all full"]:
            widths = widths_for(head_methods(plan), layout)
            dev_widths, table, key = triton_backend.device_widths(widths, device)

            def kernel():
                return torch.ops.ditfa.headwise_attention(q, k, v, dev_widths, table, key, n_img, n_txt, image_first,
                                                          128)

            kernel()  # autotune
            row = dict(case=case, plan=plan, do_bench_ms=bench(kernel), host_us=host_us(kernel),
                       graph_ms=graph_ms(kernel))
            rows.append(row)
            print(f"{case:8s} {plan:9s} do_bench {row['do_bench_ms']:.3f} ms | host {row['host_us']:.0f} us per call | "
                  f"graph replay {row['graph_ms']:.3f} ms per call", flush=True)
    save_results(args.out, "kernel-host", "python benchmarks/kernel_host.py", rows=rows)


if __name__ == "__main__":
    main()
