"""The head-wise attention runtime: one planned attention call of one module at the current step.

`PlanRuntime` is shared by all modules of a transformer (plan, step state, backend choice); `ModuleRuntime` is the
callable each attention processor invokes with the joint ``q, k, v`` (``[B, H, S, D]``). Per call it

1. looks up the methods of this module's heads at the current step (precomputed once per plan);
2. builds the ``[B, H]`` band-width table and makes ONE backend call for every computed (sample, head);
3. lets each method finish its head (fill from cache, copy the conditional CFG half, add the residual);
4. records what later steps need, and only that: outputs read by a `cache` head at the next step, and
   ``full - arrow`` residuals at the full steps that `arrow_residual` heads follow.
"""

from __future__ import annotations

import logging

from dataclasses import dataclass

import torch

from ..masks import TokenLayout
from ..methods import AttentionMethod, CfgShare, HeadMemory, make_method
from ..plan import CompressionPlan, ModuleSpec
from .backends import Widths, check_backend_name, get_backend, needs_grad, remember
from .log import note
from .state import StepState


@dataclass(frozen=True)
class _StepProgram:
    methods: tuple[AttentionMethod, ...]
    finishing: tuple[int, ...]  # heads whose method has a finalize step
    keeps: tuple[int, ...]  # heads whose output the next step reads
    records: tuple[tuple[int, AttentionMethod], ...]  # (head, arrow) residual records at this step
    uses_cfg: bool

    @staticmethod
    def of(methods: tuple[AttentionMethod, ...], keeps: tuple[int, ...],
           records: tuple[tuple[int, AttentionMethod], ...]) -> "_StepProgram":
        """The program of one step's ``methods`` (the fields that follow from them derived once, not per call)."""
        return _StepProgram(
            methods=methods,
            finishing=tuple(h for h, m in enumerate(methods) if type(m).finalize is not AttentionMethod.finalize),
            keeps=keeps, records=records, uses_cfg=any(isinstance(m, CfgShare) for m in methods))

    def heads(self, lo: int, hi: int) -> "_StepProgram":
        """The program of heads ``lo .. hi - 1`` only, renumbered from 0 (a rank's share of the heads under
        context parallelism, `ditfa_optimum.runtime.parallel`)."""
        return _StepProgram.of(self.methods[lo:hi], tuple(h - lo for h in self.keeps if lo <= h < hi),
                               tuple((h - lo, m) for h, m in self.records if lo <= h < hi))


class PlanRuntime:
    """Everything the processors of one transformer share."""

    def __init__(self, plan: CompressionPlan, backend: str | None = None, cfg=None):
        self.plan = plan
        self.backend_name = check_backend_name(backend)
        self.state = StepState(plan.num_steps, cfg=cfg)
        self.programs = {spec.name: self._compile(spec) for spec in plan.modules}
        self.warned_small = False  # one warning when the image is smaller than two mask blocks
        self._sliced: dict[tuple[str, int, int], list[_StepProgram]] = {}

    def module_programs(self, name: str, heads: tuple[int, int] | None = None) -> list[_StepProgram]:
        """The step programs of module ``name``, or of its heads ``heads = (lo, hi)`` only."""
        if heads is None:
            return self.programs[name]
        key = (name, *heads)
        if key not in self._sliced:
            self._sliced[key] = [p.heads(*heads) for p in self.programs[name]]
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
        return programs

    def module(self, spec: ModuleSpec) -> "ModuleRuntime":
        return ModuleRuntime(self, spec)


class ModuleRuntime:
    """The planned attention of one module; called by its processor."""

    def __init__(self, runtime: PlanRuntime, spec: ModuleSpec):
        self.runtime = runtime
        self.spec = spec
        self._widths: dict[tuple, Widths] = {}
        self._record_widths: dict[tuple, Widths] = {}

    def widths(self, step: int, program: _StepProgram, layout: TokenLayout, batch: int, cfg: bool,
               heads: tuple[int, int] | None = None) -> Widths:
        """The band widths of the computed (sample, head) pairs at ``step`` (0 = skipped); memoised."""
        key = (step, layout, batch, cfg, heads)
        if key not in self._widths:
            per_head = [m.kernel_widths(layout, batch, cfg) for m in program.methods]
            return remember(self._widths, key, Widths(tuple(tuple(int(h[b]) for h in per_head) for b in range(batch)),
                                                   layout.num_image_blocks))
        return self._widths[key]

    def record_widths(self, step: int, program: _StepProgram, layout: TokenLayout, batch: int,
                      heads: tuple[int, int] | None = None) -> Widths:
        """The widths of the arrow attention whose residual `arrow_residual` heads record at ``step``; memoised."""
        key = (step, layout, batch, heads)
        if key not in self._record_widths:
            row = [0] * len(program.methods)
            for h, arrow in program.records:
                row[h] = arrow.width(layout)
            return remember(self._record_widths, key, Widths((tuple(row),) * batch, layout.num_image_blocks))
        return self._record_widths[key]

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
        layout = self.layout(S - text, text)
        step = state.current_step()
        program = rt.module_programs(self.spec.name, heads)[step]
        cfg = state.cfg(needed=program.uses_cfg)
        widths = self.widths(step, program, layout, B, cfg, heads)
        grad = needs_grad(q, k, v)
        if grad and widths.quantized:
            raise ValueError(f"module {self.spec.name!r} step {step}: the plan computes heads in 8 bits (full_int8 / "
                             "arrow_int8), which are inference-only (rounding has no useful gradient); run under "
                             "torch.no_grad(), or plan without 8-bit candidates for training")
        # every backend runs an all-full call as plain SDPA, which autograd differentiates
        backend = get_backend(rt.backend_name, q.device, grad=not widths.all_full and grad)
        if widths.any:
            out = backend.attend(q, k, v, layout, widths)
        else:  # every head finalized from memory below; traced for ONNX, empty_like's memory would become a constant
            out = q * 0 if torch.jit.is_tracing() else torch.empty_like(q)

        memory = state.memory(self.spec.name)
        if program.finishing and out.requires_grad:
            out = out.clone()  # a backend may return a tensor autograd saved (SDPA's output): finish a copy
        for h in program.finishing:
            out[:, h] = program.methods[h].finalize(out[:, h], memory.setdefault(h, HeadMemory()), cfg)
        if program.records:
            arrow_out = backend.attend(q, k, v, layout, self.record_widths(step, program, layout, B, heads))
            for h, _ in program.records:
                memory.setdefault(h, HeadMemory()).residual = (out[:, h] - arrow_out[:, h]).detach()
        for h, mem in memory.items():
            mem.previous_output = None
        for h in program.keeps:
            memory.setdefault(h, HeadMemory()).previous_output = out[:, h].detach().clone()  # no graph across steps
        if step == rt.plan.num_steps - 1:
            memory.clear()  # nothing reads past the last step
        return out
