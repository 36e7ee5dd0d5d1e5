"""`full_int8`: dense attention with Q.K^T in INT8 (`ditfa_optimum.fp8_attention`'s scheme: Q per token, K smoothed
per head; P.V in the model's dtype). Hopper's tensor cores run INT8 at the FP8 rate; INT8 rounds this model family's
sharp, RMS-normed scores better than e4m3 (3.9e-3 relative error on the trained miniature model's attention against
1.65e-2 for e4m3 Q.K^T, docs/benchmarks.md).

Its cost is its FLOPs at the measured price of an 8-bit head: `COST_FACTOR` times a bf16 head's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..fp8_attention import quantize_qkv, quantized_attention
from ..masks import TokenLayout
from .base import AttentionMethod, dense_flops, register_method


@register_method
@dataclass(frozen=True)
class FullInt8(AttentionMethod):
    name = "full_int8"
    method_id = 5
    #: computed by the backend in 8 bits: its kernel widths are negative (`ditfa_optimum.runtime.backends`)
    quantized = True
    #: time of an 8-bit full head over a bf16 one, the quantization pre-pass included: 0.97 (SD3-medium, D=64) and
    #: 0.93 (FLUX.1-dev, D=128) at 2048^2 on an H200 (docs/benchmarks.md, "FP8 attention in the fused kernel")
    COST_FACTOR = 0.95

    def kernel_widths(self, layout: TokenLayout, batch_size: int, cfg: bool) -> list[int]:
        return [-layout.num_image_blocks] * batch_size

    def flops(self, layout: TokenLayout, head_dim: int, cfg: bool) -> float:
        """bf16-equivalent attention FLOPs: the dense FLOPs at `COST_FACTOR`."""
        return self.COST_FACTOR * dense_flops(layout, head_dim)

    @staticmethod
    def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The scheme on ``[B, H, S, D]`` tensors, in q's dtype."""
        return quantized_attention(quantize_qkv(q, k, v, fp8_pv=False), dtype=q.dtype)
