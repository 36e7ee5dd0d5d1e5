"""`arrow_residual(fraction)`: DiTFastAttn v1's window attention with residual sharing.

At the head's last `full` step before this one the runtime also computes arrow(fraction) and stores
``residual = full - arrow``; at this step the head computes arrow(fraction) and adds the stored residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import TokenLayout
from .arrow import Arrow
from .base import HeadMemory, register_method


@register_method
@dataclass(frozen=True)
class ArrowResidual(Arrow):
    name = "arrow_residual"
    method_id = 4
    needs_residual = True

    def finalize(self, out: torch.Tensor, memory: HeadMemory, cfg: bool) -> torch.Tensor:
        return out + self._residual(memory, out.shape)

    def finalize_heads(self, out: torch.Tensor, heads: tuple[int, ...], index: torch.Tensor,
                       memories: list[HeadMemory], cfg: bool) -> None:
        residual = torch.stack([self._residual(m, out[:, 0].shape) for m in memories], dim=1)
        out.index_copy_(1, index, out.index_select(1, index) + residual)

    def finish_masked(self, out: torch.Tensor, mask: torch.Tensor, memory: dict[str, torch.Tensor],
                      cfg: bool) -> torch.Tensor:
        residual = memory.get("residual")
        # absent only before the first recording step, where no plan adds one (StepState.place checks it)
        return out if residual is None else torch.where(mask, out + residual, out)

    @staticmethod
    def _residual(memory: HeadMemory, shape: torch.Size) -> torch.Tensor:
        res = memory.residual
        if res is None:
            raise RuntimeError("an `arrow_residual` head found no stored residual; the step state is out of sync "
                               "(call ditfa_optimum.reset_state(transformer) before a new generation)")
        if res.shape != shape:
            raise RuntimeError(f"an `arrow_residual` head's residual has shape {tuple(res.shape)} but this step "
                               f"computes {tuple(shape)}: batch size or resolution changed inside one generation")
        return res

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
        """Arrow attention plus the stored residual (``full - arrow`` from an earlier step)."""
        out = super().reference(q, k, v, layout)
        return out if residual is None else out + residual
