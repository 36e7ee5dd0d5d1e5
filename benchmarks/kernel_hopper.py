"""Experiment: a warp-specialised, persistent head-wise attention kernel for Hopper (Triton's Gluon dialect).

Not used by the runtime: measured slower than the shipped Triton kernel (`kernels/headwise_attention.py`) on every 2K
case (docs/benchmarks.md, "The warp-specialised Hopper kernel"). Kept, checked and compiled by the tests, as the
evidence behind that decision and as the starting point for a later attempt.

Why it was tried: the Triton kernel pays a fixed ~5 us of an SM per 128-row query tile, which an arrow tile of ~12 key
chunks cannot amortise. The guess was load latency (Q load, K/V pipeline fill at each tile start). This kernel hides
all of it:

* one program per SM loops over query tiles taken from a global counter (dynamic: the text tiles, which visit every
  key, run ~10x longer than arrow tiles);
* a one-warp **producer** partition takes the next tile, and issues its Q and every K/V chunk by TMA into
  shared-memory rings guarded by mbarriers; it runs ahead across tile boundaries and hands the consumer (tile, head,
  width) through shared memory, so no global load sits between two tiles;
* the **consumer** partition (8 warps, two warpgroups for 128 rows) runs the online softmax with asynchronous
  warpgroup MMAs; with ``overlap`` it issues the next chunk's QK^T before this chunk's softmax (FlashAttention-3's
  intra-warpgroup overlap).

What it showed (H100): the fixed cost per tile stayed (4.7 us here vs 5.2 us), so it is not load latency; skipping
the output store removed 2.8 us of it (``skip_store``), which led to the bulk-copy (TMA) output store now in the Triton
kernel; and its per-chunk cost is 13% above the Triton kernel's (16.6 vs 14.8 ns of the GPU per 128x128 chunk).

Contract (as `headwise_attention`): q, k, v ``[B, H, S, D]`` fp16/bf16 with 16-byte aligned strides, D in {64, 128};
widths ``[B, H]`` int32 (0 = skip, untouched; W = arrow band of W image blocks; n_blk = full); out ``[B, H, S, D]``;
lse ``[B, H, S]`` float32. Block size a multiple of 128 (the query and key tiles). Tiles are numbered as the Triton
kernel's grid: every head's text tiles first, then the image tiles head by head in ``order``.

Run on the GPU machine: bf16/fp16 correctness as `benchmarks/kernel.py` (error vs fp32 reference <= 2x PyTorch's own
same-precision error, outputs and LSE poisoned, skipped heads untouched; both token orders, ragged and aligned
lengths, D = 64 and 128, every plan, each variant), then 2K timings against the Triton kernel and cuDNN:

    python benchmarks/kernel_hopper.py [--quick] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton


from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from backends import (CASES, PLANS, bench, case_inputs, head_methods, kept_fraction, save_results,  # noqa: E402
                      setup, widths_for)
from kernel import correctness_cases, rel_err, report_checks  # noqa: E402

from ditfa_optimum.kernels.headwise_attention import (check_call, headwise_attention, launch_order,  # noqa: E402
                                                     launch_table, tune_key)
from ditfa_optimum.runtime import get_backend  # noqa: E402

BLOCK_M = 128
BLOCK_N = 128
HEAD_DIMS = (64, 128)
Q_BUFFERS = 2
KV_BUFFERS = 2


@gluon.jit
def _tile_head(tile, Order, n_heads, T, N_BLK, BS: gl.constexpr, BM: gl.constexpr):
    """The (sample, head) index tile ``tile`` belongs to (text tiles of every head first, then image tiles by head)."""
    n_text_tiles = gl.cdiv(T, BM)
    n_img_tiles = N_BLK * (BS // BM)
    if tile < n_text_tiles * n_heads:
        rank = tile % n_heads
    else:
        rank = (tile - n_text_tiles * n_heads) // n_img_tiles
    return gl.load(Order + rank)


@gluon.jit
def _tile_geometry(tile, width, n_heads, T, N_IMG, N_BLK,
                   IMAGE_FIRST: gl.constexpr, BS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr):
    """Where tile ``tile`` (of a head with band ``width``) reads and writes: rows, text keys, band keys, chunk counts.

    Pure arithmetic: the consumer gets ``width`` from the producer, so no global load sits between two tiles."""
    n_text_tiles = gl.cdiv(T, BM)
    n_img_tiles = N_BLK * (BS // BM)
    if IMAGE_FIRST:
        image_start = 0
        text_start = N_IMG
    else:
        image_start = T
        text_start = 0
    if tile < n_text_tiles * n_heads:
        row_start = text_start + (tile // n_heads) * BM
        row_end = text_start + T
        band_lo = 0
        band_hi = N_BLK
    else:
        image_tile = (tile - n_text_tiles * n_heads) % n_img_tiles
        row_start = image_start + image_tile * BM
        row_end = image_start + N_IMG
        qb = image_tile * BM // BS
        band_lo = gl.minimum(gl.maximum(qb - width // 2, 0), N_BLK - width)
        band_hi = band_lo + width
    band_start = image_start + band_lo * BS
    band_end = gl.minimum(image_start + band_hi * BS, image_start + N_IMG)
    n_text = gl.cdiv(T, BN)
    n_band = gl.cdiv(band_end - band_start, BN)
    return row_start, row_end, text_start, text_start + T, band_start, band_end, n_text, n_band


@gluon.jit
def _chunk_start(j, n_text, text_start, band_start, BN: gl.constexpr):
    if j < n_text:
        start = text_start + j * BN
    else:
        start = band_start + (j - n_text) * BN
    return start


@gluon.jit
def _chunk_end(j, n_text, text_end, band_end):
    """The end of the key segment chunk ``j`` lies in (columns from there on are masked)."""
    if j < n_text:
        hi = text_end
    else:
        hi = band_end
    return hi


@gluon.jit
def _next_tile(Counter, Widths, Order, n_tiles, n_heads, T, N_BLK, BS: gl.constexpr, BM: gl.constexpr):
    """The next tile with work, its head and band width (a skipped head's tiles are passed over); the tile is
    ``n_tiles`` or more when none is left."""
    tile = gl.atomic_add(Counter, 1)
    width = 0
    head = 0
    while width == 0:
        head = _tile_head(gl.minimum(tile, n_tiles - 1), Order, n_heads, T, N_BLK, BS, BM)
        width = gl.load(Widths + head)
        if tile >= n_tiles:
            width = 1
        if width == 0:
            tile = gl.atomic_add(Counter, 1)
    return tile, head, width


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, tile_smem, q_ready, q_empty, kv_ready, kv_empty,
              Counter, Widths, Order, n_tiles, n_heads, H, T, N_IMG, N_BLK,
              IMAGE_FIRST: gl.constexpr, BS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr):
    QB: gl.constexpr = q_smem.type.shape[0]
    KB: gl.constexpr = k_smem.type.shape[0]
    id_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    qi = 0
    kvi = 0
    slot_ids = gl.arange(0, 4, id_layout)
    tile, head, width = _next_tile(Counter, Widths, Order, n_tiles, n_heads, T, N_BLK, BS, BM)
    while tile < n_tiles:
        row_start, row_end, text_start, text_end, band_start, band_end, n_text, n_band = \
            _tile_geometry(tile, width, n_heads, T, N_IMG, N_BLK, IMAGE_FIRST, BS, BM, BN)
        b = head // H
        h = head % H
        slot = qi % QB
        mbarrier.wait(q_empty.index(slot), ((qi // QB) & 1) ^ 1)
        # the consumer gets (tile, head, width) with Q: no global load between its tiles
        tile_smem.index(slot).store(gl.where(slot_ids == 0, tile, gl.where(slot_ids == 1, head, width)))
        mbarrier.expect(q_ready.index(slot), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, row_start, 0], q_ready.index(slot), q_smem.index(slot))
        for j in range(n_text + n_band):
            start = _chunk_start(j, n_text, text_start, band_start, BN)
            s = kvi % KB
            mbarrier.wait(kv_empty.index(s), ((kvi // KB) & 1) ^ 1)
            mbarrier.expect(kv_ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [b, h, start, 0], kv_ready.index(s), k_smem.index(s))
            tma.async_copy_global_to_shared(v_desc, [b, h, start, 0], kv_ready.index(s), v_smem.index(s))
            kvi += 1
        qi += 1
        tile, head, width = _next_tile(Counter, Widths, Order, n_tiles, n_heads, T, N_BLK, BS, BM)
    # no work left: tell the consumer (tile id -1)
    slot = qi % QB
    mbarrier.wait(q_empty.index(slot), ((qi // QB) & 1) ^ 1)
    tile_smem.index(slot).store(gl.full([4], -1, gl.int32, id_layout))
    mbarrier.arrive(q_ready.index(slot), count=1)


@gluon.jit
def _softmax_update(s_acc, m_i, l_i, start, hi, qk_scale, s_layout: gl.constexpr, BN: gl.constexpr):
    """Scores of one key chunk -> (probabilities, new running max, new running sum, rescale factor)."""
    if start + BN > hi:  # ragged tail of the text segment or the band: columns past ``hi`` are not kept
        cols = start + gl.arange(0, BN, gl.SliceLayout(0, s_layout))
        s_acc = gl.where((cols < hi)[None, :], s_acc, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s_acc, 1) * qk_scale)
    p = gl.exp2(s_acc * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_i, alpha


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, tile_smem, q_ready, q_empty, kv_ready, kv_empty,
              Out, Lse, stride_ob, stride_oh, stride_os, n_heads, H, S, T, N_IMG, N_BLK, sm_scale,
              IMAGE_FIRST: gl.constexpr, STORE_LSE: gl.constexpr, OVERLAP: gl.constexpr, SKIP_STORE: gl.constexpr,
              BS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, num_warps: gl.constexpr):
    QB: gl.constexpr = q_smem.type.shape[0]
    KB: gl.constexpr = k_smem.type.shape[0]
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    id_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 instead of exp

    qi = 0
    kvi = 0
    slot = 0
    slot_ids = gl.arange(0, 4, id_layout)
    mbarrier.wait(q_ready.index(0), 0)
    ids = tile_smem.index(0).load(id_layout)
    tile = gl.sum(gl.where(slot_ids == 0, ids, 0), 0)
    while tile >= 0:
        head = gl.sum(gl.where(slot_ids == 1, ids, 0), 0)
        width = gl.sum(gl.where(slot_ids == 2, ids, 0), 0)
        row_start, row_end, text_start, text_end, band_start, band_end, n_text, n_band = \
            _tile_geometry(tile, width, n_heads, T, N_IMG, N_BLK, IMAGE_FIRST, BS, BM, BN)
        q = q_smem.index(slot).reshape([BM, D])
        n_chunks = n_text + n_band
        m_i = gl.full([BM], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.full([BM], 0.0, gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BM, D], gl.float32, o_layout)
        s_zero = gl.zeros([BM, BN], gl.float32, s_layout)

        if OVERLAP:
            # chunk 0: scores and probabilities; its PV product is issued with the next chunk's QK^T
            s = kvi % KB
            mbarrier.wait(kv_ready.index(s), (kvi // KB) & 1)
            k = k_smem.index(s).reshape([BN, D]).permute((1, 0))
            s_acc = warpgroup_mma(q, k, s_zero, use_acc=False, is_async=True)
            s_acc, _q, _k = warpgroup_mma_wait(0, deps=(s_acc, q, k))
            start = _chunk_start(0, n_text, text_start, band_start, BN)
            hi = _chunk_end(0, n_text, text_end, band_end)
            p, m_i, l_i, alpha = _softmax_update(s_acc, m_i, l_i, start, hi, qk_scale, s_layout, BN)
            p = gl.convert_layout(p.to(dtype), p_layout)
            for j in range(1, n_chunks):
                s_prev = s
                s = (kvi + j) % KB
                mbarrier.wait(kv_ready.index(s), ((kvi + j) // KB) & 1)
                k = k_smem.index(s).reshape([BN, D]).permute((1, 0))
                s_acc = warpgroup_mma(q, k, s_zero, use_acc=False, is_async=True)
                v = v_smem.index(s_prev).reshape([BN, D])
                acc = warpgroup_mma(p, v, acc, is_async=True)
                s_acc, _q, _k = warpgroup_mma_wait(1, deps=(s_acc, q, k))  # the scores; the PV product may still run
                start = _chunk_start(j, n_text, text_start, band_start, BN)
                hi = _chunk_end(j, n_text, text_end, band_end)
                p, m_i, l_i, alpha = _softmax_update(s_acc, m_i, l_i, start, hi, qk_scale, s_layout, BN)
                p = gl.convert_layout(p.to(dtype), p_layout)
                acc, _v = warpgroup_mma_wait(0, deps=(acc, v))
                mbarrier.arrive(kv_empty.index(s_prev), count=1)
                acc = acc * gl.convert_layout(alpha, row_layout)[:, None]
            # every QK^T of this tile is done: the producer may load the next Q here
            mbarrier.arrive(q_empty.index(slot), count=1)
            v = v_smem.index(s).reshape([BN, D])
            acc = warpgroup_mma(p, v, acc, is_async=True)
            acc, _v = warpgroup_mma_wait(0, deps=(acc, v))
            mbarrier.arrive(kv_empty.index(s), count=1)
        else:
            for j in range(0, n_chunks):
                s = (kvi + j) % KB
                mbarrier.wait(kv_ready.index(s), ((kvi + j) // KB) & 1)
                k = k_smem.index(s).reshape([BN, D]).permute((1, 0))
                s_acc = warpgroup_mma(q, k, s_zero, use_acc=False, is_async=True)
                s_acc, _q, _k = warpgroup_mma_wait(0, deps=(s_acc, q, k))
                start = _chunk_start(j, n_text, text_start, band_start, BN)
                hi = _chunk_end(j, n_text, text_end, band_end)
                p, m_i, l_i, alpha = _softmax_update(s_acc, m_i, l_i, start, hi, qk_scale, s_layout, BN)
                acc = acc * gl.convert_layout(alpha, row_layout)[:, None]
                v = v_smem.index(s).reshape([BN, D])
                acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v, acc, is_async=True)
                acc, _v = warpgroup_mma_wait(0, deps=(acc, v))
                mbarrier.arrive(kv_empty.index(s), count=1)
            mbarrier.arrive(q_empty.index(slot), count=1)
        kvi += n_chunks

        # epilogue: normalise and store the rows of this tile that lie in its segment
        do_store = row_start >= 0
        if SKIP_STORE:  # experiment: how much the epilogue costs (never true otherwise)
            do_store = row_start < 0
        if do_store:
            b = head // H
            h = head % H
            l_o = gl.convert_layout(l_i, row_layout)
            out = (acc / l_o[:, None]).to(dtype)
            rows = row_start + gl.arange(0, BM, row_layout)
            cols = gl.arange(0, D, gl.SliceLayout(0, o_layout))
            o_base = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
            gl.store(o_base + rows[:, None].to(gl.int64) * stride_os + cols[None, :], out,
                     mask=(rows < row_end)[:, None])
            if STORE_LSE:
                lse = (gl.convert_layout(m_i, row_layout) + gl.log2(l_o)) * 0.6931471805599453
                gl.store(Lse + head.to(gl.int64) * S + rows, lse, mask=rows < row_end)

        qi += 1
        slot = qi % QB
        mbarrier.wait(q_ready.index(slot), (qi // QB) & 1)
        ids = tile_smem.index(slot).load(id_layout)
        tile = gl.sum(gl.where(slot_ids == 0, ids, 0), 0)


@gluon.jit
def _headwise_attention_hopper_kernel(
        q_desc, k_desc, v_desc, Out, Lse, Widths, Order, Counter,
        stride_ob, stride_oh, stride_os, n_tiles, n_heads, H, S, T, N_IMG, N_BLK, sm_scale,
        IMAGE_FIRST: gl.constexpr, STORE_LSE: gl.constexpr, OVERLAP: gl.constexpr, SKIP_STORE: gl.constexpr,
        BS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, QB: gl.constexpr, KB: gl.constexpr,
        num_warps: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [QB] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [KB] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [KB] + v_desc.block_type.shape, v_desc.layout)
    tile_smem = gl.allocate_shared_memory(gl.int32, [QB, 4], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    q_ready = gl.allocate_shared_memory(gl.int64, [QB, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [QB, 1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [KB, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [KB, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(QB):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
    for i in gl.static_range(KB):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=1)
    fence_async_shared()

    gl.warp_specialize([
        (_consumer, (q_smem, k_smem, v_smem, tile_smem, q_ready, q_empty, kv_ready, kv_empty,
                     Out, Lse, stride_ob, stride_oh, stride_os, n_heads, H, S, T, N_IMG, N_BLK, sm_scale,
                     IMAGE_FIRST, STORE_LSE, OVERLAP, SKIP_STORE, BS, BM, BN, D, num_warps)),
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, tile_smem, q_ready, q_empty, kv_ready, kv_empty,
                     Counter, Widths, Order, n_tiles, n_heads, H, T, N_IMG, N_BLK, IMAGE_FIRST, BS, BM, BN)),
    ], [1], [24])


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> str | None:
    """Why this kernel cannot run these inputs (None when it can): the Triton kernel covers the rest."""
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "needs a Hopper GPU (compute capability 9.x)"
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        return f"q, k, v must be [B, H, S, D] of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype must be fp16 or bf16 (one for q, k, v), got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim must be one of {HEAD_DIMS}, got {q.shape[-1]}"
    if block_size % BLOCK_M:
        return f"the mask block size must be a multiple of {BLOCK_M}, got {block_size}"
    size = q.element_size()
    for t in (q, k, v):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:-1]):
            return "q, k, v need a contiguous last dimension and 16-byte aligned strides (tensor descriptors)"
    return None


_SM_COUNT: dict[int, int] = {}


def descriptors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Host-built TMA descriptors of the whole [B, H, S, D] q, k, v (one block: one head's 128 rows)."""
    D = q.shape[-1]
    dtype = gl.float16 if q.dtype == torch.float16 else gl.bfloat16
    q_layout = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK_M, D], dtype)
    kv_layout = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK_N, D], dtype)
    return (TensorDescriptor.from_tensor(q, [1, 1, BLOCK_M, D], q_layout),
            TensorDescriptor.from_tensor(k, [1, 1, BLOCK_N, D], kv_layout),
            TensorDescriptor.from_tensor(v, [1, 1, BLOCK_N, D], kv_layout))


def headwise_attention_hopper(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, widths: torch.Tensor,
                              num_image_tokens: int, num_text_tokens: int, image_first: bool, block_size: int,
                              out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                              store_lse: bool = True, order: torch.Tensor | None = None, overlap: bool = True,
                              programs: int | None = None, buffers: tuple[int, int] | None = None,
                              skip_store: bool = False):
    """Launch the Hopper kernel; arguments and result as `kernels.headwise_attention.headwise_attention`.

    ``programs``: persistent programs (default: one per SM); ``overlap``: the intra-warpgroup softmax/MMA overlap;
    ``buffers``: (Q, K/V) shared-memory ring depths (default `Q_BUFFERS`, `KV_BUFFERS`)."""
    check_call("headwise_attention_hopper", check_inputs(q, k, v, block_size), q, widths, num_image_tokens,
               num_text_tokens)
    B, H, S, D = q.shape
    n_blk = -(-num_image_tokens // block_size)
    widths = widths.to(torch.int32).contiguous()
    order = launch_order(widths) if order is None else order
    if out is None:
        out = torch.empty(B, H, S, D, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    n_tiles = (triton.cdiv(num_text_tokens, BLOCK_M) + n_blk * (block_size // BLOCK_M)) * B * H
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    grid = (min(programs or _SM_COUNT[index], n_tiles),)
    counter = torch.zeros(1, dtype=torch.int32, device=q.device)
    q_desc, k_desc, v_desc = descriptors(q, k, v)
    _headwise_attention_hopper_kernel[grid](
        q_desc, k_desc, v_desc, out, lse, widths, order, counter,
        out.stride(0), out.stride(1), out.stride(2), n_tiles, B * H, H, S, num_text_tokens, num_image_tokens, n_blk,
        D ** -0.5,
        IMAGE_FIRST=bool(image_first), STORE_LSE=store_lse, OVERLAP=overlap, SKIP_STORE=skip_store,
        BS=block_size, BM=BLOCK_M, BN=BLOCK_N,
        D=D, QB=(buffers or (Q_BUFFERS, KV_BUFFERS))[0], KB=(buffers or (Q_BUFFERS, KV_BUFFERS))[1], num_warps=8)
    return out, lse


def compile_for_hopper(head_dim: int = 128, overlap: bool = False, dtype=torch.float16, image_first: bool = False):
    """Compile the kernel for sm_90a without a GPU (Triton's bundled ptxas); returns ptxas' resource lines.

    The CPU tests use it so the experiment keeps building: Gluon has no interpreter mode."""
    import os
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import mangle_type

    B, H, S = 1, 2, 640
    q = torch.empty(B, H, S, head_dim, dtype=dtype)
    q_desc, k_desc, v_desc = descriptors(q, q, q)
    ints = torch.empty(H, dtype=torch.int32)
    fn = _headwise_attention_hopper_kernel
    args = dict(q_desc=q_desc, k_desc=k_desc, v_desc=v_desc, Out=q, Lse=torch.empty(B, H, S), Widths=ints,
                Order=ints, Counter=ints, stride_ob=q.stride(0), stride_oh=q.stride(1), stride_os=q.stride(2),
                n_tiles=10, n_heads=H, H=H, S=S, T=128, N_IMG=512, N_BLK=4, sm_scale=0.1)
    consts = dict(IMAGE_FIRST=image_first, STORE_LSE=True, OVERLAP=overlap, SKIP_STORE=False, BS=128, BM=BLOCK_M,
                  BN=BLOCK_N, D=head_dim, QB=Q_BUFFERS, KB=KV_BUFFERS, num_warps=8)
    signature = {name: "constexpr" if name in consts else mangle_type(args[name]) for name in fn.arg_names}
    source = gluon._runtime.GluonASTSource(fn, signature=signature,
                                           constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        info = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull], capture_output=True,
                              text=True, check=True)
    return [line.strip() for line in info.stderr.splitlines() if "registers" in line or "spill" in line]


#: (name, overlap, (Q buffers, K/V buffers)) per head dim: the variants timed (all checked)
VARIANTS = {
    128: [("overlap", True, (2, 2)), ("plain", False, (2, 2)), ("plain q1kv3", False, (1, 3))],
    64: [("overlap", True, (2, 2)), ("plain", False, (2, 2)), ("plain q2kv4", False, (2, 4))],
}


def check(results: list, device) -> None:
    reference = get_backend("reference", device)
    for layout, D, plan, widths, q, k, v, ref in correctness_cases(device):
        computed = widths > 0
        ref_lse = torch.logsumexp(_scores(q, k, layout, widths), -1)  # fp32, once for every dtype and variant
        for dtype in (torch.bfloat16, torch.float16):
            qb, kb, vb = q.to(dtype), k.to(dtype), v.to(dtype)
            base = rel_err(reference.attend(qb, kb, vb, layout, widths), ref, computed)
            for name, overlap, buffers in VARIANTS[D]:
                out = torch.full_like(qb, float("nan"))
                lse = torch.full(qb.shape[:3], float("nan"), device=device)
                headwise_attention_hopper(qb, kb, vb, widths, layout.num_image_tokens, layout.num_text_tokens,
                                          layout.image_first, 128, out=out, lse=lse, overlap=overlap, buffers=buffers)
                torch.cuda.synchronize()
                lse_err = float((lse[computed] - ref_lse[computed]).abs().max())
                written = bool(torch.isfinite(out[computed]).all()) and bool(torch.isfinite(lse[computed]).all())
                untouched = bool(out[~computed].isnan().all())
                err = rel_err(out, ref, computed)
                ok = written and untouched and err <= 2 * base + 1e-6 and lse_err < 0.05
                results.append(dict(order="image-first" if layout.image_first else "text-first",
                                    tokens=(layout.num_image_tokens, layout.num_text_tokens), head_dim=D, plan=plan,
                                    dtype=str(dtype), variant=name, rel_err=err, torch_rel_err=base,
                                    ratio=err / base, lse_max_err=lse_err, all_written=written,
                                    skipped_untouched=untouched, ok=ok))
                if not ok:
                    print("FAIL", results[-1], flush=True)


def _scores(q, k, layout, widths):
    """fp32 masked scores (scaled), -inf where the plan drops the pair: for the reference log-sum-exp."""
    from ditfa_optimum.masks import arrow_mask

    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    keep = torch.stack([torch.stack([arrow_mask(layout, max(int(w), 1), q.device) for w in row])
                        for row in widths.cpu()])
    return scores.masked_fill(~keep, float("-inf"))


def time_all(results: list, device, quick: bool) -> None:
    cases = ["SD3 2K", "FLUX 2K"] if quick else list(CASES)
    for case in cases:
        n_img, n_txt, image_first, D = CASES[case]
        layout, q, k, v, dense_ms = case_inputs(case, device)
        for plan in PLANS:
            widths = widths_for(head_methods(plan), layout).to(device, torch.int32)
            order, table, key = launch_order(widths), launch_table(widths), tune_key(widths)
            kept = kept_fraction(widths.cpu(), layout)
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[:3], device=device)

            def triton_kernel():
                return headwise_attention(q, k, v, widths, n_img, n_txt, image_first, 128, out=out, lse=lse,
                                          table=table, key=key)

            triton_kernel()  # autotune
            triton_ms = bench(triton_kernel)
            row = dict(case=case, plan=plan, kept=kept, cudnn_dense_ms=dense_ms, ideal_ms=dense_ms * kept,
                       triton_ms=triton_ms)
            ideal = row["ideal_ms"]
            line = f"{case:8s} {plan:9s} kept {kept:.3f} cudnn {dense_ms:.3f} ideal {ideal:.3f} | triton " \
                   f"{triton_ms:.3f} ({triton_ms / ideal:.2f})"
            for name, overlap, buffers in VARIANTS[D]:
                def hopper():
                    return headwise_attention_hopper(q, k, v, widths, n_img, n_txt, image_first, 128, out=out,
                                                     lse=lse, order=order, overlap=overlap, buffers=buffers)

                hopper()
                row[f"hopper {name} ms"] = ms = bench(hopper)
                line += f" | {name} {ms:.3f} ({ms / ideal:.2f})"
            results.append(row)
            print(line, flush=True)


def main():
    args, device = setup(__doc__)
    checks, timings = [], []
    check(checks, device)
    bad = report_checks(checks, "dtype", "variant")
    time_all(timings, device, args.quick)
    save_results(args.out, "kernel-hopper", "python benchmarks/kernel_hopper.py", checks=checks, timings=timings)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
