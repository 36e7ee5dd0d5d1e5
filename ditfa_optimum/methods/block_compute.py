"""`compute`: the block runs; its attention heads follow the head-wise plan."""

from __future__ import annotations

from dataclasses import dataclass

from .block_base import BlockMethod, register_block_method


@register_block_method
@dataclass(frozen=True)
class Compute(BlockMethod):
    name = "compute"
    method_id = 0
    symbol = "."

    def cost(self, attention: float, projections: float, mlp: float) -> float:
        return attention + projections + mlp
