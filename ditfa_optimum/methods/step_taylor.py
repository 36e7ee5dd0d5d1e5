"""`step_taylor`: a whole denoising step where the transformer does not run; its output (the velocity) is extrapolated
to first order from the last two steps where it ran (TaylorSeer's idea, decided per step by the search):

    v(t) ≈ v(a) + (v(a) - v(b)) · (t - a) / (a - b)        a > b: the last two steps where the transformer ran

With only one earlier step where it ran, the output is reused, v(t) = v(a). Like `block_taylor`, the variable is the
step index (a plan holds steps, never sigmas); for the usual near-uniform schedules the difference is a smooth
rescaling that the search's measured errors absorb.

This is a *step* method: one per step, for the whole transformer (every block, every head). A plan lists the steps
that run it (`CompressionPlan.skipped_steps`); the runtime is `ditfa_optimum.runtime.steps`. It costs nothing
(elementwise), so it saves a whole step of transformer FLOPs; the search prices its error with the measured
propagation gain of the transformer's output (`Sensitivity.output_gain`).
"""

from __future__ import annotations

from typing import Sequence

import torch

NAME = "step_taylor"


def sources(step: int, ran: Sequence[int]) -> tuple[int, ...]:
    """The earlier steps whose outputs `extrapolate` reads at ``step``: the last two where the transformer ran
    (latest first), or the only one. Raises ValueError (saying the fix) when none ran before."""
    earlier = [s for s in ran if s < step]
    if not earlier:
        raise ValueError(f"`{NAME}` at step {step} extrapolates the transformer's output from earlier steps where it "
                         "ran, but it runs at no earlier step; run the transformer at an earlier step")
    return tuple(reversed(earlier[-2:]))


def extrapolate(outputs: dict[int, torch.Tensor], step: int, anchors: Sequence[int]) -> torch.Tensor:
    """The output at ``step`` from the stored ``outputs[anchor]`` (``anchors`` as `sources` returns them).

    Example:
        >>> out = extrapolate({2: torch.tensor([3.0]), 3: torch.tensor([4.0])}, 5, (3, 2))
        >>> out.tolist()
        [6.0]
    """
    if len(anchors) == 1:
        return outputs[anchors[0]]
    a, b = anchors
    if not step > a > b:
        raise ValueError(f"{NAME} extrapolates forward from earlier steps a > b to t > a, got a={a}, b={b}, t={step}")
    return outputs[a] + (outputs[a] - outputs[b]) * ((step - a) / (a - b))
