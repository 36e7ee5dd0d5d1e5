"""`arrow(fraction)`: text rows and text columns dense, image x image only inside the diagonal band.

The mask itself is defined once, in :mod:`ditfa_optimum.masks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import TokenLayout, arrow_kept_pairs, arrow_mask, window_blocks
from .base import AttentionMethod, register_method, sdpa_reference


def check_fraction(fraction) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"arrow fraction must be a number in (0, 1], got {fraction!r}")
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"arrow fraction must be in (0, 1] (e.g. 1/8 = 0.125), got {fraction}")
    return float(fraction)


@register_method
@dataclass(frozen=True)
class Arrow(AttentionMethod):
    name = "arrow"
    method_id = 1
    fraction: float = 0.125

    def __post_init__(self):
        object.__setattr__(self, "fraction", check_fraction(self.fraction))

    @classmethod
    def from_param(cls, param):
        if param is None:
            raise ValueError(f"method {cls.name!r} needs its window fraction, e.g. '{cls.name}:0.125'")
        return cls(param)

    @property
    def param(self) -> float:
        return self.fraction

    def __str__(self) -> str:
        return f"{self.name}:{self.fraction:g}"

    def width(self, layout: TokenLayout) -> int:
        return window_blocks(self.fraction, layout.num_image_blocks)

    def kernel_widths(self, layout: TokenLayout, batch_size: int, cfg: bool) -> list[int]:
        return [self.width(layout)] * batch_size

    def flops(self, layout: TokenLayout, head_dim: int, cfg: bool) -> float:
        return 4.0 * head_dim * arrow_kept_pairs(layout, self.width(layout))

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Arrow attention on ``[..., S, D]`` tensors laid out as ``layout`` says."""
        return sdpa_reference(q, k, v, arrow_mask(layout, self.width(layout), device=q.device))
