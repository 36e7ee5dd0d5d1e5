"""Where a query tile's time goes: fit kernel time = a x chunks + b x tiles over band widths, with and without text.

FLUX-shaped (B=1, 24 heads, D=128, 16384 image tokens, 128-token blocks, bf16), every head the same arrow width W in
{4, 8, 16, 32, 64, 128 (full)}, text lengths T in {0, 512}. With T=0 an image tile visits exactly W key chunks, so the
slope over W is the cost of a chunk and the intercept the fixed cost of a tile; with T=512 the difference shows what
the text keys and the text query tiles (which visit every key) cost beyond their chunk count; T=512 with W = 8 / 16 /
128 are the FLUX 2K all 1/16 / all 1/8 / all full cases. Times, `do_bench` medians, in one run: the Triton kernel
(autotuned; output by bulk copy, and from registers as before: `TMA_STORE` off), the Hopper experiment
(`kernel_hopper.py`) and the same with its output store skipped (what the epilogue costs).

    python benchmarks/kernel_overhead.py [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends import HEADS, bench, save_results, setup  # noqa: E402

from ditfa_optimum.kernels import headwise_attention as hw  # noqa: E402
from ditfa_optimum.kernels.headwise_attention import (headwise_attention, launch_order,  # noqa: E402
                                                     launch_table, tune_key)
from kernel_hopper import headwise_attention_hopper  # noqa: E402

N_IMG, D, BS = 16384, 128, 128
WIDTHS = (4, 8, 16, 32, 64, 128)


def chunks_and_tiles(T: int, W: int) -> tuple[int, int]:
    n_blk, n_text_tiles = N_IMG // BS, -(-T // 128)
    text_chunks = -(-T // 128)
    per_head_chunks = n_text_tiles * (text_chunks + n_blk) + n_blk * (text_chunks + W)
    return HEADS * per_head_chunks, HEADS * (n_text_tiles + n_blk)


def fit(rows, key):
    """Least squares time = a * chunks + b * tiles (tiles fixed per T, so fit per T: time = a * chunks + c)."""
    x = torch.tensor([r["chunks"] for r in rows], dtype=torch.float64)
    y = torch.tensor([r[key] for r in rows], dtype=torch.float64)
    A = torch.stack([x, torch.ones_like(x)], 1)
    a, c = torch.linalg.lstsq(A, y[:, None]).solution.flatten().tolist()
    return a, c


def main():
    args, device = setup(__doc__)
    results = []
    for T in (0, 512):
        S = N_IMG + T
        q, k, v = (torch.randn(1, HEADS, S, D, device=device, dtype=torch.bfloat16) for _ in range(3))
        out, lse = torch.empty_like(q), torch.empty(1, HEADS, S, device=device)
        for W in WIDTHS:
            widths = torch.full((1, HEADS), W, dtype=torch.int32, device=device)
            order, table, key = launch_order(widths), launch_table(widths), tune_key(widths)

            def triton_kernel():
                return headwise_attention(q, k, v, widths, N_IMG, T, False, BS, out=out, lse=lse, table=table,
                                          key=key)

            def hopper():
                return headwise_attention_hopper(q, k, v, widths, N_IMG, T, False, BS, out=out, lse=lse,
                                                 order=order, overlap=False)

            def hopper_no_store():  # the same work without the epilogue's output store
                return headwise_attention_hopper(q, k, v, widths, N_IMG, T, False, BS, out=out, lse=lse,
                                                 order=order, overlap=False, skip_store=True)

            hw.TMA_STORE = False  # A/B: the output store from registers (before 2026-11-26 evening)
            triton_kernel()
            register_store_ms = bench(triton_kernel)
            hw.TMA_STORE = True
            triton_kernel()
            hopper()
            hopper_no_store()
            chunks, tiles = chunks_and_tiles(T, W)
            row = dict(T=T, W=W, chunks=chunks, tiles=tiles, triton_ms=bench(triton_kernel),
                       triton_register_store_ms=register_store_ms, hopper_ms=bench(hopper),
                       hopper_no_store_ms=bench(hopper_no_store))
            results.append(row)
            print(f"T={T:4d} W={W:3d} chunks {chunks:7d} tiles {tiles:5d} | triton {row['triton_ms']:.3f} ms "
                  f"(register store {register_store_ms:.3f}) | "
                  f"hopper {row['hopper_ms']:.3f} ms | hopper without the store {row['hopper_no_store_ms']:.3f} ms",
                  flush=True)
    for T in (0, 512):
        rows = [r for r in results if r["T"] == T]
        for key in ("triton_ms", "triton_register_store_ms", "hopper_ms", "hopper_no_store_ms"):
            a, c = fit(rows, key)
            tiles = rows[0]["tiles"]
            print(f"T={T} {key}: {a * 1e6:.2f} ns per chunk, fixed {c * 1e3:.1f} us = {c * 1e6 / tiles:.1f} ns per "
                  f"tile ({c * 1e6 / tiles * 132 / 1e3:.2f} us of one SM)", flush=True)
    save_results(args.out, "kernel-overhead", "python benchmarks/kernel_overhead.py", rows=results)


if __name__ == "__main__":
    main()
