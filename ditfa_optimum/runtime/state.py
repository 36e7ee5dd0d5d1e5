"""Per-generation state of an applied plan: which denoising step runs, which call of the step ("branch") it is, whether
CFG is batched, what heads and blocks remember (per branch; block memory: `block_memory`, used by
`ditfa_optimum.runtime.blocks`).

The state is advanced by the transformer's ``ditfa_transformer`` hook (`ditfa_optimum.runtime.transformer_hook`) at
every transformer call, from the first of these that the call provides:

1. the ``step_index`` of the diffusers cache context (``transformer.cache_context(name, step_index=i)``);
2. the ``step_index`` of the pipeline's scheduler, when `apply` was given the pipeline (None before the scheduler's
   first step counts as the start);
3. the call's timestep (denoising runs it downwards). This is the fallback for a transformer called without its
   pipeline; it reads the timestep's value, which for a tensor on a GPU waits for the device (one sync per call).

The position rises from step to step: a higher position starts the next step, the same position is another call within
the step, a lower one (or the first call ever) starts a new generation at step 0 with memory cleared. Calls without any
position count as steps.

Branches: where the pipeline names its calls with ``transformer.cache_context(name)`` (FLUX's "cond" / "uncond"), each
name is one branch with its own memory, whatever the order of the calls; otherwise the n-th call within a step is
branch n (SD3's skip-layer guidance and FLUX true CFG make 2).

After advancing, the hook hands the step to the plan's step-independent tables (`place`): a one-element tensor on
the call's device that compiled blocks read instead of the Python step (`ditfa_optimum.runtime.tables`); `set_step`
fills it too.

`reset()` does the same explicitly (e.g. before reusing a pipeline whose first timestep could equal the last one).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..methods import BlockMemory, HeadMemory
from .log import note, say


#: calls at one timestep from which the state warns (SD3 skip-layer guidance and FLUX true CFG make 2)
MANY_BRANCHES = 4


def exporting() -> bool:
    """Whether torch.export (strict, non-strict or draft) is tracing this call; False inside torch.compile.

    Reads torch's export flag itself: up to torch 2.11, Dynamo answers ``torch.compiler.is_exporting()`` with True
    while it traces any graph, torch.compile's included (pytorch/pytorch#176347), which refused every compiled call
    of a planned transformer there."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


class StepState:
    def __init__(self, num_steps: int, cfg: bool | Callable[[], bool | None] | None = None):
        self.num_steps = num_steps
        self._cfg = cfg
        self.step = -1
        self.branch = 0
        self.calls_in_step = 0
        self.last_position: float | None = None
        self._branches: dict[str, int] = {}  # cache-context name -> branch, for this generation
        self.text_tokens: int | None = None
        self.local_text_tokens: int | None = None  # this rank's text tokens under context parallelism
        self._memory: dict[tuple[str, int], dict[int, HeadMemory]] = {}
        self._block_memory: dict[tuple[str, int], BlockMemory] = {}
        self._step_memory: dict[int, dict] = {}
        self._warned_cfg = False
        self._warned_branches = False
        #: set by `ditfa_optimum.export` while it traces one step on purpose: calls run that step, memory as given
        self.export_step: int | None = None
        # the step-independent form of the plan (`ditfa_optimum.runtime.tables`), for compiled blocks
        self.traced = False  # the transformer hook itself ran inside a trace (whole-transformer compile)
        self.step_tensor: torch.Tensor | None = None  # the current step on the device, set by `place`
        self.placer: Callable[[torch.device], None] | None = None  # moves the plan's tables to a device
        self.table_memories: list[dict] = []  # the tables' memory (per branch), cleared by `reset`
        self.memory_steps: frozenset[int] = frozenset()  # steps where some head reads memory (cache, residual)
        self._ran_branches: set[int] = set()
        #: the transformer hook advanced the state when the pipeline opened the call's cache context (before the call)
        self.advanced = False
        #: calls run the tables eagerly too, and keep their memory in place (`ditfa_optimum.runtime.graphs`: a CUDA
        #: graph replays the writes of its capture into the same tensors); `reset` then keeps those tensors
        self.graphing = False

    # ---------------------------------------------------------------- step tracking
    def reset(self) -> None:
        """Forget the step position and every stored head output (start of a new generation)."""
        if 0 <= self.step < self.num_steps - 1:
            note(__name__, logging.INFO, "ditfa: a generation ended after step %d of the plan's %d", self.step,
                self.num_steps)
        self.step, self.branch, self.calls_in_step, self.last_position = -1, 0, 0, None
        self.advanced = False
        self._branches.clear()
        self._ran_branches.clear()
        self._memory.clear()
        if not self.graphing:  # (captured graphs write into these tensors; a generation never reads the last one's:
            for memory in self.table_memories:  # the branch check in `place` refuses a read before a write)
                memory.clear()
        self._block_memory.clear()
        self._step_memory.clear()

    def on_transformer_call(self, timestep, text_tokens: int | None, *, step_index: int | None = None,
                            context: str | None = None) -> None:
        """Called before each transformer forward with what it knows of the call's position (see the module
        docstring): its ``timestep``, the text length of its inputs, and optionally the ``step_index`` (of the cache
        context or the scheduler; -1 before the scheduler's first step) and the cache ``context`` name."""
        if self.export_step is not None:  # one step traced on purpose, its memory handed in (ditfa_optimum.export)
            self.step, self.branch, self.calls_in_step = self.export_step, 0, 0
            self.text_tokens = text_tokens
            return
        if torch.jit.is_tracing():
            raise RuntimeError(TRACED_GRAPH)
        if exporting():  # torch.export in any mode: torch.onnx's dynamo exporter falls back to a
            raise RuntimeError(TRACED_TIMESTEP)  # draft export that would bake this call's step in, silently wrong
        if step_index is not None:
            position = float(step_index)
        else:
            t = _first_value(timestep)
            position = None if t is None else -t
        if position is None:  # nothing tells the position: count calls
            self._advance()
        elif self.last_position is None or position < self.last_position:
            self.reset()
            self._advance()
        elif position > self.last_position:
            self._advance()
        else:
            self.calls_in_step += 1
            self.branch = self.calls_in_step
            if self.calls_in_step == MANY_BRANCHES and not self._warned_branches and context is None:
                note(__name__, logging.WARNING,
                    "ditfa: %d transformer calls at the same step: each is taken as another branch of step %d (like "
                    "a CFG half run on its own) and keeps its own cached outputs until the generation ends. For "
                    "independent calls, call ditfa_optimum.reset_state(transformer) between them",
                    self.calls_in_step + 1, self.step)
                self._warned_branches = True
        if context is not None:
            self.branch = self._branches.setdefault(context, len(self._branches))
        self.last_position = position
        self.text_tokens = text_tokens

    def place(self, device: torch.device | None) -> None:
        """Called by the transformer hook after advancing: hand the step to the plan's tables on ``device``
        (`ditfa_optimum.runtime.tables`, which compiled blocks run). One ``fill_`` of a one-element tensor per call;
        the first call on a device moves the tables there. Inside a trace (the whole transformer compiled) it only
        notes that the hook is traced: the step is then a constant of each graph, and the modules run their step
        programs."""
        self.traced = torch.compiler.is_compiling()
        if self.traced or self.placer is None or self.step < 0:
            return
        if device is not None and (self.step_tensor is None or self.step_tensor.device != device):
            with torch.inference_mode(False):  # a tensor later calls may update outside inference mode
                self.step_tensor = torch.zeros(1, dtype=torch.long, device=device)
                self.placer(device)
        if self.step_tensor is not None:
            self.step_tensor.fill_(self.step)
        if self.step in self.memory_steps and not self._has_memory(self.branch):
            step = self.step
            self.reset()
            raise RuntimeError(f"the plan reads cached head outputs at this call (step {step}), but its branch ran "
                               "no earlier step of this generation to cache them: the step state is out of sync (call "
                               "ditfa_optimum.reset_state(transformer) before a new generation), or a second call per "
                               "step (SD3 skip-layer guidance) starts at a step the plan caches; search the plan with "
                               "the pipeline's settings")
        self._ran_branches.add(self.branch)

    def _has_memory(self, branch: int) -> bool:
        """Whether ``branch`` ran an earlier step of this generation, or was handed memory (`set_head_memories`)."""
        return branch in self._ran_branches or any(b == branch for _, b in self._memory)

    def _advance(self) -> None:
        self.step += 1
        self.branch = self.calls_in_step = 0
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
        self.step, self.branch, self.calls_in_step = step, branch, branch
        if self.step_tensor is not None:  # compiled blocks read the step from it (runtime/tables.py)
            self.step_tensor.fill_(step)

    # ---------------------------------------------------------------- CFG
    def cfg(self, needed: bool) -> bool:
        """Whether the batch is [uncond, cond] CFG halves. ``needed``: a `cfg_share` head asks.

        Only the first call of a step batches CFG: a second call at the same timestep runs one half on its own (SD3's
        skip-layer guidance call on the conditional batch, FLUX's true-CFG negative prompt), so `cfg_share` heads
        compute it in full."""
        if self.calls_in_step > 0:
            return False
        value = self._cfg() if callable(self._cfg) else self._cfg
        if value is None:
            if needed and not self._warned_cfg:
                say(__name__, logging.WARNING,
                    "ditfa: the plan has `cfg_share` heads but the runtime cannot tell whether the batch is batched "
                    "CFG; computing them in full. Pass the pipeline to apply(), or cfg=True.")
                self._warned_cfg = True
            return False
        return bool(value)

    # ---------------------------------------------------------------- memory
    def memory(self, module: str) -> dict[int, HeadMemory]:
        """Head memories of ``module`` for the current branch, by head index."""
        return self._memory.setdefault((module, self.branch), {})

    def head_memories(self) -> dict[tuple[str, int], dict[int, HeadMemory]]:
        """Every head memory: (module, branch) -> head -> memory (a copy of the mapping; the memories themselves)."""
        return {key: dict(heads) for key, heads in self._memory.items()}

    def set_head_memories(self, memories: dict[tuple[str, int], dict[int, HeadMemory]]) -> None:
        """Replace every head memory by ``memories`` (as `head_memories` returns them): the ONNX export feeds a traced
        step the memory earlier steps left."""
        self._memory = {key: dict(heads) for key, heads in memories.items()}

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
        total += sum(t.numel() * t.element_size() for memory in self.table_memories for kept in memory.values()
                     for t in kept.values())
        for heads in self._memory.values():
            for mem in heads.values():
                for t in (mem.previous_output, mem.residual):
                    total += 0 if t is None else t.numel() * t.element_size()
        return total


#: why a traced call cannot place itself (torch.export: the timestep is symbolic there)
TRACED_TIMESTEP = ("the ditfa plan reads the step from this call's timestep, which this trace cannot read (its value "
                   "is symbolic: torch.export, or a graph traced with a data-dependent timestep). A plan picks each "
                   "head's method by the step its hook tracks from call to call, which an exported graph cannot hold: "
                   "it would run one step's methods at every step. Export the model without a plan "
                   "(ditfa_optimum.remove(model) first), export it with the plan to ONNX through "
                   "ditfa_optimum.export.export_onnx (one graph per step; docs/export.md), or use torch.compile, which "
                   "follows the steps (docs/runtime.md)")


#: why a TorchScript trace (torch.jit.trace; torch.onnx.export with dynamo=False) of a planned model is refused
TRACED_GRAPH = ("a TorchScript trace (torch.jit.trace, or torch.onnx.export with dynamo=False) of a model with a ditfa "
                "plan would record the methods of the one step it runs as constants: the graph would run them at "
                "every step, silently wrong. Trace or export the model without a plan (ditfa_optimum.remove(model) "
                "first), export with the plan through ditfa_optimum.export.export_onnx (one graph per step; "
                "docs/export.md), or use torch.compile, which follows the steps (docs/runtime.md)")


def _first_value(timestep) -> float | None:
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        try:
            return float(timestep.reshape(-1)[0]) if timestep.numel() else None
        except Exception as error:
            from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode  # sympy: imported late

            if isinstance(error, GuardOnDataDependentSymNode):
                raise RuntimeError(TRACED_TIMESTEP) from error
            raise
    return float(timestep)
