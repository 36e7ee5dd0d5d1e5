"""`block_cache`: the block does not run; each stream gets its input plus the residual (output - input) the block
produced at the last step where it ran (`compute` or `mlp_cache`) — diffusers' FirstBlockCache / cache-dit's DBCache
reuse, decided per (block, step) by the plan instead of by a runtime threshold."""

from __future__ import annotations

from dataclasses import dataclass

from .block_base import BlockMethod, MemoryRef, Streams, add_residual, register_block_method


@register_block_method
@dataclass(frozen=True)
class BlockCache(BlockMethod):
    name = "block_cache"
    method_id = 1
    runs_block = False
    runs_mlp = False
    symbol = "C"

    def sources(self, step, ran, mlp_ran, mlps):
        if not ran:
            raise ValueError(f"`{self.name}` reuses the block's residual from an earlier step where it ran, but the "
                             "block runs at no earlier step; run it (`compute`) at an earlier step")
        return (MemoryRef("residual", ran[-1]),)

    def skip(self, inputs, step, residuals, sources):
        return self.reference(inputs, residuals[sources[0].step])

    def cost(self, attention, projections, mlp):
        return 0.0  # one elementwise add per stream, not counted

    @staticmethod
    def reference(inputs: Streams, res: Streams) -> Streams:
        """The block's outputs: ``inputs + res`` per stream (``res`` from the last step where the block ran)."""
        return add_residual(inputs, res, "block_cache")
