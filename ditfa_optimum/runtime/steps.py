"""Whole skipped steps at run time: `step_taylor` on diffusers' own hook machinery.

`install_steps` makes `StepRuntime` the step handler of the plan's transformer hook (``"ditfa_transformer"``,
`ditfa_optimum.runtime.transformer_hook`), which calls it with the transformer's forward after advancing the step
state (`StepState`); the state says which step a call belongs to:

* at a step the plan runs, the transformer runs as usual; its output is kept (detached, per CFG branch) when a later
  skipped step reads it (`CompressionPlan.step_sources`), and freed after its last reader;
* at a skipped step (`CompressionPlan.skipped_steps`) nothing below the hook runs, no block and no attention module:
  the output is extrapolated from the kept outputs (`ditfa_optimum.methods.step_taylor`) and returned in the form the
  transformer returns (a ``(sample,)`` tuple or its output dataclass).
"""

from __future__ import annotations

import torch

from ..methods import step_taylor
from ..plan import CompressionPlan
from .state import StepState


def _sample(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output.sample


def _like(output, sample: torch.Tensor):
    """``sample`` in the form of ``output`` (a tuple, or the transformer's output dataclass)."""
    if isinstance(output, (tuple, list)):
        return type(output)([sample, *output[1:]])
    return type(output)(sample=sample)


class StepRuntime:
    """The plan's transformer-level handler: runs or extrapolates each step (see the module docstring)."""

    def __init__(self, plan: CompressionPlan, state: StepState):
        self.plan, self.state = plan, state
        self.sources = plan.step_sources()
        self.last_reader: dict[int, int] = {}
        for step, refs in enumerate(self.sources):
            for ref in refs:
                self.last_reader[ref] = step

    def __call__(self, module, forward, args, kwargs):
        state = self.state
        step = state.current_step()
        memory = state.step_memory()
        if self.plan.runs_step(step):
            out = forward(*args, **kwargs)
            if step in self.last_reader:
                memory[step] = (_sample(out).detach(), out)
            return out
        anchors = self.sources[step]
        missing = [s for s in anchors if s not in memory]
        if missing:
            branch = f" of call {state.branch + 1} within the step" if state.branch else ""
            raise RuntimeError(f"the plan skips step {step} and extrapolates it from the transformer's outputs{branch} "
                               f"at steps {list(anchors)}, but step {missing[0]} left none: a second call per step "
                               "(SD3 skip-layer guidance) that did not run at those steps cannot be extrapolated; "
                               "search the plan with skip_steps=False, or call ditfa_optimum.reset_state(transformer) "
                               "if the step state is out of sync")
        sample = step_taylor.extrapolate({s: memory[s][0] for s in anchors}, step, anchors)
        out = _like(memory[anchors[0]][1], sample)
        for ref in anchors:
            if self.last_reader.get(ref) == step:
                memory.pop(ref, None)
        return out


def install_steps(hook, plan: CompressionPlan, state: StepState) -> None:
    """Make the plan's transformer ``hook`` skip the plan's skipped steps (`ditfa_optimum.apply.remove` takes the
    hook, and with it this handler, off)."""
    hook.step_handler = StepRuntime(plan, state)
