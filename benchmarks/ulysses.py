"""A plan under diffusers' Ulysses context parallelism: do the plan's speed-up and the parallelism's multiply?

    torchrun --nproc_per_node 2 benchmarks/ulysses.py                  # FLUX.1-dev architecture, 2048², 2 GPUs
    torchrun --nproc_per_node 2 benchmarks/ulysses.py --tiny           # the tiny FLUX on CPUs (gloo): a smoke run

Each rank builds the FLUX.1-dev architecture with random bf16 weights (the same seed on every rank) and times whole
trajectories of `e2e.NUM_STEPS` transformer calls (fixed inputs, timesteps falling) in four rows, all in one run:
stock and a plan (`e2e.mixed_plan`, 50% / 68% attention-FLOP cut) on one GPU each, then the same after
``enable_parallelism(ContextParallelConfig(ulysses_degree=N))``. Reported by rank 0: median ms per trajectory, the
speed-ups against one-GPU stock, and ``(plan + CP) / (plan x CP)``, the share of the product of the two speed-ups
that the combination keeps (issue 21's goal: >= 0.9 at 2K). The CP outputs are checked against the one-GPU ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "benchmarks")) if p not in sys.path]

import e2e  # noqa: E402

from ditfa_optimum import apply, remove  # noqa: E402


def trajectory_ms(model, steps: list[dict], warmup: int, reps: int, cuda: bool) -> tuple[float, torch.Tensor]:
    """Median ms of whole trajectories (every rank in step, a barrier before each), and the last output."""
    times, out = [], None
    for i in range(warmup + reps):
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            for inputs in steps:
                out = model(**inputs, return_dict=False)[0]
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny FLUX on CPUs (gloo)")
    parser.add_argument("--size", type=int, default=2048, help="pixels per side (default 2048)")
    parser.add_argument("--cuts", type=float, nargs="+", default=[0.5, 0.68], help="plans' attention-FLOP cuts")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", help="JSON path (rank 0 writes)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    else:
        torch.accelerator.device_count = lambda: 1  # diffusers divides the rank by it (docs/parallel.md)
    from diffusers import ContextParallelConfig

    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model, text_tokens, block_size = e2e.build_model("flux", args.tiny)
    model = model.to(device)
    steps, image_tokens = e2e.step_inputs(model, e2e.TINY["size"] if args.tiny else args.size, text_tokens, 1, device)
    if args.tiny:
        steps = steps[:4]  # a smoke run: the first steps of the 28-step plans (new generation each trajectory)
    plans = {cut: e2e.mixed_plan(model, cut, image_tokens, text_tokens, block_size, cfg=False) for cut in args.cuts}
    rows, outputs = [], {}

    def row(name: str, plan=None, parallel: bool = False):
        if plan is not None:
            apply(model, plan, backend=None if cuda else "blocked")
        try:
            ms, out = trajectory_ms(model, steps, args.warmup, args.reps, cuda)
        finally:
            if plan is not None:
                remove(model)
        rows.append(dict(row=name, ulysses=size if parallel else 1, ms=ms))
        outputs[name] = out.float()
        if rank == 0:
            print(f"{name}: {ms:.1f} ms", flush=True)

    row("stock")
    for cut, plan in plans.items():
        row(f"plan {cut:.0%}", plan)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=size))
    row(f"stock + ulysses-{size}", parallel=True)
    for cut, plan in plans.items():
        row(f"plan {cut:.0%} + ulysses-{size}", plan, parallel=True)

    stock = rows[0]["ms"]
    by_name = {r["row"]: r for r in rows}
    cp = stock / by_name[f"stock + ulysses-{size}"]["ms"]
    for r in rows:
        r["speedup"] = stock / r["ms"]
    for cut in plans:
        alone = by_name[f"plan {cut:.0%}"]
        both = by_name[f"plan {cut:.0%} + ulysses-{size}"]
        both["of_product"] = both["speedup"] / (alone["speedup"] * cp)
        ref = outputs[f"plan {cut:.0%}"]
        both["rel_err_vs_one_gpu"] = float((outputs[both["row"]] - ref).norm() / ref.norm())
    ref = outputs["stock"]
    by_name[f"stock + ulysses-{size}"]["rel_err_vs_one_gpu"] = float(
        (outputs[f"stock + ulysses-{size}"] - ref).norm() / ref.norm())
    if rank == 0:
        print("| row | GPUs | ms / trajectory | speed-up | of plan x CP | rel. error vs one GPU |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['row']} | {r['ulysses']} | {r['ms']:.1f} | {r['speedup']:.2f}x | "
                  f"{r.get('of_product', float('nan')):.2f} | {r.get('rel_err_vs_one_gpu', float('nan')):.1e} |")
        if args.out:
            Path(args.out).write_text(json.dumps(dict(
                size=args.size, tiny=args.tiny, steps=len(steps), world=size, rows=rows,
                device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__), indent=2) + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
