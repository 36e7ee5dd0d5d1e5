"""Experiment, kept as evidence: a persistent "chunk stream" variant of the fused kernel (not shipped; it is slower).

Idea: the shipped kernel pays a fixed cost per 128-row query tile (pipeline fill, Q load, epilogue), about 5 us on an
H100, which weighs most where tiles are shortest (FLUX 2K all arrow 1/16: 12 key chunks a tile, 1.29-1.36x ideal). Here
one program per SM runs a host-built list of tiles (longest first onto the least loaded program) as ONE loop over all
their key chunks, driven by a table with a row per chunk (sample-head, query row, key start, key bound, first/last
flags), so the pipeliner can load the next tile's first keys while the current tile finishes. A new tile restarts the
online softmax by setting m = -inf (the rescale factor 0 clears acc and l); Q is re-read per chunk by bulk copy.

Measured (H100, 2026-11-26, bf16, B=1, 24 heads; x = time / ideal, shipped kernel in the same run):

    FLUX 2K  all 1/8 1.84 (shipped 1.24)   all 1/16 1.87 (1.34)   mixed 1.89 (1.19)
    SD3 2K   all 1/8 1.64 (1.13)           all 1/16 1.72 (1.23)   mixed 1.54 (1.08)

A first version carried the tile state (tile index, band) through the loop instead of the table: Triton 3.6's
pipeliner then could not prefetch across the dependent loads and issued each chunk's K/V copy right before waiting
on it (2.1-2.2x ideal for FLUX). With the table the copies are double-buffered across tiles, but the per-chunk Q
re-read, the per-chunk masks and the table reads cost more than the per-tile fill they hide.

    python benchmarks/kernel_persistent.py                                     # GPU: check + time
    TRITON_INTERPRET=1 python benchmarks/kernel_persistent.py --cpu-check      # CPU: against the reference
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys
from pathlib import Path

import numpy as np
import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditfa_optimum.kernels import headwise_attention as hw  # noqa: E402
from ditfa_optimum.kernels.headwise_attention import _attend_chunk  # noqa: E402


@triton.jit
def _stream_kernel(
        Q, Qd, K, V, Out, Lse, Chunks, Starts,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_os,
        H, S, T, N_IMG, sm_scale,
        HEAD_DIM: tl.constexpr, IMAGE_FIRST: tl.constexpr, STORE_LSE: tl.constexpr,
        PRECISION: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program runs the chunk stream ``Chunks[Starts[pid]:Starts[pid + 1]]``: per chunk (bh, query row start, key
    start, key bound << 2 | last << 1 | first). Addresses come from a table indexed by the loop counter, so the
    pipeliner can load chunk j + 2 while chunk j computes, across tile boundaries."""
    pid = tl.program_id(0)
    c0 = tl.load(Starts + pid)
    c1 = tl.load(Starts + pid + 1)
    if IMAGE_FIRST:
        text_start = N_IMG
    else:
        text_start = 0
    text_end = text_start + T
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for j in range(c0, c1):
        entry = Chunks + j * 4
        bh = tl.load(entry)
        row_start = tl.load(entry + 1)
        start = tl.load(entry + 2)
        packed = tl.load(entry + 3)
        hi = packed >> 2
        b = bh // H
        h = bh % H
        m_i = tl.where((packed & 1) != 0, float("-inf"), m_i)  # a new tile: alpha = 0 clears acc and l
        offs_m = row_start + tl.arange(0, BLOCK_M)
        if USE_TMA:
            q = Qd.load([b, h, row_start, 0]).reshape([BLOCK_M, HEAD_DIM])
            k_src = K
            v_src = V
        else:
            q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qs
                        + offs_d[None, :], mask=offs_m[:, None] < S, other=0.0)
            k_src = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
            v_src = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        acc, m_i, l_i = _attend_chunk(acc, m_i, l_i, q, k_src, v_src, stride_ks, stride_vs, b, h, start, hi,
                                      offs_n, offs_d, qk_scale, PRECISION, True, USE_TMA, BLOCK_N, HEAD_DIM)
        if (packed & 2) != 0:
            in_text = (row_start >= text_start) & (row_start < text_end)
            row_end = tl.where(in_text, text_end, tl.where(IMAGE_FIRST, N_IMG, S))
            rows_ok = offs_m < row_end
            o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
            tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :],
                     (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=rows_ok[:, None])
            if STORE_LSE:
                tl.store(Lse + bh.to(tl.int64) * S + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453,
                         mask=rows_ok)


def chunk_stream(widths, n_img, n_txt, image_first, block_size, bm, bn, programs):
    """(chunks [n, 4] int32, starts [P + 1] int32): the tiles of `schedule`, expanded to one row per key chunk."""
    tiles, starts, order = schedule(widths, n_img, n_txt, block_size, bm, bn, programs)
    flat = widths.flatten().long()
    n_blk = -(-n_img // block_size)
    n_text_tiles = -(-n_txt // bm)
    tph = n_text_tiles + n_blk * (block_size // bm)
    image_start, text_start = (0, n_img) if image_first else (n_txt, 0)
    rows, bounds = [], [0]
    per_program = np.split(tiles.numpy(), starts.numpy()[1:])
    for program in per_program:
        for tile in program:
            rank, local = divmod(int(tile), tph)
            bh = int(order[rank])
            w = int(flat[bh])
            if local < n_text_tiles:
                row_start, lo, hi_blk = text_start + local * bm, 0, n_blk
            else:
                ti = local - n_text_tiles
                row_start = image_start + ti * bm
                qb = ti * bm // block_size
                lo = min(max(qb - w // 2, 0), n_blk - w)
                hi_blk = lo + w
            band_start, band_end = image_start + lo * block_size, min(image_start + hi_blk * block_size,
                                                                       image_start + n_img)
            starts_k = [(s, text_start + n_txt) for s in range(text_start, text_start + n_txt, bn)]
            starts_k += [(s, band_end) for s in range(band_start, band_end, bn)]
            for c, (s, hi) in enumerate(starts_k):
                rows.append((bh, row_start, s, hi << 2 | (c == len(starts_k) - 1) << 1 | (c == 0)))
        bounds.append(len(rows))
    return torch.tensor(rows, dtype=torch.int32), torch.tensor(bounds, dtype=torch.int32)


def stream_attention(q, k, v, n_img, n_txt, image_first, bm, bn, warps, stages, stream, out=None, lse=None):
    B, H, S, D = q.shape
    chunks, starts = stream
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device) if lse is None else lse
    use_tma = hw._tma_ok(q, k, v)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_arg, v_arg = (TensorDescriptor.from_tensor(t, [1, 1, bn, D]) for t in (k, v))
        q_desc = TensorDescriptor.from_tensor(q, [1, 1, bm, D])
    else:
        k_arg, v_arg, q_desc = k, v, q
    return _stream_kernel[(len(starts) - 1,)](
        q, q_desc, k_arg, v_arg, out, lse, chunks, starts,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        H, S, n_txt, n_img, D ** -0.5,
        HEAD_DIM=D, IMAGE_FIRST=bool(image_first), STORE_LSE=True,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", USE_TMA=use_tma,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages), out, lse


def schedule(widths: torch.Tensor, n_img: int, n_txt: int, block_size: int, bm: int, bn: int, programs: int):
    """(tiles, starts, order): every computed query tile, longest first onto the least loaded of ``programs``."""
    flat = widths.flatten().long()
    order = torch.argsort(flat, descending=True, stable=True)
    n_computed = int((flat > 0).sum())
    n_blk = -(-n_img // block_size)
    n_text_tiles = -(-n_txt // bm)
    tph = n_text_tiles + n_blk * (block_size // bm)
    n_tc = -(-n_txt // bn)
    tiles, lengths = [], []
    for rank in range(n_computed):
        w = int(flat[order[rank]])
        for local in range(tph):
            if local < n_text_tiles:
                length = n_tc + -(-n_img // bn)
            else:
                ti = local - n_text_tiles
                if ti * bm >= n_img:
                    continue
                qb = ti * bm // block_size
                lo = min(max(qb - w // 2, 0), n_blk - w)
                length = n_tc + -(-(min((lo + w) * block_size, n_img) - lo * block_size) // bn)
            tiles.append(rank * tph + local)
            lengths.append(length)
    programs = max(1, min(programs, len(tiles)))
    heap = [(0, p) for p in range(programs)]
    per_program = [[] for _ in range(programs)]
    for idx in np.argsort(-np.asarray(lengths), kind="stable"):
        load, p = heapq.heappop(heap)
        per_program[p].append(tiles[idx])
        heapq.heappush(heap, (load + lengths[idx], p))
    flat_tiles = [t for p in per_program for t in p]
    starts = np.cumsum([0] + [len(p) for p in per_program])[:-1]
    as_i32 = lambda x: torch.tensor(np.asarray(x), dtype=torch.int32)  # noqa: E731
    return as_i32(flat_tiles), as_i32(starts), order.to(torch.int32)


def cpu_check():
    from ditfa_optimum.masks import TokenLayout
    from ditfa_optimum.runtime import get_backend

    torch.manual_seed(0)
    for layout in (TokenLayout(70, 9, image_first=True, block_size=16), TokenLayout(70, 9, image_first=False,
                                                                                     block_size=16),
                   TokenLayout(48, 40, image_first=False, block_size=16), TokenLayout(100, 13, True, 32)):
        q, k, v = (torch.randn(2, 3, layout.seq_len, 16) for _ in range(3))
        widths = torch.randint(0, layout.num_image_blocks + 1, (2, 3), dtype=torch.int32)
        widths[0, 0], widths[1, 2], widths[0, 2] = 0, layout.num_image_blocks, 1
        ref = get_backend("reference", q.device).attend(q, k, v, layout, widths.long())
        computed = widths > 0
        out = torch.full_like(q, float("nan"))
        stream = chunk_stream(widths, layout.num_image_tokens, layout.num_text_tokens, layout.image_first,
                              layout.block_size, 16, 16, 5)
        stream_attention(q, k, v, layout.num_image_tokens, layout.num_text_tokens, layout.image_first, 16, 16, 1, 2,
                         stream, out=out)
        assert out[~computed].isnan().all(), "a skipped head was written"
        err = float((out[computed] - ref[computed]).abs().max())
        print(layout, "max err", err)
        assert err < 1e-4, err


def gpu():
    from backends import CASES, PLANS, bench, case_inputs, head_methods, kept_fraction, widths_for

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    torch.manual_seed(0)
    rows = []
    for case in ("FLUX 2K", "SD3 2K"):
        n_img, n_txt, image_first, D = CASES[case]
        layout, q, k, v, dense = case_inputs(case, dev)
        configs = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4)] if D == 128 else [
            (128, 64, 4, 3), (64, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3)]
        for plan in PLANS:
            if plan == "all full":
                continue
            widths = widths_for(head_methods(plan), layout)
            kept = kept_fraction(widths, layout)
            dw = widths.to(dev, torch.int32)
            table, key = hw.launch_table(widths).to(dev), hw.tune_key(widths)
            shipped = lambda: hw.headwise_attention(q, k, v, dw, n_img, n_txt, image_first, 128, table=table,  # noqa
                                                    key=key)
            ref, _ = shipped()
            base = bench(shipped)
            print(f"{case} {plan} ideal {dense * kept:.3f} shipped {base:.3f} ({base / dense / kept:.2f})", flush=True)
            for bm, bn, w, s in configs:
                for per_sm in (1, 2):
                    stream = chunk_stream(widths, n_img, n_txt, image_first, 128, bm, bn, sms * per_sm)
                    stream = tuple(t.to(dev) for t in stream)
                    try:
                        out = torch.full_like(q, float("nan"))
                        compiled, _, _ = stream_attention(q, k, v, n_img, n_txt, image_first, bm, bn, w, s, stream,
                                                          out=out)
                    except Exception as exc:
                        print(f"  {bm}x{bn} w{w} s{s} x{per_sm}: {type(exc).__name__} {str(exc)[:100]}")
                        continue
                    if plan == "all 1/16" and per_sm == 1:
                        name = f"stream-{case.split()[0]}-{bm}x{bn}w{w}s{s}"
                        try:
                            Path(os.environ.get("OUT", "."), f"{name}.ttgir").write_text(compiled.asm["ttgir"])
                            print(f"  {name}: {compiled.n_regs} regs, {compiled.metadata.shared} B shared, "
                                  f"{compiled.n_spills} spills")
                        except Exception as exc:  # report only
                            print(f"  no IR dump: {exc}")
                    computed = (dw > 0)[..., None, None].expand_as(out)
                    written = bool(torch.isfinite(out[computed]).all())
                    diff = float((out[computed].float() - ref[computed].float()).abs().max())
                    ms = bench(lambda: stream_attention(q, k, v, n_img, n_txt, image_first, bm, bn, w, s, stream))
                    rows.append((case, plan, bm, bn, w, s, per_sm, ms, ms / dense / kept, base / dense / kept))
                    print(f"  {bm}x{bn} w{w} s{s} x{per_sm}: {ms:.3f} ms = {ms / dense / kept:.2f} ideal "
                          f"(shipped {base / dense / kept:.2f}); diff vs shipped {diff:.1e}, all written {written}",
                          flush=True)
        del q, k, v
    print("\nbest per case/plan:")
    for case in ("FLUX 2K", "SD3 2K"):
        for plan in PLANS:
            mine = sorted((r for r in rows if r[0] == case and r[1] == plan), key=lambda r: r[7])
            if mine:
                r = mine[0]
                print(f"{case} {plan}: stream {r[2]}x{r[3]} w{r[4]} s{r[5]} x{r[6]} {r[8]:.2f} ideal vs shipped "
                      f"{r[9]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-check", action="store_true")
    if parser.parse_args().cpu_check:
        assert os.environ.get("TRITON_INTERPRET") == "1"
        cpu_check()
    else:
        gpu()
