"""Whole generations replayed from CUDA graphs (`ditfa_optimum.use_cuda_graphs`), against stock graphed the same way.

    python benchmarks/cuda_graphs.py --arch both --sizes 1024      # GPU: full-size architectures, random weights
    python benchmarks/cuda_graphs.py --tiny                        # CPU smoke run (tiny models, a stand-in capture)
    python benchmarks/cuda_graphs.py --arch sd3 --rows "plan 50%" --no-graphs --diagnose DIR   # where host time goes

Per architecture and size the rows are stock, the all-full plan and `benchmarks/e2e.py`'s 50% and 68% mixed plans,
each run eagerly and from CUDA graphs. Stock's graphs are the same `StepGraphs` around the bare transformer. Each row
times whole 28-step trajectories on e2e.py's fixed inputs (``--warmup`` untimed ones first: the graph rows capture
there). A plan's hook is told each step the way a pipeline's scheduler tells it. Calls go back to back, as a pipeline
issues them. Reported per step: GPU ms (CUDA events around the trajectory, / 28), and the host's ms per call in one
more trajectory with the GPU idle before each call (what the host itself spends: for a graph row the hook, the input
copies, one replay launch and the output copy; the back-to-back host time is kept too, but it includes waits for a
full launch queue, which graph launches of a thousand kernels meet as well). The last step's output is compared
with the eager row of the same plan.

On the CPU (``--tiny``) the graphs are the tests' stand-in, which replays a call by running it again: only the
script's plumbing is checked there.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import statistics
import sys
import time
import traceback
import warnings
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "benchmarks")) if p not in sys.path]

import e2e  # noqa: E402
from compiled_host import position as tell_step  # noqa: E402  (tells the plan's hook the step, as a scheduler)

from ditfa_optimum import apply, get_adapter, remove, uniform_plan, use_cuda_graphs  # noqa: E402
from ditfa_optimum.runtime.graphs import StepGraphs  # noqa: E402


def trajectory(model, call, steps: list[dict], cuda: bool) -> tuple[float, float, torch.Tensor]:
    """(GPU ms, host ms) of one trajectory and its last output."""
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    began = time.perf_counter()
    with torch.no_grad():
        for s, inputs in enumerate(steps):
            tell_step(model, s)
            out = call(**inputs, return_dict=False)[0]
    host = (time.perf_counter() - began) * 1e3
    if cuda:
        end.record()
        end.synchronize()
        return start.elapsed_time(end), host, out
    return host, host, out


def idle_host(model, call, steps: list[dict], cuda: bool) -> list[float]:
    """Host ms of each call of one trajectory with the GPU idle before it (synchronised): what the host itself spends
    (Python, copies, launches), none of it waiting for a full launch queue."""
    times = []
    with torch.no_grad():
        for s, inputs in enumerate(steps):
            tell_step(model, s)
            if cuda:
                torch.cuda.synchronize()
            began = time.perf_counter()
            call(**inputs, return_dict=False)
            times.append((time.perf_counter() - began) * 1e3)
    if cuda:
        torch.cuda.synchronize()
    return times


def diagnose(model, call, steps: list[dict], cuda: bool, path: Path) -> None:
    """One more trajectory with the GPU idle before each call, under cProfile and (CUDA) torch's sync debug mode:
    writes where the host's time goes and every place a call waited for the GPU (a synchronising CUDA call: a host
    read of a device value, a copy from pageable memory), with its stack, to ``path``."""
    waits: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            stack = "".join(traceback.format_stack(limit=9)[:-1])
            waits[stack] = waits.get(stack, 0) + 1

    profiler = cProfile.Profile()
    with warnings.catch_warnings():  # (restores warnings.showwarning on leaving)
        warnings.simplefilter("always")
        warnings.showwarning = record
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            profiler.enable()
            idle_host(model, call, steps, cuda)
            profiler.disable()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    text.write(f"\n{sum(waits.values())} synchronising calls in {len(steps)} transformer calls\n")
    for stack, count in sorted(waits.items(), key=lambda kv: -kv[1]):
        text.write(f"\n--- {count} x\n{stack}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue())


def run_row(model, call, steps, args, cuda: bool) -> dict:
    for _ in range(args.warmup):
        trajectory(model, call, steps, cuda)
    gpu, host, out = [], [], None
    for _ in range(args.reps):
        g, h, out = trajectory(model, call, steps, cuda)
        gpu.append(g / len(steps))
        host.append(h / len(steps))
    idle = idle_host(model, call, steps, cuda)
    return dict(ms_per_step=statistics.median(gpu), ms_all=gpu, host_ms_per_step=statistics.median(host),
                host_all=host, idle_host_ms_per_step=statistics.median(idle), idle_host_all=idle, out=out)


def rows_of(arch: str, size: int, args, device, emit) -> None:
    _, _, cfg = e2e.ARCHS[arch]
    model, text_tokens, block_size = e2e.build_model(arch, args.tiny)
    steps, image_tokens = e2e.step_inputs(model, size, text_tokens, 2 if cfg else 1, device)
    modules = len(get_adapter(model).module_specs(model))
    cuda = device.type == "cuda"
    common = dict(arch=arch, size=size, image_tokens=image_tokens, text_tokens=text_tokens, batch=2 if cfg else 1,
                  attention_modules=modules)
    plans = [("stock", None), ("all-full plan", uniform_plan(model, e2e.NUM_STEPS, block_size=block_size))]
    plans += [(f"plan {t:.0%}", e2e.mixed_plan(model, t, image_tokens, text_tokens, block_size, cfg))
              for t in e2e.TARGET_CUTS]
    if args.rows:
        unknown = set(args.rows) - {name for name, _ in plans}
        if unknown:
            raise SystemExit(f"--rows: no row named {sorted(unknown)}; rows: {[name for name, _ in plans]}")
        plans = [(name, plan) for name, plan in plans if name in args.rows or name == "stock"]
    stock_ms = stock_graph_ms = None
    try:
        for name, plan in plans:
            eager_out = None
            for graphed in (False, True) if args.graphs else (False,):
                if time.perf_counter() > args.deadline:
                    raise e2e.OutOfBudget(f"time budget spent before {arch} {size} {name}")
                graphs = None
                if plan is not None:
                    apply(model, plan, backend=args.backend, cfg=cfg)
                    if graphed:
                        graphs = use_cuda_graphs(model)
                elif graphed:
                    graphs = StepGraphs()
                if graphs is not None and args.tiny:  # the CPU stand-in: a replay runs the call again
                    graphs._capture, graphs.device_type = (lambda fn: fn), "cpu"
                call = graphs.wrap(model) if plan is None and graphed else model
                try:
                    row = run_row(model, call, steps, args, cuda)
                    if args.diagnose and not graphed:
                        slug = name.replace(" ", "-").replace("%", "")
                        diagnose(model, call, steps, cuda, Path(args.diagnose) / f"{arch}-{size}-{slug}.txt")
                finally:
                    if plan is not None:
                        remove(model)
                out = row.pop("out")
                if not graphed:
                    eager_out = out
                ms = row["ms_per_step"]
                if name == "stock":
                    stock_ms, stock_graph_ms = (stock_ms, ms) if graphed else (ms, stock_graph_ms)
                emit(dict(common, row=name, graphs=graphed, **row,
                          speedup_vs_stock_eager=stock_ms / ms,
                          speedup_vs_stock_graphs=stock_graph_ms / ms if graphed and stock_graph_ms else None,
                          idle_host_us_per_attention_call=row["idle_host_ms_per_step"] * 1e3 / modules,
                          captures=None if graphs is None else graphs.captures,
                          replays=None if graphs is None else graphs.replays,
                          eager_calls=None if graphs is None else graphs.eager_calls,
                          max_abs_diff_vs_eager=float((out.float() - eager_out.float()).abs().max()),
                          output_finite=bool(out.isfinite().all()),
                          allocated_mib=torch.cuda.memory_allocated() / 2**20 if cuda else None))
                del graphs, call
                gc.collect()
    finally:
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def table(rows: list[dict]) -> str:
    head = ("| arch | size | row | mode | ms / step | vs stock eager | vs stock graphs | host ms / step, GPU idle | "
            "per attention call (us) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        vs = r["speedup_vs_stock_graphs"]
        lines.append(f"| {r['arch']} | {r['size']}² | {r['row']} | {'graphs' if r['graphs'] else 'eager'} | "
                     f"{r['ms_per_step']:.2f} | {r['speedup_vs_stock_eager']:.2f}× | "
                     f"{'—' if vs is None else f'{vs:.2f}×'} | {r['idle_host_ms_per_step']:.2f} | "
                     f"{r['idle_host_us_per_attention_call']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["sd3", "flux", "both"], default="both")
    parser.add_argument("--sizes", type=int, nargs="+", help="pixels per side (default 1024; --tiny 128)")
    parser.add_argument("--backend", default=None, help="the plans' backend (default triton; --tiny reference)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed trajectories per row (default 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed trajectories per row (default 3; --tiny 1)")
    parser.add_argument("--budget", type=float, default=480.0, help="start no row after this many seconds")
    parser.add_argument("--tiny", action="store_true", help="CPU run on the tiny models")
    parser.add_argument("--out", help="JSON path (default docs/benchmarks/cuda-graphs-<date>-<card>.json)")
    parser.add_argument("--rows", nargs="+", help="only these rows (stock always runs: the baseline)")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false", help="eager rows only")
    parser.add_argument("--diagnose", metavar="DIR", help="per eager row, a profile of one more trajectory and every "
                        "call that waited for the GPU, with its stack, in DIR/<arch>-<size>-<row>.txt")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("the full-size runs need a CUDA GPU; use --tiny on the CPU")
    args.sizes = args.sizes or [e2e.TINY["size"] if args.tiny else 1024]
    args.backend = args.backend or ("reference" if args.tiny else "triton")
    args.warmup = 1 if args.warmup is None else args.warmup
    args.reps = args.reps or (1 if args.tiny else 3)
    args.deadline = time.perf_counter() + args.budget
    device = torch.device("cpu" if args.tiny else "cuda")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    today = str(date.today())
    out = Path(args.out or ROOT / "docs" / "benchmarks" / f"cuda-graphs-{today}-{e2e.card_slug(card)}.json")
    payload = dict(meta=dict(date=today, device=card, command=" ".join(["python benchmarks/cuda_graphs.py", *argv]),
                             **e2e.versions()),
                   settings=dict(steps=e2e.NUM_STEPS, warmup=args.warmup, reps=args.reps, backend=args.backend,
                                 target_cuts=e2e.TARGET_CUTS), rows=[])
    started = time.perf_counter()

    def emit(row: dict) -> None:
        payload["rows"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"[{time.perf_counter() - started:6.1f} s] {row['arch']} {row['size']} {row['row']} "
              f"{'graphs' if row['graphs'] else 'eager'}: {row['ms_per_step']:.2f} ms/step, host "
              f"{row['idle_host_ms_per_step']:.2f} ms/step (GPU idle)", flush=True)

    torch.manual_seed(0)
    try:
        for arch in (["sd3", "flux"] if args.arch == "both" else [args.arch]):
            for size in args.sizes:
                rows_of(arch, size, args, device, emit)
    except e2e.OutOfBudget as stop:
        payload["incomplete"] = str(stop)
        print(f"stopped: {stop}", flush=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\n{card}, torch {payload['meta']['torch']}, {today}: `{payload['meta']['command']}` -> {out}")
    print(table(payload["rows"]))
    return 0 if "incomplete" not in payload else 1


if __name__ == "__main__":
    sys.exit(main())
