"""Every configuration of the fused kernel on every 2K plan: which tile shape, warps and pipeline depth wins where.

The autotuner keeps one configuration per (shape, plan key); this sweep shows the whole table behind that choice, so a
change to the configuration list or the key is decided on measurements. For SD3 and FLUX at 2048^2 (B=1, 24 heads,
bf16, 128-token blocks) and the plans of `benchmarks/kernel.py`, it times the kernel with each configuration of
`CONFIGS` that fits (plus the register-capped candidates below, which may fit two programs on one SM), checks each
against the autotuned launch, and prints per case and plan the five fastest with their ratio to the ideal time
(cuDNN dense x kept fraction, measured in the same run).

    python benchmarks/kernel_configs.py [--out DIR] [--cases "FLUX 2K"] [--plans "all 1/16"]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends import (CASES, PLANS, bench, case_inputs, head_methods, kept_fraction, save_results,  # noqa: E402
                      widths_for)

from ditfa_optimum.kernels import headwise_attention as hw  # noqa: E402

#: candidates beyond CONFIGS (BLOCK_M, BLOCK_N, warps, stages, register cap): a cap can let two programs share an SM
#: (one's prologue hides behind the other)
EXTRA = [(128, 64, 8, 2, 128), (128, 128, 8, 2, 128), (64, 64, 4, 2, 128), (64, 128, 4, 2, 168), (128, 64, 4, 2, 255)]


def candidates(block_size: int, head_dim: int):
    import triton

    capped = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s, maxnreg=r)
              for bm, bn, w, s, r in EXTRA]
    return [c for c in hw.CONFIGS + capped if hw.fits(c, block_size, head_dim)]


def describe(config) -> str:
    kw = config.all_kwargs()
    cap = f" r{kw['maxnreg']}" if kw.get("maxnreg") else ""
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{kw['num_warps']} s{kw['num_stages']}{cap}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--cases", nargs="*", default=["SD3 2K", "FLUX 2K"])
    parser.add_argument("--plans", nargs="*", default=[p for p in PLANS if p != "all full"])
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda")
    rows = []
    for case in args.cases:
        n_img, n_txt, image_first, D = CASES[case]
        layout, q, k, v, dense_ms = case_inputs(case, device)
        for plan in args.plans:
            widths = widths_for(head_methods(plan), layout)
            kept = kept_fraction(widths, layout)
            dev_widths = widths.to(device, torch.int32)
            table, key = hw.launch_table(widths).to(device), hw.tune_key(widths)

            def run(config=None):
                return hw.headwise_attention(q, k, v, dev_widths, n_img, n_txt, image_first, 128, table=table,
                                             key=key, config=config)

            ref, _ = run()  # the autotuned launch
            tuned = str(getattr(hw._autotuned_kernel, "best_config", None))
            tuned_ms = bench(run)
            computed = (dev_widths > 0)[..., None, None].expand_as(ref)
            for config in candidates(128, D):
                try:
                    out, _ = run(config)
                except Exception as exc:  # out of resources: shared memory or registers
                    print(f"{case} {plan} {describe(config)}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    continue
                err = float((out[computed].float() - ref[computed].float()).abs().max())
                ms = bench(lambda: run(config))
                rows.append(dict(case=case, plan=plan, kept=kept, cudnn_dense_ms=dense_ms, ideal_ms=dense_ms * kept,
                                 config=describe(config), ms=ms, over_ideal=ms / (dense_ms * kept),
                                 max_abs_diff_vs_tuned=err, tuned=tuned, tuned_ms=tuned_ms))
                print(f"{case} {plan} {describe(config):22s} {ms:.3f} ms  {ms / (dense_ms * kept):.2f}x ideal  "
                      f"(diff vs tuned {err:.1e})", flush=True)

    meta = save_results(args.out, "kernel_configs", "python benchmarks/kernel_configs.py", rows=rows)
    print(f"\n{meta['device']}, torch {meta['torch']}, {meta['date']}")
    print("| case | plan | ideal ms | autotuned ms (its config) | fastest five: config ms (x ideal) |")
    print("|---|---|---|---|---|")
    for case in args.cases:
        for plan in args.plans:
            mine = sorted((r for r in rows if r["case"] == case and r["plan"] == plan), key=lambda r: r["ms"])
            if not mine:
                continue
            best = ", ".join(f"{r['config']} {r['ms']:.3f} ({r['over_ideal']:.2f})" for r in mine[:5])
            print(f"| {case} | {plan} | {mine[0]['ideal_ms']:.3f} | {mine[0]['tuned_ms']:.3f} "
                  f"({mine[0]['tuned']}) | {best} |")


if __name__ == "__main__":
    main()
