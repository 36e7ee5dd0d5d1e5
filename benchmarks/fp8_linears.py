"""One denoising step with FP8 linear layers and a plan, against stock bfloat16 (full-size SD3-medium / FLUX.1-dev
architectures, random weights; timings only: random weights say nothing about quality, see quality.py --curves fp8).

Rows per architecture and resolution, each timed as `e2e.py` times a step (fixed inputs, ``--warmup`` untimed calls,
median of ``--reps``; a plan row runs the real trajectory to the step before the timed one and rewinds to it before
every call, `e2e.rewind`):

1. ``stock``: diffusers' processors, bfloat16 linears -- the baseline;
2. ``plan X%``: `e2e.mixed_plan` at attention-FLOP cut X (default 68%), triton backend;
3. ``fp8 linears``: `ditfa_optimum.fp8_linears.quantize` (torchao, float8 e4m3 weights and per-row dynamic
   activations), stock attention;
4. ``plan X% + fp8 linears``.

``--compile``: the same rows with ``torch.compile(transformer, fullgraph=True)``, each compiled from scratch (the
speed-ups are against compiled stock); ``--compiled-rows`` picks which (default: stock and plan + fp8, the two the
targets compare, since a FLUX.1-dev compile takes about a minute). The model is converted to FP8 in place after the
bfloat16 rows, so rows run in the order above.

    python benchmarks/fp8_linears.py --sizes 2048 [--arch sd3|flux|both] [--compile] [--profile DIR] [--out PATH]
    python benchmarks/fp8_linears.py --tiny      (CPU: the tiny models, the conversion without the GPU check)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "benchmarks")) if p not in sys.path]

import e2e  # noqa: E402

from ditfa_optimum import apply, fp8_linears, remove  # noqa: E402

ROWS = ("stock", "plan", "fp8 linears", "plan + fp8 linears")


def profile_call(case: e2e.Case, inputs: dict, before, step: int, path: Path) -> None:
    """One more call under torch.profiler: its kernels by total device time, written to ``path`` (what the time of a
    row goes to: the GEMMs, the activations' FP8 rounding, attention)."""
    from torch.profiler import ProfilerActivity, profile

    model = case.compiled if case.args.compile else case.model
    if before is not None:
        before()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with e2e.step_context(case, step):
            model(**inputs)
        torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))


def time_row(case: e2e.Case, plan, compiled: bool, profile_to: Path | None = None):
    """(milliseconds per call, the last output, the timed step) of one row: ``plan`` None for stock attention;
    ``profile_to``: also write a profile of one call there (`profile_call`)."""
    case.args.compile = compiled

    def compile_model():
        if compiled:
            torch._dynamo.reset()
            case.compiled = torch.compile(case.model, fullgraph=True)

    mid = e2e.NUM_STEPS // 2
    if plan is None:
        compile_model()
        times, out = e2e.time_calls(case, case.steps[mid], step=mid)
        if profile_to is not None:
            profile_call(case, case.steps[mid], None, mid, profile_to)
        return times, out, mid
    report = plan.flops(case.image_tokens, case.text_tokens, cfg=case.cfg)
    t = e2e.timed_step(report.cut_per_step(), report.cut)
    runtime = apply(case.model, plan, backend=case.args.backends[0], cfg=case.cfg)
    try:
        e2e.run_steps(case, t)
        point = e2e.checkpoint(runtime)
        compile_model()
        times, out = e2e.time_calls(case, case.steps[t], before=lambda: e2e.rewind(runtime, point), step=t)
        if profile_to is not None:
            profile_call(case, case.steps[t], lambda: e2e.rewind(runtime, point), t, profile_to)
    finally:
        remove(case.model)
    return times, out, t


def run_case(case: e2e.Case, target: float, emit) -> None:
    plan = e2e.mixed_plan(case.model, target, case.image_tokens, case.text_tokens, case.block_size, case.cfg)
    cut = plan.flops(case.image_tokens, case.text_tokens, cfg=case.cfg).cut
    modes = [False] + ([True] if case.args.compile else [])
    wanted = {False: case.args.eager_rows, True: case.args.compiled_rows}
    baseline, overlapped_base, reference = {}, {}, None
    for name in ROWS:
        if name == "fp8 linears":  # from here on the linear layers are FP8 (in place, once)
            count = len(fp8_linears.quantize(case.model, check=not case.args.tiny))
        for compiled in modes:
            if name not in wanted[compiled]:
                continue
            case.check_budget(f"{name}{' (compiled)' if compiled else ''}")
            profile_to = None
            if case.args.profile and case.clock.cuda:
                slug = name.replace(" + ", "-").replace(" ", "-") + ("-compiled" if compiled else "")
                profile_to = Path(case.args.profile) / f"{case.arch}-{case.size}-{slug}.txt"
            times, out, step = time_row(case, plan if name.startswith("plan") else None, compiled, profile_to)
            ms = statistics.median(times)
            overlapped = e2e.overlapped_median(case)
            if name == "stock":
                baseline[compiled], overlapped_base[compiled] = ms, overlapped
                reference = out.float() if reference is None else reference  # eager stock when it runs
            diff = None if reference is None else float((out.float() - reference).norm() / reference.norm())
            emit(dict(arch=case.arch, size=case.size, image_tokens=case.image_tokens, text_tokens=case.text_tokens,
                      batch=case.batch, row=name if not name.startswith("plan") else name.replace("plan",
                      f"plan {target:.0%}"), compiled=compiled, timed_step=step,
                      attention_cut=cut if name.startswith("plan") else 0.0,
                      fp8_linears=count if "fp8" in name else 0, ms=ms, ms_all=times,
                      speedup=baseline[compiled] / ms, rel_diff_vs_stock=diff, ms_overlapped=overlapped,
                      ms_overlapped_all=case.overlapped_ms if case.args.overlap else None,
                      speedup_overlapped=None if overlapped is None else overlapped_base[compiled] / overlapped,
                      output_finite=bool(out.isfinite().all())))


def table(rows: list[dict]) -> str:
    lines = ["| arch | size | row | compiled | attention cut | FP8 linears | ms / step | speed-up | back to back ms "
             "| speed-up | rel. diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        arch = {"sd3": "SD3-medium", "flux": "FLUX.1-dev"}.get(r["arch"], r["arch"])
        diff = "–" if r["rel_diff_vs_stock"] is None else f"{r['rel_diff_vs_stock']:.3f}"
        lines.append(f"| {arch} | {r['size']}² | {r['row']} | {'yes' if r['compiled'] else 'no'} | "
                     f"{r['attention_cut']:.1%} | {r['fp8_linears']} | {r['ms']:.2f} | {r['speedup']:.2f}× | "
                     + ("– | – | " if r.get("ms_overlapped") is None else
                        f"{r['ms_overlapped']:.2f} | {r['speedup_overlapped']:.2f}× | ") + f"{diff} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["sd3", "flux", "both"], default="both")
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--target", type=float, default=0.68, help="attention-FLOP cut of the plan rows")
    parser.add_argument("--compile", action="store_true", help="also the compiled rows (--compiled-rows)")
    parser.add_argument("--compiled-rows", nargs="+", default=["stock", "plan + fp8 linears"], choices=ROWS)
    parser.add_argument("--eager-rows", nargs="*", default=list(ROWS), choices=ROWS,
                        help="the eager rows to time (default all; none: compiled rows only)")
    parser.add_argument("--tiny", action="store_true", help="CPU run on the tiny models")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--reps", type=int)
    parser.add_argument("--budget", type=float, default=480.0, help="start no row after this many seconds")
    parser.add_argument("--overlap", action="store_true",
                        help="also time each row's calls back to back, as a pipeline issues steps (e2e.overlapped_calls)")
    parser.add_argument("--profile", metavar="DIR", help="also profile one call of each row (GPU), tables to DIR")
    parser.add_argument("--out", help="JSON path (default docs/benchmarks/fp8-linears-<date>-<card>.json)")
    args = parser.parse_args(argv)
    if not args.tiny:
        fp8_linears.check_available()
    args.archs = ["sd3", "flux"] if args.arch == "both" else [args.arch]
    args.sizes = args.sizes or ([e2e.TINY["size"]] if args.tiny else [2048])
    args.backends = ["blocked"] if args.tiny else ["triton"]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.reps = args.reps or (2 if args.tiny else 10)
    args.share_reps = 0
    args.deadline = time.perf_counter() + args.budget
    device = torch.device("cpu" if args.tiny else "cuda")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out = Path(args.out or ROOT / "docs" / "benchmarks" / f"fp8-linears-{date.today()}-{e2e.card_slug(card)}.json")
    payload = dict(meta=dict(date=str(date.today()), device=card, command=" ".join(
        ["python benchmarks/fp8_linears.py", *(sys.argv[1:] if argv is None else argv)]), **e2e.versions()),
        settings=dict(steps=e2e.NUM_STEPS, warmup=args.warmup, reps=args.reps, target=args.target,
                      compiled_rows=args.compiled_rows if args.compile else []), rows=[])
    started = time.perf_counter()

    def emit(row: dict) -> None:
        payload["rows"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"[{time.perf_counter() - started:6.1f} s] {row['arch']} {row['size']} {row['row']}"
              f"{' (compiled)' if row['compiled'] else ''}: {row['ms']:.2f} ms, {row['speedup']:.2f}x"
              + ("" if row["ms_overlapped"] is None else
                 f"; back to back {row['ms_overlapped']:.2f} ms, {row['speedup_overlapped']:.2f}x"), flush=True)

    def run(case, emit):
        if args.tiny:  # the tiny models are float32; FP8 linears need bfloat16
            case.model.to(torch.bfloat16)
            case.steps = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in s.items()}
                          for s in case.steps]
        run_case(case, args.target, emit)

    try:
        e2e.each_case(args, device, run, emit)
    except e2e.OutOfBudget as stop:
        payload["incomplete"] = str(stop)
        print(f"stopped: {stop}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\n{card}, torch {payload['meta']['torch']}, {payload['meta']['date']}: `{payload['meta']['command']}` "
          f"-> {out}")
    print(table(payload["rows"]))
    return 0 if "incomplete" not in payload else 1


if __name__ == "__main__":
    sys.exit(main())
