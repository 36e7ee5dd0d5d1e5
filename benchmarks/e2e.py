"""End-to-end transformer step time on full-size SD3-medium and FLUX.1-dev architectures (random weights, bf16).

Step mode (default). For each architecture (``benchmarks/configs/``, built by `search_time.build_pipeline`) and
resolution (1024^2 -> 4096 image tokens, 2048^2 -> 16384; SD3: 333 text tokens, CFG batch 2 = [uncond, cond]; FLUX:
512 text tokens, batch 1, guidance embedding) it times ONE transformer forward (a denoising step) on fixed random
inputs, rows:

1. ``stock``: diffusers' own attention processors (SDPA, whatever kernel PyTorch picks) -- the baseline;
2. ``all-full plan``: our runtime with every head full (its overhead; target: within 3% of stock). Both the triton
   and the flex backend hand all-full steps to the same SDPA call, so it is timed once, with the first backend;
3. ``plan 50%`` / ``plan 68%``: plans whose whole-trajectory attention-FLOP cut (`CompressionPlan.flops(...).cut`)
   is within +-1% of the target, for every backend asked for. Paper-like mix (`mixed_plan`, seeded): step 0 all full,
   then per head full / cfg_share (SD3 only) / arrow 1/8, 1/16, 1/32 / cache, compressing more in later steps.

Timing: ``--warmup`` calls, then the median of ``--reps`` calls, each bracketed by CUDA events after a synchronize
(perf_counter on the CPU).

Which step is timed. The runtime advances its step from the timestep of each transformer call (runtime/state.py):
a lower timestep than the last one starts the next step, and `cache` heads read the outputs the previous step kept.
A plan row therefore (a) picks the step ``t`` in the middle half of the trajectory whose own FLOP cut is closest to
the plan's average cut, (b) runs the real trajectory 0 .. t-1 once (a cache head at t-1 needs t-2, and so on back to
the all-full step 0), (c) keeps a copy of the step position and of the head memories after step t-1, and (d) before
every timed call rewinds the state to exactly that point (`rewind`): every timed call is step t after step t-1, with
the caches that step really reads. The all-full row times step T/2 the same way (nothing to remember); the stock
model has no step state.

Attention share of the dense step: during ``--share-reps`` extra stock steps, ``torch.nn.functional.
scaled_dot_product_attention`` (which both stock processors call) is wrapped to record CUDA events around every call;
share = (sum of the SDPA call times) / (time of the same step), median over the steps. The Amdahl limit of a plan row
is ``1 / (1 - share * cut)`` with the FLOP cut of the timed step (which is chosen to equal the plan's average), i.e.
it assumes attention time proportional to FLOPs; "of limit" = achieved speed-up / limit.

Memory: ``cache MiB`` = bytes the head memories hold after the timed step (`StepState.memory_bytes`). GPU only:
``held +MiB`` = memory allocated after the real step t-1 minus before the plan ran (caches and runtime buffers);
``peak +MiB`` = peak allocated during the real step t-1 minus the peak of a stock step. Measured once per plan, with
the first backend (the caches do not depend on the backend; flex's BlockMask cache is not in these numbers).

Generation mode (``--generation``): whole trajectories of NUM_STEPS transformer calls (the fixed inputs of each
step, timesteps falling), ``--warmup`` untimed and ``--reps`` timed ones, median; rows: stock, the all-full plan, and
plans skipping 30% / 50% of the steps whole (`step_taylor`, spread evenly, every head full). Ideal = NUM_STEPS /
steps computed.

Search mode (``--search``): calibration + search wall time and peak memory of the SD3-medium architecture (1024^2,
28 steps, 8 prompts) and FLUX.1-dev (4 prompts), by `search_time.run` (word-hash prompt embeddings stand in for the
text encoders). A separate mode so that each fits one 10-minute GPU command.

    python benchmarks/e2e.py [--arch sd3|flux|both] [--sizes 1024 2048] [--backends triton flex] [--out PATH]
    python benchmarks/e2e.py --search [--arch ...]
    python benchmarks/e2e.py --generation [--arch ...] [--sizes 1024]
    python benchmarks/e2e.py --tiny        (CPU: the tiny test models, "blocked" backend, 1 + 2 calls per row)

Rows stop being started after ``--budget`` seconds (the JSON is rewritten after every row, so partial results stay).
Measured on an H100 (2026-11-26): the default mode takes 274 s, ``--search`` 187 s (estimated before the run: ~7 and
~3 min).
Prints a markdown table last; writes JSON to ``--out`` (default ``docs/benchmarks/e2e-<date>-<card>.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import platform
import re
import statistics
import sys
import time
import types
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "benchmarks")) if p not in sys.path]

import search_time  # noqa: E402

from ditfa_optimum import apply, compile_blocks, get_adapter, remove, reset_state, uniform_plan  # noqa: E402
from ditfa_optimum.methods import make_method  # noqa: E402
from ditfa_optimum.plan import CompressionPlan  # noqa: E402
from ditfa_optimum.runtime.transformer_hook import TRANSFORMER_HOOK  # noqa: E402
from ditfa_optimum.tiny import tiny_inputs, tiny_transformer  # noqa: E402

NUM_STEPS = 28
TARGET_CUTS = (0.50, 0.68)
#: generation mode: shares of the steps skipped whole (`step_taylor`)
GENERATION_CUTS = (0.3, 0.5)
CUT_TOLERANCE = 0.01
#: the compressed heads' mix at full strength, in order of increasing cut (`cfg_share` only where CFG is batched)
MIX = {"cfg_share": 0.10, "arrow:1/8": 0.25, "arrow:1/16": 0.20, "arrow:1/32": 0.15, "cache": 0.30}
#: the mix's strength grows linearly over steps 1 .. T-1 from RAMP[0] to RAMP[1] times the plan's (capped at 1)
RAMP = (0.8, 1.2)
PLAN_SEED = 0
#: per architecture: config name in benchmarks/configs (= search_time's model name), tiny family, batched CFG
ARCHS = {"sd3": ("sd3_medium", "sd3", True), "flux": ("flux_dev", "flux", False)}
TINY = dict(size=128, text_tokens=8, block_size=4)  # tiny models: 256 (SD3) / 64 (FLUX) image tokens
SEARCH_SIZE = 1024


class OutOfBudget(Exception):
    """Raised before a row that would start after the time budget."""


class Clock:
    """CUDA events on the GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3


@dataclasses.dataclass
class Case:
    """One architecture at one resolution: the model, the inputs of every step, and what the rows share."""

    arch: str
    size: int
    model: torch.nn.Module
    steps: list[dict]  # transformer keyword inputs per step (same latents and text, the step's timestep)
    image_tokens: int
    text_tokens: int
    block_size: int
    cfg: bool
    clock: Clock
    args: argparse.Namespace
    compiled: object = None  # torch.compile(model, fullgraph=True) with --compile
    host_ms: float | None = None  # host time of the last timed row's calls (median)
    overlapped_ms: list[float] | None = None  # the last timed row's calls issued back to back (args.overlap)

    @property
    def batch(self) -> int:
        return 2 if self.cfg else 1

    def check_budget(self, what: str) -> None:
        if time.perf_counter() > self.args.deadline:
            raise OutOfBudget(f"time budget ({self.args.budget:.0f} s) spent before {self.arch} {self.size} {what}")


# ---------------------------------------------------------------------------------------------- models and inputs
def build_model(arch: str, tiny: bool) -> tuple[torch.nn.Module, int, int]:
    """(transformer, text tokens, plan block size): the full-size architecture on the GPU, or its tiny version."""
    config, family, _ = ARCHS[arch]
    if tiny:
        return tiny_transformer(family), TINY["text_tokens"], TINY["block_size"]
    pipe, encoder = search_time.build_pipeline(config)
    return pipe.transformer, encoder.text_tokens, 128


def step_inputs(model: torch.nn.Module, size: int, text_tokens: int, batch: int, device) -> tuple[list[dict], int]:
    """Inputs of each of the NUM_STEPS steps at ``size``^2 pixels (timesteps falling linearly), and the image tokens."""
    image_tokens = get_adapter(model).image_tokens(model, size, size)
    side = math.isqrt(image_tokens)
    packed = get_adapter(model).model_class == "FluxTransformer2DModel"  # FLUX inputs are the packed token grid
    latent = side if packed else side * model.config.patch_size
    base = tiny_inputs(model, batch=batch, height=latent, width=latent, text_tokens=text_tokens, timestep=1000.0)
    if getattr(model.config, "guidance_embeds", False):
        base["guidance"] = torch.full((batch,), 3.5)
    base = {k: v.to(device) for k, v in base.items()}
    return [{**base, "timestep": base["timestep"] * (1 - s / NUM_STEPS)} for s in range(NUM_STEPS)], image_tokens


# ---------------------------------------------------------------------------------------------- plans
def mixed_plan(model: torch.nn.Module, target: float, image_tokens: int, text_tokens: int, block_size: int,
               cfg: bool) -> CompressionPlan:
    """A deterministic plan with an attention-FLOP cut within CUT_TOLERANCE of ``target``.

    Step 0 is all full. At step s >= 1 every (module, head) draws a method from fixed uniform numbers (seed PLAN_SEED):
    full with probability ``1 - a_s``, else the MIX (without `cfg_share` when CFG is not batched), with strength
    ``a_s = min(1, a * ramp_s)`` rising over the steps. ``a`` is found by bisection: the cut only grows with it,
    because a higher strength only moves a draw to a method later in MIX order, which cuts more.
    """
    adapter = get_adapter(model)
    specs = adapter.module_specs(model)
    heads = {s.num_heads for s in specs}
    if len(heads) != 1:
        raise ValueError(f"mixed_plan needs one head count over all modules, got {sorted(heads)}")
    names = ["full"] + [m for m in MIX if cfg or m != "cfg_share"]
    methods = [make_method(m) for m in names]
    weights = torch.tensor([MIX[m] for m in names[1:]], dtype=torch.float64)
    weights /= weights.sum()
    # attention FLOPs of one head of each module under each method: [modules, methods]; column 0 (full) is dense
    cost = torch.tensor([[m.flops(s.layout(image_tokens, text_tokens, block_size), s.head_dim, cfg) for m in methods]
                         for s in specs], dtype=torch.float64)
    draws = torch.rand(len(specs), NUM_STEPS, heads.pop(), generator=torch.Generator().manual_seed(PLAN_SEED),
                       dtype=torch.float64)
    ramp = torch.cat([torch.zeros(1, dtype=torch.float64), torch.linspace(*RAMP, NUM_STEPS - 1, dtype=torch.float64)])

    def choose(strength: float) -> torch.Tensor:  # [modules, steps, heads] index into `methods`
        a = (strength * ramp).clamp(max=1.0)
        bounds = torch.cat([(1 - a)[:, None], a[:, None] * weights], dim=1).cumsum(1)  # [steps, methods]
        return (draws[..., None] >= bounds[None, :, None, :]).sum(-1).clamp(max=len(methods) - 1)

    def cut(index: torch.Tensor) -> float:
        planned = cost.gather(1, index.flatten(1)).sum()
        return float(1 - planned / (cost[:, 0].sum() * index[0].numel()))

    lo, hi = 0.0, 1.0 / RAMP[0]  # at hi every step 1 .. T-1 runs the whole mix
    if cut(choose(hi)) < target - CUT_TOLERANCE:
        raise ValueError(f"the method mix cuts at most {cut(choose(hi)):.1%} here; target {target:.0%} is out of reach")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cut(choose(mid)) < target else (lo, mid)
    strength = min((lo, hi), key=lambda a: abs(cut(choose(a)) - target))
    index = choose(strength)
    if abs(cut(index) - target) > CUT_TOLERANCE:  # a single draw moves the cut by more than the tolerance here
        raise ValueError(f"no mix strength cuts {target:.0%} +- {CUT_TOLERANCE:.0%}; closest {cut(index):.1%}")
    ids = torch.tensor([m.method_id for m in methods], dtype=torch.int16)
    params = torch.tensor([m.param for m in methods], dtype=torch.float64)
    return CompressionPlan(specs, {s.name: ids[index[i]] for i, s in enumerate(specs)},
                           {s.name: params[index[i]] for i, s in enumerate(specs)}, block_size=block_size,
                           model_class=adapter.model_class,
                           metadata=dict(source="benchmarks/e2e.py mixed_plan", target_cut=target, strength=strength,
                                         mix=MIX, ramp=RAMP, seed=PLAN_SEED,
                                         method_counts={n: int((index == k).sum()) for k, n in enumerate(names)}))


def int8_full_heads(plan: CompressionPlan) -> CompressionPlan:
    """``plan`` with every `full` head after step 0 computed in 8 bits (`full_int8`)."""
    full, int8 = make_method("full").method_id, make_method("full_int8").method_id
    methods = {}
    for name in plan.module_names:
        ids = plan.methods[name].clone()
        ids[1:][ids[1:] == full] = int8
        methods[name] = ids
    moved = sum(int((m == int8).sum()) for m in methods.values())
    counts = dict(plan.metadata["method_counts"])
    counts.update(full=counts["full"] - moved, full_int8=moved)
    return CompressionPlan(plan.modules, methods, dict(plan.params), block_size=plan.block_size,
                           model_class=plan.model_class, metadata=dict(plan.metadata, method_counts=counts))


def timed_step(per_step_cut: torch.Tensor, plan_cut: float) -> int:
    """The step in the middle half of the trajectory whose own FLOP cut is closest to the plan's average."""
    middle = range(NUM_STEPS // 4, 3 * NUM_STEPS // 4)
    return min(middle, key=lambda s: abs(float(per_step_cut[s]) - plan_cut))


# ---------------------------------------------------------------------------------------------- step position
def checkpoint(runtime) -> dict:
    """The runtime's step position and a copy of its head memories (which the runtime rebinds, never mutates)."""
    state = runtime.state
    return dict(step=state.step, last_position=state.last_position,
                memory={n: {h: dataclasses.replace(m) for h, m in state.memory(n).items()}
                        for n in runtime.plan.module_names})


def rewind(runtime, point: dict) -> None:
    """Put the runtime back at ``point``: the next call with a lower timestep runs the following step."""
    state = runtime.state
    state.set_step(point["step"])
    state.last_position = point["last_position"]
    for name, heads in point["memory"].items():
        memory = state.memory(name)
        memory.clear()
        memory.update({h: dataclasses.replace(m) for h, m in heads.items()})


# ---------------------------------------------------------------------------------------------- measurements
@contextlib.contextmanager
def step_context(case: Case, step: int | None):
    """With ``--compile``, a planned call is told its step the way a pipeline tells it (its scheduler's
    ``step_index``, read by the plan's transformer hook): a compiled graph cannot read the timestep's value, which is
    how the runtime places a call made without a pipeline (runtime/state.py)."""
    registry = getattr(case.model, "_diffusers_hook", None)
    hook = registry.get_hook(TRANSFORMER_HOOK) if registry is not None else None
    if not case.args.compile or step is None or hook is None:
        yield
        return
    hook.scheduler = types.SimpleNamespace(step_index=step)
    try:
        yield
    finally:
        hook.scheduler = None


def time_calls(case: Case, inputs: dict, before=None, step: int | None = None) -> tuple[list[float], torch.Tensor]:
    """Per-call milliseconds of ``--reps`` transformer calls after ``--warmup`` ones, and the last output; with
    ``--compile`` the calls go to the compiled model (``case.compiled``). ``before`` runs before every call, outside
    the timed region. The host's part (Python until the call returns, before waiting for the device) is kept in
    ``case.host_ms``."""
    times, out, host = [], None, []
    model = case.compiled if case.args.compile else case.model
    with torch.no_grad():
        for i in range(case.args.warmup + case.args.reps):
            if before is not None:
                before()
            case.clock.sync()
            start = case.clock.mark()
            issued = time.perf_counter()
            with step_context(case, step):
                out = model(**inputs).sample
            issued = time.perf_counter() - issued
            end = case.clock.mark()
            if i >= case.args.warmup:
                times.append(case.clock.ms(start, end))
                host.append(issued * 1e3)
    case.host_ms = statistics.median(host)
    if getattr(case.args, "overlap", False):
        case.overlapped_ms = overlapped_calls(case, model, inputs, before, step)
    return times, out


def overlapped_median(case: Case) -> float | None:
    """The median of the last timed row's back-to-back calls (``--overlap``), else None."""
    return statistics.median(case.overlapped_ms) if getattr(case.args, "overlap", False) else None


def overlapped_calls(case: Case, model, inputs: dict, before, step: int | None) -> list[float]:
    """Per-call milliseconds of ``--reps`` calls issued back to back, as a pipeline issues its steps: one
    synchronisation before the first, none between calls, so the host prepares call n+1 (hooks, Dynamo's guards,
    launches) while the device still runs call n. An event between consecutive calls times each: a call's device
    time plus any time the device waited for the host. `time_calls` synchronises before every call, which also
    counts the host's lead-in before the first kernel of each call (guards, hooks) as step time."""
    case.clock.sync()
    marks = []
    with torch.no_grad():
        for _ in range(case.args.reps):
            if before is not None:
                before()
            marks.append(case.clock.mark())
            with step_context(case, step):
                model(**inputs)
        marks.append(case.clock.mark())
    return [case.clock.ms(a, b) for a, b in zip(marks, marks[1:])]


def run_steps(case: Case, stop: int) -> None:
    """The real trajectory's first ``stop`` steps through ``case.model`` (a plan applied to it follows them)."""
    with torch.no_grad():
        for s in range(stop):
            with step_context(case, s):
                case.model(**case.steps[s])


def peak_of(case: Case, inputs: dict) -> int | None:
    """Run one transformer call; the peak allocated GPU bytes during it (None on the CPU)."""
    if case.clock.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        case.model(**inputs)
    if not case.clock.cuda:
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def allocated(case: Case) -> int | None:
    return torch.cuda.memory_allocated() if case.clock.cuda else None


@contextlib.contextmanager
def timed_sdpa(clock: Clock, marks: list):
    """Wrap ``F.scaled_dot_product_attention`` (what the stock processors call) to record (start, end) per call."""
    original = F.scaled_dot_product_attention

    def timed(*args, **kwargs):
        start = clock.mark()
        out = original(*args, **kwargs)
        marks.append((start, clock.mark()))
        return out

    F.scaled_dot_product_attention = timed
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def attention_share(case: Case, inputs: dict) -> dict:
    """Share of the stock step's time spent in its SDPA calls (median over ``--share-reps`` steps)."""
    shares, attention, calls = [], [], 0
    with torch.no_grad():
        for _ in range(case.args.share_reps):
            marks = []
            case.clock.sync()
            with timed_sdpa(case.clock, marks):
                start = case.clock.mark()
                case.model(**inputs)
                end = case.clock.mark()
            step = case.clock.ms(start, end)
            attention.append(sum(case.clock.ms(a, b) for a, b in marks))
            shares.append(attention[-1] / step)
            calls = len(marks)
    modules = len(get_adapter(case.model).module_specs(case.model))
    if calls != modules:
        raise RuntimeError(f"the stock step made {calls} SDPA calls for {modules} attention modules: the share "
                           "measurement does not see this diffusers' attention")
    return dict(attention_share=statistics.median(shares), attention_ms=statistics.median(attention),
                attention_calls=calls)


def mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


# ---------------------------------------------------------------------------------------------- rows
def run_case(case: Case, emit) -> None:
    """All rows of one architecture and resolution; ``emit(row)`` records each as soon as it is measured."""
    mid = NUM_STEPS // 2
    common = dict(arch=case.arch, size=case.size, image_tokens=case.image_tokens, text_tokens=case.text_tokens,
                  batch=case.batch, cfg=case.cfg)

    def recompile():  # every compiled row compiles its graphs from scratch
        if case.args.compile:
            torch._dynamo.reset()
            if case.args.compile == "blocks":
                compile_blocks(case.model, fullgraph=True)
                case.compiled = case.model  # its blocks compiled, the transformer's own code (the hook) eager
            else:
                case.compiled = torch.compile(case.model, fullgraph=True)

    case.check_budget("stock")
    for _, block in get_adapter(case.model).blocks(case.model):
        block._compiled_call_impl = None  # blocks compiled by an earlier case run eagerly again (nn.Module.compile)
    with torch.no_grad():  # a warm-up call first: a cold first call (cuDNN set-up) inflates the attention share
        case.model(**case.steps[mid])
    share = attention_share(case, case.steps[mid])  # instrumented eager stock calls
    recompile()
    times, stock_out = time_calls(case, case.steps[mid], step=mid)
    stock_host = case.host_ms
    stock_over = overlapped_median(case)
    stock_ms, stock_peak = statistics.median(times), peak_of(case, case.steps[mid])
    zero = 0.0 if case.clock.cuda else None  # memory deltas of the baseline against itself
    emit(dict(common, row="stock", backend=None, timed_step=mid, plan_cut=0.0, step_cut=0.0, ms=stock_ms,
              ms_all=times, speedup=1.0, amdahl_limit=1.0, of_limit=1.0, cache_mib=0.0, held_delta_mib=zero,
              peak_delta_mib=zero, output_finite=bool(stock_out.isfinite().all()), compiled=case.args.compile,
              host_ms=stock_host, ms_overlapped=stock_over, speedup_overlapped=None if stock_over is None else 1.0,
              **share))

    def row(name, backend, plan_cut, step, step_cut, times, out, **extra):  # out: the last timed output
        ms, over = statistics.median(times), overlapped_median(case)
        limit = 1 / (1 - share["attention_share"] * step_cut)
        emit(dict(common, row=name, backend=backend, timed_step=step, plan_cut=plan_cut, step_cut=step_cut, ms=ms,
                  ms_all=times, speedup=stock_ms / ms, attention_share=share["attention_share"], amdahl_limit=limit,
                  of_limit=stock_ms / ms / limit, output_finite=bool(out.isfinite().all()), compiled=case.args.compile,
                  host_ms=case.host_ms, extra_host_us_per_attention_call=(case.host_ms - stock_host) * 1e3 / modules,
                  ms_overlapped=over, speedup_overlapped=None if over is None else stock_over / over, **extra))

    modules = share["attention_calls"]
    backend = case.args.backends[0]

    case.check_budget("all-full plan")
    held_before = allocated(case)
    runtime = apply(case.model, uniform_plan(case.model, NUM_STEPS, block_size=case.block_size), backend=backend,
                    cfg=case.cfg)
    before = float(mid - 1) if case.args.compile else -float(case.steps[mid - 1]["timestep"][0])
    position = dict(step=mid - 1, last_position=before, memory={})
    recompile()
    times, out = time_calls(case, case.steps[mid], before=lambda: rewind(runtime, position), step=mid)
    ran = runtime.state.step
    rewind(runtime, position)
    with step_context(case, mid):
        peak = peak_of(case, case.steps[mid])
    held = allocated(case)  # less the extra output held here
    held = None if held is None else held - held_before - out.numel() * out.element_size()
    row("all-full plan", backend, 0.0, mid, 0.0, times, out, runtime_step=ran,
        cache_mib=mib(runtime.state.memory_bytes()),
        held_delta_mib=mib(held), peak_delta_mib=mib(None if peak is None else peak - stock_peak),
        max_abs_diff_vs_stock=float((out.float() - stock_out.float()).abs().max()),
        overhead_vs_stock=statistics.median(times) / stock_ms - 1)
    remove(case.model)

    variants = [(f"plan {target:.0%}", target, False) for target in TARGET_CUTS]
    if case.args.int8:  # the same plans with their full heads (after step 0) in 8 bits
        variants += [(f"plan {target:.0%} + int8 full heads", target, True) for target in TARGET_CUTS]
    for name, target, int8 in variants:
        case.check_budget(name)
        plan = mixed_plan(case.model, target, case.image_tokens, case.text_tokens, case.block_size, case.cfg)
        if int8:
            plan = int8_full_heads(plan)
        report = plan.flops(case.image_tokens, case.text_tokens, cfg=case.cfg)
        per_step = report.cut_per_step()
        t = timed_step(per_step, report.cut)
        if case.args.compile == "blocks":  # the trajectory through the compiled blocks: their memory is the tables'
            for b in case.args.backends:
                case.check_budget(f"{name} ({b})")
                runtime = apply(case.model, plan, backend=b, cfg=case.cfg)
                recompile()
                held_before = allocated(case)
                run_steps(case, t)
                memory = dict(held_delta_mib=mib(None if held_before is None else allocated(case) - held_before),
                              peak_delta_mib=None, memory_backend=b)
                point = checkpoint(runtime)
                times, out = time_calls(case, case.steps[t], before=lambda: rewind(runtime, point), step=t)
                row(name, b, report.cut, t, float(per_step[t]), times, out, target_cut=target,
                    runtime_step=runtime.state.step, cache_mib=mib(runtime.state.memory_bytes()),
                    method_counts=plan.metadata["method_counts"], strength=plan.metadata["strength"], **memory)
                remove(case.model)
            continue
        # the real trajectory up to step t-1, once, with the first backend; memory measured on its last step
        runtime = apply(case.model, plan, backend=backend, cfg=case.cfg)
        held_before = allocated(case)
        run_steps(case, t - 1)
        with step_context(case, t - 1):
            peak = peak_of(case, case.steps[t - 1])
        memory = dict(held_delta_mib=mib(None if held_before is None else allocated(case) - held_before),
                      peak_delta_mib=mib(None if peak is None else peak - stock_peak), memory_backend=backend)
        point = checkpoint(runtime)
        remove(case.model)
        for b in case.args.backends:
            case.check_budget(f"{name} ({b})")
            runtime = apply(case.model, plan, backend=b, cfg=case.cfg)
            recompile()
            times, out = time_calls(case, case.steps[t], before=lambda: rewind(runtime, point), step=t)
            row(name, b, report.cut, t, float(per_step[t]), times, out, target_cut=target,
                runtime_step=runtime.state.step, cache_mib=mib(runtime.state.memory_bytes()),
                method_counts=plan.metadata["method_counts"], strength=plan.metadata["strength"], **memory)
            remove(case.model)


def each_case(args, device, run, emit) -> None:
    """``run(case, emit)`` for every architecture and resolution asked for, one model build per architecture."""
    for arch in args.archs:
        _, _, cfg = ARCHS[arch]
        model, text_tokens, block_size = build_model(arch, args.tiny)
        try:
            for size in args.sizes:
                steps, image_tokens = step_inputs(model, size, text_tokens, 2 if cfg else 1, device)
                run(Case(arch, size, model, steps, image_tokens, text_tokens, block_size, cfg, Clock(device), args),
                    emit)
        finally:
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def step_mode(args, device, emit) -> None:
    torch._dynamo.config.cache_size_limit = 64  # flex compiles once per shape: never fall back to eager silently
    each_case(args, device, run_case, emit)


def spread_skips(num_steps: int, cut: float) -> list[int]:
    """``round(cut * num_steps)`` steps to skip, spread evenly over steps 2 .. num_steps - 2 (runs of at most two; the
    first two steps and the last one run, as in the searched plans)."""
    k = round(cut * num_steps)
    span = num_steps - 3
    if not 0 <= k <= span:
        raise ValueError(f"cannot skip {k} of {num_steps} steps with steps 0, 1 and {num_steps - 1} computed")
    return sorted({2 + round(i * span / k) for i in range(k)}) if k else []


def time_generation(case: Case, before=None) -> tuple[list[float], torch.Tensor]:
    """Median-ready times (ms) of whole trajectories of NUM_STEPS transformer calls, and the last call's output."""
    times, out = [], None
    for i in range(case.args.warmup + case.args.reps):
        if before is not None:
            before()
        case.clock.sync()
        start = case.clock.mark()
        with torch.no_grad():
            for inputs in case.steps:
                out = case.model(**inputs)
        end = case.clock.mark()
        if i >= case.args.warmup:
            times.append(case.clock.ms(start, end))
    return times, (out[0] if isinstance(out, tuple) else out.sample)


def run_generation_case(case: Case, emit) -> None:
    """Whole trajectories: stock, the all-full plan, and plans that skip whole steps (`step_taylor`, every head full).
    The inputs of every step are fixed (not a denoising loop), so a computed last step equals stock's exactly."""
    common = dict(arch=case.arch, size=case.size, image_tokens=case.image_tokens, text_tokens=case.text_tokens,
                  batch=case.batch, cfg=case.cfg, steps=NUM_STEPS)
    case.check_budget("stock generation")
    times, stock_out = time_generation(case)
    stock_ms = statistics.median(times)
    emit(dict(common, row="stock", backend=None, skipped_steps=[], whole_cut=0.0, ms=stock_ms, ms_all=times,
              speedup=1.0, ideal=1.0, of_ideal=1.0, max_abs_diff_vs_stock=0.0))
    backend = case.args.backends[0]
    for cut in (0.0, *GENERATION_CUTS):
        name = "all-full plan" if cut == 0 else f"skip {cut:.0%} of steps"
        case.check_budget(name)
        plan = uniform_plan(case.model, NUM_STEPS, block_size=case.block_size)
        skipped = spread_skips(NUM_STEPS, cut)
        plan.set_skipped_steps(skipped)
        apply(case.model, plan, backend=backend, cfg=case.cfg)
        try:
            times, out = time_generation(case, before=lambda: reset_state(case.model))
        finally:
            remove(case.model)
        ms = statistics.median(times)
        ideal = NUM_STEPS / (NUM_STEPS - len(skipped))
        emit(dict(common, row=name, backend=backend, skipped_steps=skipped, whole_cut=len(skipped) / NUM_STEPS,
                  ms=ms, ms_all=times, speedup=stock_ms / ms, ideal=ideal, of_ideal=stock_ms / ms / ideal,
                  max_abs_diff_vs_stock=float((out.float() - stock_out.float()).abs().max())))


def generation_mode(args, device, emit) -> None:
    each_case(args, device, run_generation_case, emit)


def search_mode(args, emit) -> None:
    """Calibration + search time of each architecture at SEARCH_SIZE, NUM_STEPS steps (`search_time.run`)."""
    for arch in args.archs:
        config = ARCHS[arch][0]
        if time.perf_counter() > args.deadline:
            raise OutOfBudget(f"time budget ({args.budget:.0f} s) spent before the {arch} search")
        emit(dict(search_time.run(config, search_time.DEFAULT_PROMPTS[config], NUM_STEPS, SEARCH_SIZE,
                                  threshold=0.1, cost_model="flops", backend=None), arch=arch))


# ---------------------------------------------------------------------------------------------- output
def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(cells) + " |" for cells in rows])


def step_table(rows: list[dict]) -> str:
    return markdown(["arch", "size", "row", "backend", "FLOP cut (plan / step)", "ms / step", "speed-up",
                     "attention share", "Amdahl limit", "of limit", "host ms", "back to back ms", "speed-up",
                     "cache MiB", "held +MiB", "peak +MiB"],
                    [[r["arch"], f"{r['size']}²", r["row"] + (f" (compiled{', blocks' if r.get('compiled') == 'blocks' else ''})" if r.get("compiled") else ""),
                      r["backend"] or "stock",
                      f"{r['plan_cut']:.1%} / {r['step_cut']:.1%}", f"{r['ms']:.2f}", f"{r['speedup']:.2f}×",
                      f"{r['attention_share']:.1%}", f"{r['amdahl_limit']:.2f}×", f"{r['of_limit']:.2f}",
                      fmt(r.get("host_ms"), ".1f"), fmt(r.get("ms_overlapped"), ".2f"),
                      fmt(r.get("speedup_overlapped"), ".2f"), fmt(r["cache_mib"], ".1f"), fmt(r["held_delta_mib"], ".1f"), fmt(r["peak_delta_mib"], ".1f")]
                     for r in rows])


def generation_table(rows: list[dict]) -> str:
    return markdown(["arch", "size", "row", "steps skipped", "ms / generation", "speed-up", "ideal (steps)",
                     "of ideal", "max abs diff of the last output vs stock"],
                    [[r["arch"], f"{r['size']}²", r["row"], f"{len(r['skipped_steps'])} / {r['steps']}",
                      f"{r['ms']:.1f}", f"{r['speedup']:.2f}×", f"{r['ideal']:.2f}×", f"{r['of_ideal']:.2f}",
                      f"{r['max_abs_diff_vs_stock']:.2g}"] for r in rows])


def search_table(rows: list[dict]) -> str:
    return markdown(["arch", "prompts (batch)", "size", "steps", "dense generation s", "calibration s", "search s",
                     "optimize total s", "peak GiB (model)", "FLOP cut"],
                    [[r["arch"], f"{r['prompts']} ({r['transformer_batch']})", f"{r['size']}²", str(r["steps"]),
                      f"{r['dense_generation_seconds']:.1f}", f"{r['calibration_seconds']:.1f}",
                      f"{r['search_seconds']:.1f}", f"{r['optimize_wall_seconds']:.1f}",
                      f"{r['peak_memory_gib']:.1f} ({r['model_memory_gib']:.1f})", f"{r['flop_cut']:.1%}"]
                     for r in rows])


def card_slug(device_name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"`` (the file-name convention of docs/benchmarks/)."""
    model = re.search(r"\b([A-Z]+\d{2,4})\b", device_name)
    return model.group(1).lower() if model else re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def versions() -> dict:
    import diffusers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(torch=torch.__version__, triton=triton_version, diffusers=diffusers.__version__,
                python=platform.python_version())


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["sd3", "flux", "both"], default="both")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"step mode: pixels per side (default 1024 2048; "
                        f"--tiny {TINY['size']}); --search runs at {SEARCH_SIZE}")
    parser.add_argument("--backends", nargs="+", help="step mode: runtime backends of the plan rows (default triton "
                        "flex; --tiny blocked)")
    parser.add_argument("--search", action="store_true", help="calibration + search time instead of step time")
    parser.add_argument("--generation", action="store_true", help="whole trajectories (NUM_STEPS calls) of plans "
                        "that skip whole steps, against stock (default sizes 1024)")
    parser.add_argument("--compile", nargs="?", const="whole", choices=["whole", "blocks"],
                        help="step mode: time compiled rows, stock and planned, each compiled from scratch with "
                        "fullgraph=True: 'whole' (default) torch.compile of the transformer, 'blocks' each block "
                        "compiled (ditfa_optimum.compile_blocks, regional compilation)")
    parser.add_argument("--overlap", action="store_true", help="step mode: also time each row's calls back to back, "
                        "as a pipeline issues its steps (overlapped_calls; the host's lead-in before a call's first "
                        "kernel hides behind the previous call)")
    parser.add_argument("--int8", action="store_true", help="step mode: also each plan with its full heads after "
                        "step 0 computed in 8 bits (full_int8)")
    parser.add_argument("--tiny", action="store_true", help="CPU run of the whole script on the tiny models")
    parser.add_argument("--warmup", type=int, help="untimed calls per row (default 3; --tiny 1)")
    parser.add_argument("--reps", type=int, help="timed calls per row, median reported (default 10; --tiny 2)")
    parser.add_argument("--share-reps", type=int, default=3, help="instrumented stock steps for the attention share")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="start no row after this many seconds (a FLUX 2K row with its compile takes ~1 min)")
    parser.add_argument("--out", help="JSON path (default docs/benchmarks/e2e[-search|-tiny]-<date>-<card>.json)")
    args = parser.parse_args(argv)
    if args.search and args.generation:
        parser.error("--search and --generation are separate modes; run one per call")
    if args.tiny and args.search:
        parser.error("--search times the full-size architectures and needs a GPU; it has no --tiny version")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("the full-size runs need a CUDA GPU; use --tiny on the CPU")
    args.archs = ["sd3", "flux"] if args.arch == "both" else [args.arch]
    args.sizes = args.sizes or ([TINY["size"]] if args.tiny else [1024] if args.generation else [1024, 2048])
    args.backends = args.backends or (["blocked"] if args.tiny else ["triton", "flex"])
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.reps = args.reps or (2 if args.tiny else 10)
    args.deadline = time.perf_counter() + args.budget
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    torch.manual_seed(0)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    mode = "-".join(m for m, on in (("search", args.search), ("generation", args.generation),
                                    ("compiled", args.compile == "whole"),
                                    ("compiled-blocks", args.compile == "blocks"), ("tiny", args.tiny)) if on) or None
    today = str(date.today())
    name = f"e2e{'-' + mode if mode else ''}-{today}-{card_slug(card)}.json"
    out = Path(args.out or ROOT / "docs" / "benchmarks" / name)
    payload = dict(meta=dict(date=today, device=card, command=" ".join(["python benchmarks/e2e.py", *argv]),
                             **versions()),
                   settings=dict(steps=NUM_STEPS, warmup=args.warmup, reps=args.reps, share_reps=args.share_reps,
                                 target_cuts=TARGET_CUTS, cut_tolerance=CUT_TOLERANCE, mix=MIX, ramp=RAMP,
                                 plan_seed=PLAN_SEED, backends=args.backends, sizes=args.sizes, archs=args.archs),
                   rows=[])
    started = time.perf_counter()

    def emit(row: dict) -> None:
        payload["rows"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")
        what = (f"{row['row']} {row['backend'] or ''}: {row['ms']:.2f} ms, {row['speedup']:.2f}x"
                if "ms" in row else f"optimize {row['optimize_wall_seconds']:.1f} s")
        print(f"[{time.perf_counter() - started:6.1f} s] {row['arch']} {row['size']} {what}", flush=True)

    threads = torch.get_num_threads()
    if args.tiny:  # tiny tensors: a second thread only adds start-up and, on a busy machine, contention (100x)
        torch.set_num_threads(1)
    try:
        if args.search:
            search_mode(args, emit)
        elif args.generation:
            generation_mode(args, device, emit)
        else:
            step_mode(args, device, emit)
    except OutOfBudget as stop:
        payload["incomplete"] = str(stop)
        print(f"stopped: {stop}", flush=True)
    finally:
        torch.set_num_threads(threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\n{card}, torch {payload['meta']['torch']}, triton {payload['meta']['triton']}, {today}: "
          f"`{payload['meta']['command']}` -> {out}")
    table = search_table if args.search else generation_table if args.generation else step_table
    print(table(payload["rows"]))
    return 0 if "incomplete" not in payload else 1


if __name__ == "__main__":
    sys.exit(main())
