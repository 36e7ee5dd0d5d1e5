"""The 8-bit heads' quantization pre-pass in two Triton launches, over the heads a plan computes in 8 bits: `ditfa_optimum.fp8_attention.quantize_qkv`'s
scheme, fused (PyTorch's eager version takes about as long as the attention kernel itself at 2K: 1.05 ms for SD3,
1.9 ms for FLUX on an H200, docs/benchmarks.md).

1. ``_stats_kernel``, grid ``(heads, SPLITS)``: each program reduces one slice of the tokens of one head to per-channel
   partials: the keys' sum, minimum and maximum, the values' absolute maximum (``[heads, SPLITS, D]`` each).
2. ``_quantize_kernel``, grid ``(heads, cdiv(S, BLOCK))``: each program combines its head's partials (the keys' mean,
   the head's key scale ``max |k - mean| / 127``, the values' channel scales ``amax / 448``) and writes one block of
   tokens: Q in INT8 per token with its row scale, the smoothed K in INT8, V in e4m3 into the transposed ``[B, H, D,
   S]`` buffer.

Divisions are IEEE-rounded (``div_rn``: Triton's ``/`` is an approximate division, which moved 0.07-0.15% of the INT8
values by one level against PyTorch's on an H200) and rounding to INT8 is round-half-to-even, as ``torch.round``
(adding and subtracting 1.5 * 2^23), so the INT8 tensors equal the PyTorch pre-pass's; the e4m3 conversion is
the hardware's (round to nearest even; Triton's CPU interpreter rounds differently, so on the CPU the runtime uses the
PyTorch pre-pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fp8_attention import E4M3, LOG2E, QuantizedQKV

SPLITS = 16  # token slices per head in the statistics pass (B * H * 16 programs: every SM busy at B = 1)
BLOCK = 64  # tokens per program of the quantization pass
#: 1.5 * 2^23: (x + _ROUND) - _ROUND rounds a float32 |x| < 2^22 to the nearest even integer
_ROUND = tl.constexpr(12582912.0)


@triton.jit
def _stats_kernel(K, V, KSum, KMin, KMax, VMax, Heads, stride_heads, stride_kb, stride_kh, stride_ks, stride_vb,
                  stride_vh, stride_vs, H, S, chunk,
                  WITH_V: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)  # this program's head: sample * H + head, from the list of heads to quantize
    bh = tl.load(Heads + row * stride_heads)
    k_head = K + (bh // H).to(tl.int64) * stride_kb + (bh % H).to(tl.int64) * stride_kh
    v_head = V + (bh // H).to(tl.int64) * stride_vb + (bh % H).to(tl.int64) * stride_vh
    split = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_DIM)
    k_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    k_min = tl.full([HEAD_DIM], float("inf"), dtype=tl.float32)
    k_max = tl.full([HEAD_DIM], float("-inf"), dtype=tl.float32)
    v_max = tl.zeros([HEAD_DIM], dtype=tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, S)
    for start in range(lo, hi, BLOCK_S):
        rows = start + tl.arange(0, BLOCK_S)
        ok = (rows < hi)[:, None]
        k = tl.load(k_head + rows[:, None] * stride_ks + offs_d[None, :], mask=ok,
                    other=0.0).to(tl.float32)
        k_sum += tl.sum(k, 0)
        k_min = tl.minimum(k_min, tl.min(tl.where(ok, k, float("inf")), 0))
        k_max = tl.maximum(k_max, tl.max(tl.where(ok, k, float("-inf")), 0))
        if WITH_V:
            v = tl.load(v_head + rows[:, None] * stride_vs + offs_d[None, :], mask=ok,
                        other=0.0).to(tl.float32)
            v_max = tl.maximum(v_max, tl.max(tl.abs(v), 0))
    out = (row * tl.num_programs(1) + split) * HEAD_DIM + offs_d
    tl.store(KSum + out, k_sum)
    tl.store(KMin + out, k_min)
    tl.store(KMax + out, k_max)
    if WITH_V:
        tl.store(VMax + out, v_max)


@triton.jit
def _quantize_kernel(Q, K, V, Q8, K8, VT, RowScale, VScale, KSum, KMin, KMax, VMax, Heads, stride_heads,
                     stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                     stride_vth, stride_vtd, H, S, sm_scale_log2e,
                     WITH_V: tl.constexpr, SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    bh = tl.load(Heads + row * stride_heads).to(tl.int64)  # outputs: contiguous, indexed by sample * H + head
    b = bh // H
    h = bh % H
    rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = rows < S
    # this head's statistics from the partials of every slice
    part = (row * SPLITS + tl.arange(0, SPLITS))[:, None] * HEAD_DIM + offs_d[None, :]
    k_mean = tl.sum(tl.load(KSum + part), 0) / S
    k_amax = tl.max(tl.maximum(tl.max(tl.load(KMax + part), 0) - k_mean, k_mean - tl.min(tl.load(KMin + part), 0)),
                    0)
    k_scale = tl.where(k_amax > 0, k_amax / 127.0, 1.0)

    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :], mask=ok[:, None],
                other=0.0).to(tl.float32)
    q_amax = tl.max(tl.abs(q), 1)
    q_scale = tl.where(q_amax > 0, q_amax / 127.0, 1.0)
    q8 = tl.minimum(tl.maximum((tl.math.div_rn(q, q_scale[:, None]) + _ROUND) - _ROUND, -127.0), 127.0)
    tile = bh * S * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]  # Q8, K8: contiguous [B, H, S, D]
    tl.store(Q8 + tile, q8.to(tl.int8), mask=ok[:, None])
    tl.store(RowScale + bh * S + rows, q_scale * k_scale * sm_scale_log2e, mask=ok)

    k = tl.load(K + b * stride_kb + h * stride_kh + rows[:, None] * stride_ks + offs_d[None, :], mask=ok[:, None],
                other=0.0).to(tl.float32)
    k8 = tl.minimum(tl.maximum((tl.math.div_rn(k - k_mean[None, :], k_scale) + _ROUND) - _ROUND, -127.0), 127.0)
    tl.store(K8 + tile, k8.to(tl.int8), mask=ok[:, None])

    if WITH_V:
        v_amax = tl.max(tl.load(VMax + part), 0)
        v_scale = tl.where(v_amax > 0, v_amax / 448.0, 1.0)
        if tl.program_id(1) == 0:
            tl.store(VScale + bh * HEAD_DIM + offs_d, v_scale)
        v = tl.load(V + b * stride_vb + h * stride_vh + rows[:, None] * stride_vs + offs_d[None, :], mask=ok[:, None],
                    other=0.0).to(tl.float32)
        v8 = tl.minimum(tl.maximum(tl.math.div_rn(v, v_scale[None, :]), -448.0), 448.0).to(VT.dtype.element_ty)
        tl.store(VT + bh * stride_vth + offs_d[None, :] * stride_vtd + rows[:, None], v8, mask=ok[:, None])


def quantize_qkv_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8_pv: bool = True,
                       heads: torch.Tensor | None = None) -> QuantizedQKV:
    """`ditfa_optimum.fp8_attention.quantize_qkv` in two Triton launches (``q, k, v``: ``[B, H, S, D]`` of one float
    dtype, any strides with the last dimension contiguous, e.g. diffusers' ``[B, S, H, D]`` transposed; head dim a
    power of two). ``heads``: a 1-D int32 tensor on q's device of the ``sample * H + head`` indices to quantize (any
    stride, e.g. the first column of a launch table); the other heads' entries are left unwritten. Default: all."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be [B, H, S, D] of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, S, D = q.shape
    if D & (D - 1) or any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError(f"the fused pre-pass needs a power-of-two head dim and contiguous channels, got D={D}, "
                         f"strides {q.stride()}, {k.stride()}, {v.stride()}")
    dev = q.device
    if heads is None:
        heads = torch.arange(B * H, dtype=torch.int32, device=dev)
    if heads.dim() != 1 or heads.dtype != torch.int32 or heads.device != dev:
        raise ValueError(f"heads must be a 1-D int32 tensor on {dev}, got {tuple(heads.shape)} {heads.dtype} on "
                         f"{heads.device}")
    n = heads.shape[0]
    partial = [torch.empty(max(n, 1), SPLITS, D, dtype=torch.float32, device=dev) for _ in range(4)]
    chunk = -(-S // SPLITS)
    if n:
        _stats_kernel[(n, SPLITS)](k, v, *partial, heads, heads.stride(0), *k.stride()[:3], *v.stride()[:3], H, S,
                                   chunk, WITH_V=fp8_pv, HEAD_DIM=D, BLOCK_S=32)
    q8 = torch.empty(B, H, S, D, dtype=torch.int8, device=dev)
    k8 = torch.empty_like(q8)
    row_scale = torch.empty(B, H, S, dtype=torch.float32, device=dev)
    if fp8_pv:
        padded = -(-S // 16) * 16
        vt = torch.empty(B, H, D, padded, dtype=E4M3, device=dev)
        v_scale = torch.empty(B, H, D, dtype=torch.float32, device=dev)
    else:
        vt, v_scale = q8, row_scale  # not read
    if n:
        _quantize_kernel[(n, triton.cdiv(S, BLOCK))](
            q, k, v, q8, k8, vt, row_scale, v_scale, *partial, heads, heads.stride(0), *q.stride()[:3],
            *k.stride()[:3], *v.stride()[:3],
            vt.stride(1) if fp8_pv else 0, vt.stride(2) if fp8_pv else 0, H, S, D ** -0.5 * LOG2E,
            WITH_V=fp8_pv, SPLITS=SPLITS, HEAD_DIM=D, BLOCK_S=BLOCK)
    if not fp8_pv:
        return QuantizedQKV(q8, k8, row_scale, v, None)
    return QuantizedQKV(q8, k8, row_scale, vt[..., :S], v_scale)

