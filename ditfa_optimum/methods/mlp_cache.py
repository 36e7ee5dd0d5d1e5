"""`mlp_cache`: the block runs its attention (under the head-wise plan), but its MLP submodules (image ``ff`` and text
``ff_context`` where they exist) do not run: each returns its output from the last step where it ran (a `compute`
step of this block).

Only blocks whose MLP is a separately callable submodule can use it; FLUX's single-stream blocks fuse their MLP into
``proj_out`` together with the attention output, so they have none (their `BlockSpec.mlps` is empty).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_base import BlockMethod, MemoryRef, register_block_method


@register_block_method
@dataclass(frozen=True)
class MlpCache(BlockMethod):
    name = "mlp_cache"
    method_id = 3
    runs_mlp = False
    symbol = "M"

    def sources(self, step, ran, mlp_ran, mlps):
        if not mlps:
            raise ValueError(f"`{self.name}` reuses the block's MLP outputs, but this block has no separately "
                             "callable MLP (e.g. FLUX single-stream blocks fuse theirs into proj_out); use "
                             "`block_cache` or `block_taylor` there")
        if not mlp_ran:
            raise ValueError(f"`{self.name}` reuses the MLP outputs of an earlier step where the MLP ran, but the "
                             "block's MLP runs at no earlier step; run the block (`compute`) at an earlier step")
        return (MemoryRef("mlp", mlp_ran[-1]),)

    def cost(self, attention, projections, mlp):
        return attention + projections

    @staticmethod
    def reference(stored: torch.Tensor, x: torch.Tensor, name: str = "the MLP") -> torch.Tensor:
        """The MLP's output for input ``x``: the output ``stored`` at the last step where it ran."""
        if stored.shape[:-1] != x.shape[:-1]:
            raise RuntimeError(f"`mlp_cache`: {name}'s stored output has shape {tuple(stored.shape)} but this step's "
                               f"input has {tuple(x.shape)}: batch size or resolution changed inside one generation, "
                               "or the feed-forward runs in chunks (set_chunk_feed_forward), which mlp_cache cannot "
                               "reuse")
        return stored
