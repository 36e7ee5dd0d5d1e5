"""`arrow_int8(fraction)`: arrow attention (`arrow`) with Q.K^T in INT8, as `full_int8` computes it.

Its cost is its kept pairs' FLOPs at the measured price of an 8-bit arrow head, `COST_FACTOR` times a bf16 one's:
above 1 on Hopper today, because the quantization pre-pass reads the whole head while the band computes a fraction
of it, so the search picks it only where a measured cost model (`cost_model="measured"`) finds it cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..fp8_attention import quantize_qkv, quantized_attention
from ..masks import TokenLayout, arrow_kept_pairs, arrow_mask
from .arrow import Arrow
from .base import register_method


@register_method
@dataclass(frozen=True)
class ArrowInt8(Arrow):
    name = "arrow_int8"
    method_id = 6
    quantized = True
    #: time of an 8-bit arrow-1/8 head over a bf16 one, the pre-pass included: 1.10 for SD3-medium and FLUX.1-dev
    #: at 2048^2 on an H200 (docs/benchmarks.md, "FP8 attention in the fused kernel")
    COST_FACTOR = 1.10

    def kernel_widths(self, layout: TokenLayout, batch_size: int, cfg: bool) -> list[int]:
        return [-self.width(layout)] * batch_size

    def flops(self, layout: TokenLayout, head_dim: int, cfg: bool) -> float:
        """bf16-equivalent attention FLOPs: the kept pairs' FLOPs at `COST_FACTOR`."""
        return self.COST_FACTOR * 4.0 * head_dim * arrow_kept_pairs(layout, self.width(layout))

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        keep = arrow_mask(layout, self.width(layout), device=q.device)
        return quantized_attention(quantize_qkv(q, k, v, fp8_pv=False), keep, dtype=q.dtype)
