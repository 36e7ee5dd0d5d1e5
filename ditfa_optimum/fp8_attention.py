"""FP8 (e4m3) attention in PyTorch: the numerical scheme of the quantized attention methods (issue 16), and the
reference their fused kernel path is checked against.

The scheme, per (sample, head), for a query row's softmax over its kept keys:

1. **K smoothing** (``smooth_k``): subtract the keys' mean over the tokens, per channel. Every score of a query row
   moves by the same ``q . mean``, which the softmax cancels, so exact attention is unchanged; the quantized keys
   lose the shared offset that would otherwise eat their range (a channel whose keys all sit near +8 leaves the
   per-token differences, which carry the attention, a few levels of e4m3).
2. **Q and K in e4m3** with one float32 scale per (sample, head) (``granularity="head"``) or per block of ``block``
   consecutive tokens (``"block"``, the tiles a kernel loads): ``scale = amax / 448``, ``x8 = round(x / scale)``.
3. **Scores** ``(q8 . k8^T) * scale_q * scale_k`` accumulated in float32 (the FP8 tensor cores' accumulator), masked,
   softmax statistics (row max, row sum) in float32.
4. **P in e4m3**: the exponentials lie in [0, 1]; they are scaled by 448 (the format's largest value) and rounded.
5. **V in e4m3** with one scale per (sample, head, channel): a channel scale multiplies the output column, so it is
   applied after the product, where a kernel can apply it too.
6. ``out = (p8 . v8) * scale_v / (448 * row sum)``.

Variants (`fp8_attention`'s keywords): Q and K in INT8 instead (``qk_format="int8"``, SageAttention's choice;
Hopper's INT8 tensor cores run at the FP8 rate), P.V in bfloat16 (``fp8_pv=False``), V smoothed like K
(``smooth_v``). Measured on the trained miniature model's attention (docs/benchmarks.md, "FP8 attention"): all in
e4m3 1.8e-2 relative error, INT8 Q.K^T with e4m3 P.V 7.6e-3, INT8 Q.K^T with bfloat16 P.V 3.9e-3 (bfloat16
attention 2.0e-3).

The scheme the fused kernel runs (`quantize_qkv`, `quantized_attention`; bottom of this module) is the measured best
split: Q in INT8 per token, K smoothed in INT8 per (sample, head), P.V in the inputs' dtype or in e4m3.

Rounding is emulated by casting to ``torch.float8_e4m3fn`` (round to nearest even, as the hardware conversion) or
rounding to integers, so this runs on any device and in CI; products of two e4m3 (or INT8) values are exact in
float32, so only the accumulation order differs from a kernel. `relative_error` is the measure the issue sets (goal
5e-3, SageAttention's 1.3e-2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
INT8_MAX = 127.0
GRANULARITIES = ("head", "block")
QK_FORMATS = ("e4m3", "int8")


def quantize(x: torch.Tensor, granularity: str = "head", block: int = 128, per_channel: bool = False,
             fmt: str = "e4m3") -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (``[..., S, D]``) rounded to e4m3 (or INT8) and the float32 scales that dequantize it
    (``x8.float() * scale``).

    Args:
        granularity: "head": one scale per leading index (sample, head); "block": one per ``block`` consecutive
            tokens of it (the last block may be shorter); either shared by the channels (Q, K). Ignored with
            ``per_channel``.
        per_channel: one scale per channel over all tokens instead (V).
        fmt: "e4m3" (float8, 3 mantissa bits) or "int8" (integers in [-127, 127], as float32 values: Hopper's INT8
            tensor cores run at the FP8 rate).

    Returns ``(x8, scale)``, ``scale`` broadcastable against ``x``: ``[..., 1, 1]``, ``[..., S, 1]`` or ``[..., 1,
    D]``. An all-zero group gets scale 1 (it quantizes to zeros either way).
    """
    if fmt not in QK_FORMATS:
        raise ValueError(f"fmt must be one of {QK_FORMATS}, got {fmt!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if block < 1:
        raise ValueError(f"block must be a positive number of tokens, got {block}")
    xf = x.float()
    if per_channel:
        amax = xf.abs().amax(dim=-2, keepdim=True)
    elif granularity == "head":
        amax = xf.abs().amax(dim=(-2, -1), keepdim=True)
    else:
        S = xf.shape[-2]
        pad = (-S) % block
        padded = F.pad(xf.abs().amax(dim=-1), (0, pad))  # [..., S + pad]
        amax = padded.unflatten(-1, (-1, block)).amax(dim=-1)  # [..., blocks]
        amax = amax.repeat_interleave(block, dim=-1)[..., :S, None]
    top = E4M3_MAX if fmt == "e4m3" else INT8_MAX
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    scaled = (xf / scale).clamp(-top, top)
    return (scaled.to(E4M3) if fmt == "e4m3" else torch.round(scaled)), scale


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None, *,
                  granularity: str = "head", block: int = 128, smooth_k: bool = True, fp8_pv: bool = True,
                  smooth_v: bool = False, qk_format: str = "e4m3") -> torch.Tensor:
    """Attention of ``q, k, v`` (``[B, H, S, D]``, any float dtype) computed as the module docstring says; float32
    output. ``keep``: optional boolean ``[S, S]`` (or broadcastable) mask of the kept (query, key) pairs, every row
    keeping at least one key (an arrow mask: `ditfa_optimum.masks.arrow_mask`).

    Variants: ``fp8_pv=False`` keeps P and V in bfloat16 (only Q.K^T in FP8, SageAttention's split with FP8 in place
    of INT8); ``smooth_v`` subtracts V's per-channel mean before quantizing it and adds it back to the output
    (exact: each output row is a convex combination of V's rows); ``qk_format="int8"`` rounds Q and K to INT8
    instead (SageAttention's choice for Q.K^T)."""
    if q.dim() != 4 or q.shape != k.shape or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"q, k, v must be [B, H, S, D] with the same B, H, S (and q, k the same D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    kf = k.float()
    if smooth_k:
        kf = kf - kf.mean(dim=-2, keepdim=True)
    q8, sq = quantize(q, granularity, block, fmt=qk_format)
    k8, sk = quantize(kf, granularity, block, fmt=qk_format)
    vf = v.float()
    v_mean = vf.mean(dim=-2, keepdim=True) if smooth_v else torch.zeros_like(vf[..., :1, :])
    scores = (q8.float() @ k8.float().transpose(-1, -2)) * (sq * sk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    if not fp8_pv:
        pv = p.bfloat16().float() @ (vf - v_mean).bfloat16().float()
        return pv / p.sum(dim=-1, keepdim=True) + v_mean
    v8, sv = quantize(vf - v_mean, per_channel=True)
    p8 = (p * E4M3_MAX).to(E4M3)
    return (p8.float() @ v8.float()) * sv / (E4M3_MAX * p.sum(dim=-1, keepdim=True)) + v_mean


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """The float64 attention the quantized one is measured against (float32 output)."""
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep).float()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` over the whole tensor (Frobenius norms)."""
    ref = ref.float()
    return float((out.float() - ref).norm() / ref.norm())


# ---- the shipped scheme: what the quantized methods compute and the fused kernel runs --------------------------------

#: the 8-bit heads' scheme as plans record it (`CompressionPlan.to_json_dict`'s "attention_quantization"); change it
#: whenever what `quantize_qkv` / `quantized_attention` compute changes
SCHEME = "int8-qk:q-per-token,k-smoothed-per-head;pv-model-dtype"
LOG2E = 1.4426950408889634
#: P is scaled by the format's largest value before rounding to e4m3 (the softmax's row
#: maxima become 448, the smallest kept probabilities stay above e4m3's subnormals); the row sums carry the same
#: factor, so it cancels
P_SCALE = E4M3_MAX


@dataclass(frozen=True)
class QuantizedQKV:
    """One attention call's inputs in 8 bits, as the fused kernel reads them (`quantize_qkv`).

    Attributes:
        q8: ``[B, H, S, D]`` int8, each query token scaled by its own absolute maximum.
        k8: ``[B, H, S, D]`` int8: the keys minus their per-channel mean over the tokens (K smoothing, exact under
            softmax), one scale per (sample, head).
        row_scale: ``[B, H, S]`` float32: ``q_scale * k_scale * D**-0.5 * log2(e)``, what turns an integer score
            into the base-2 logit the kernel exponentiates.
        v: ``[B, H, S, D]``: V in bf16/fp16/fp32 as given (``fp8_pv=False``), or e4m3 laid out ``[B, H, D, S]``
            (a transposed view of a buffer whose rows are padded to 16 bytes: the FP8 tensor cores take P.V's
            right operand K-major), each channel scaled by its absolute maximum over the tokens.
        v_scale: ``[B, H, D]`` float32 channel scales of the e4m3 V (None with ``fp8_pv=False``).
    """

    q8: torch.Tensor
    k8: torch.Tensor
    row_scale: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor | None

    @property
    def fp8_pv(self) -> bool:
        return self.v_scale is not None


def _scale(amax: torch.Tensor, top: float) -> torch.Tensor:
    return torch.where(amax > 0, amax / top, torch.ones_like(amax))


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8_pv: bool = True) -> QuantizedQKV:
    """Quantize one attention call's ``q, k, v`` (``[B, H, S, D]``, one float dtype) for `quantized_attention` and
    the fused kernel: Q in INT8 per token, K smoothed and in INT8 per (sample, head), V in e4m3 per channel (or kept
    as it is with ``fp8_pv=False``). Plain PyTorch on any device."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be [B, H, S, D] of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, S, D = q.shape
    qf = q.float()
    q_scale = _scale(qf.abs().amax(dim=-1, keepdim=True), INT8_MAX)  # [B, H, S, 1]
    q8 = torch.round(qf / q_scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    kf = k.float()
    kf = kf - kf.mean(dim=-2, keepdim=True)
    k_scale = _scale(kf.abs().amax(dim=(-2, -1), keepdim=True), INT8_MAX)  # [B, H, 1, 1]
    k8 = torch.round(kf / k_scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    row_scale = (q_scale * k_scale * (D ** -0.5 * LOG2E)).squeeze(-1).contiguous()
    if not fp8_pv:
        return QuantizedQKV(q8, k8, row_scale, v, None)
    vf = v.float()
    v_scale = _scale(vf.abs().amax(dim=-2), E4M3_MAX)  # [B, H, D]
    padded = -(-S // 16) * 16
    vt = torch.empty(B, H, D, padded, dtype=E4M3, device=v.device)[..., :S]
    vt.copy_((vf / v_scale[..., None, :]).clamp_(-E4M3_MAX, E4M3_MAX).transpose(-1, -2))
    return QuantizedQKV(q8, k8, row_scale, vt, v_scale.contiguous())


def quantized_attention(qq: QuantizedQKV, keep: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
                        ) -> torch.Tensor:
    """Attention computed from `quantize_qkv`'s tensors the way the fused kernel computes it (integer scores, base-2
    softmax in float32, P rounded to e4m3 after scaling by `P_SCALE` when V is in e4m3, else to ``v``'s dtype);
    ``keep`` as in `fp8_attention`. Output ``[B, H, S, D]`` in ``dtype``."""
    scores = (qq.q8.float() @ qq.k8.float().transpose(-1, -2)) * qq.row_scale[..., None]  # base-2 logits
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    p = torch.exp2(scores - scores.amax(dim=-1, keepdim=True))
    if qq.fp8_pv:
        p = p * P_SCALE
        out = (p.to(E4M3).float() @ qq.v.float().transpose(-1, -2)) * qq.v_scale[..., None, :]
    else:
        out = p.to(qq.v.dtype).float() @ qq.v.float()
    return (out / p.sum(dim=-1, keepdim=True)).to(dtype)
