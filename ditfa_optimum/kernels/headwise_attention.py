"""Fused head-wise attention: one launch computes a layer's whole mixed plan (full, arrow of any width, skip).

Layout and contract (the runtime's backend interface, ``ditfa_optimum.runtime.backends``):

    q, k, v : [B, H, S, D]   any strides (last dim contiguous), fp16 / bf16 / fp32; S = text + image tokens
    widths  : [B, H] int32   per (sample, head): 0 = skip (output left untouched), W >= 1 = arrow band of W image
                             blocks, W == n_blk = full attention (the host wrapper's argument)
    table   : [B * H, 2] int32  the kernel's: rows (sample * H + head, width) by decreasing width, the launch order
                             (`launch_table`)
    out     : [B, H, S, D]   q's dtype; lse: [B, H, S] float32 (natural log of the softmax denominator of the scaled
                             scores), written for computed rows when STORE_LSE

The mask is exactly `ditfa_optimum.masks.arrow_keep`: image tokens form blocks of ``BS`` tokens counted from the first
image token; an image query block ``bq`` keeps text keys and image key blocks ``[s, s + W)``,
``s = clamp(bq - W // 2, 0, n_blk - W)``; text queries keep every key.

Grid: ``((n_text_tiles + n_image_tiles) * B * H,)``, in launch order longest first: the text query tiles of every head
(they visit every key), then the image tiles head by head in the order of ``table`` (decreasing band width, skipped
heads last), so the shortest arrow tiles fill the tail instead of a full head's. Query tiles never straddle segments:
text tiles cover ``[text_start, text_end)`` and image tiles are aligned to image blocks (``BLOCK_M`` divides ``BS``),
so every image tile has one band. Keys are visited in one loop over the text segment's and then the band's whole
chunks (``BLOCK_N`` divides ``BS``), then the ragged tail of each, masked: only kept blocks are read.

Limits (checked by the host wrapper, not the kernel): D in {16, 32, 64, 128, 256}; BS a multiple of 16.

8-bit heads (``quant=``, constexpr ``QUANT``): the launch reads `ditfa_optimum.fp8_attention.quantize_qkv`'s tensors
instead of q, k, v: INT8 Q and smoothed K with one float per query row (``RowScale``) that turns an integer score
into a base-2 logit, and V in the inputs' dtype (`QUANT_QK`) or in e4m3 laid out ``[B, H, D, S]`` with channel
scales (`QUANT_QK_PV`). One launch is either kind; a layer with both is two launches with a table each
(`launch_table(..., drop_skipped=True)`). They need D >= 32 and, on a GPU, D = 64 or 128 and a block size that is a
multiple of 64. The LSE of an 8-bit head is that of the smoothed keys' scores (it differs from the exact one by ``q . mean(k)`` per row).
Measured on an H200 (docs/benchmarks.md): 1.07-1.28x faster than bf16 heads at 2K, before the pre-pass.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..fp8_attention import E4M3, QuantizedQKV

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: the kernel's QUANT values: bf16/fp16/fp32 heads; INT8 Q.K^T with P.V in the inputs' dtype; INT8 Q.K^T and e4m3 P.V
QUANT_NONE, QUANT_QK, QUANT_QK_PV = 0, 1, 2
#: DITFA_TRITON_AUTOTUNE=0: one configuration, no autotuning (test suites that compile many small shapes)
AUTOTUNE = os.environ.get("DITFA_TRITON_AUTOTUNE", "1") != "0"
HEAD_DIMS = (16, 32, 64, 128, 256)


#: autotuned for block sizes that are multiples of 64 (the default 128 included); others run one fixed tile
CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s,
                         pre_hook=lambda nargs: _descriptor_hook(nargs))
           for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)
           if not (w == 8 and bm * bn < 128 * 128)]
#: (BLOCK_M, BLOCK_N, warps, stages) the autotuner tries for the head dims measured on an H100: the front-runners of
#: the sweep of every configuration (docs/benchmarks/kernel-configs-2026-11-26-h100.json; the sweep script is in
#: commit 0445e6f, docs/design-notes.md). A short list keeps the first call fast and leaves timing noise
#: no slow candidate to pick: with all of `CONFIGS`, one run chose a tile 8% slower for FLUX 2K mixed, and with 128x64
#: (4 warps) still listed for D=128, one run chose it for FLUX 2K all 1/8 and mixed, 7% slower than 128x128 timed
#: in the same GPU call. D=128: 128x128 with 8 warps won every plan; D=64: five candidates within 3% of each other.
#: Other head dims try every configuration that fits.
TILES = {
    64: [(128, 64, 4, 3), (128, 64, 4, 4), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4)],
    128: [(128, 128, 8, 3), (128, 128, 8, 2)],
}


def _tile(config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def fits(config, block_size: int, head_dim: int, quant: int = 0) -> bool:
    """Whether a configuration's tiles divide the mask's block size and are not too big for the head dim (8-bit
    keys: twice as many fit)."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    return (block_size % bm == 0 and block_size % bn == 0 and bn <= max(head_dim, 32) * (2 if quant else 1)
            and not (head_dim >= 256 and bm * bn > 64 * 64))


#: the 8-bit launches' candidates: the tiles `benchmarks/fp8_probe.py` ran correctly on an H200 (2026-12-02; an
#: autotuning run over a longer list met an illegal instruction on an H100); 8-bit tiles hold twice the keys in the
#: same shared memory, so D=64 also tries 128-key tiles
TILES_8BIT = {
    64: [(128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    128: [(128, 128, 8, 3), (128, 64, 4, 3)],
}


def _prune(configs, named_args, **kwargs):
    """The configurations that fit; of those, this head dim's shortlist (`TILES`, `TILES_8BIT`) when any of it fits
    (not, e.g., a 64-token block with D=128)."""
    bs, d = kwargs.get("BS", named_args.get("BS")), kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    quant = kwargs.get("QUANT", named_args.get("QUANT"))
    fitting = [c for c in configs if fits(c, bs, d, quant)]
    return [c for c in fitting if _tile(c) in (TILES_8BIT if quant else TILES).get(d, ())] or fitting


@triton.jit
def _attend_chunk(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, b, h, start, hi, offs_n, offs_d, qk_scale,
                  PRECISION: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, QUANT: tl.constexpr):
    """Online-softmax update with the keys [start, start + BLOCK_N) (MASKED: only those below ``hi``).

    With USE_TMA, ``k_base`` / ``v_base`` are host-built tensor descriptors of the whole [B, H, S, D] keys / values
    (Hopper's copy engine); rows past the sequence read as zeros and masked columns are removed from the scores.
    QUANT (`QUANT_NONE`, `QUANT_QK`, `QUANT_QK_PV`): q and the keys are INT8, the scores integers turned into base-2
    logits by the per-row ``qk_scale``; with QUANT_QK_PV the values are e4m3 laid out [B, H, D, S] (``stride_vn``
    is then the channel stride) and P is rounded to e4m3 after scaling by 448 (the row sums carry the same factor)."""
    cols = start + offs_n
    valid = cols < hi
    if USE_TMA:
        k = k_base.load([b, h, start, 0]).reshape([BLOCK_N, HEAD_DIM]).T
    elif MASKED:
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=valid[None, :], other=0)
    else:
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None])
    if QUANT == 2:  # e4m3 values stored transposed: loaded [D, BLOCK_N], used as [BLOCK_N, D]
        if USE_TMA:
            v = v_base.load([b, h, 0, start]).reshape([HEAD_DIM, BLOCK_N]).T
        elif MASKED:
            v = tl.load(v_base + offs_d[None, :] * stride_vn + cols[:, None], mask=valid[:, None], other=0.0)
        else:
            v = tl.load(v_base + offs_d[None, :] * stride_vn + cols[:, None])
    elif USE_TMA:
        v = v_base.load([b, h, start, 0]).reshape([BLOCK_N, HEAD_DIM])
    elif MASKED:
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
    else:
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :])
    if QUANT:
        qk = tl.dot(q, k, out_dtype=tl.int32)
        # int32 -> float32 by the exponent trick (an integer add and a float subtract, both at the full ALU rate,
        # where a conversion instruction runs at the exponential's quarter rate): exact while |qk| < 2^22, and
        # |qk| <= 127^2 * 256 < 2^22 for every head dim the kernel takes
        qk = (qk + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        qk = tl.dot(q, k, input_precision=PRECISION)
    if MASKED:
        qk = tl.where(valid[None, :], qk, float("-inf"))
    # qk_scale: one number, or (QUANT) one positive number per query row
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    scale = qk_scale[:, None] if QUANT else qk_scale
    if QUANT == 2:  # P scaled by 448 = 2^8.807: exp2(x + log2(448))
        p = tl.math.exp2(qk * scale - (m_new - 8.807354922057604)[:, None])
    else:
        p = tl.math.exp2(qk * scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if QUANT == 2:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _headwise_attention_kernel(
        Q, K, V, Out, Lse, Table, RowScale, VScale,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_os,
        H, S, T, N_IMG, N_BLK, sm_scale, TUNE_KEY,
        HEAD_DIM: tl.constexpr, BS: tl.constexpr, IMAGE_FIRST: tl.constexpr, STORE_LSE: tl.constexpr,
        PRECISION: tl.constexpr, USE_TMA: tl.constexpr, TMA_STORE: tl.constexpr, Q_TMA: tl.constexpr,
        QUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # longest programs first: every head's text tiles (they visit every key), then the image tiles head by head in
    # the table's order (decreasing band width), so the shortest programs fill the tail
    n_text_tiles = tl.cdiv(T, BLOCK_M)
    n_image_tiles = N_BLK * (BS // BLOCK_M)
    n_heads = tl.num_programs(0) // (n_text_tiles + n_image_tiles)
    pid = tl.program_id(0)
    is_text = pid < n_text_tiles * n_heads
    image_pid = pid - n_text_tiles * n_heads
    rank = tl.where(is_text, pid % n_heads, image_pid // n_image_tiles)
    pid_t = tl.where(is_text, pid // n_heads, n_text_tiles + image_pid % n_image_tiles)
    # one table row (sample-head index, band width): two independent loads instead of a chain of two
    pid_bh = tl.load(Table + 2 * rank)
    width = tl.load(Table + 2 * rank + 1)
    if width == 0:
        return
    b = pid_bh // H
    h = pid_bh % H
    if IMAGE_FIRST:
        image_start = 0
        text_start = N_IMG
    else:
        image_start = T
        text_start = 0
    image_end = image_start + N_IMG
    text_end = text_start + T

    # a text query tile visits every key; an image tile, the text keys and its band
    tile = pid_t - n_text_tiles
    row_start = tl.where(is_text, text_start + pid_t * BLOCK_M, image_start + tile * BLOCK_M)
    row_end = tl.where(is_text, text_end, image_end)
    qb = tl.maximum(tile, 0) * BLOCK_M // BS
    band_lo = tl.where(is_text, 0, tl.minimum(tl.maximum(qb - width // 2, 0), N_BLK - width))
    band_hi = tl.where(is_text, N_BLK, band_lo + width)

    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_ok = offs_m < row_end
    if Q_TMA:  # Q is a descriptor (where no query tile straddles the segments); rows past S read as zeros
        q = Q.load([b, h, row_start, 0]).reshape([BLOCK_M, HEAD_DIM])
    else:
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=rows_ok[:, None], other=0.0)
    if USE_TMA:  # K and V arrive as descriptors
        k_src = K
        v_src = V
    else:
        k_src = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_src = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    if QUANT:  # per query row: the quantization scales of the row and of the head's keys, times sm_scale * log2(e)
        qk_scale = tl.load(RowScale + pid_bh.to(tl.int64) * S + offs_m, mask=rows_ok, other=1.0)
    else:
        qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 instead of exp
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # One software-pipelined loop over the whole key chunks of the text segment and of the band (chunk j < n_text
    # is text, the rest band), then the ragged tails of both ranges, masked (none or one chunk each). The tail loops
    # are not pipelined (num_stages=1): a pipelined loop sets up its buffers' barriers even when it runs no chunk
    # (4.3% of FLUX 2K all 1/16, profiled), and measured (paired A/B, H100) this is faster on every FLUX 2K plan
    # than both pipelining them and compiling them out where they run nothing (docs/design-notes.md).
    band_start = image_start + band_lo * BS
    band_end = tl.minimum(image_start + band_hi * BS, image_end)
    n_text = (text_end - text_start) // BLOCK_N
    n_band = (band_end - band_start) // BLOCK_N
    for j in range(0, n_text + n_band):
        start = tl.where(j < n_text, text_start + j * BLOCK_N, band_start + (j - n_text) * BLOCK_N)
        acc, m_i, l_i = _attend_chunk(acc, m_i, l_i, q, k_src, v_src, stride_ks, stride_vs, b, h, start, start,
                                      offs_n, offs_d, qk_scale, PRECISION, False, USE_TMA, BLOCK_N, HEAD_DIM,
                                      QUANT)
    for start in tl.range(text_start + n_text * BLOCK_N, text_end, BLOCK_N, num_stages=1):
        acc, m_i, l_i = _attend_chunk(acc, m_i, l_i, q, k_src, v_src, stride_ks, stride_vs, b, h, start, text_end,
                                      offs_n, offs_d, qk_scale, PRECISION, True, USE_TMA, BLOCK_N, HEAD_DIM,
                                      QUANT)
    for start in tl.range(band_start + n_band * BLOCK_N, band_end, BLOCK_N, num_stages=1):
        acc, m_i, l_i = _attend_chunk(acc, m_i, l_i, q, k_src, v_src, stride_ks, stride_vs, b, h, start, band_end,
                                      offs_n, offs_d, qk_scale, PRECISION, True, USE_TMA, BLOCK_N, HEAD_DIM,
                                      QUANT)

    acc = acc * (1.0 / l_i)[:, None]
    if QUANT == 2:  # the e4m3 values' channel scales
        acc = acc * tl.load(VScale + pid_bh.to(tl.int64) * HEAD_DIM + offs_d)[None, :]
    if TMA_STORE:  # Out is a descriptor: one asynchronous bulk copy; rows past the sequence are clipped
        Out.store([b, h, row_start, 0], acc.to(Out.dtype).reshape([1, 1, BLOCK_M, HEAD_DIM]))
    else:
        o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], acc.to(Out.dtype.element_ty),
                 mask=rows_ok[:, None])
    if STORE_LSE:
        log2_sum = tl.math.log2(l_i) - 8.807354922057604 if QUANT == 2 else tl.math.log2(l_i)  # P's factor 448
        lse = (m_i + log2_sum) * 0.6931471805599453
        tl.store(Lse + pid_bh.to(tl.int64) * S + offs_m, lse, mask=rows_ok)


# TUNE_KEY (`tune_key`): the plan's typical band, so short-band plans get their own configuration
_autotuned_kernel = triton.autotune(configs=CONFIGS, key=["S", "T", "HEAD_DIM", "BS", "IMAGE_FIRST", "PRECISION",
                                                          "USE_TMA", "TMA_STORE", "Q_TMA", "QUANT", "TUNE_KEY"],
                                    prune_configs_by={"early_config_prune": _prune})(_headwise_attention_kernel)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> str | None:
    """Why the kernel cannot run these inputs (None when it can)."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        return f"q, k, v must be [B, H, S, D] of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype must be fp16, bf16 or fp32 (one for q, k, v), got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim must be one of {HEAD_DIMS}, got {q.shape[-1]}"
    if block_size % 16:
        return f"the mask block size must be a multiple of 16, got {block_size}"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "the last dimension of q, k, v must be contiguous"
    return None


def quantized_shape_problem(head_dim: int, block_size: int, device: torch.device | bool) -> str | None:
    """Why 8-bit heads of this head dim and mask block size cannot run in the kernel on ``device`` (or, given a bool,
    on a GPU or not), before anything is quantized; None when they can."""
    gpu = (device.type == "cuda" and not INTERPRET) if isinstance(device, torch.device) else device
    if head_dim < 32:
        return f"8-bit heads need a head dim of at least 32 (the INT8 tensor cores' depth), got {head_dim}"
    if gpu and head_dim not in TILES_8BIT:
        # the autotuner would try tiles never verified: a D=32 e4m3 P.V launch met an illegal instruction (H200)
        return (f"8-bit heads on a GPU run head dims {sorted(TILES_8BIT)} (the tiles verified on Hopper), got "
                f"{head_dim}; keep these heads in bf16")
    if gpu and block_size % 64:
        # 32-token tiles met an illegal instruction (e4m3 P.V, H200); only `TILES_8BIT`'s tiles ran correctly
        return (f"8-bit heads on a GPU need a mask block size that is a multiple of 64 (the 64- and 128-token tiles "
                f"verified on Hopper), got {block_size}; plan with such a block size or keep these heads in bf16")
    return None


def check_quantized(quant: QuantizedQKV, q: torch.Tensor, block_size: int = 128,
                    gpu: bool | None = None) -> str | None:
    """Why `quantize_qkv`'s tensors cannot stand for ``q, k, v`` in a kernel launch with this mask block size (None
    when they can). ``gpu``: judge for a compiled launch on a GPU (default: q's device, unless the interpreter runs)."""
    B, H, S, D = q.shape
    problem = quantized_shape_problem(D, block_size, q.device if gpu is None else gpu)
    if problem:
        return problem
    if quant.q8.shape != q.shape or quant.k8.shape != q.shape or quant.row_scale.shape != (B, H, S):
        return (f"quantized inputs must be quantize_qkv(q, k, v) of q {tuple(q.shape)}, got q8 "
                f"{tuple(quant.q8.shape)}, k8 {tuple(quant.k8.shape)}, row scales {tuple(quant.row_scale.shape)}")
    if quant.q8.dtype != torch.int8 or quant.k8.dtype != torch.int8 or quant.row_scale.dtype != torch.float32:
        return f"q8, k8 must be int8 and the row scales float32, got {quant.q8.dtype}, {quant.k8.dtype}, " \
               f"{quant.row_scale.dtype}"
    expected = (B, H, D, S) if quant.fp8_pv else (B, H, S, D)
    if quant.v.shape != expected or (quant.fp8_pv and quant.v.dtype != E4M3):
        return f"quantized v must be {'e4m3 ' if quant.fp8_pv else ''}{expected}, got {quant.v.dtype} " \
               f"{tuple(quant.v.shape)}"
    if not quant.row_scale.is_contiguous() or (quant.fp8_pv and not quant.v_scale.is_contiguous()):
        return "the quantization scales must be contiguous"
    if quant.q8.stride(-1) != 1 or quant.k8.stride(-1) != 1 or quant.v.stride(-1) != 1:
        return "the last dimension of the quantized tensors must be contiguous"
    return None


def check_call(name: str, problem: str | None, q: torch.Tensor, widths: torch.Tensor, num_image_tokens: int,
               num_text_tokens: int) -> None:
    """Raise ``ValueError`` (prefixed with the launcher's name) for an input problem, a token count that does not make
    the sequence length, or a width table that is not ``[B, H]`` on q's device."""
    if problem:
        raise ValueError(f"{name}: {problem}")
    B, H, S, _ = q.shape
    if num_image_tokens < 1 or num_text_tokens < 0 or num_image_tokens + num_text_tokens != S:
        raise ValueError(f"{name}: {num_image_tokens} image + {num_text_tokens} text tokens do not make the sequence "
                         f"length {S}")
    if widths.shape != (B, H) or widths.device != q.device:
        raise ValueError(f"{name}: widths must be [B, H] = {(B, H)} on {q.device}, got {tuple(widths.shape)} on "
                         f"{widths.device}")


#: DITFA_TRITON_TMA=0 switches the Hopper copy-engine loads off (pointer loads everywhere); DITFA_TRITON_TMA_8BIT=0
#: only in the 8-bit launches
USE_TMA = os.environ.get("DITFA_TRITON_TMA", "1") != "0"
USE_TMA_8BIT = os.environ.get("DITFA_TRITON_TMA_8BIT", "1") != "0"


_HOPPER: dict[torch.device, bool] = {}


def _hopper(device: torch.device) -> bool:
    """Tensor descriptors allowed: a Hopper-or-newer GPU, not the interpreter, not switched off (asked once per
    device)."""
    found = _HOPPER.get(device)
    if found is None:
        found = _HOPPER[device] = (not INTERPRET and USE_TMA and device.type == "cuda"
                                   and torch.cuda.get_device_capability(device)[0] >= 9)
    return found


def _aligned(t: torch.Tensor) -> bool:
    """Every head's [S, D] rows of ``t`` 16-byte aligned (what a tensor descriptor needs)."""
    return t.data_ptr() % 16 == 0 and all((st * t.element_size()) % 16 == 0 for st in t.stride()[:-1])


def _tma_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Tensor descriptors on Hopper or newer, when every head's [S, D] keys and values are 16-byte aligned."""
    return _hopper(q.device) and _aligned(k) and _aligned(v)


def _descriptor_hook(nargs):
    """Autotuning changes BLOCK_M / BLOCK_N: give the K/V (and Out) descriptors the matching block shapes."""
    if nargs.get("USE_TMA"):
        nargs["K"].block_shape = [1, 1, nargs["BLOCK_N"], nargs["HEAD_DIM"]]
        nargs["V"].block_shape = ([1, 1, nargs["HEAD_DIM"], nargs["BLOCK_N"]] if nargs.get("QUANT") == QUANT_QK_PV
                                  else [1, 1, nargs["BLOCK_N"], nargs["HEAD_DIM"]])
    if nargs.get("TMA_STORE"):
        nargs["Out"].block_shape = [1, 1, nargs["BLOCK_M"], nargs["HEAD_DIM"]]
    if nargs.get("Q_TMA"):
        nargs["Q"].block_shape = [1, 1, nargs["BLOCK_M"], nargs["HEAD_DIM"]]


def _flat_widths(widths) -> list[int]:
    """``widths`` (a ``[B, H]`` tensor, or its rows as Python ints) flattened to ints, sample-major."""
    rows = widths.tolist() if isinstance(widths, torch.Tensor) else widths
    return [int(w) for row in rows for w in row]


def launch_table(widths, drop_skipped: bool = False) -> torch.Tensor:
    """The kernel's launch table: ``[B * H, 2]`` int32 rows ``(sample * H + head, width)`` by decreasing width, on the
    device of ``widths`` (a ``[B, H]`` tensor, read on the host) or, from rows of ints, on the CPU. ``drop_skipped``:
    only the computed pairs' rows (the kernel launches one head's tiles per row; a launch that computes some heads
    in 8 bits and the rest in bf16 is two launches, each with the rows of its own heads)."""
    flat = _flat_widths(widths)
    order = sorted(range(len(flat)), key=lambda i: -flat[i])  # Python's sort is stable: ties keep their order
    if drop_skipped:
        order = [i for i in order if flat[i]]
    device = widths.device if isinstance(widths, torch.Tensor) else "cpu"
    return torch.tensor([[i, flat[i]] for i in order], dtype=torch.int32, device=device).reshape(len(order), 2)


def tune_key(widths) -> int:
    """The autotuning key of a plan: log2 of the mean band width of its computed heads, rounded (0 when none).

    Image tiles run text chunks plus ``width`` band blocks, so the best tile shape and pipeline depth depend on the
    plan: all-arrow-1/16 plans want other configurations than full heads. Reads ``widths`` (a tensor or rows of
    ints) on the host (give the key to `headwise_attention` to avoid a device sync)."""
    computed = [w for w in _flat_widths(widths) if w > 0]
    return 0 if not computed else max(0, round(math.log2(sum(computed) / len(computed))))


def headwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, widths: torch.Tensor,
                       num_image_tokens: int, num_text_tokens: int, image_first: bool, block_size: int,
                       out: torch.Tensor | None = None, lse: torch.Tensor | None = None, store_lse: bool = True,
                       table: torch.Tensor | None = None, key: int | None = None,
                       config: triton.Config | None = None, quant: QuantizedQKV | None = None):
    """Launch the kernel. ``widths``: ``[B, H]`` int32 on q's device; ``table``: `launch_table(widths)` (on q's
    device; or only some of its rows, e.g. ``drop_skipped``) and ``key``: `tune_key(widths)` (both computed when not
    given). Returns ``(out, lse)``; with ``store_lse=False`` and no ``lse`` given, ``lse`` is a one-element
    placeholder.

    ``out`` / ``lse`` may be given (e.g. poisoned by tests); skipped (sample, head) entries are never written.
    ``config`` runs one configuration (``BLOCK_M``, ``BLOCK_N``, warps, stages) instead of the autotuned choice
    (benchmarks); its tiles must divide ``block_size``.
    ``quant``: `quantize_qkv(q, k, v)` of these inputs: the table's heads are computed from those 8-bit tensors
    (`ditfa_optimum.fp8_attention`'s scheme; q, k, v then give only the shapes and the output dtype).
    """
    check_call("headwise_attention", check_inputs(q, k, v, block_size), q, widths, num_image_tokens, num_text_tokens)
    B, H, S, D = q.shape
    n_blk = -(-num_image_tokens // block_size)
    widths = widths.to(torch.int32).contiguous()
    table = launch_table(widths) if table is None else table
    if (table.dim() != 2 or table.shape[1] != 2 or table.shape[0] > B * H or table.dtype != torch.int32
            or table.device != q.device):
        raise ValueError(f"headwise_attention: table must be launch_table(widths) (or some of its rows), [{B * H}, 2] "
                         f"int32 on {q.device}, got {tuple(table.shape)} {table.dtype} on {table.device}")
    if quant is not None:
        problem = check_quantized(quant, q, block_size)
        if problem:
            raise ValueError(f"headwise_attention: {problem}")
    key = tune_key(widths) if key is None else key
    if out is None:
        out = torch.empty(B, H, S, D, dtype=q.dtype, device=q.device)
    if lse is None:  # not stored: a placeholder the kernel never reads
        lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device) if store_lse else _placeholder(q.device)

    if table.shape[0] == 0:
        return out, lse
    row_scale = v_scale = lse  # placeholders the kernel does not read unless QUANT
    if quant is not None:  # the kernel reads the 8-bit tensors; q keeps giving the output dtype
        q, k, v, row_scale = quant.q8, quant.k8, quant.v, quant.row_scale
        v_scale = quant.v_scale if quant.fp8_pv else lse
    # the output by bulk copies (Hopper) when no query tile straddles the two segments: the first segment (text or
    # image) ends on a tile boundary (128 is a multiple of every tile), the second at S, where the copy clips.
    # Measured: storing from registers cost ~2.8 us of an SM per tile (docs/benchmarks.md)
    first = num_image_tokens if image_first else num_text_tokens
    # e4m3 V is stored [B, H, D, S]: a bulk copy's start along S (its contiguous dim) must be 16-byte aligned, and the
    # second segment's keys start at `first` (an unaligned start met an illegal instruction on an H200)
    use_tma = _tma_ok(q, k, v) and (quant is None or (USE_TMA_8BIT and (not quant.fp8_pv or first % 16 == 0)))
    tma_store = use_tma and _aligned(out) and first % 128 == 0
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_arg = TensorDescriptor.from_tensor(k, [1, 1, 64, D])  # blocks set per config
        v_arg = TensorDescriptor.from_tensor(v, [1, 1, D, 64] if quant is not None and quant.fp8_pv else [1, 1, 64, D])
    else:
        k_arg, v_arg = k, v
    o_arg = TensorDescriptor.from_tensor(out, [1, 1, 64, D]) if tma_store else out
    q_tma = tma_store and _aligned(q)  # the same condition: no query tile straddles the segments
    q_arg = TensorDescriptor.from_tensor(q, [1, 1, 64, D]) if q_tma else q
    numbers = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
               H, S, num_text_tokens, num_image_tokens, n_blk, D ** -0.5, key)
    args = (q_arg, k_arg, v_arg, o_arg, lse, table.contiguous(), row_scale, v_scale, *numbers)
    consts = dict(HEAD_DIM=D, BS=block_size, IMAGE_FIRST=bool(image_first), STORE_LSE=store_lse,
                  PRECISION="ieee" if v.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (no TF32)
                  USE_TMA=use_tma, TMA_STORE=tma_store, Q_TMA=q_tma,
                  QUANT=QUANT_NONE if quant is None else QUANT_QK_PV if quant.fp8_pv else QUANT_QK)

    def grid(meta):
        bm = meta["BLOCK_M"]
        return ((triton.cdiv(num_text_tokens, bm) + n_blk * (block_size // bm)) * table.shape[0],)

    if config is not None:
        meta = config.all_kwargs()
        if block_size % meta["BLOCK_M"] or block_size % meta["BLOCK_N"]:
            raise ValueError(f"headwise_attention: config tiles {meta['BLOCK_M']}x{meta['BLOCK_N']} must divide the "
                             f"mask block size {block_size}")
        _descriptor_hook({**consts, "Q": q_arg, "K": k_arg, "V": v_arg, "Out": o_arg, "BLOCK_M": meta["BLOCK_M"],
                          "BLOCK_N": meta["BLOCK_N"]})
        _headwise_attention_kernel[grid(meta)](*args, **consts, **meta)
    elif INTERPRET or not AUTOTUNE or block_size % 64:
        # one fixed tile that divides the block size (the CPU interpreter: the smallest, fastest to simulate)
        tile = 16 if INTERPRET else max(t for t in (64, 32, 16) if block_size % t == 0)
        _descriptor_hook({**consts, "Q": q_arg, "K": k_arg, "V": v_arg, "Out": o_arg, "BLOCK_M": tile,
                          "BLOCK_N": tile})
        _headwise_attention_kernel[grid({"BLOCK_M": tile})](*args, **consts, BLOCK_M=tile, BLOCK_N=tile,
                                                            num_warps=1 if INTERPRET else 4, num_stages=2)
    else:
        _launch_tuned(grid, args, consts, dict(Q=q_arg, K=k_arg, V=v_arg, Out=o_arg),
                      (q.device, q.dtype, k.dtype, v.dtype, row_scale.dtype, v_scale.dtype, table.shape[0],
                       *numbers))
    return out, lse


_PLACEHOLDERS: dict[torch.device, torch.Tensor] = {}


def _placeholder(device: torch.device) -> torch.Tensor:
    """One float32 element on ``device``: the LSE pointer of a launch that stores none."""
    if device not in _PLACEHOLDERS:
        _PLACEHOLDERS[device] = torch.empty(1, dtype=torch.float32, device=device)
    return _PLACEHOLDERS[device]


#: the configuration the autotuner chose, by everything a launch's tuning depends on (`_launch_tuned`)
_TUNED: dict[tuple, triton.Config] = {}


def _launch_tuned(grid, args: tuple, consts: dict, descriptors: dict, shape_key: tuple) -> None:
    """Launch with the autotuned configuration. The first launch of a ``shape_key`` (device, dtypes, launch-table
    rows, the integer arguments: more specific than the autotuner's own key) goes through the autotuner; later ones
    launch its choice directly, skipping its per-call dispatch (argument dictionaries, key, hooks), which measured
    as a large share of the host time of a call (docs/benchmarks.md, host time)."""
    key = (shape_key, tuple(consts.items()))
    config = _TUNED.get(key)
    if config is None:
        _autotuned_kernel[grid](*args, **consts)
        _TUNED[key] = _autotuned_kernel.best_config
        return
    meta = config.all_kwargs()
    _descriptor_hook({**consts, **descriptors, "BLOCK_M": meta["BLOCK_M"], "BLOCK_N": meta["BLOCK_N"]})
    _headwise_attention_kernel[grid(meta)](*args, **consts, **meta)
