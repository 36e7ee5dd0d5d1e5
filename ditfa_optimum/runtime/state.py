"""Per-generation state of an applied plan: which denoising step runs, whether CFG is batched, what heads and blocks
remember (per branch; block memory: `block_memory`, used by `ditfa_optimum.runtime.blocks`).

The step is advanced by the pipeline's own denoising loop: every transformer call reports its timestep, and

* a timestep lower than the last one starts the next step;
* a timestep higher than the last one (or the first call ever) starts a new generation: step 0, memory cleared;
* the same timestep again is another call within the same step (e.g. FLUX true-CFG runs the negative prompt as a second
  call): it gets its own "branch", with its own cached head outputs.

`reset()` does the same explicitly (e.g. before reusing a pipeline whose first timestep could equal the last one).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..methods import BlockMemory, HeadMemory

logger = logging.getLogger(__name__)


#: calls at one timestep from which the state warns (SD3 skip-layer guidance and FLUX true CFG make 2)
MANY_BRANCHES = 4


class StepState:
    def __init__(self, num_steps: int, cfg: bool | Callable[[], bool | None] | None = None):
        self.num_steps = num_steps
        self._cfg = cfg
        self.step = -1
        self.branch = 0
        self.last_timestep: float | None = None
        self.text_tokens: int | None = None
        self._memory: dict[tuple[str, int], dict[int, HeadMemory]] = {}
        self._block_memory: dict[tuple[str, int], BlockMemory] = {}
        self._step_memory: dict[int, dict] = {}
        self._warned_cfg = False
        self._warned_branches = False

    # ---------------------------------------------------------------- step tracking
    def reset(self) -> None:
        """Forget the step position and every stored head output (start of a new generation)."""
        if 0 <= self.step < self.num_steps - 1:
            logger.info("ditfa: a generation ended after step %d of the plan's %d", self.step, self.num_steps)
        self.step, self.branch, self.last_timestep = -1, 0, None
        self._memory.clear()
        self._block_memory.clear()
        self._step_memory.clear()

    def on_transformer_call(self, timestep, text_tokens: int | None) -> None:
        """Called before each transformer forward with its timestep and the text length of its inputs."""
        t = _first_value(timestep)
        if t is None:  # no timestep given: count calls
            self._advance()
        elif self.last_timestep is None or t > self.last_timestep:
            self.reset()
            self._advance()
        elif t < self.last_timestep:
            self._advance()
        else:
            self.branch += 1
            if self.branch == MANY_BRANCHES and not self._warned_branches:
                logger.warning("ditfa: %d transformer calls at the same timestep: each is taken as another branch of "
                               "step %d (like a CFG half run on its own) and keeps its own cached outputs until the "
                               "generation ends. For independent calls, call ditfa_optimum.reset_state(transformer) "
                               "between them", self.branch + 1, self.step)
                self._warned_branches = True
        self.last_timestep = t
        self.text_tokens = text_tokens

    def _advance(self) -> None:
        self.step += 1
        self.branch = 0
        if self.step >= self.num_steps:
            step = self.step
            self.reset()
            raise ValueError(f"the pipeline runs denoising step {step} (0-based) but the plan covers only "
                             f"{self.num_steps} steps; search a plan with at least {step + 1} steps or call the "
                             f"pipeline with num_inference_steps={self.num_steps}")

    def current_step(self) -> int:
        if self.step < 0:
            raise RuntimeError("a planned attention module ran before the transformer reported a step; call the "
                               "transformer itself (not its blocks) or set the step with state.set_step(i)")
        return self.step

    def set_step(self, step: int, branch: int = 0) -> None:
        """Position the state explicitly (for driving single blocks by hand)."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step must be in [0, {self.num_steps}), got {step}")
        self.step, self.branch = step, branch

    # ---------------------------------------------------------------- CFG
    def cfg(self, needed: bool) -> bool:
        """Whether the batch is [uncond, cond] CFG halves. ``needed``: a `cfg_share` head asks.

        Only the first call of a step batches CFG: a second call at the same timestep runs one half on its own (SD3's
        skip-layer guidance call on the conditional batch, FLUX's true-CFG negative prompt), so `cfg_share` heads
        compute it in full."""
        if self.branch > 0:
            return False
        value = self._cfg() if callable(self._cfg) else self._cfg
        if value is None:
            if needed and not self._warned_cfg:
                logger.warning("ditfa: the plan has `cfg_share` heads but the runtime cannot tell whether the batch "
                               "is batched CFG; computing them in full. Pass the pipeline to apply(), or cfg=True.")
                self._warned_cfg = True
            return False
        return bool(value)

    # ---------------------------------------------------------------- memory
    def memory(self, module: str) -> dict[int, HeadMemory]:
        """Head memories of ``module`` for the current branch, by head index."""
        return self._memory.setdefault((module, self.branch), {})

    def block_memory(self, block: str) -> BlockMemory:
        """What block ``block`` keeps from earlier steps, for the current branch (residuals, MLP outputs)."""
        return self._block_memory.setdefault((block, self.branch), BlockMemory())

    def step_memory(self) -> dict:
        """The transformer outputs kept for skipped steps (`ditfa_optimum.runtime.steps`), current branch: step ->
        (sample, output)."""
        return self._step_memory.setdefault(self.branch, {})

    def memory_bytes(self) -> int:
        total = sum(mem.nbytes() for mem in self._block_memory.values())
        total += sum(s.numel() * s.element_size() for mem in self._step_memory.values() for s, _ in mem.values())
        for heads in self._memory.values():
            for mem in heads.values():
                for t in (mem.previous_output, mem.residual):
                    total += 0 if t is None else t.numel() * t.element_size()
        return total


def _first_value(timestep) -> float | None:
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0]) if timestep.numel() else None
    return float(timestep)
