"""The head-wise attention runtime: one planned attention call of one module at the current step.

`PlanRuntime` is shared by all modules of a transformer (plan, step state, backend choice); `ModuleRuntime` is the
callable each attention processor invokes with the joint ``q, k, v`` (``[B, H, S, D]``). Per call it

1. looks up the step program of this module (its heads' methods at the current step, precomputed once per plan;
   equal programs are one object) and what a call of it derives from its shapes (`_Call`: layout, ``[B, H]``
   band-width table, backend, head indices; derived once per program and shape, so the host work per call is a few
   dictionary lookups);
2. makes ONE backend call for every computed (sample, head);
3. lets each method finish its heads, all of one method at once (fill from cache, copy the conditional CFG half, add
   the residual: one or two tensor operations per method, not per head);
4. records what later steps need, and only that: outputs read by a `cache` head at the next step (one gather), and
   ``full - arrow`` residuals at the full steps that `arrow_residual` heads follow.
"""

from __future__ import annotations

import logging

from dataclasses import dataclass, field

import torch

from ..masks import TokenLayout
from ..methods import AttentionMethod, CfgShare, HeadMemory, make_method
from ..plan import CompressionPlan, ModuleSpec
from .backends import Widths, check_backend_name, get_backend, needs_grad, remember
from .log import note
from .state import StepState
from .tables import ModuleTable, Vocabulary, run_table, table_problem


@dataclass(frozen=True, eq=False)  # one object per distinct program of a module (`PlanRuntime.module_programs`)
class _StepProgram:
    methods: tuple[AttentionMethod, ...]
    groups: tuple[tuple[AttentionMethod, tuple[int, ...]], ...]  # heads whose method finishes them, by method
    keeps: tuple[int, ...]  # heads whose output the next step reads
    records: tuple[tuple[int, AttentionMethod], ...]  # (head, arrow) residual records at this step
    uses_cfg: bool
    #: what a call of this program derives from its shapes (`_Call`), by (image tokens, text tokens, batch, cfg,
    #: device, grad): steps with equal programs share it, so a generation derives it once per distinct program
    calls: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def of(methods: tuple[AttentionMethod, ...], keeps: tuple[int, ...],
           records: tuple[tuple[int, AttentionMethod], ...]) -> "_StepProgram":
        """The program of one step's ``methods`` (the fields that follow from them derived once, not per call)."""
        groups: dict[AttentionMethod, list[int]] = {}
        for h, m in enumerate(methods):
            if type(m).finalize is not AttentionMethod.finalize:
                groups.setdefault(m, []).append(h)
        return _StepProgram(methods=methods, groups=tuple((m, tuple(hs)) for m, hs in groups.items()), keeps=keeps,
                            records=records, uses_cfg=any(isinstance(m, CfgShare) for m in methods))

    def key(self) -> tuple:
        return self.methods, self.keeps, self.records

    def heads(self, lo: int, hi: int) -> "_StepProgram":
        """The program of heads ``lo .. hi - 1`` only, renumbered from 0 (a rank's share of the heads under
        context parallelism, `ditfa_optimum.runtime.parallel`)."""
        return _StepProgram.of(self.methods[lo:hi], tuple(h - lo for h in self.keeps if lo <= h < hi),
                               tuple((h - lo, m) for h, m in self.records if lo <= h < hi))


def _interned(programs: list[_StepProgram]) -> list[_StepProgram]:
    """``programs`` with equal programs replaced by one object (they then share their derived `_Call`s)."""
    seen: dict[tuple, _StepProgram] = {}
    return [seen.setdefault(p.key(), p) for p in programs]


@dataclass(frozen=True)
class _Call:
    """What one call of a step program derives from its shapes, once (`ModuleRuntime.prepare`)."""

    layout: TokenLayout
    widths: Widths
    record_widths: Widths | None
    backend: object
    group_index: tuple[torch.Tensor, ...]  # each finishing group's heads, on the call's device
    keep_index: torch.Tensor | None  # the kept heads, on the call's device


def _memory_of(memory: dict[int, HeadMemory], head: int) -> HeadMemory:
    found = memory.get(head)
    return found if found is not None else memory.setdefault(head, HeadMemory())


class PlanRuntime:
    """Everything the processors of one transformer share."""

    def __init__(self, plan: CompressionPlan, backend: str | None = None, cfg=None):
        self.plan = plan
        self.backend_name = check_backend_name(backend)
        self.state = StepState(plan.num_steps, cfg=cfg)
        self.programs = {spec.name: self._compile(spec) for spec in plan.modules}
        self.warned_small = False  # one warning when the image is smaller than two mask blocks
        self._sliced: dict[tuple[str, int, int], list[_StepProgram]] = {}
        # the step-independent form, for compiled blocks (`ditfa_optimum.runtime.tables`); none for plans it cannot
        # express (8-bit heads), whose compiled blocks run the step programs
        self.table_problem = table_problem(plan)
        self.vocabulary = Vocabulary(plan) if self.table_problem is None else None
        self.tables = {} if self.vocabulary is None else {
            spec.name: ModuleTable(plan, spec.name, self.vocabulary) for spec in plan.modules}
        if self.tables:
            self.state.placer = self.place
            self.state.table_memories = [table.memory for table in self.tables.values()]
            self.state.memory_steps = frozenset(
                step for spec in plan.modules for step in range(plan.num_steps)
                if any(m.needs_previous_output or m.needs_residual for m in plan.step_methods(spec.name, step)))

    def place(self, device: torch.device) -> None:
        """Move every module's tables to ``device`` (`StepState.place`, at the first call on a device)."""
        for table in self.tables.values():
            table.place(device)

    def module_programs(self, name: str, heads: tuple[int, int] | None = None) -> list[_StepProgram]:
        """The step programs of module ``name``, or of its heads ``heads = (lo, hi)`` only."""
        if heads is None:
            return self.programs[name]
        key = (name, *heads)
        if key not in self._sliced:
            self._sliced[key] = _interned([p.heads(*heads) for p in self.programs[name]])
        return self._sliced[key]

    def _compile(self, spec: ModuleSpec) -> list[_StepProgram]:
        keeps = self.plan.output_keeps(spec.name)
        records: dict[int, list] = {}
        for step, head, fraction in self.plan.residual_records(spec.name):
            records.setdefault(step, []).append((head, make_method("arrow", fraction)))
        programs = []
        for step in range(self.plan.num_steps):
            programs.append(_StepProgram.of(tuple(self.plan.step_methods(spec.name, step)),
                                            tuple(torch.nonzero(keeps[step]).flatten().tolist()),
                                            tuple(records.get(step, ()))))
        return _interned(programs)

    def module(self, spec: ModuleSpec) -> "ModuleRuntime":
        return ModuleRuntime(self, spec)


class ModuleRuntime:
    """The planned attention of one module; called by its processor."""

    def __init__(self, runtime: PlanRuntime, spec: ModuleSpec):
        self.runtime = runtime
        self.spec = spec
        self.table: ModuleTable | None = runtime.tables.get(spec.name)

    def prepare(self, program: _StepProgram, num_image_tokens: int, num_text_tokens: int, batch: int, cfg: bool,
                device: torch.device, grad: bool) -> _Call:
        """What a call of ``program`` with these shapes needs (layout, band widths, backend, head indices); derived
        once per (program, shapes), shared by the steps that run an equal program."""
        key = (num_image_tokens, num_text_tokens, batch, cfg, device, grad)
        call = program.calls.get(key)
        if call is None:
            layout = self.layout(num_image_tokens, num_text_tokens)
            per_head = [m.kernel_widths(layout, batch, cfg) for m in program.methods]
            widths = Widths(tuple(tuple(int(h[b]) for h in per_head) for b in range(batch)), layout.num_image_blocks)
            record_widths = None
            if program.records:
                row = [0] * len(program.methods)
                for h, arrow in program.records:
                    row[h] = arrow.width(layout)
                record_widths = Widths((tuple(row),) * batch, layout.num_image_blocks)
            # every backend runs an all-full call as plain SDPA, which autograd differentiates
            backend = get_backend(self.runtime.backend_name, device, grad=not widths.all_full and grad)
            index = lambda heads: torch.tensor(heads, dtype=torch.long, device=device)  # noqa: E731
            call = remember(program.calls, key, _Call(
                layout, widths, record_widths, backend, tuple(index(heads) for _, heads in program.groups),
                index(program.keeps) if program.keeps else None))
        return call

    def layout(self, num_image_tokens: int, num_text_tokens: int) -> TokenLayout:
        layout = self.spec.layout(num_image_tokens, num_text_tokens, self.runtime.plan.block_size)
        if layout.num_image_blocks <= 1 and not self.runtime.warned_small:
            self.runtime.warned_small = True
            note(__name__, logging.WARNING,
                "ditfa: %d image tokens make %d mask block(s) of %d tokens: every arrow head computes full attention "
                "here (correct, but nothing is saved); plan with a smaller block_size for this resolution",
                num_image_tokens, layout.num_image_blocks, self.runtime.plan.block_size)
        return layout

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_text_tokens: int,
                 heads: tuple[int, int] | None = None) -> torch.Tensor:
        """Attention of the joint sequence ``q, k, v`` (``[B, H, S, D]``) under the plan's current step.

        ``heads = (lo, hi)``: q, k, v hold only the module's heads ``lo .. hi - 1`` (one rank's share under context
        parallelism), which run their part of the plan; their cached outputs are this process's."""
        rt, state = self.runtime, self.runtime.state
        B, H, S, _ = q.shape
        if heads is not None and not (0 <= heads[0] < heads[1] <= self.spec.num_heads
                                      and heads[1] - heads[0] == H):
            raise ValueError(f"module {self.spec.name!r}: heads {heads} are not {H} of its {self.spec.num_heads} "
                             "heads")
        if heads is None and H != self.spec.num_heads:
            raise ValueError(f"module {self.spec.name!r} was planned with {self.spec.num_heads} heads but attends "
                             f"with {H}; the plan does not fit this model (under tensor parallelism each rank holds "
                             "a share of the heads: not supported with a plan; use context parallelism)")
        text = num_text_tokens if self.spec.joint else 0
        if not 0 <= text < S:
            raise ValueError(f"module {self.spec.name!r}: {text} text tokens do not fit a joint sequence of {S}")
        if state.graphing or (self.table is not None and heads is None and torch.compiler.is_compiling()):
            out = self._traced_call(q, k, v, S - text, text, heads)
            if out is not None:
                return out
        step = state.current_step()
        program = rt.module_programs(self.spec.name, heads)[step]
        cfg = state.cfg(needed=program.uses_cfg)
        grad = needs_grad(q, k, v)
        call = self.prepare(program, S - text, text, B, cfg, q.device, grad)
        widths = call.widths
        if grad and widths.quantized:
            raise ValueError(f"module {self.spec.name!r} step {step}: the plan computes heads in 8 bits (full_int8 / "
                             "arrow_int8), which are inference-only (rounding has no useful gradient); run under "
                             "torch.no_grad(), or plan without 8-bit candidates for training")
        if widths.any:
            out = call.backend.attend(q, k, v, call.layout, widths)
        else:  # every head finalized from memory below; traced for ONNX, empty_like's memory would become a constant
            out = q * 0 if torch.jit.is_tracing() else torch.empty_like(q)

        memory = state.memory(self.spec.name)
        if program.groups and out.requires_grad:
            out = out.clone()  # a backend may return a tensor autograd saved (SDPA's output): finish a copy
        for (method, group), index in zip(program.groups, call.group_index):
            method.finalize_heads(out, group, index, [_memory_of(memory, h) for h in group], cfg)
        if program.records:
            arrow_out = call.backend.attend(q, k, v, call.layout, call.record_widths)
            for h, _ in program.records:
                _memory_of(memory, h).residual = (out[:, h] - arrow_out[:, h]).detach()
        for mem in memory.values():
            mem.previous_output = None
        if program.keeps:  # one gather for every kept head (a copy: no graph across steps), a view per head
            kept = out.detach().index_select(1, call.keep_index)
            for i, h in enumerate(program.keeps):
                _memory_of(memory, h).previous_output = kept[:, i]
        if step == rt.plan.num_steps - 1:
            memory.clear()  # nothing reads past the last step
        return out

    def _traced_call(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_image_tokens: int,
                     num_text_tokens: int, heads: tuple[int, int] | None = None) -> torch.Tensor | None:
        """The call in step-independent form (`ditfa_optimum.runtime.tables`), when it applies: the blocks are
        compiled but the transformer hook ran eagerly and placed the step on q's device, no gradients, a backend with
        `attend_widths`. None otherwise (the step program runs). Under CUDA graphs (``state.graphing``) it always
        applies, or raises: a step program captured in a graph would replay its step's methods at every step."""
        rt, state = self.runtime, self.runtime.state
        problem = None
        if self.table is None or heads is not None:
            problem = rt.table_problem or "one rank's heads under context parallelism have no tables"
        elif state.traced or state.export_step is not None:
            problem = "the transformer hook itself is traced"
        elif state.step_tensor is None or self.table.choice.device != q.device:
            problem = "the step was not placed on the call's device"
        elif needs_grad(q, k, v):
            problem = "the call needs gradients"
        backend = None if problem else get_backend(rt.backend_name, q.device)
        if backend is not None and not hasattr(backend, "attend_widths"):
            problem = f"the {backend.name!r} backend takes no widths tensor (use 'triton' or 'reference')"
        if problem is None:
            return run_table(self.table, rt.vocabulary, backend, q, k, v,
                             self.layout(num_image_tokens, num_text_tokens), state.step_tensor, state.branch,
                             state.cfg(needed=self.table.uses_cfg), in_place=state.graphing)
        if state.graphing:
            raise RuntimeError(f"module {self.spec.name!r} cannot run under CUDA graphs: {problem}. A graph replays "
                               "what it captured, so a step program would run its step's methods at every step; "
                               "call ditfa_optimum.use_cuda_graphs(pipe, False)")
        return None
