"""Block-level methods at run time, on diffusers' own hook machinery.

`install_blocks` puts one `diffusers.hooks.ModelHook` (registered as ``"ditfa_block"``) on each given transformer block
and, where the handler asks for it, one (``"ditfa_mlp"``) on each of the block's MLP submodules (`BlockSpec.mlps`).
The hooks only forward calls to a *handler*; the plan's handler is `BlockRuntime`, and another component (the
calibration, measuring candidates) can install its own. The handler contract:

    handler.block(spec: BlockSpec) -> BlockCall
        Called once per block at install time. The returned callable replaces the block's forward.
    handler.mlp(spec: BlockSpec, name: str) -> BlockCall | None            (optional method)
        Called once per name in ``spec.mlps`` at install time; None: that MLP gets no hook.

    BlockCall(module, original_forward, args, kwargs) -> output
        module: the hooked block (or MLP) module.
        original_forward: the module's forward below our hook; ``original_forward(*args, **kwargs)`` runs it
            (for a block: its attention processors and MLP hooks run inside).
        args, kwargs: the call's arguments as the transformer passed them (read the block's streams with
            ``adapter.block_inputs(spec, module, args, kwargs)``).
        returns: what the module's forward returns; for a block, ``adapter.block_output(spec, streams)`` builds it
            from `Streams`, and ``adapter.block_output_streams(spec, output)`` reads a real output.

`InstalledBlocks.remove()` takes every hook off and, where the hook registry was created by us and is empty again,
deletes it and the instance ``forward`` attribute diffusers set, so the modules are exactly stock again.

`BlockRuntime` runs the plan: at the step state's current step (`StepState.current_step()`, shared with the head-wise
runtime, memory per CFG branch) a block whose method runs the block calls it (recording its residual when a later step
reads it); one that does not returns its method's `skip` from the stored residuals; an MLP under `mlp_cache` returns its
stored output. Records are kept only when a later step reads them (`CompressionPlan.block_keeps`) and dropped after
their last reader.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..methods import BlockMethod, MemoryRef, MlpCache, residual
from ..plan import BlockSpec, CompressionPlan
from .state import StepState

BLOCK_HOOK = "ditfa_block"
MLP_HOOK = "ditfa_mlp"

BlockCall = Callable[[torch.nn.Module, Callable[..., Any], tuple, dict], Any]


def _hook_registry():
    from diffusers.hooks import HookRegistry  # imported when needed: diffusers.hooks takes seconds to import

    return HookRegistry


@functools.lru_cache(maxsize=None)
def _call_hook_class():
    from diffusers.hooks import ModelHook

    class DitfaCallHook(ModelHook):
        """Hands every call of its module to ``call`` with the forward below this hook."""

        def __init__(self, call: BlockCall):
            super().__init__()
            self.call = call

        def new_forward(self, module, *args, **kwargs):
            return self.call(module, self.fn_ref.original_forward, args, kwargs)

    return DitfaCallHook


@dataclass
class _Hooked:
    module: torch.nn.Module
    hook_name: str
    created_registry: bool


@dataclass
class InstalledBlocks:
    """The hooks `install_blocks` put on; `remove` takes them off."""

    transformer: torch.nn.Module
    hooked: list[_Hooked]

    def remove(self) -> None:
        for h in reversed(self.hooked):
            _unhook(h)
        self.hooked = []
        _invalidate_registry_caches(self.transformer)


def _hook(module: torch.nn.Module, hook_name: str, call, where: str) -> _Hooked:
    """Register ``call`` on ``module`` as ``hook_name``: a `BlockCall` (wrapped in a hook that hands it every call),
    or a ready `diffusers.hooks.ModelHook`."""
    HookRegistry = _hook_registry()
    created = not hasattr(module, "_diffusers_hook")
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if registry.get_hook(hook_name) is not None:
        raise ValueError(f"{where} already has a {hook_name!r} hook; remove the plan or calibration that put it there "
                         "(ditfa_optimum.remove) first")
    from diffusers.hooks import ModelHook

    registry.register_hook(call if isinstance(call, ModelHook) else _call_hook_class()(call), hook_name)
    return _Hooked(module, hook_name, created)


def _unhook(h: _Hooked) -> None:
    registry = getattr(h.module, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(h.hook_name, recurse=False)
    if h.created_registry and not registry.hooks:
        # diffusers leaves an instance `forward` (the original bound method) and the registry behind: drop both
        del h.module._diffusers_hook
        h.module.__dict__.pop("forward", None)


def _invalidate_registry_caches(transformer: torch.nn.Module) -> None:
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None and hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()


def install_blocks(transformer: torch.nn.Module, adapter, blocks: list[tuple[BlockSpec, torch.nn.Module]],
                   handler) -> InstalledBlocks:
    """Route every call of ``blocks`` (and of their MLPs, where the handler wants) through ``handler``.

    Args:
        transformer: the transformer holding the blocks (MLP names in `BlockSpec.mlps` are looked up in it).
        adapter: its adapter (passed on for symmetry with `ditfa_optimum.apply.install`; handlers use it to read and
            build block streams).
        blocks: ``(spec, module)`` pairs, as `Adapter.blocks` returns them (or a subset).
        handler: see the module docstring: ``handler.block(spec)`` and, optionally, ``handler.mlp(spec, name)``.

    Returns:
        `InstalledBlocks`; its ``remove()`` restores the stock modules.

    Example:
        >>> installed = install_blocks(model, adapter, adapter.blocks(model), my_handler)   # doctest: +SKIP
        >>> installed.remove()                                                                # doctest: +SKIP
    """
    hooked: list[_Hooked] = []
    mlp = getattr(handler, "mlp", None)
    try:
        for spec, module in blocks:
            hooked.append(_hook(module, BLOCK_HOOK, handler.block(spec), f"block {spec.name!r}"))
            for name in spec.mlps if mlp is not None else ():
                call = mlp(spec, name)
                if call is not None:
                    hooked.append(_hook(transformer.get_submodule(name), MLP_HOOK, call, f"MLP {name!r}"))
    except Exception:
        InstalledBlocks(transformer, hooked).remove()
        raise
    _invalidate_registry_caches(transformer)
    return InstalledBlocks(transformer, hooked)


# ------------------------------------------------------------------------------------------------ the plan's handler
@dataclass(frozen=True)
class _BlockStep:
    method: BlockMethod
    sources: tuple[MemoryRef, ...]  # what this step reads
    record_residual: bool  # a later step reads this step's residual
    record_mlp: bool  # a later step reads this step's MLP outputs
    frees: tuple[MemoryRef, ...]  # records whose last reader is this step


class BlockRuntime:
    """The plan's block handler (`install_blocks`): runs each block's block method at the current step.

    Args:
        plan: the plan (its blocks and block methods).
        state: the step state shared with the head-wise runtime (`PlanRuntime.state`).
        adapter: the transformer's adapter (reads and builds block streams).
    """

    def __init__(self, plan: CompressionPlan, state: StepState, adapter):
        self.plan, self.state, self.adapter = plan, state, adapter
        self.programs = {b.name: self._compile(b) for b in plan.blocks}

    def _compile(self, spec: BlockSpec) -> list[_BlockStep]:
        sources, keeps = self.plan.block_sources(spec.name), self.plan.block_keeps(spec.name)
        return [_BlockStep(method=self.plan.block_method(spec.name, step), sources=sources[step],
                           record_residual=MemoryRef("residual", step) in keeps,
                           record_mlp=MemoryRef("mlp", step) in keeps,
                           frees=tuple(ref for ref, last in keeps.items() if last == step))
                for step in range(self.plan.num_steps)]

    def block(self, spec: BlockSpec) -> BlockCall:
        programs, adapter, state = self.programs[spec.name], self.adapter, self.state

        def run_block(module, forward, args, kwargs):
            step = state.current_step()
            program = programs[step]
            memory = state.block_memory(spec.name)
            if program.method.runs_block:
                inputs = adapter.block_inputs(spec, module, args, kwargs) if program.record_residual else None
                out = forward(*args, **kwargs)
                if program.record_residual:
                    memory.residuals[step] = residual(adapter.block_output_streams(spec, out), inputs)
            else:
                for ref in program.sources:
                    if ref.step not in memory.residuals:
                        raise RuntimeError(_missing(spec.name, step, ref))
                inputs = adapter.block_inputs(spec, module, args, kwargs)
                out = adapter.block_output(spec, program.method.skip(inputs, step, memory.residuals, program.sources))
            for ref in program.frees:
                memory.drop(ref)
            return out

        return run_block

    def mlp(self, spec: BlockSpec, name: str) -> BlockCall | None:
        programs, state = self.programs[spec.name], self.state
        if not any(ref.kind == "mlp" for p in programs for ref in p.sources):
            return None  # no step reuses this block's MLP: leave it unhooked

        def run_mlp(module, forward, args, kwargs):
            step = state.current_step()
            program = programs[step]
            memory = state.block_memory(spec.name)
            if not program.method.runs_mlp:
                (ref,) = (r for r in program.sources if r.kind == "mlp")
                stored = memory.mlp.get(ref.step, {}).get(name)
                if stored is None:
                    raise RuntimeError(_missing(spec.name, step, ref))
                return MlpCache.reference(stored, args[0] if args else kwargs["hidden_states"], name)
            out = forward(*args, **kwargs)
            if program.record_mlp:
                outputs = memory.mlp.setdefault(step, {})
                if name in outputs:
                    raise RuntimeError(f"MLP {name!r} ran twice at step {step} (a chunked feed-forward, "
                                       "set_chunk_feed_forward?); mlp_cache needs one call per step: turn chunking off")
                outputs[name] = out  # stock blocks never modify it in place, so no copy is needed
            return out

        return run_mlp


def _missing(block: str, step: int, ref: MemoryRef) -> str:
    return (f"block {block!r} at step {step} reads the {ref.kind} recorded at step {ref.step}, but none was recorded: "
            f"the block did not run at step {ref.step} of this generation (skip_layers?) or the step state is out of "
            "sync (call ditfa_optimum.reset_state(transformer) before a new generation)")
