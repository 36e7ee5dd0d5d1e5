"""`full`: dense attention for this head."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import TokenLayout
from .base import AttentionMethod, dense_flops, register_method, sdpa_reference


@register_method
@dataclass(frozen=True)
class Full(AttentionMethod):
    name = "full"
    method_id = 0

    def kernel_widths(self, layout: TokenLayout, batch_size: int, cfg: bool) -> list[int]:
        return [layout.num_image_blocks] * batch_size

    def flops(self, layout: TokenLayout, head_dim: int, cfg: bool) -> float:
        return dense_flops(layout, head_dim)

    @staticmethod
    def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Dense attention on ``[..., S, D]`` tensors."""
        return sdpa_reference(q, k, v)
