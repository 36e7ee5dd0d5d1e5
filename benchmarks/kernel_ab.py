"""A/B of kernel variants in one run: the shipped kernel against a baseline copy of it, same inputs, interleaved.

Run-to-run noise on the 2K cases is about +-4%, and even `do_bench` medians of variants alternated in one process
disagreed by 3% between two runs (2026-11-26), so a change worth 1-3% is judged here launch by launch: the variants
are launched in turn (order rotated every launch), each launch timed with CUDA events, and the median of the paired
ratios (launch i of a variant over launch i of the baseline, run back to back) is reported with each variant's
median and interquartile range. Every variant runs one fixed configuration per head dim (the autotuner's choice on
an H100: 128x128, 8 warps, 3 stages for D=128; 128x64, 4 warps, 3 stages for D=64), so autotuning noise cannot pick
different tiles, and every variant's output must equal the baseline's bit for bit on the computed heads (the
variants change scheduling, not arithmetic).

Variants: ``base`` (``--baseline FILE``: a copy of ``kernels/headwise_attention.py`` from an earlier commit, e.g.
``git show e76f635:kernels/headwise_attention.py > /tmp/base_hw.py``), ``pointer q`` (this checkout, queries loaded
with pointer loads: ``Q_TMA`` off), ``shipped`` (this checkout), and any ``--variant NAME=FILE`` (another edited copy).

    python benchmarks/kernel_ab.py --baseline FILE [--variant NAME=FILE ...] [--launches 300] [--out DIR]
    python benchmarks/kernel_ab.py --baseline FILE --profile VARIANT   # FLUX 2K all 1/16, three launches (ncu)
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends import case_inputs, head_methods, kept_fraction, save_results, widths_for  # noqa: E402

from ditfa_optimum.kernels import headwise_attention as hw  # noqa: E402

AB_CASES = [("FLUX 2K", "all 1/16"), ("FLUX 2K", "all 1/8"), ("FLUX 2K", "mixed"), ("FLUX 2K", "all full"),
            ("SD3 2K", "all 1/16"), ("SD3 2K", "all 1/8"), ("SD3 2K", "mixed")]
#: (BLOCK_M, BLOCK_N, warps, stages) per head dim: the autotuner's H100 choice (docs/benchmarks.md)
FIXED = {128: (128, 128, 8, 3), 64: (128, 64, 4, 3)}


def load_module(path: str, name: str):
    """Another copy of the kernel module (an earlier commit's, or an edited one), imported under its own name."""
    spec = importlib.util.spec_from_file_location(f"kernel_ab_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_call(module, q, k, v, widths, layout, store_lse: bool = True, **attrs):
    """A zero-argument launch of ``module``'s kernel on one case (launch order / table built once, like the runtime)."""
    import triton

    bm, bn, w, s = FIXED[q.shape[-1]]
    config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    dev_widths = widths.to(q.device, torch.int32)
    kwargs = dict(key=module.tune_key(widths), config=config, store_lse=store_lse)
    if "table" in inspect.signature(module.headwise_attention).parameters:
        kwargs["table"] = module.launch_table(widths).to(q.device)
    else:
        kwargs["order"] = module.launch_order(widths).to(q.device)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device=q.device)

    def call():
        for name, value in attrs.items():  # module switches read at launch (e.g. Q_TMA)
            setattr(module, name, value)
        return module.headwise_attention(q, k, v, dev_widths, layout.num_image_tokens, layout.num_text_tokens,
                                         layout.image_first, layout.block_size, out=out, lse=lse, **kwargs)

    return call


def variants(baseline, extra: dict, q, k, v, widths, layout) -> dict:
    calls = {"base": make_call(baseline, q, k, v, widths, layout),
             "pointer q": make_call(hw, q, k, v, widths, layout, Q_TMA=False),
             "shipped": make_call(hw, q, k, v, widths, layout, Q_TMA=True)}
    for name, module in extra.items():
        calls[name] = make_call(module, q, k, v, widths, layout)
    return calls


def interleaved(calls: dict, launches: int) -> dict:
    """Per-launch times in ms (CUDA events), the variants launched in turn, their order rotated every launch."""
    names = list(calls)
    for call in calls.values():
        call()
    events = {n: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(launches)] for n in names}
    for i in range(launches):
        for n in names[i % len(names):] + names[:i % len(names)]:
            start, end = events[n][i]
            start.record()
            calls[n]()
            end.record()
    torch.cuda.synchronize()
    return {n: [start.elapsed_time(end) for start, end in events[n]] for n in names}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--variant", action="append", default=[], help="NAME=FILE: another copy of the kernel module")
    parser.add_argument("--launches", type=int, default=300, help="timed launches per variant and case")
    parser.add_argument("--profile", default=None, help="launch this variant three times on FLUX 2K all 1/16, exit")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda")
    baseline = load_module(args.baseline, "base")
    extra = {}
    for spec in args.variant:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            parser.error(f"--variant takes NAME=FILE, got {spec!r}")
        extra[name] = load_module(path, name.replace(" ", "_"))
    rows = []
    for case, plan in AB_CASES[:1] if args.profile else AB_CASES:
        layout, q, k, v, dense_ms = case_inputs(case, device)
        widths = widths_for(head_methods(plan), layout)
        calls = variants(baseline, extra, q, k, v, widths, layout)
        if args.profile:
            for _ in range(3):
                calls[args.profile]()
            torch.cuda.synchronize()
            return
        ideal = dense_ms * kept_fraction(widths, layout)
        computed = (widths > 0).to(device)  # skipped heads are never written
        ref = calls["base"]()[0][computed].clone()
        for name, call in calls.items():
            out = call()[0][computed]
            if not torch.equal(out, ref):
                raise SystemExit(f"{case} {plan}: variant {name} differs from the baseline "
                                 f"(max abs diff {(out.float() - ref.float()).abs().max():.3g})")
        times = interleaved(calls, args.launches)
        med = {name: statistics.median(t) for name, t in times.items()}
        # paired: launch i of a variant against launch i of the baseline, run back to back (drift cancels)
        paired = {n: statistics.median(a / b for a, b in zip(times[n], times["base"])) for n in times}
        quart = {n: statistics.quantiles(t, n=4) for n, t in times.items()}
        row = dict(case=case, plan=plan, cudnn_dense_ms=dense_ms, ideal_ms=ideal, launches=args.launches,
                   median_ms=med, quartiles_ms=quart, paired_vs_base=paired, vs_ideal={n: med[n] / ideal for n in med})
        rows.append(row)
        print(f"{case} {plan}: ideal {ideal:.3f} ms | " + " | ".join(
            f"{n} {med[n]:.3f} ({med[n] / ideal:.3f}x ideal, paired {paired[n]:.3f} of base, IQR "
            f"{(quart[n][2] - quart[n][0]) / med[n] * 100:.1f}%)" for n in med), flush=True)
    command = " ".join(["python benchmarks/kernel_ab.py", "--baseline", args.baseline]
                       + [f"--variant {spec}" for spec in args.variant] + ["--launches", str(args.launches)])
    save_results(args.out, "kernel-ab", command, fixed_configs={str(d): c for d, c in FIXED.items()}, rows=rows)


if __name__ == "__main__":
    main()
