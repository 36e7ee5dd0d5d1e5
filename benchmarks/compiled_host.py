"""Where the host time of a step with compiled blocks goes: stock against a planned step (the plan's tables).

    python benchmarks/compiled_host.py --arch sd3 --size 1024      # GPU: the full-size architecture, random weights
    python benchmarks/compiled_host.py --tiny                      # CPU smoke run (tiny model, reference backend)

Each row compiles every block (`ditfa_optimum.compile_blocks`, inductor, fullgraph) and runs the step in the middle
of a 28-step trajectory (`benchmarks/e2e.py`'s inputs and 68% mixed plan, its trajectory run first so the plan's
kept outputs exist). The host time of a call is the time until it returns, the GPU idle before it (median of
``--reps``): Python and launch time, an upper bound where the GPU is slower than the host (the launch queue then
fills and a launch waits). Holding the GPU busy with a sleep kernel first does not work here: a planned step queues
more launches than the queue holds, and the host then waits for the sleep (measured: ~1 s "host" time). Then one call
is profiled (cProfile; read the functions' own time, not a blocking launch's) and its top functions by own time
printed; everything is written as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "benchmarks")) if p not in sys.path]

import e2e  # noqa: E402

from ditfa_optimum import apply, compile_blocks, remove  # noqa: E402
from ditfa_optimum.runtime.transformer_hook import TRANSFORMER_HOOK  # noqa: E402

def position(model, step: int, rewind=None) -> None:
    """Put the plan back where ``rewind`` leaves it and tell its hook the call's step, as a pipeline's scheduler
    would (no plan: nothing to do)."""
    if rewind is not None:
        rewind()
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(TRANSFORMER_HOOK) if registry is not None else None
    if hook is not None:
        hook.scheduler = types.SimpleNamespace(step_index=step)


def issue(model, inputs: dict, step: int, cuda: bool, rewind=None) -> float:
    """Seconds until one call returns, the GPU idle before it."""
    position(model, step, rewind)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(**inputs)
    took = time.perf_counter() - start
    if cuda:
        torch.cuda.synchronize()
    return took


def profile(model, inputs: dict, step: int, cuda: bool, rewind, top: int) -> str:
    profiler = cProfile.Profile()
    position(model, step, rewind)
    if cuda:
        torch.cuda.synchronize()
    profiler.enable()
    model(**inputs)
    profiler.disable()
    if cuda:
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["sd3", "flux"], default="sd3")
    parser.add_argument("--size", type=int, help="pixels per side (default 1024; --tiny: e2e's tiny size)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--top", type=int, default=30, help="functions printed per profile")
    parser.add_argument("--tiny", action="store_true", help="CPU run on the tiny model")
    parser.add_argument("--out", help="JSON path (default: not written)")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("the full-size run needs a CUDA GPU; use --tiny on the CPU")
    cuda = not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    size = args.size or (e2e.TINY["size"] if args.tiny else 1024)
    _, _, cfg = e2e.ARCHS[args.arch]
    model, text_tokens, block_size = e2e.build_model(args.arch, args.tiny)
    steps, image_tokens = e2e.step_inputs(model, size, text_tokens, 2 if cfg else 1, device)
    plan = e2e.mixed_plan(model, 0.68, image_tokens, text_tokens, block_size, cfg)
    t = e2e.timed_step(plan.flops(image_tokens, text_tokens, cfg=cfg).cut_per_step(), 0.68)
    backend = "reference" if args.tiny else "triton"
    rows = {}
    torch._dynamo.reset()
    compile_blocks(model, fullgraph=True)
    with torch.no_grad():
        for name in ("stock", "plan 68%"):
            rewind = None
            if name != "stock":
                runtime = apply(model, plan, backend=backend, cfg=cfg)
                for s in range(t):  # the trajectory through the compiled blocks: the tables keep their outputs
                    issue(model, steps[s], s, cuda)
                point = e2e.checkpoint(runtime)
                rewind = lambda: e2e.rewind(runtime, point)  # noqa: E731
            for _ in range(3):  # warm-up (compiles, tunes)
                issue(model, steps[t], t, cuda, rewind)
            times = [issue(model, steps[t], t, cuda, rewind) * 1e3 for _ in range(args.reps)]
            text = profile(model, steps[t], t, cuda, rewind, args.top)
            rows[name] = dict(host_ms=statistics.median(times), host_ms_all=times, profile=text)
            print(f"## {args.arch} {size}² {name}: host {rows[name]['host_ms']:.2f} ms per step call\n{text}")
            if name != "stock":
                remove(model)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(arch=args.arch, size=size, timed_step=t, rows=rows,
                                                  device=torch.cuda.get_device_name() if cuda else "cpu",
                                                  torch=torch.__version__), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
