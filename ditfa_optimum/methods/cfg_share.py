"""`cfg_share`: with CFG batched as [uncond, cond], compute the conditional half and reuse it for the unconditional.

Without CFG (or when the runtime cannot tell) the head is computed in full: correct, just not cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import TokenLayout
from .base import AttentionMethod, HeadMemory, dense_flops, register_method, sdpa_reference


def check_cfg_batch(batch_size: int) -> int:
    if batch_size % 2:
        raise ValueError(f"classifier-free guidance batches [uncond, cond] halves, but the batch has odd size {batch_size}")
    return batch_size // 2


@register_method
@dataclass(frozen=True)
class CfgShare(AttentionMethod):
    name = "cfg_share"
    method_id = 3

    def kernel_widths(self, layout: TokenLayout, batch_size: int, cfg: bool) -> list[int]:
        full = layout.num_image_blocks
        if not cfg:
            return [full] * batch_size
        half = check_cfg_batch(batch_size)
        return [0] * half + [full] * half

    def finalize(self, out: torch.Tensor, memory: HeadMemory, cfg: bool) -> torch.Tensor:
        if not cfg:
            return out
        half = check_cfg_batch(out.shape[0])
        return torch.cat([out[half:], out[half:]], dim=0)

    def finalize_heads(self, out: torch.Tensor, heads: tuple[int, ...], index: torch.Tensor,
                       memories: list[HeadMemory], cfg: bool) -> None:
        if cfg:
            half = check_cfg_batch(out.shape[0])
            out[:half].index_copy_(1, index, out[half:].index_select(1, index))

    def finish_masked(self, out: torch.Tensor, mask: torch.Tensor, memory: dict[str, torch.Tensor],
                      cfg: bool) -> torch.Tensor:
        if not cfg:
            return out
        half = check_cfg_batch(out.shape[0])
        uncond = (torch.arange(out.shape[0], device=out.device) < half).view(-1, 1, 1, 1)
        return torch.where(mask & uncond, torch.cat([out[half:], out[half:]], dim=0), out)

    def flops(self, layout: TokenLayout, head_dim: int, cfg: bool) -> float:
        return dense_flops(layout, head_dim) * (0.5 if cfg else 1.0)

    @staticmethod
    def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``[B, ..., S, D]`` with B = 2 x prompts: the conditional half's dense attention, used for both halves."""
        half = check_cfg_batch(q.shape[0])
        cond = sdpa_reference(q[half:], k[half:], v[half:])
        return torch.cat([cond, cond], dim=0)
