"""`block_taylor`: the block does not run; its residual is extrapolated to first order from the last two steps where it
ran (after TaylorSeer):

    r(t) ≈ r(a) + (r(a) - r(b)) · (t - a) / (a - b)        a > b: the last two steps where the block ran

With only one earlier step where the block ran, it falls back to plain reuse, r(t) = r(a) (`block_cache`).

The step index, not the scheduler's sigma or timestep, is the variable: it keeps the method model- and
scheduler-agnostic and the plan self-contained (a plan holds steps, never sigmas). For the usual near-uniform
schedules the two differ by a smooth rescaling the search's error measurement absorbs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_base import BlockMethod, MemoryRef, Streams, add_residual, register_block_method


@register_block_method
@dataclass(frozen=True)
class BlockTaylor(BlockMethod):
    name = "block_taylor"
    method_id = 2
    runs_block = False
    runs_mlp = False
    symbol = "T"

    def sources(self, step, ran, mlp_ran, mlps):
        if not ran:
            raise ValueError(f"`{self.name}` extrapolates the block's residual from earlier steps where it ran, but "
                             "the block runs at no earlier step; run it (`compute`) at an earlier step")
        return tuple(MemoryRef("residual", s) for s in reversed(ran[-2:]))  # (a,) or (a, b)

    def skip(self, inputs, step, residuals, sources):
        if len(sources) == 1:
            return add_residual(inputs, residuals[sources[0].step], self.name)
        (a, b) = (s.step for s in sources)
        return self.reference(inputs, residuals[a], residuals[b], a, b, step)

    def cost(self, attention, projections, mlp):
        return 0.0  # elementwise, not counted

    @staticmethod
    def extrapolate(r_a: torch.Tensor | None, r_b: torch.Tensor | None, a: int, b: int, t: int) -> torch.Tensor | None:
        """``r(a) + (r(a) - r(b)) · (t - a) / (a - b)``; None where a stream is absent."""
        if r_a is None or r_b is None:
            return None
        if not t > a > b:
            raise ValueError(f"block_taylor extrapolates forward from earlier steps a > b to t > a, got a={a}, b={b}, "
                             f"t={t}")
        return r_a + (r_a - r_b) * ((t - a) / (a - b))

    @classmethod
    def reference(cls, inputs: Streams, r_a: Streams, r_b: Streams, a: int, b: int, t: int) -> Streams:
        """The block's outputs at step ``t`` from its residuals at steps ``a > b`` (the last two where it ran)."""
        res = Streams(cls.extrapolate(r_a.image, r_b.image, a, b, t), cls.extrapolate(r_a.text, r_b.text, a, b, t))
        return add_residual(inputs, res, cls.name)
