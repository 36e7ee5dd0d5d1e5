"""Runtime backends on the GPU: correctness in bf16 and time per attention call against cuDNN dense attention.

One run (a few minutes on an H100) checks and times, for SD3 and FLUX attention shapes at 2048^2 and 1024^2 (B=1,
24 heads, bf16):

* plans: all arrow 1/8, all arrow 1/16, mixed (heads cycle full / arrow 1/8 / arrow 1/16 / cached), all full;
* cuDNN SDPA dense (the stock baseline), our `flex` backend (compiled FlexAttention, per-head BlockMask built from
  `ditfa_optimum.masks`), our `reference` backend (masked SDPA), and the whole `ModuleRuntime` call (flex) to show
  the runtime's own overhead;
* "ideal" = cuDNN dense time x fraction of (query, key) pairs the plan keeps;
* the time to build one BlockMask (a plan needs one per module and step).

Correctness (flash-attn's rule): each backend's bf16 error against an fp32 reference must be at most 2x the error of
PyTorch's own bf16 SDPA on the same inputs (checked on mid-size shapes, all plans). Outputs are poisoned (NaN) first.

Usage (GPU machine, from the repository root):
    python benchmarks/backends.py [--quick] [--out DIR]
Prints a markdown table last; writes JSON to DIR (default $OUT or ./bench-out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditfa_optimum.masks import TokenLayout, arrow_kept_pairs  # noqa: E402
from ditfa_optimum.methods import make_method  # noqa: E402
from ditfa_optimum.plan import CompressionPlan, ModuleSpec  # noqa: E402
from ditfa_optimum.runtime import PlanRuntime, get_backend  # noqa: E402

CASES = {  # name: (image tokens, text tokens, image_first, head_dim)
    "SD3 2K": (16384, 333, True, 64),
    "FLUX 2K": (16384, 512, False, 128),
    "SD3 1K": (4096, 333, True, 64),
    "FLUX 1K": (4096, 512, False, 128),
}
PLANS = {
    "all 1/8": ["arrow:1/8"],
    "all 1/16": ["arrow:1/16"],
    "mixed": ["full", "arrow:1/8", "arrow:1/16", "cache"],
    "all full": ["full"],
}
HEADS = 24


def head_methods(plan_name: str) -> list[str]:
    cycle = PLANS[plan_name]
    return [cycle[h % len(cycle)] for h in range(HEADS)]


def widths_for(methods: list[str], layout: TokenLayout) -> torch.Tensor:
    """``[1, H]`` band widths of one sample, as the runtime derives them from the methods."""
    return torch.tensor([[make_method(m).kernel_widths(layout, 1, cfg=False)[0] for m in methods]], dtype=torch.int64)


def kept_fraction(widths: torch.Tensor, layout: TokenLayout) -> float:
    pairs = sum(arrow_kept_pairs(layout, int(w)) for w in widths.flatten() if w > 0)
    return pairs / (widths.numel() * layout.seq_len ** 2)


def bench(fn, reps_ms=400):
    from triton.testing import do_bench

    return do_bench(fn, warmup=100, rep=reps_ms, return_mode="median")


def case_inputs(case: str, device):
    """One timing case of `CASES`: its layout (128-token blocks), random bf16 q, k, v (B=1, `HEADS` heads) and
    cuDNN SDPA's dense time on them in ms (the stock baseline every ratio is taken against)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n_img, n_txt, image_first, D = CASES[case]
    layout = TokenLayout(n_img, n_txt, image_first=image_first, block_size=128)
    q, k, v = (torch.randn(1, HEADS, layout.seq_len, D, device=device, dtype=torch.bfloat16) for _ in range(3))

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    return layout, q, k, v, bench(cudnn)


def rel_err(out, ref, keep):
    out, ref = out[keep].float(), ref[keep].float()
    return float((out - ref).norm() / ref.norm())


def check_correctness(results: list, device, image_tokens: int = 2000, block_size: int = 128):
    """bf16 backends vs an fp32 reference; ratio to PyTorch's own bf16 SDPA error."""
    for order in (True, False):
        layout = TokenLayout(image_tokens, 77, image_first=order, block_size=block_size)
        for plan_name in PLANS:
            widths = widths_for(head_methods(plan_name), layout)
            B, H = 2, HEADS
            widths = widths.expand(B, H).contiguous()
            q, k, v = (torch.randn(B, H, layout.seq_len, 64, device=device) for _ in range(3))
            ref = get_backend("reference", device).attend(q, k, v, layout, widths.to(device))  # fp32
            qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
            computed = (widths > 0).to(device)
            # PyTorch's own bf16 error: bf16 SDPA with the same masks (the reference backend in bf16)
            torch_bf16 = get_backend("reference", device).attend(qb, kb, vb, layout, widths.to(device))
            base = rel_err(torch_bf16, ref, computed)
            for backend in ("flex", "reference"):
                out = torch.full_like(qb, float("nan"))
                out.copy_(get_backend(backend, device).attend(qb, kb, vb, layout, widths.to(device)))
                written = bool(torch.isfinite(out[computed]).all())
                err = rel_err(out, ref, computed)
                results.append(dict(check="bf16 vs fp32", order="image-first" if order else "text-first",
                                    plan=plan_name, backend=backend, rel_err=err, torch_bf16_rel_err=base,
                                    ratio=err / base, all_written=written, ok=written and err <= 2 * base + 1e-6))


def time_cases(results: list, device, quick: bool):
    cases = ["SD3 2K", "FLUX 2K"] if quick else list(CASES)
    for case in cases:
        n_img, n_txt, image_first, D = CASES[case]
        layout, q, k, v, dense_ms = case_inputs(case, device)
        flex = get_backend("flex", device)
        for plan_name in PLANS:
            methods = head_methods(plan_name)
            widths = widths_for(methods, layout)  # host table, as the runtime passes it
            kept = kept_fraction(widths, layout)
            flex.block_mask(layout, widths, device)  # first build of this shape
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for shift in range(1, 4):  # new width tables of the same shape
                flex.block_mask(layout, widths.roll(shift, dims=1), device)
            torch.cuda.synchronize()
            mask_ms = (time.perf_counter() - t0) * 1e3 / 3
            flex_ms = bench(lambda: flex.attend(q, k, v, layout, widths))
            # masked SDPA has no sparse kernel: timed at 1K only, to show it is a correctness path
            ref_ms = bench(lambda: get_backend("reference", device).attend(q, k, v, layout, widths), reps_ms=200) \
                if "1K" in case else float("nan")
            # the whole runtime call, repeating step 1 of a 3-step plan (step 0 full, so cached heads have an output)
            spec = ModuleSpec("m", HEADS, D, image_first=image_first)
            plan = CompressionPlan.from_methods([spec], {"m": [["full"] * HEADS, methods, methods]}, block_size=128)
            rt = PlanRuntime(plan, backend="flex", cfg=False)
            mod = rt.module(spec)
            rt.state.on_transformer_call(1.0, n_txt)
            mod(q, k, v, n_txt)
            rt.state.on_transformer_call(0.5, n_txt)

            def runtime_call():
                rt.state.step = 1
                return mod(q, k, v, n_txt)

            runtime_ms = bench(runtime_call)
            from torch._dynamo.utils import counters

            results.append(dict(case=case, plan=plan_name, kept=kept, cudnn_dense_ms=dense_ms, ideal_ms=dense_ms * kept,
                                flex_ms=flex_ms, runtime_flex_ms=runtime_ms, reference_ms=ref_ms,
                                block_mask_build_ms=mask_ms, dynamo_unique_graphs=counters["stats"]["unique_graphs"]))
            print(f"{case:8s} {plan_name:9s} kept {kept:.3f} cudnn {dense_ms:.3f} flex {flex_ms:.3f} "
                  f"runtime {runtime_ms:.3f} ref {ref_ms:.3f} mask {mask_ms:.1f} ms graphs "
                  f"{results[-1]['dynamo_unique_graphs']}", flush=True)


def save_results(out_dir, name: str, command: str, **data) -> dict:
    """Write ``{"meta": ..., **data}`` to ``out_dir/name.json``; meta: date, card, torch version, the command. Returns
    the meta."""
    meta = dict(date=str(date.today()), device=torch.cuda.get_device_name(), torch=torch.__version__, command=command)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(dict(meta=meta, **data), indent=2))
    return meta


def setup(doc: str):
    """The shared command line of the GPU benchmarks (``--quick``, ``--out``): (args, device), seeded."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2K cases only")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = parser.parse_args()
    torch.manual_seed(0)
    return args, torch.device("cuda")


def main():
    args, device = setup(__doc__)
    torch._dynamo.config.cache_size_limit = 64  # report recompiles (unique graphs) rather than fall back silently
    checks, timings = [], []
    check_correctness(checks, device)
    time_cases(timings, device, args.quick)
    meta = save_results(args.out, "backends", "python benchmarks/backends.py", checks=checks, timings=timings)

    print(f"\n{meta['device']}, torch {meta['torch']}, {meta['date']}")
    bad = [c for c in checks if not c["ok"]]
    worst = max(checks, key=lambda c: c["ratio"])
    print(f"correctness: {len(checks) - len(bad)}/{len(checks)} ok (bf16 error <= 2x torch's own; worst ratio "
          f"{worst['ratio']:.2f}: {worst['backend']} {worst['plan']} {worst['order']})")
    for c in bad:
        print(f"  FAIL {c}")
    print("\n| case | plan | kept | cuDNN dense ms | ideal ms | flex ms | flex/ideal | runtime (flex) ms | "
          "reference ms | BlockMask build ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in timings:
        print(f"| {r['case']} | {r['plan']} | {r['kept']:.3f} | {r['cudnn_dense_ms']:.3f} | {r['ideal_ms']:.3f} | "
              f"{r['flex_ms']:.3f} | {r['flex_ms'] / r['ideal_ms']:.2f} | {r['runtime_flex_ms']:.3f} | "
              f"{r['reference_ms']:.3f} | {r['block_mask_build_ms']:.1f} |")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
