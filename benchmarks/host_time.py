"""Host time per planned attention call (issue 18's "<= 30 us per attention call"), against stock SDPA's.

    python benchmarks/host_time.py                 # GPU: FLUX.1-dev and SD3-medium shapes at 1024²
    python benchmarks/host_time.py --tiny          # CPU smoke run (blocked backend)

A planned attention call is the module's `ModuleRuntime` (step program, width table, backend) and the fused kernel's
launch (launch table and tuning key from the host caches, tensor descriptors, the autotuner's dispatch). Issued
``--calls`` times back to back with no synchronisation in between, fewer than the GPU's launch queue holds, the
host never waits for the device: the time to issue them, divided by their number, is the host time per call. Each
row is measured ``--reps`` times (median), after warm-up calls that tune and cache everything. Rows: stock
``scaled_dot_product_attention`` (the floor a stock processor pays), the kernel launched directly with cached tables
(`headwise_attention`), and the whole planned call through the runtime for an all-full step, a mixed step (arrow,
cache, full heads) and an all-arrow step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT),) if p not in sys.path]

from ditfa_optimum.plan import CompressionPlan, ModuleSpec  # noqa: E402
from ditfa_optimum.runtime import PlanRuntime  # noqa: E402

SHAPES = {  # (heads, head dim, image tokens, text tokens, image first) at 1024²
    "flux": (24, 128, 4096, 512, False),
    "sd3": (24, 64, 4096, 333, True),
}
TINY = (4, 16, 256, 16, False)


def issue_us(call, calls: int, reps: int, sync) -> float:
    """Median over ``reps`` of the host time (us) per call to issue ``calls`` calls back to back."""
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls * 1e6)
        sync()
    return statistics.median(times)


def rows_for(name: str, shape, device, backend: str, calls: int, reps: int, dtype) -> list[dict]:
    H, D, n_img, n_txt, image_first = shape
    spec = ModuleSpec("blocks.0.attn", num_heads=H, head_dim=D, image_first=image_first)
    mixed = ["arrow:1/8", "arrow:1/16", "cache", "full"] * (H // 4)
    programs = {"all full": ["full"] * H, "mixed": mixed, "all arrow 1/8": ["arrow:1/8"] * H}
    q, k, v = (torch.randn(1, H, n_img + n_txt, D, device=device, dtype=dtype) for _ in range(3))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = [dict(shape=name, row="stock SDPA", us=issue_us(lambda: F.scaled_dot_product_attention(q, k, v), calls,
                                                          reps, sync))]
    for label, heads in programs.items():
        # step 0 full (what `cache` heads read), then the same program at every later step
        plan = CompressionPlan.from_methods([spec], {spec.name: [["full"] * H] + [heads] * (calls * reps + 64)},
                                            block_size=128 if device.type == "cuda" else 16)
        runtime = PlanRuntime(plan, backend=backend, cfg=False)
        module = runtime.module(spec)
        state = runtime.state
        step = iter(range(plan.num_steps))

        def planned():
            state.on_transformer_call(None, n_txt, step_index=next(step))
            module(q, k, v, num_text_tokens=n_txt)

        with torch.no_grad():
            for _ in range(4):  # warm-up: tuning, host caches
                planned()
            out.append(dict(shape=name, row=f"planned call, {label}", us=issue_us(planned, calls, reps, sync)))
    if device.type == "cuda":
        from ditfa_optimum.kernels.headwise_attention import headwise_attention, launch_table, tune_key

        widths = torch.tensor([[4096 // 128 // 8] * H], dtype=torch.int32, device=device)
        table, key = launch_table(widths), tune_key(widths)

        def kernel():
            headwise_attention(q, k, v, widths, n_img, n_txt, image_first, 128, table=table, key=key,
                               store_lse=False)

        kernel()
        out.append(dict(shape=name, row="kernel launch alone (all arrow 1/8)", us=issue_us(kernel, calls, reps, sync)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, blocked backend")
    parser.add_argument("--calls", type=int, default=200, help="calls issued back to back (default 200)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", help="JSON path")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    shapes = SHAPES if cuda else {"tiny": TINY}
    rows = []
    for name, shape in shapes.items():
        rows += rows_for(name, shape, device, "triton" if cuda else "blocked", args.calls, args.reps,
                         torch.bfloat16 if cuda else torch.float32)
    print("| shape | row | host us per call |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['row']} | {r['us']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__, calls=args.calls,
            reps=args.reps, rows=rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
