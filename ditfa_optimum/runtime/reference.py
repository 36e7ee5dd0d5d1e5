"""The PyTorch reference backend: any device, any dtype; the test oracle (never chosen by "auto").

Heads are grouped by band width; each group is one `scaled_dot_product_attention` call with the boolean arrow mask of
`ditfa_optimum.masks` (no mask at all for full width, so an all-`full` plan computes exactly what stock diffusers does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..masks import TokenLayout, arrow_keep, arrow_mask
from .backends import attend_by_width, register_backend


@register_backend
class ReferenceBackend:
    name = "reference"

    def available(self, device: torch.device) -> bool:
        return True

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
               widths: torch.Tensor) -> torch.Tensor:
        return attend_by_width(q, k, v, layout, widths, masked_arrow)

    def attend_widths(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                      widths: torch.Tensor, key: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        """The step-independent call (`ditfa_optimum.runtime.tables`): one SDPA call whose ``[B, H, S, S]`` mask is
        made on the device from the ``[B, H]`` widths tensor (skipped pairs compute a band of one block, which the
        runtime overwrites). ``out``: written for the computed pairs only (skipped ones keep its values) and
        returned."""
        pos = torch.arange(layout.seq_len, device=q.device)
        width = widths.clamp(min=1).to(torch.long)[:, :, None, None]
        keep = arrow_keep(pos[:, None], pos[None, :], layout, width)
        result = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        if out is None:
            return result
        return out.copy_(torch.where((widths > 0)[:, :, None, None], result, out))


def masked_arrow(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, width: int) -> torch.Tensor:
    """Arrow attention as SDPA with the boolean `arrow_mask` (builds the whole score matrix)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=arrow_mask(layout, width, device=q.device))
