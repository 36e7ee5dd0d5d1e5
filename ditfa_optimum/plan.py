"""`CompressionPlan`: for every attention module, denoising step and head, one attention method and its parameter;
and for every transformer block and step, one block method.

A plan is plain data: per module an int16 tensor of method ids and a float64 tensor of method parameters, both
``[num_steps, num_heads]``; per block (optional) an int16 ``[num_steps]`` tensor of block method ids; plus the
structural description of the modules and blocks it was made for (`ModuleSpec`, `BlockSpec`). It never holds module
references, so it can be searched, saved and compared on a machine without the model.

On disk (`save` / `load`): ``plan.json`` (schema version (`ditfa_optimum.schema`), method vocabularies, module and
block specs, metadata: names and numbers, never tensor values) and ``plan.safetensors`` (keys
``"<module name>.method"``, ``"<module name>.param"`` and ``"<block name>.block_method"``). Plans written before the
blocks and skipped steps existed still load.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from . import schema
from .masks import DEFAULT_BLOCK_SIZE, TokenLayout
from .methods import (
    AttentionMethod,
    BlockMethod,
    Compute,
    Full,
    MemoryRef,
    block_method_class,
    block_method_names,
    dense_flops,
    make_block_method,
    make_method,
    method_class,
    method_names,
)

PLAN_JSON = "plan.json"
PLAN_TENSORS = "plan.safetensors"


@dataclass(frozen=True)
class ModuleSpec:
    """Structure of one attention module, as an adapter reports it.

    Args:
        name: the module's qualified name in the transformer (``transformer_blocks.3.attn``).
        num_heads: attention heads.
        head_dim: channels per head.
        image_first: token order of its joint sequence (SD3: True, FLUX: False).
        joint: False when the module attends over image tokens only (SD3.5's second attention): no text tokens.
    """

    name: str
    num_heads: int
    head_dim: int
    image_first: bool = True
    joint: bool = True

    def layout(self, image_tokens: int, text_tokens: int, block_size: int) -> TokenLayout:
        return TokenLayout(image_tokens, text_tokens if self.joint else 0, self.image_first, block_size).check()


@dataclass(frozen=True)
class BlockSpec:
    """Structure and linear cost of one transformer block, as an adapter reports it.

    FLOPs count the block's matrix multiplies (``nn.Linear``, 2 FLOPs per multiply-add, read from the weight shapes by
    the adapter); norms, activations, gates and residual adds are not counted, nor are the attention products
    themselves (those come from the head plan, per step). The per-token numbers make the cost of any resolution and
    text length a product: see `projection_flops` and `mlp_flops`.

    Args:
        name: the block's qualified name in the transformer (``transformer_blocks.3``).
        attention: names of the attention modules inside it (their `ModuleSpec.name`), in execution order.
        mlps: qualified names of its MLP submodules that `mlp_cache` skips (SD3/FLUX double-stream: ``ff`` and
            ``ff_context``; SD3's last block only ``ff``); empty when it has none callable on its own (FLUX
            single-stream blocks fuse the MLP into ``proj_out``): such a block cannot use `mlp_cache`.
        attn_proj_image: FLOPs per image token of its attention projections (q, k, v, out; SD3.5's ``attn2``).
        attn_proj_text: FLOPs per text token of its attention projections (the added q/k/v/out of joint attention).
        mlp_image: FLOPs per image token of its MLP.
        mlp_text: FLOPs per text token of its MLP.
        modulation: FLOPs per sample (not per token) of its AdaLN modulation linears on the timestep embedding.
    """

    name: str
    attention: tuple[str, ...]
    mlps: tuple[str, ...] = ()
    attn_proj_image: int = 0
    attn_proj_text: int = 0
    mlp_image: int = 0
    mlp_text: int = 0
    modulation: int = 0

    def __post_init__(self):
        object.__setattr__(self, "attention", tuple(self.attention))
        object.__setattr__(self, "mlps", tuple(self.mlps))
        for f in ("attn_proj_image", "attn_proj_text", "mlp_image", "mlp_text", "modulation"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"block {self.name!r}: {f} must be an integer number of FLOPs >= 0, got {value!r}")

    def projection_flops(self, image_tokens: int, text_tokens: int) -> float:
        """Linear FLOPs outside the MLP (attention projections and modulation) for one sample."""
        return float(image_tokens * self.attn_proj_image + text_tokens * self.attn_proj_text + self.modulation)

    def mlp_flops(self, image_tokens: int, text_tokens: int) -> float:
        """The MLP's FLOPs for one sample."""
        return float(image_tokens * self.mlp_image + text_tokens * self.mlp_text)


class _Cuts:
    """Dense vs planned FLOPs, ``[rows, steps]`` float64, and the cuts they give (rows: modules or blocks)."""

    dense: torch.Tensor
    planned: torch.Tensor

    @property
    def dense_total(self) -> float:
        return float(self.dense.sum())

    @property
    def planned_total(self) -> float:
        return float(self.planned.sum())

    @property
    def cut(self) -> float:
        """Fraction of the dense FLOPs the plan saves (0 = none, 1 = all)."""
        return 1.0 - self.planned_total / self.dense_total

    def cut_per_step(self) -> torch.Tensor:
        return 1.0 - self.planned.sum(0) / self.dense.sum(0)

    def _cut_per_row(self, names: list[str]) -> dict[str, float]:
        return {n: 1.0 - float(p.sum() / d.sum()) for n, d, p in zip(names, self.dense, self.planned)}


@dataclass
class FlopReport(_Cuts):
    """Attention FLOPs of a plan vs dense attention, per module and step (one sample; CFG halves counted)."""

    module_names: list[str]
    dense: torch.Tensor  # [M, T] float64
    planned: torch.Tensor  # [M, T] float64

    def cut_per_module(self) -> dict[str, float]:
        return self._cut_per_row(self.module_names)


@dataclass
class TransformerFlopReport(_Cuts):
    """FLOPs of the transformer blocks (attention products + linear layers), dense vs planned, per block and step,
    for one sample. The embedders and the final projection outside the blocks are not counted (well under 1% of an
    SD3/FLUX forward)."""

    block_names: list[str]
    dense: torch.Tensor  # [NB, T] float64
    planned: torch.Tensor  # [NB, T] float64

    def cut_per_block(self) -> dict[str, float]:
        return self._cut_per_row(self.block_names)


def _check_names(what: str, planned: list[str], model: dict) -> None:
    """Refuse a plan whose module (or block) names differ from the model's, naming up to five of each side."""
    missing = [n for n in planned if n not in model]
    extra = [n for n in model if n not in set(planned)]
    if missing or extra:
        raise ValueError(f"the plan does not match the model's {what}: the model lacks {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} and the plan lacks {extra[:5]}"
                         f"{' ...' if len(extra) > 5 else ''} ({len(planned)} planned, {len(model)} in the model); "
                         "was the plan made for another model?")


@dataclass
class CompressionPlan:
    """Per attention module, step and head: which method runs; per transformer block and step (optional): which block
    method runs.

    Args:
        modules: the attention modules the plan covers, in execution order.
        methods: per module name, ``[num_steps, num_heads]`` integer method ids.
        params: per module name, ``[num_steps, num_heads]`` float64 method parameters (arrow window fraction, else 0).
        block_size: the arrow mask's block size in tokens (part of the mask definition, see `ditfa_optimum.masks`).
        model_class: the transformer class the plan was made for (checked by `validate`).
        metadata: free-form JSON-able facts (search config, provenance); never needed to run the plan.
        blocks: the transformer blocks, in execution order (empty: the plan has no block level and runs every block).
            When given, every attention module belongs to exactly one block.
        block_methods: per block name, ``[num_steps]`` integer block method ids (`ditfa_optimum.methods.block_base`);
            blocks left out run `compute` at every step.
        skipped_steps: the steps where the transformer does not run at all: its output is extrapolated from the last
            two steps where it ran (`ditfa_optimum.methods.step_taylor`). Step 0 always runs. The head and block
            methods listed for a skipped step are not used.

    Example:
        >>> from ditfa_optimum.plan import CompressionPlan, ModuleSpec
        >>> specs = [ModuleSpec("transformer_blocks.0.attn", num_heads=4, head_dim=8)]
        >>> plan = CompressionPlan.uniform(specs, num_steps=4, method="arrow:1/8")
        >>> str(plan.method("transformer_blocks.0.attn", step=1, head=2))
        'arrow:0.125'
    """

    modules: list[ModuleSpec]
    methods: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]
    block_size: int = DEFAULT_BLOCK_SIZE
    model_class: str | None = None
    metadata: dict = field(default_factory=dict)
    blocks: list[BlockSpec] = field(default_factory=list)
    block_methods: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped_steps: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.methods = {k: torch.as_tensor(v, dtype=torch.int16).cpu() for k, v in self.methods.items()}
        self.params = {k: torch.as_tensor(v, dtype=torch.float64).cpu() for k, v in self.params.items()}
        self.blocks = list(self.blocks)
        self.block_methods = {k: torch.as_tensor(v, dtype=torch.int16).cpu().clone()
                              for k, v in self.block_methods.items()}
        self._check_structure()
        self.skipped_steps = self._checked_skips(self.skipped_steps)
        for b in self.blocks:  # default: the block runs at every step
            self.block_methods.setdefault(b.name, torch.zeros(self.num_steps, dtype=torch.int16))
        self._check_block_structure()
        self._check_schedule()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_methods(cls, modules: Iterable[ModuleSpec], table: dict[str, list[list[AttentionMethod | str]]],
                     **kwargs) -> "CompressionPlan":
        """Build from ``table[module][step][head]`` = a method object or a string like ``"arrow:1/8"``."""
        modules = list(modules)
        methods, params = {}, {}
        for spec in modules:
            if spec.name not in table:
                raise ValueError(f"no methods given for attention module {spec.name!r}")
            rows = [[m if isinstance(m, AttentionMethod) else make_method(m) for m in row] for row in table[spec.name]]
            methods[spec.name] = torch.tensor([[m.method_id for m in row] for row in rows], dtype=torch.int16)
            params[spec.name] = torch.tensor([[m.param for m in row] for row in rows], dtype=torch.float64)
        return cls(modules, methods, params, **kwargs)

    @classmethod
    def uniform(cls, modules: Iterable[ModuleSpec], num_steps: int, method: AttentionMethod | str = "full",
                full_steps: int = 1, **kwargs) -> "CompressionPlan":
        """Every head of every module runs ``method``, except the first ``full_steps`` steps, which run `full`."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if not 0 <= full_steps <= num_steps:
            raise ValueError(f"full_steps must be in [0, num_steps={num_steps}], got {full_steps}")
        method = method if isinstance(method, AttentionMethod) else make_method(method)
        table = {s.name: [[Full() if t < full_steps else method] * s.num_heads for t in range(num_steps)]
                 for s in modules}
        return cls.from_methods(modules, table, **kwargs)

    # ---------------------------------------------------------------- access
    @property
    def num_steps(self) -> int:
        return next(iter(self.methods.values())).shape[0]

    @property
    def module_names(self) -> list[str]:
        return [s.name for s in self.modules]

    def spec(self, module: str) -> ModuleSpec:
        for s in self.modules:
            if s.name == module:
                return s
        raise KeyError(f"the plan has no attention module {module!r}; it covers {self.module_names}")

    def method(self, module: str, step: int, head: int) -> AttentionMethod:
        mid = int(self.methods[module][step, head])
        return method_class(mid).from_param(float(self.params[module][step, head]) or None)

    def step_methods(self, module: str, step: int) -> list[AttentionMethod]:
        """The methods of every head of ``module`` at ``step``."""
        return [self.method(module, step, h) for h in range(self.spec(module).num_heads)]

    def set(self, module: str, step: int, head: int, method: AttentionMethod | str) -> None:
        """Change one entry (re-validates the schedule)."""
        method = method if isinstance(method, AttentionMethod) else make_method(method)
        old = (self.methods[module][step, head].clone(), self.params[module][step, head].clone())
        self.methods[module][step, head] = method.method_id
        self.params[module][step, head] = method.param
        try:
            self._check_schedule()
        except ValueError:
            self.methods[module][step, head], self.params[module][step, head] = old
            raise

    def method_counts(self) -> dict[str, int]:
        """How many (module, step, head) entries use each method name."""
        ids = torch.cat([m.flatten() for m in self.methods.values()])
        return {method_class(int(i)).name: int(c) for i, c in zip(*ids.unique(return_counts=True))}

    # ---------------------------------------------------------------- blocks
    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def block_spec(self, block: str) -> BlockSpec:
        for b in self.blocks:
            if b.name == block:
                return b
        raise KeyError(f"the plan has no block {block!r}; it covers {self.block_names or 'no blocks'}")

    def block_of(self, module: str) -> BlockSpec | None:
        """The block holding attention module ``module`` (None when the plan has no blocks)."""
        for b in self.blocks:
            if module in b.attention:
                return b
        return None

    def block_method(self, block: str, step: int) -> BlockMethod:
        self.block_spec(block)
        return block_method_class(int(self.block_methods[block][step]))()

    def set_block(self, block: str, step: int, method: BlockMethod | str) -> None:
        """Change one (block, step) entry (re-validates the schedule; rolls back and raises if it breaks a rule)."""
        method = make_block_method(method)
        self.block_spec(block)
        old = self.block_methods[block][step].clone()
        self.block_methods[block][step] = method.method_id
        try:
            self._check_schedule()
        except ValueError:
            self.block_methods[block][step] = old
            raise

    def remap_steps(self, num_steps: int) -> "CompressionPlan":
        """This plan for ``num_steps`` denoising steps: each step takes the choices of the searched step at the same
        normalised position, and computes where that would read memory the new schedule never made
        (`ditfa_optimum.remap`). The result was not searched for these steps: expect its images to differ more from
        dense than the search predicted (docs/runtime.md, "Another step count")."""
        from .remap import remap_steps

        return remap_steps(self, num_steps)

    def set_skipped_steps(self, steps: Iterable[int]) -> None:
        """Skip these whole steps (`step_taylor`; re-validates the schedule, rolls back and raises if a rule breaks,
        e.g. a `cache` head right after a skipped step)."""
        old = self.skipped_steps
        self.skipped_steps = self._checked_skips(list(steps))
        try:
            self._check_schedule()
        except ValueError:
            self.skipped_steps = old
            raise

    def block_counts(self) -> dict[str, int]:
        """How many (block, step) entries use each block method name (empty when the plan has no blocks)."""
        if not self.blocks:
            return {}
        ids = torch.cat([self.block_methods[n] for n in self.block_names])
        return {block_method_class(int(i)).name: int(c) for i, c in zip(*ids.unique(return_counts=True))}

    @property
    def skips_blocks(self) -> bool:
        """Whether any (block, step) runs something else than `compute` (the runtime then needs its block hooks)."""
        return any(bool((self.block_methods[n] != Compute.method_id).any()) for n in self.block_names)

    def block_runs(self, block: str) -> list[bool]:
        """Per step: whether the block's forward executes (its attention modules run)."""
        return [self.runs_step(t) and self.block_method(block, t).runs_block for t in range(self.num_steps)]

    def block_sources(self, block: str) -> list[tuple[MemoryRef, ...]]:
        """Per step: what the block's method reads from earlier steps (``MemoryRef(kind, step)``; ``()`` for none)."""
        return self._block_schedule(self.block_spec(block))

    def block_keeps(self, block: str) -> dict[MemoryRef, int]:
        """What the runtime must record for ``block``: each `MemoryRef` some step reads, with the last step reading it
        (the record is freed after that step). Records nobody reads are absent, so they are never stored."""
        keeps = {}
        for step, refs in enumerate(self.block_sources(block)):
            for ref in refs:
                keeps[ref] = step  # steps ascend: the last assignment is the last reader
        return keeps

    def __eq__(self, other) -> bool:
        if not isinstance(other, CompressionPlan):
            return NotImplemented
        return (self.modules == other.modules and self.block_size == other.block_size
                and self.model_class == other.model_class
                and all(torch.equal(self.methods[n], other.methods[n]) and torch.equal(self.params[n], other.params[n])
                        for n in self.module_names)
                and self.blocks == other.blocks
                and all(torch.equal(self.block_methods[n], other.block_methods[n]) for n in self.block_names)
                and self.skipped_steps == other.skipped_steps)

    # ---------------------------------------------------------------- validation
    def _check_structure(self) -> None:
        names = self.module_names
        if not names:
            raise ValueError("a plan needs at least one attention module")
        if len(set(names)) != len(names):
            raise ValueError(f"attention module names repeat in the plan: {names}")
        if set(self.methods) != set(names) or set(self.params) != set(names):
            raise ValueError(f"plan tensors cover modules {sorted(self.methods)} / {sorted(self.params)}, "
                             f"but the plan lists {names}")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or \
                not 1 <= self.block_size <= 1 << 20:
            raise ValueError(f"block_size must be an int in [1, 2^20] (tokens per arrow-mask block), got "
                             f"{str(self.block_size)[:40]}")
        steps = None
        for spec in self.modules:
            m, p = self.methods[spec.name], self.params[spec.name]
            if m.dim() != 2 or m.shape[1] != spec.num_heads or p.shape != m.shape:
                raise ValueError(f"module {spec.name!r}: method/param tensors must be [num_steps, {spec.num_heads}] "
                                 f"(one entry per head), got {tuple(m.shape)} and {tuple(p.shape)}")
            steps = m.shape[0] if steps is None else steps
            if m.shape[0] != steps or steps < 1:
                raise ValueError(f"module {spec.name!r} has {m.shape[0]} steps, other modules have {steps}")
            for (step, head), mid, par in zip(itertools.product(range(steps), range(spec.num_heads)),
                                              m.flatten().tolist(), p.flatten().tolist()):
                where = f"module {spec.name!r} step {step} head {head}"
                try:
                    method_class(mid).from_param(par or None)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None

    def _checked_skips(self, steps) -> list[int]:
        try:
            out = sorted({int(s) for s in steps})
            exact = all(float(s) == int(s) for s in steps)
        except (TypeError, ValueError):
            out, exact = None, False
        if out is None or not exact:
            raise ValueError(f"skipped_steps must be a list of step indices, got {steps!r}")
        bad = [s for s in out if not 1 <= s < self.num_steps]
        if bad:
            raise ValueError(f"skipped_steps {bad} are outside 1..{self.num_steps - 1}: step 0 always runs (nothing "
                             f"earlier to extrapolate from) and the plan covers {self.num_steps} steps")
        return out

    def runs_step(self, step: int) -> bool:
        """Whether the transformer runs at ``step`` (False: `step_taylor` extrapolates its output)."""
        return step not in self.skipped_steps

    def step_sources(self) -> list[tuple[int, ...]]:
        """Per step: the earlier steps whose transformer outputs a skipped step extrapolates from (``()`` where the
        transformer runs)."""
        from .methods import step_taylor

        ran, out = [], []
        for step in range(self.num_steps):
            if self.runs_step(step):
                ran.append(step)
                out.append(())
            else:
                out.append(step_taylor.sources(step, ran))
        return out

    def _check_block_structure(self) -> None:
        names = self.block_names
        if len(set(names)) != len(names):
            raise ValueError(f"block names repeat in the plan: {names}")
        extra = sorted(set(self.block_methods) - set(names))
        if extra:
            raise ValueError(f"block methods are given for {extra}, which are not among the plan's blocks {names}")
        if not self.blocks:
            return
        owner: dict[str, str] = {}
        for b in self.blocks:
            for module in b.attention:
                if module not in self.methods:
                    raise ValueError(f"block {b.name!r} lists attention module {module!r}, which the plan does not "
                                     f"cover; its modules are {self.module_names}")
                if module in owner:
                    raise ValueError(f"attention module {module!r} is listed by two blocks, {owner[module]!r} and "
                                     f"{b.name!r}")
                owner[module] = b.name
        orphans = [n for n in self.module_names if n not in owner]
        if orphans:
            raise ValueError(f"attention modules {orphans[:5]} belong to none of the plan's blocks; a plan with blocks "
                             "lists every block of the model (Adapter.blocks)")
        for b in self.blocks:
            ids = self.block_methods[b.name]
            if ids.shape != (self.num_steps,):
                raise ValueError(f"block {b.name!r}: its block method tensor must be [num_steps={self.num_steps}], got "
                                 f"{tuple(ids.shape)}")
            for step, mid in enumerate(ids.tolist()):
                try:
                    block_method_class(mid)
                except ValueError as e:
                    raise ValueError(f"block {b.name!r} step {step}: {e}") from None

    def _block_schedule(self, block: BlockSpec) -> list[tuple[MemoryRef, ...]]:
        """Per step, what the block's method reads; raises ValueError for a step whose memory no earlier step makes."""
        ran, mlp_ran, sources = [], [], []
        for step, mid in enumerate(self.block_methods[block.name].tolist()):
            if not self.runs_step(step):  # the transformer does not run: neither does the block
                sources.append(())
                continue
            m = block_method_class(mid)()
            where = f"block {block.name!r} step {step}"
            if step == 0 and not isinstance(m, Compute):
                raise ValueError(f"{where}: `{m.name}`, but step 0 must be `compute`: no earlier step left anything "
                                 "to reuse")
            try:
                sources.append(m.sources(step, ran, mlp_ran, block.mlps))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if m.runs_block:
                ran.append(step)
                if m.runs_mlp:
                    mlp_ran.append(step)
        return sources

    def _check_block_heads(self, block: BlockSpec) -> None:
        """Head methods that read an earlier step of their head need the block to have run then."""
        methods = [block_method_class(i)() for i in self.block_methods[block.name].tolist()]
        runs = self.block_runs(block.name)
        if all(m.runs_block for m in methods):
            return
        for module in block.attention:
            ids = self.methods[module]
            for step in range(1, self.num_steps):
                if not runs[step] or runs[step - 1] or not self.runs_step(step - 1):
                    continue  # (a skipped step before is checked for every module by _check_schedule)
                for head, mid in enumerate(ids[step].tolist()):
                    m = method_class(mid)
                    if m.needs_previous_output:
                        raise ValueError(
                            f"module {module!r} step {step} head {head}: `{m.name}` reuses the head's output of step "
                            f"{step - 1}, but its block {block.name!r} does not run at step {step - 1} "
                            f"(`{methods[step - 1].name}`); compute the head at step {step} or run the block at step "
                            f"{step - 1}")
            for step, head, _ in self.residual_records(module):
                if not runs[step]:
                    raise ValueError(
                        f"module {module!r} step {step} head {head}: this `full` step records the residual that the "
                        f"head's later `arrow_residual` steps add, but its block {block.name!r} does not run at step "
                        f"{step} (`{methods[step].name}`); run the block at step {step} or give the head an earlier "
                        "full step in a step where the block runs")

    def _check_schedule(self) -> None:
        for block in self.blocks:
            self._block_schedule(block)
            self._check_block_heads(block)
        runs = [self.runs_step(t) for t in range(self.num_steps)]
        for spec in self.modules:
            for head in range(spec.num_heads):
                methods = [self.method(spec.name, t, head) for t in range(self.num_steps)]
                conflict = schedule_conflict(methods, runs, runs)
                if conflict is None:
                    continue
                step, kind, last_full, fraction = conflict
                m = self.method(spec.name, step, head)
                where = f"module {spec.name!r} step {step} head {head}"
                if kind == "first step":
                    why = (f"`{m.name}` reuses the previous step's output, but step 0 has none; use `full` (or any "
                           "computed method) at step 0")
                elif kind == "previous step skipped":
                    why = (f"`{m.name}` reuses the head's output of step {step - 1}, but the plan skips step "
                           f"{step - 1} (`step_taylor`: the transformer does not run); compute the head at step "
                           f"{step} or run step {step - 1}")
                elif kind == "no full step":
                    why = (f"`{m.name}` needs a `full` step of this head before it to record the residual; none "
                           "precedes it")
                else:
                    why = (f"`{m}` follows the full step {last_full} like an earlier arrow_residual with fraction "
                           f"{fraction:g}; one full step records one residual, so use one fraction until the next "
                           "full step")
                raise ValueError(f"{where}: {why}")

    def validate(self, modules: Iterable[ModuleSpec], num_steps: int | None = None,
                 model_class: str | None = None, blocks: Iterable[BlockSpec] | None = None) -> None:
        """Check that the plan fits a model (its attention modules) and a step count; raise one clear ValueError.

        Args:
            modules: the model's attention modules, as its adapter reports them.
            num_steps: the denoising steps the pipeline will run; the plan must cover at least that many.
            model_class: the transformer's class name.
            blocks: the model's blocks (`Adapter.block_specs`); checked when given and the plan has blocks. Names,
                attention modules and MLP names must match; the FLOP counts are informative and not compared.
        """
        modules = list(modules)
        if model_class and self.model_class and model_class != self.model_class:
            raise ValueError(f"the plan was made for a {self.model_class}, but the transformer is a {model_class}")
        theirs = {s.name: s for s in modules}
        _check_names("attention modules", self.module_names, theirs)
        for mine in self.modules:
            other = theirs[mine.name]
            if (mine.num_heads, mine.head_dim) != (other.num_heads, other.head_dim):
                raise ValueError(f"module {mine.name!r}: the plan has {mine.num_heads} heads of dim {mine.head_dim}, "
                                 f"the model {other.num_heads} heads of dim {other.head_dim}; was the plan made for "
                                 "another model?")
            if (mine.image_first, mine.joint) != (other.image_first, other.joint):
                raise ValueError(f"module {mine.name!r}: token order/joint mismatch (plan {mine}, model {other})")
        if blocks is not None and self.blocks:
            self._validate_blocks(list(blocks))
        if num_steps is not None and num_steps > self.num_steps:
            raise ValueError(f"the plan covers {self.num_steps} denoising steps but the pipeline runs {num_steps}; "
                             f"search a plan for {num_steps} steps or call the pipeline with "
                             f"num_inference_steps={self.num_steps}")

    def _validate_blocks(self, blocks: list[BlockSpec]) -> None:
        theirs = {b.name: b for b in blocks}
        _check_names("blocks", self.block_names, theirs)
        for mine in self.blocks:
            other = theirs[mine.name]
            if (mine.attention, mine.mlps) != (other.attention, other.mlps):
                raise ValueError(f"block {mine.name!r}: the plan has attention modules {list(mine.attention)} and MLPs "
                                 f"{list(mine.mlps)}, the model {list(other.attention)} and {list(other.mlps)}; was "
                                 "the plan made for another model?")

    # ---------------------------------------------------------------- cost
    def flops(self, image_tokens: int, text_tokens: int, cfg: bool = False) -> FlopReport:
        """Attention FLOPs of this plan and of dense attention at a resolution (per sample).

        Args:
            image_tokens: image tokens per sample (e.g. 4096 for SD3 at 1024x1024).
            text_tokens: text tokens per sample (e.g. 333 for SD3, 512 for FLUX.1-dev).
            cfg: whether CFG is batched, which makes `cfg_share` half price.
        """
        dense = torch.zeros(len(self.modules), self.num_steps, dtype=torch.float64)
        planned = torch.zeros_like(dense)
        for i, spec in enumerate(self.modules):
            layout = spec.layout(image_tokens, text_tokens, self.block_size)
            dense[i] = spec.num_heads * dense_flops(layout, spec.head_dim)
            for step in filter(self.runs_step, range(self.num_steps)):
                planned[i, step] = sum(m.flops(layout, spec.head_dim, cfg) for m in self.step_methods(spec.name, step))
            for step, head, fraction in self.residual_records(spec.name):
                planned[i, step] += make_method("arrow", fraction).flops(layout, spec.head_dim, cfg)
        return FlopReport(self.module_names, dense, planned)

    def transformer_flops(self, image_tokens: int, text_tokens: int, cfg: bool = False) -> TransformerFlopReport:
        """FLOPs of the transformer blocks, dense vs this plan, per block and step (one sample).

        Dense: every block computes, every head full. Planned: per (block, step) its block method's `cost` from the
        attention FLOPs of its modules under the head plan (`flops`, which counts the residual-recording arrows too)
        and its `BlockSpec` linear FLOPs: `compute` pays everything, `mlp_cache` everything but the MLP,
        `block_cache` / `block_taylor` nothing.

        Args:
            image_tokens: image tokens per sample.
            text_tokens: text tokens per sample.
            cfg: whether CFG is batched (`cfg_share` heads then cost half).
        """
        if not self.blocks:
            raise ValueError("this plan records no blocks (an old plan, or one made without block specs), so its "
                             "whole-transformer FLOPs are unknown; make it with "
                             "blocks=adapter.block_specs(transformer) (ditfa_optimum.uniform_plan does), or use "
                             "plan.flops() for attention alone")
        attention = self.flops(image_tokens, text_tokens, cfg)
        row = {n: i for i, n in enumerate(attention.module_names)}
        dense = torch.zeros(len(self.blocks), self.num_steps, dtype=torch.float64)
        planned = torch.zeros_like(dense)
        for i, block in enumerate(self.blocks):
            rows = [row[n] for n in block.attention]
            attn_dense, attn_planned = attention.dense[rows].sum(0), attention.planned[rows].sum(0)
            proj = block.projection_flops(image_tokens, text_tokens)
            mlp = block.mlp_flops(image_tokens, text_tokens)
            dense[i] = attn_dense + proj + mlp
            for step in filter(self.runs_step, range(self.num_steps)):  # a skipped step costs nothing
                planned[i, step] = self.block_method(block.name, step).cost(float(attn_planned[step]), proj, mlp)
        return TransformerFlopReport(self.block_names, dense, planned)

    # ---------------------------------------------------------------- what the runtime must keep
    def residual_records(self, module: str) -> Iterator[tuple[int, int, float]]:
        """``(step, head, fraction)``: at this full step also compute arrow(fraction) and store full - arrow."""
        spec = self.spec(module)
        for head in range(spec.num_heads):
            last_full = None
            recorded = set()
            for step in range(self.num_steps):
                if not self.runs_step(step):
                    continue
                m = self.method(module, step, head)
                if isinstance(m, Full):
                    last_full = step
                elif m.needs_residual and last_full is not None and last_full not in recorded:
                    recorded.add(last_full)
                    yield last_full, head, m.param

    def output_keeps(self, module: str) -> torch.Tensor:
        """``[num_steps, num_heads]`` bool: this head's output at this step is read by the next step."""
        ids = self.methods[module]
        reads_prev = torch.zeros_like(ids, dtype=torch.bool)
        for mid in ids.unique().tolist():
            if method_class(mid).needs_previous_output:
                reads_prev |= ids == mid
        runs = self.block_runs(block.name) if (block := self.block_of(module)) is not None else \
            [self.runs_step(t) for t in range(self.num_steps)]
        reads_prev &= torch.tensor(runs)[:, None]  # a head whose block or step does not run reads nothing
        keeps = torch.zeros_like(reads_prev)
        keeps[:-1] = reads_prev[1:]
        return keeps

    # ---------------------------------------------------------------- serialization
    def uses_quantized_heads(self) -> bool:
        """Whether any head is computed in 8 bits (`full_int8`, `arrow_int8`)."""
        return any(method_class(name).quantized for name in self.method_counts())

    def to_json_dict(self) -> dict:
        extra = {}
        if self.uses_quantized_heads():  # what the 8-bit heads compute, so a later package cannot run them otherwise
            from .fp8_attention import SCHEME

            extra["attention_quantization"] = {"scheme": SCHEME, "scales": "dynamic"}
        return schema.stamp({
            **extra,
            "model_class": self.model_class,
            "block_size": self.block_size,
            "num_steps": self.num_steps,
            "method_vocabulary": {name: method_class(name).method_id for name in method_names()},
            "modules": [asdict(s) for s in self.modules],
            "block_method_vocabulary": {name: block_method_class(name).method_id for name in block_method_names()},
            "blocks": [{**asdict(b), "attention": list(b.attention), "mlps": list(b.mlps)} for b in self.blocks],
            "skipped_steps": list(self.skipped_steps),
            "metadata": self.metadata,
        })

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.module_names:
            out[f"{n}.method"] = self.methods[n].contiguous()
            out[f"{n}.param"] = self.params[n].contiguous()
        for n in self.block_names:
            out[f"{n}.block_method"] = self.block_methods[n].contiguous()
        return out

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``plan.json`` and ``plan.safetensors`` into ``directory`` (created if needed)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), directory / PLAN_TENSORS, metadata={"format": "pt"})
        (directory / PLAN_JSON).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")
        return directory

    @classmethod
    def from_json_and_tensors(cls, info: dict, tensors: dict[str, torch.Tensor]) -> "CompressionPlan":
        info = schema.read("plan", info, "plan.json")
        modules = [ModuleSpec(**m) for m in info["modules"]]
        # map the file's vocabulary onto this package's ids, so ids may be renumbered between versions
        vocab = info["method_vocabulary"]
        remap = {int(file_id): method_class(name).method_id for name, file_id in vocab.items()}
        methods, params = {}, {}
        for spec in modules:
            for key in (f"{spec.name}.method", f"{spec.name}.param"):
                if key not in tensors:
                    raise ValueError(f"plan tensors lack {key!r}; the plan file is incomplete or from another plan")
            ids = tensors[f"{spec.name}.method"]
            unknown = sorted(set(ids.unique().tolist()) - set(remap))
            if unknown:
                raise ValueError(f"module {spec.name!r}: method ids {unknown} are not in the plan's vocabulary {vocab}")
            methods[spec.name] = ids.clone().apply_(remap.__getitem__)
            params[spec.name] = tensors[f"{spec.name}.param"]
        blocks, block_methods = _blocks_from_json(info, tensors)
        expected = {k for s in modules for k in (f"{s.name}.method", f"{s.name}.param")}
        expected |= {f"{b.name}.block_method" for b in blocks}
        extra = set(tensors) - expected
        if extra:
            raise ValueError(f"plan tensors hold keys no module or block of the plan names: {sorted(extra)[:5]}")
        skipped = info.get("skipped_steps", [])
        if not isinstance(skipped, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in skipped):
            raise ValueError(f"plan.json 'skipped_steps' must be a list of step indices, got {skipped!r}")
        plan = cls(modules, methods, params, block_size=int(info["block_size"]), model_class=info.get("model_class"),
                   metadata=info.get("metadata") or {}, blocks=blocks, block_methods=block_methods,
                   skipped_steps=skipped)
        if plan.num_steps != info.get("num_steps", plan.num_steps):
            raise ValueError(f"plan.json says {info['num_steps']} steps, the tensors hold {plan.num_steps}")
        check_attention_quantization(plan, info.get("attention_quantization"))
        return plan

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CompressionPlan":
        """Read a plan written by `save`. Loading executes nothing from the files."""
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (PLAN_JSON, PLAN_TENSORS):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} does not exist; a plan directory holds {PLAN_JSON} and "
                                        f"{PLAN_TENSORS} (written by CompressionPlan.save)")
        try:
            info = json.loads((directory / PLAN_JSON).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{directory / PLAN_JSON} is not valid JSON ({e})") from None
        # copies: a file-backed tensor would change under the plan if the file were rewritten (safetensors 0.4.4)
        tensors = {k: v.clone() for k, v in load_file(directory / PLAN_TENSORS).items()}
        return cls.from_json_and_tensors(info, tensors)

    def summary(self) -> str:
        def shares(counts):
            total = sum(counts.values())
            return ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))

        blocks = f"; {len(self.blocks)} blocks: {shares(self.block_counts())}" if self.skips_blocks else ""
        skipped = f"; steps skipped (step_taylor): {self.skipped_steps}" if self.skipped_steps else ""
        return (f"CompressionPlan({len(self.modules)} attention modules x {self.num_steps} steps, "
                f"block {self.block_size}; {shares(self.method_counts())}{blocks}{skipped})")

    def __repr__(self) -> str:
        return self.summary()

    # ---------------------------------------------------------------- report
    def report(self, image_tokens: int | None = None, text_tokens: int | None = None,
               cfg: bool | None = None) -> "PlanReport":
        """Per module x step: the share of heads per method, the attention-FLOP cut, and (for searched plans) the
        predicted mean RSE. Token counts and CFG default to the search's (``metadata["search"]``)."""
        info = self.metadata.get("search", {})
        info = info if isinstance(info, dict) else {}
        image_tokens = info.get("image_tokens") if image_tokens is None else image_tokens
        text_tokens = info.get("text_tokens") if text_tokens is None else text_tokens
        cfg = bool(info.get("cfg", False)) if cfg is None else cfg
        if image_tokens is None or text_tokens is None:
            raise ValueError("this plan does not record the token counts it was searched at; pass image_tokens= and "
                             "text_tokens=")
        for name, value in (("image_tokens", image_tokens), ("text_tokens", text_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1 << 24:
                raise ValueError(f"{name} must be a token count in [0, 2^24], got {str(value)[:40]} (the plan's "
                                 "metadata is damaged or edited?); pass image_tokens= and text_tokens=")
        pairs = sorted({(int(i), float(p)) for n in self.module_names
                        for i, p in zip(self.methods[n].flatten().tolist(), self.params[n].flatten().tolist())})
        names = [str(method_class(i).from_param(p or None)) for i, p in pairs]
        share = torch.zeros(len(self.modules), self.num_steps, len(names), dtype=torch.float64)
        for i, spec in enumerate(self.modules):
            ids, params = self.methods[spec.name].long(), self.params[spec.name]
            for k, (mid, param) in enumerate(pairs):
                share[i, :, k] = ((ids == mid) & (params == param)).double().mean(1)
        flops = self.flops(image_tokens, text_tokens, cfg)
        predicted = _predicted_rse(info.get("predicted_rse"), self.module_names, self.num_steps)
        report = PlanReport(self.module_names, names, share, 1.0 - flops.planned / flops.dense, predicted, flops.cut,
                            skipped_steps=list(self.skipped_steps))
        if self.blocks:
            whole = self.transformer_flops(image_tokens, text_tokens, cfg)
            report.block_names = self.block_names
            report.block_methods = {n: [str(self.block_method(n, t)) if self.runs_step(t) else "step_taylor"
                                        for t in range(self.num_steps)] for n in self.block_names}
            report.block_flop_cut = 1.0 - whole.planned / whole.dense
            report.transformer_cut = whole.cut
        return report


def schedule_conflict(methods: list, runs: list[bool], ran: list[bool]
                      ) -> tuple[int, str, int | None, float | None] | None:
    """The first step of one head's schedule whose method reads memory the schedule never made, or None.

    ``methods``: the head's method at every step; ``runs``: whether the transformer runs at each step (steps it skips
    are not looked at); ``ran``: whether the head's block runs there (``runs`` when blocks are not planned). Returns
    ``(step, kind, last full step, recorded fraction)``, ``kind`` one of "first step" (a reuse at step 0),
    "previous step skipped" (a reuse after a step where the block did not run), "no full step" (an
    `arrow_residual` with no `full` step of a running block before it), "another fraction" (an `arrow_residual`
    of another fraction than the one recorded after the same full step). The plan's check and `remap_steps`'s
    repair both follow these rules."""
    last_full, fraction = None, None  # the last full step whose block ran; the fraction recorded after it
    for step, m in enumerate(methods):
        if not runs[step]:
            continue
        if m.needs_previous_output and step == 0:
            return step, "first step", last_full, fraction
        if m.needs_previous_output and not ran[step - 1]:
            return step, "previous step skipped", last_full, fraction
        if isinstance(m, Full):
            last_full, fraction = (step if ran[step] else None), None
        elif m.needs_residual:
            if last_full is None:
                return step, "no full step", last_full, fraction
            if fraction not in (None, m.param):
                return step, "another fraction", last_full, fraction
            fraction = m.param
    return None


@dataclass
class PlanReport:
    """What a plan does where, as data (the CLI draws it).

    Attributes:
        module_names: rows.
        method_names: the methods the plan uses, with their parameters (``"arrow:0.125"``), by method id.
        share: ``[M, T, K]`` fraction of the module's heads running method ``k`` at step ``t``.
        flop_cut: ``[M, T]`` attention-FLOP cut of the module at the step (0 = dense).
        predicted_rse: ``[M, T]`` the search's predicted mean RSE over heads, or None for hand-made plans.
        total_cut: the whole plan's attention-FLOP cut.
        block_names: the plan's blocks (empty when it has none; then the block fields below are empty/None).
        block_methods: per block, its block method name at each step.
        block_flop_cut: ``[NB, T]`` whole-block FLOP cut (attention + linear layers) of the block at the step.
        transformer_cut: the plan's cut of the transformer blocks' FLOPs (`CompressionPlan.transformer_flops`).
    """

    module_names: list[str]
    method_names: list[str]
    share: torch.Tensor
    flop_cut: torch.Tensor
    predicted_rse: torch.Tensor | None
    total_cut: float
    block_names: list[str] = field(default_factory=list)
    block_methods: dict[str, list[str]] = field(default_factory=dict)
    block_flop_cut: torch.Tensor | None = None
    transformer_cut: float | None = None
    skipped_steps: list[int] = field(default_factory=list)

    def table(self) -> str:
        """A text table: per module, its FLOP cut and the share of each method over all steps."""
        width = max(len(n) for n in self.module_names)
        cols = [max(10, len(n)) for n in self.method_names]
        head = f"{'module':<{width}}  {'cut':>6}  " + "  ".join(f"{n:>{c}}" for n, c in zip(self.method_names, cols))
        if self.predicted_rse is not None:
            head += f"  {'pred. RSE':>9}"
        lines = [head, "-" * len(head)]
        for i, name in enumerate(self.module_names):
            row = f"{name:<{width}}  {float(self.flop_cut[i].mean()):>6.1%}  "
            row += "  ".join(f"{float(self.share[i, :, k].mean()):>{c}.1%}" for k, c in enumerate(cols))
            if self.predicted_rse is not None:
                row += f"  {float(self.predicted_rse[i].mean()):>9.4f}"
            lines.append(row)
        lines.append(f"{'total':<{width}}  {self.total_cut:>6.1%}")
        if self.skipped_steps:
            lines.append(f"steps skipped whole (step_taylor: the transformer does not run): {self.skipped_steps}")
        if self.block_names:
            lines += ["", self.block_table()]
        return "\n".join(lines)

    def block_table(self) -> str:
        """Per block: its whole-block FLOP cut and one letter per step (``.`` compute, ``C`` block_cache,
        ``T`` block_taylor, ``M`` mlp_cache, ``S`` the whole step skipped by step_taylor)."""
        from .methods import block_method_class

        width = max(len(n) for n in self.block_names + ["total (blocks)"])
        head = f"{'block':<{width}}  {'cut':>6}  steps"
        lines = [head, "-" * (width + 10 + max(len(m) for m in self.block_methods.values()))]
        for i, name in enumerate(self.block_names):
            letters = "".join("S" if m == "step_taylor" else block_method_class(m).symbol
                              for m in self.block_methods[name])
            lines.append(f"{name:<{width}}  {float(self.block_flop_cut[i].mean()):>6.1%}  {letters}")
        lines.append(f"{'total (blocks)':<{width}}  {self.transformer_cut:>6.1%}")
        return "\n".join(lines)



def _blocks_from_json(info: dict, tensors: dict[str, torch.Tensor]) -> tuple[list[BlockSpec], dict[str, torch.Tensor]]:
    """The blocks and block-method tensors of a plan, ids mapped through the file's vocabulary."""
    blocks = []
    for entry in info.get("blocks") or []:
        try:
            blocks.append(BlockSpec(**entry))
        except TypeError as e:
            raise ValueError(f"plan.json block entry {entry.get('name', entry)!r} does not describe a block ({e})") \
                from None
    vocab = info.get("block_method_vocabulary") or {}
    remap = {int(file_id): block_method_class(name).method_id for name, file_id in vocab.items()}
    methods = {}
    for b in blocks:
        key = f"{b.name}.block_method"
        if key not in tensors:
            raise ValueError(f"plan tensors lack {key!r}; the plan file is incomplete or from another plan")
        ids = tensors[key]
        unknown = sorted(set(ids.unique().tolist()) - set(remap))
        if unknown:
            raise ValueError(f"block {b.name!r}: block method ids {unknown} are not in the plan's block vocabulary "
                             f"{vocab}")
        methods[b.name] = ids.clone().apply_(remap.__getitem__)
    return blocks, methods


def _predicted_rse(value, modules: list[str], steps: int) -> torch.Tensor | None:
    """``[M, T]`` from a plan's ``metadata["search"]["predicted_rse"]``; None when absent or not that shape (it is
    display-only metadata, never needed to run the plan, so a damaged entry is left out rather than trusted)."""
    import math

    if not isinstance(value, dict):
        return None
    rows = [value.get(n) for n in modules]
    ok = all(isinstance(r, list) and len(r) == steps and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in r) for r in rows)
    return torch.tensor(rows, dtype=torch.float64) if ok else None


def check_attention_quantization(plan: "CompressionPlan", entry) -> None:
    """A plan with 8-bit heads must say which scheme they compute, and it must be this package's
    (`ditfa_optimum.fp8_attention.SCHEME`, scales computed per call): else the heads would run another computation
    than the one the search measured."""
    if not plan.uses_quantized_heads():
        return
    from .fp8_attention import SCHEME

    if not isinstance(entry, dict) or entry.get("scheme") != SCHEME or entry.get("scales") != "dynamic":
        eight = ", ".join(n for n in plan.method_counts() if method_class(n).quantized)
        raise ValueError(f"the plan computes heads in 8 bits ({eight}) "
                         f"with attention_quantization {entry!r}, but this version of ditfa-optimum computes them as "
                         f"{{'scheme': {SCHEME!r}, 'scales': 'dynamic'}}; install the version that made the plan, or "
                         "search the plan again")
