"""A plan in step-independent form, for compiled blocks (regional compilation: `ditfa_optimum.compile_blocks`,
diffusers' ``transformer.compile_repeated_blocks``, ``torch.compile`` of single blocks) and for a whole compiled
transformer whose pipeline opens a cache context before each call (FLUX's).

Eager calls run the step program of the current step (`ditfa_optimum.runtime.headwise`): the step is a Python int,
and each module reads its own program. Traced, that makes Dynamo compile one graph per block and step (it specializes
on every Python value the code reads): 57 x 28 graphs on FLUX.1-dev, far past the recompile limit. Here a module's
plan is data instead:

* the plan's **vocabulary**: every distinct method of the plan (the `arrow` records of `arrow_residual` heads
  included), shared by all modules, plus a last entry that computes nothing;
* per module, a ``choice`` table ``[steps, heads]`` of vocabulary indices (and one of recorded arrows when the module
  has `arrow_residual` heads), on the device;
* the **step** as a one-element device tensor, set before each transformer call by the plan's transformer hook, which
  runs eagerly when only the blocks are compiled, or advances when the pipeline opens the call's cache context
  (`StepState.place`, `ditfa_optimum.runtime.transformer_hook`).

A call gathers its step's row of ``choice``, turns it into ``[B, H]`` band widths through the vocabulary's width
table (Python ints of the layout, the same for every block), makes one backend call with those widths as a tensor
(`attend_widths`: the fused kernel, or the masked reference), and lets each finishing method of the module finish
its heads with a mask (`AttentionMethod.finish_masked`: ``torch.where``, no index known on the host). What it keeps:
the module's whole output when it has `cache` heads (read at the next step), ``full - arrow`` for its `arrow_residual`
heads; per branch, until the generation ends (`StepState.reset`).

The traced code reads a module only through tensors and a few flags (which finishing methods it has, whether it
keeps outputs or records residuals), so the blocks of one kind share one graph, and the steps share it too; a
generation compiles a handful of graphs (the first call of each branch, which finds no memory yet, is one more).

Not covered (those calls run the step programs, with a graph per step): plans with 8-bit heads, backends without
`attend_widths` (``flex``, ``blocked``), calls that need gradients, one rank's heads under context parallelism,
methods registered without `finish_masked`, and a whole compiled transformer whose pipeline opens no cache context
(SD3's): the hook is traced with it and reads the step, a constant of each graph there.
"""

from __future__ import annotations

import math

import torch

from ..masks import TokenLayout
from ..methods import AttentionMethod, Cache, CfgShare, Full, make_method
from ..plan import CompressionPlan
from .backends import sdpa


def _finishes(method: AttentionMethod) -> bool:
    return type(method).finalize is not AttentionMethod.finalize


def table_problem(plan: CompressionPlan) -> str | None:
    """Why ``plan`` has no step-independent form (None when it has one)."""
    for spec in plan.modules:
        for step in range(plan.num_steps):
            for method in plan.step_methods(spec.name, step):
                if method.quantized:
                    return f"it computes heads in 8 bits ({method})"
                if _finishes(method) and type(method).finish_masked is AttentionMethod.finish_masked:
                    return f"method {method.name!r} has no finish_masked"
    return None


class Vocabulary:
    """Every distinct method of a plan, in a fixed order; index ``len(methods)`` computes nothing."""

    def __init__(self, plan: CompressionPlan):
        seen: dict[AttentionMethod, int] = {}
        counts: dict[AttentionMethod, int] = {}
        for spec in plan.modules:
            for step in range(plan.num_steps):
                for method in plan.step_methods(spec.name, step):
                    seen.setdefault(method, len(seen))
                    counts[method] = counts.get(method, 0) + 1
            for _step, _head, fraction in plan.residual_records(spec.name):
                seen.setdefault(make_method("arrow", fraction), len(seen))
        self.methods: tuple[AttentionMethod, ...] = tuple(seen)
        self.index = seen
        self.counts = tuple(counts.get(m, 0) for m in self.methods)
        self.none = len(self.methods)
        self._widths: dict[tuple, torch.Tensor] = {}

    def widths(self, layout: TokenLayout, batch: int, cfg: bool, device: torch.device) -> torch.Tensor:
        """``[entries + 1, B]`` int32: each entry's band width per sample (the last entry's all 0). Eager calls get
        one tensor per (layout, batch, cfg, device), made once: no host-to-device copy per call, which a CUDA graph
        capture would refuse (traced, it is a constant of the graph)."""
        key = (layout, batch, cfg, str(device))
        if not torch.compiler.is_compiling() and key in self._widths:
            return self._widths[key]
        rows = [m.kernel_widths(layout, batch, cfg) for m in self.methods] + [[0] * batch]
        tensor = torch.tensor(rows, dtype=torch.int32, device=device)
        if not torch.compiler.is_compiling():
            self._widths[key] = tensor
        return tensor

    def tune_key(self, layout: TokenLayout, batch: int, cfg: bool) -> int:
        """The kernel's autotuning key for every step of the plan (log2 of its mean computed band width, weighted by
        how often each method runs): one key, so the steps share one graph."""
        total = count = 0
        for method, n in zip(self.methods, self.counts):
            for w in method.kernel_widths(layout, batch, cfg):
                if w > 0:
                    total, count = total + w * n, count + n
        return 0 if not count else max(0, round(math.log2(total / count)))


class ModuleTable:
    """One module's plan as tables (see the module docstring). Built on the CPU; `place` moves it."""

    def __init__(self, plan: CompressionPlan, name: str, vocabulary: Vocabulary):
        steps = [[vocabulary.index[m] for m in plan.step_methods(name, s)] for s in range(plan.num_steps)]
        self.choice = torch.tensor(steps, dtype=torch.long)  # [steps, heads]
        used = {vocabulary.methods[i] for row in steps for i in row}
        #: (vocabulary index, method) of the methods that finish heads, in vocabulary order
        self.finishers = tuple((vocabulary.index[m], m) for m in vocabulary.methods if m in used and _finishes(m))
        self.keeps = any(m.needs_previous_output for m in used)
        self.uses_cfg = any(isinstance(m, CfgShare) for m in used)
        self.all_full = all(isinstance(m, Full) for m in used)
        records = list(plan.residual_records(name))  # (a generator: always true)
        self.records = None
        if records:
            table = torch.full_like(self.choice, vocabulary.none)
            for step, head, fraction in records:
                table[step, head] = vocabulary.index[make_method("arrow", fraction)]
            self.records = table
        #: per branch: what later steps read ("previous": the whole output, "residual": full - arrow)
        self.memory: dict[int, dict[str, torch.Tensor]] = {}

    def place(self, device: torch.device) -> None:
        self.choice = self.choice.to(device)
        if self.records is not None:
            self.records = self.records.to(device)


def launch_table(widths: torch.Tensor) -> torch.Tensor:
    """The fused kernel's launch table (`ditfa_optimum.kernels.headwise_attention.launch_table`) made on the device
    from a ``[B, H]`` widths tensor: rows ``(sample * H + head, width)`` by decreasing width, ties in order."""
    flat = widths.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    return torch.stack([order.to(torch.int32), flat.index_select(0, order)], dim=1).contiguous()


def _keep(memory: dict[str, torch.Tensor], name: str, value: torch.Tensor, in_place: bool) -> None:
    """``memory[name] = value``; ``in_place``: written into the tensor already there (a CUDA graph's capture records
    the write to that tensor, which its replays then update)."""
    held = memory.get(name)
    if held is value:  # (written in place already: the kernel's output was the kept tensor)
        return
    same = held is not None and (held.shape, held.dtype, held.device) == (value.shape, value.dtype, value.device)
    if in_place and same:
        held.copy_(value)
    else:
        memory[name] = value.detach().clone() if in_place else value.detach()


def run_table(table: ModuleTable, vocabulary: Vocabulary, backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        layout: TokenLayout, step: torch.Tensor, branch: int, cfg: bool, in_place: bool = False) -> torch.Tensor:
    """One call of ``table``'s module at the step held by ``step`` (a one-element device tensor); ``in_place``: what
    it keeps is written into the tensors kept before (`ditfa_optimum.runtime.graphs`)."""
    B, H = q.shape[:2]
    if table.all_full:
        return sdpa(q, k, v)
    by_entry = vocabulary.widths(layout, B, cfg, q.device)
    key = vocabulary.tune_key(layout, B, cfg)
    row = table.choice.index_select(0, step)[0]  # [H]: this step's method of each head
    memory = table.memory.setdefault(branch, {})
    if in_place:  # kept by an earlier generation of other shapes (a graph with them was dropped): not this one's
        for name in [n for n, held in memory.items() if (held.shape, held.device) != (q.shape, q.device)]:
            del memory[name]
    # in place and eager (CUDA graphs), the backend writes the computed heads into the kept output itself: its cached
    # heads then hold the last step's output already (no copy in, none out), and only other finishers copy
    previous = memory.get("previous") if in_place and table.keeps and not torch.compiler.is_compiling() else None
    if previous is not None and (previous.dtype != q.dtype or not previous.is_contiguous()):
        previous = None
    widths = by_entry.index_select(0, row).t()
    out = backend.attend_widths(q, k, v, layout, widths, key, out=previous) if previous is not None else \
        backend.attend_widths(q, k, v, layout, widths, key)
    for index, method in table.finishers:
        if out is previous and isinstance(method, Cache):
            continue  # its heads were not written: they hold the last step's output
        out = method.finish_masked(out, (row == index).view(1, H, 1, 1), memory, cfg)
    if table.records is not None:
        recorded = table.records.index_select(0, step)[0]
        arrow = backend.attend_widths(q, k, v, layout, by_entry.index_select(0, recorded).t(), key)
        residual = memory.get("residual")
        residual = torch.zeros_like(out) if residual is None else residual
        _keep(memory, "residual", torch.where((recorded != vocabulary.none).view(1, H, 1, 1), out - arrow, residual),
              in_place)
    if table.keeps:
        _keep(memory, "previous", out, in_place)
    return out
