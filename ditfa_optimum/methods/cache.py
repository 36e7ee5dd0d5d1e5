"""`cache`: reuse this head's output from the previous denoising step (nothing is computed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import TokenLayout
from .base import AttentionMethod, HeadMemory, register_method


@register_method
@dataclass(frozen=True)
class Cache(AttentionMethod):
    name = "cache"
    method_id = 2
    needs_previous_output = True

    def kernel_widths(self, layout: TokenLayout, batch_size: int, cfg: bool) -> list[int]:
        return [0] * batch_size

    def finalize(self, out: torch.Tensor, memory: HeadMemory, cfg: bool) -> torch.Tensor:
        return self.reference(memory, out.shape)

    def finalize_heads(self, out: torch.Tensor, heads: tuple[int, ...], index: torch.Tensor,
                       memories: list[HeadMemory], cfg: bool) -> None:
        shape = out[:, 0].shape
        out.index_copy_(1, index, torch.stack([self.reference(m, shape) for m in memories], dim=1))

    def finish_masked(self, out: torch.Tensor, mask: torch.Tensor, memory: dict[str, torch.Tensor],
                      cfg: bool) -> torch.Tensor:
        previous = memory.get("previous")
        # absent only at a branch's first call, where no plan caches (StepState.place checks it on the host)
        return torch.where(mask, torch.zeros_like(out) if previous is None else previous, out)

    def flops(self, layout: TokenLayout, head_dim: int, cfg: bool) -> float:
        return 0.0

    @staticmethod
    def reference(memory: HeadMemory, shape: torch.Size) -> torch.Tensor:
        prev = memory.previous_output
        if prev is None:
            raise RuntimeError("a `cache` head found no output from the previous step; the step state is out of sync "
                               "(call ditfa_optimum.reset_state(transformer) before a new generation)")
        if prev.shape != shape:
            raise RuntimeError(f"a `cache` head's stored output has shape {tuple(prev.shape)} but this step needs "
                               f"{tuple(shape)}: batch size or resolution changed inside one generation")
        return prev
