"""The PyTorch reference backend: any device, any dtype; the test oracle and the CPU fallback.

Heads are grouped by band width; each group is one `scaled_dot_product_attention` call with the boolean arrow mask of
`ditfa_optimum.masks` (no mask at all for full width, so an all-`full` plan computes exactly what stock diffusers does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..masks import TokenLayout, arrow_mask
from .backends import register_backend


@register_backend
class ReferenceBackend:
    name = "reference"

    def available(self, device: torch.device) -> bool:
        return True

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
               widths: torch.Tensor) -> torch.Tensor:
        full = layout.num_image_blocks
        if bool((widths == full).all()):
            return F.scaled_dot_product_attention(q, k, v)
        out = torch.empty_like(q)
        for width in widths.unique().tolist():
            if width == 0:
                continue
            b, h = torch.nonzero(widths == width, as_tuple=True)
            mask = None if width == full else arrow_mask(layout, width, device=q.device)
            out[b, h] = F.scaled_dot_product_attention(q[b, h], k[b, h], v[b, h], attn_mask=mask)
        return out
