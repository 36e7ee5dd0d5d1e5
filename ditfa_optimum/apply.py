"""Install a `CompressionPlan` on a transformer (or a pipeline's transformer), and take it off again.

The plan runs through attention processors set on the planned modules and one diffusers hook on the transformer that
advances the step state at each call (`ditfa_optimum.runtime.transformer_hook`); a plan with block methods other than `compute` also gets one
diffusers hook per block (and per reused MLP), see `ditfa_optimum.runtime.blocks`. Nothing is monkeypatched; `remove`
restores the original processor objects and removes the hooks, giving the stock model back exactly.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass, field

import torch

from .adapters import Adapter, get_adapter
from .adapters.base import check_processor_equivalence
from .masks import DEFAULT_BLOCK_SIZE
from .methods import AttentionMethod
from .plan import CompressionPlan
from .runtime.blocks import BlockRuntime, InstalledBlocks, _hook, _invalidate_registry_caches, install_blocks
from .runtime.headwise import PlanRuntime
from .runtime.log import allow_in_compiled_graphs
from .runtime.steps import install_steps
from .runtime.transformer_hook import COPIED, TRANSFORMER_HOOK, transformer_hook

logger = logging.getLogger(__name__)

_ATTR = "_ditfa_installed"


@dataclass
class _Installed:
    runtime: PlanRuntime  # or a calibration session
    adapter: Adapter
    originals: dict[str, object]
    modules: dict[str, torch.nn.Module]
    hook: InstalledBlocks  # the ``ditfa_transformer`` hook (`ditfa_optimum.runtime.transformer_hook`)
    blocks: InstalledBlocks | None = None  # block hooks, when the plan skips blocks
    transformer_hook: object = None  # that hook (install_steps hands it the step handler)
    #: the transformer these hooks belong to (a weak reference survives copy.deepcopy unchanged, so a copy of a
    #: planned transformer can tell that it is one)
    owner: weakref.ref | None = field(default=None, repr=False)


def _split(model) -> tuple[torch.nn.Module, object | None]:
    """(transformer, pipeline or None) from a transformer or a diffusers pipeline."""
    if isinstance(model, torch.nn.Module):
        return model, None
    transformer = getattr(model, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise ValueError(f"expected a transformer (torch.nn.Module) or a pipeline with a .transformer, "
                         f"got {type(model).__name__}")
    return transformer, model


def apply(model, plan: CompressionPlan, *, backend: str | None = None, cfg: bool | None = None,
          num_inference_steps: int | None = None) -> PlanRuntime:
    """Run ``plan`` in ``model``'s attention from now on.

    Args:
        model: an MMDiT transformer (``SD3Transformer2DModel``, ``FluxTransformer2DModel``) or a diffusers pipeline
            holding one as ``.transformer``.
        plan: the plan; it must match the transformer's attention modules.
        backend: "auto" (default; also ``$DITFA_BACKEND``), "triton", "flex", "blocked" or "reference".
        cfg: whether transformer calls batch CFG as [uncond, cond]. Default: asked from the pipeline at each call
            when a pipeline is given, else unknown (then `cfg_share` heads are computed in full, with a warning).
        num_inference_steps: the step count the pipeline will run, when it is not the plan's: the plan is remapped
            (`CompressionPlan.remap_steps`, with a warning saying what to expect). Without it, a generation of another
            step count than the plan's is refused.

    Returns:
        The `PlanRuntime` (its ``.state`` tells the current step and cache memory).

    Example:
        >>> runtime = apply(pipe, plan)          # doctest: +SKIP
        >>> image = pipe("a red cube", num_inference_steps=plan.num_steps).images[0]   # doctest: +SKIP
        >>> remove(pipe)                          # doctest: +SKIP
    """
    transformer, pipeline = _split(model)
    adapter, modules = _prepare(transformer)
    if num_inference_steps is not None and num_inference_steps != plan.num_steps:
        plan = plan.remap_steps(num_inference_steps)
        logger.warning("ditfa: the plan was searched for %d steps and runs remapped at %d (each step takes the "
                       "choices of the searched step at the same position; docs/runtime.md). Expect the images to "
                       "differ more from dense than the search predicted; search a plan for %d steps for that "
                       "quality", plan.metadata["remapped"]["from_steps"], num_inference_steps, num_inference_steps)
    blocks = adapter.blocks(transformer) if plan.blocks else []
    plan.validate([spec for spec, _ in modules], model_class=adapter.model_class,
                  blocks=[spec for spec, _ in blocks] if plan.blocks else None)
    runtime = PlanRuntime(plan, backend=backend, cfg=cfg_source(cfg, adapter, pipeline))
    install(transformer, adapter, modules, runtime, pipeline=pipeline)
    try:
        if plan.skips_blocks:
            _installed(transformer).blocks = install_blocks(transformer, adapter, blocks,
                                                            BlockRuntime(plan, runtime.state, adapter))
        if plan.skipped_steps:
            install_steps(_installed(transformer).transformer_hook, plan, runtime.state)
    except Exception:
        remove(transformer)
        raise
    return runtime


#: diffusers hooks that skip or replace computation across steps; a plan's per-head state cannot follow them
_SKIPPING_HOOKS = ("fbc_", "mag_cache", "taylorseer", "pyramid_attention_broadcast", "faster_cache", "sea_cache",
                   "layer_skip")


def foreign_caches(modules) -> list[str]:
    """The step-skipping caches installed on ``modules`` (diffusers hooks by name, cache-dit by its marker)."""
    found = []
    for module in modules:
        registry = getattr(module, "_diffusers_hook", None)
        for name in getattr(registry, "hooks", {}):
            if name.startswith(_SKIPPING_HOOKS):
                found.append(f"diffusers hook {name!r}")
        if getattr(module, "_is_cached", False):
            found.append("cache-dit (enable_cache)")
    return sorted(set(found))


def check_no_foreign_cache(transformer: torch.nn.Module, modules) -> None:
    """Refuse to run a plan (or calibrate) under another step cache: it would skip blocks whose heads the plan
    caches or measures, and the two would each assume they own the step-to-step state."""
    found = foreign_caches(modules)
    if found:
        raise ValueError(f"the transformer also runs {', '.join(found)}, which skips transformer blocks across "
                         "steps; a ditfa plan keeps per-head (and per-block) outputs from step to step and cannot "
                         "follow blocks another cache skips. Use one of them: remove the other cache "
                         "(diffusers: transformer.disable_cache() or HookRegistry.remove_hook; cache-dit: "
                         "cache_dit.disable_cache(pipe)), or ditfa_optimum.remove(pipe). A plan can itself skip "
                         "blocks (block methods, docs/runtime.md)")


def _watched(transformer: torch.nn.Module, adapter: Adapter, modules: list) -> list[torch.nn.Module]:
    """The modules where step caches install themselves: the transformer, its blocks and attention modules."""
    return [transformer, *(module for _, module in adapter.blocks(transformer)), *(m for _, m in modules)]


def _prepare(transformer: torch.nn.Module) -> tuple[Adapter, list]:
    """The transformer's adapter and planned modules, after checking nothing else already runs there."""
    installed = getattr(transformer, _ATTR, None)
    if installed is not None and installed.owner is not None and installed.owner() is not transformer:
        raise RuntimeError(COPIED)
    if installed is not None:
        raise ValueError("this transformer already runs a ditfa plan (or a calibration); call "
                         "ditfa_optimum.remove(...) first")
    adapter = get_adapter(transformer)
    check_no_foreign_cache(transformer, list(transformer.modules()))
    modules = adapter.attention_modules(transformer)
    for spec, module in modules:
        adapter.check_processor(spec.name, module)
    return adapter, modules


def cfg_source(cfg: bool | None, adapter: Adapter, pipeline):
    """What the step state asks to learn whether a call batches CFG: the given value, else the pipeline, at call time."""
    if cfg is None and pipeline is not None:
        return lambda: adapter.batched_cfg(pipeline)  # read at call time: guidance is a call argument
    return cfg


def install(transformer: torch.nn.Module, adapter: Adapter, modules: list, runtime, pipeline=None) -> None:
    """Route ``modules``' attention through ``runtime`` (anything with ``.state``, a `StepState`, and
    ``.module(spec)``, a callable ``(q, k, v, num_text_tokens) -> out``): the plan runtime, or a calibration.

    Every transformer call first checks that the plan can still run as searched, and raises a clear error otherwise:
    no other step cache was enabled, no planned processor was replaced (``fuse_qkv_projections``, IP-adapter loading,
    ``set_attn_processor`` would otherwise silently drop the plan), and (given the ``pipeline`` and a plan) the
    pipeline runs as many denoising steps as the plan covers. A call that raises resets the step state, so the next
    generation starts clean."""
    check_processor_equivalence(adapter, modules)
    originals = {spec.name: module.processor for spec, module in modules}
    for spec, module in modules:
        planned = adapter.make_processor(spec, runtime.module(spec))
        # applied after transformer.enable_parallelism(...): keep running under its context parallelism
        planned._parallel_config = getattr(originals[spec.name], "_parallel_config", None)
        module.set_processor(planned)
    processors = {spec.name: module.processor for spec, module in modules}

    signature = inspect.signature(transformer.forward)
    watched = _watched(transformer, adapter, modules)
    plan = getattr(runtime, "plan", None)
    state = runtime.state
    keeps_memory = plan is not None and keeps_step_memory(plan)

    def guard():
        check_no_foreign_cache(transformer, watched)  # a cache enabled after apply() would break the plan
        for spec, module in modules:
            if module.processor is not processors[spec.name]:
                raise ValueError(
                    f"attention module {spec.name!r} no longer runs the ditfa plan: its processor was replaced by "
                    f"{type(module.processor).__name__} after apply() (fuse_qkv_projections, an IP-adapter or "
                    "LoRA loader, set_attn_processor, ...). Call ditfa_optimum.remove(pipe) first, make the "
                    "change, then apply the plan again")
        if plan is not None and pipeline is not None and state.step == 0 and state.calls_in_step == 0:
            check_step_count(pipeline, plan.num_steps)
        if keeps_memory and torch.is_grad_enabled() and getattr(transformer, "gradient_checkpointing", False):
            raise ValueError(
                "gradient checkpointing recomputes every block's attention during backward, after the plan's step "
                "memory has moved on, so this plan's heads that reuse an earlier step (cache, arrow_residual) or its "
                "block methods would read the wrong memory. Disable it (transformer.disable_gradient_checkpointing()), "
                "run without gradients (torch.no_grad()), or train with a plan whose heads keep nothing between steps "
                "(full, arrow, cfg_share)")

    def read_call(_module, args, kwargs):
        return adapter.read_call(signature, args, kwargs)

    scheduler = getattr(pipeline, "scheduler", None)
    hook = transformer_hook(transformer, state, read_call, guard, scheduler if hasattr(scheduler, "step_index") else None)
    allow_in_compiled_graphs()  # the runtime's messages inside torch.compile(fullgraph=True): runtime/log.py
    hooked = _hook(transformer, TRANSFORMER_HOOK, hook, "the transformer")
    _invalidate_registry_caches(transformer)
    setattr(transformer, _ATTR, _Installed(runtime, adapter, originals, {s.name: m for s, m in modules},
                                           InstalledBlocks(transformer, [hooked]), transformer_hook=hook,
                                           owner=weakref.ref(transformer)))


def keeps_step_memory(plan: CompressionPlan) -> bool:
    """Whether a step of ``plan`` reads what an earlier step stored: a head's output (`cache`), a residual
    (`arrow_residual`), or a block's (block methods). Such a plan cannot be recomputed out of order (checkpointing)."""
    return plan.skips_blocks or any(bool(plan.output_keeps(name).any()) or next(plan.residual_records(name), None)
                                    for name in plan.module_names)


def check_step_count(pipeline, plan_steps: int) -> None:
    """Refuse a generation whose step count differs from the plan's (read from the scheduler's timesteps, set
    before the denoising loop starts): a plan runs its step table, and fewer steps would run it silently wrong."""
    timesteps = getattr(getattr(pipeline, "scheduler", None), "timesteps", None)
    if timesteps is None or not hasattr(timesteps, "__len__"):
        return
    steps = len(timesteps)
    if steps and steps != plan_steps:
        raise ValueError(f"the pipeline runs {steps} denoising steps but the plan was searched for {plan_steps}; "
                         f"call it with num_inference_steps={plan_steps}; or run the plan remapped to {steps} steps "
                         f"(ditfa_optimum.apply(pipe, plan, num_inference_steps={steps}): lower quality than "
                         f"searched, docs/runtime.md); or search a plan for {steps} steps "
                         "(DiTFastAttnConfig(num_inference_steps=...))")


def _installed(model) -> _Installed:
    transformer, _ = _split(model)
    installed = getattr(transformer, _ATTR, None)
    if installed is None:
        raise ValueError("this transformer runs no ditfa plan (apply one with ditfa_optimum.apply)")
    if installed.owner is not None and installed.owner() is not transformer:
        raise RuntimeError(COPIED)
    return installed


def remove(model) -> CompressionPlan | None:
    """Take the plan off: original processors back, hook removed, caches freed. Returns the removed plan."""
    transformer, _ = _split(model)
    installed = _installed(transformer)
    if installed.blocks is not None:
        installed.blocks.remove()
    for name, module in installed.modules.items():
        if type(module.processor).__name__ == installed.adapter.planned_processor_name(name):
            original = installed.originals[name]
            parallel = getattr(module.processor, "_parallel_config", None)
            if parallel is not None and hasattr(original, "_parallel_config"):
                original._parallel_config = parallel  # enable_parallelism ran while the plan was applied
            module.set_processor(original)
        # else: replaced after apply (set_attn_processor, an IP-adapter loader): keep what the user set
    installed.hook.remove()
    installed.runtime.state.graphing = False  # (CUDA graphs, if any, go with the hook)
    installed.runtime.state.reset()
    delattr(transformer, _ATTR)
    return getattr(installed.runtime, "plan", None)


def get_runtime(model) -> PlanRuntime | None:
    """The installed `PlanRuntime`, or None when no plan runs."""
    transformer, _ = _split(model)
    installed = getattr(transformer, _ATTR, None)
    return None if installed is None else installed.runtime


def reset_state(model) -> None:
    """Start the next transformer call at step 0 with empty caches (normally automatic, see runtime/state.py)."""
    _installed(model).runtime.state.reset()


def compile_blocks(model, **options) -> int:
    """Regional compilation of ``model``'s transformer (a pipeline or the transformer): ``torch.compile`` of each
    transformer block on its own (``block.compile(**options)``, e.g. ``fullgraph=True``), the blocks as its adapter
    lists them; returns how many were compiled. diffusers' ``transformer.compile_repeated_blocks`` does the same
    where the model class names its blocks (FLUX does, SD3 does not in diffusers 0.42).

    With a plan applied, compiled blocks run the plan's step-independent form (`ditfa_optimum.runtime.tables`): the
    blocks of one kind share their graphs over all blocks and steps (docs/runtime.md, "torch.compile"). Works without
    a plan too (the stock model's regional compilation)."""
    transformer, _ = _split(model)
    blocks = [module for _, module in get_adapter(transformer).blocks(transformer)]
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def use_cuda_graphs(model, enabled: bool = True):
    """Replay each call of ``model``'s planned transformer (a pipeline or the transformer) from a CUDA graph: the
    first call of each branch runs eagerly, the second is captured, later ones replay it with one launch
    (`ditfa_optimum.runtime.graphs`). The plan's hook stays eager around the graph: it moves the step, guards the
    plan, skips steps. Every planned call then runs the plan's step-independent tables, eagerly too.

    Returns the `StepGraphs` (its ``captures`` / ``replays`` / ``eager_calls`` count what happened), or None with
    ``enabled=False``, which goes back to plain calls. Refused for plans the tables cannot express (8-bit heads,
    block methods) and for the ``flex`` and ``blocked`` backends. Works with `compile_blocks` (the compiled blocks
    are captured; not yet timed on a GPU). Memory: one graph's activations per branch, and what the plan keeps
    between steps stays allocated until ``use_cuda_graphs(model, False)`` or `remove`."""
    from .runtime.graphs import StepGraphs

    installed = _installed(model)
    runtime, hook = installed.runtime, installed.transformer_hook
    if not isinstance(runtime, PlanRuntime):
        raise ValueError("use_cuda_graphs replays a plan's calls; this transformer is being calibrated")
    state = runtime.state
    if not enabled:
        hook.graphs, state.graphing = None, False
        state.reset()  # (now drops the tables' memory too)
        return None
    problem = runtime.table_problem
    if problem is None and runtime.plan.skips_blocks:
        problem = "it has block methods, which each block decides on the host at every step"
    if problem is None and runtime.backend_name in ("flex", "blocked"):
        problem = (f"its backend {runtime.backend_name!r} takes no widths tensor (apply it with backend='triton', "
                   "'reference' or the default)")
    if problem is not None:
        raise ValueError(f"this plan cannot run from CUDA graphs: {problem}. A graph replays what it captured, so "
                         "every call must run the plan's step-independent tables (docs/runtime.md, \"CUDA graphs\")")
    state.reset()
    state.graphing = True
    hook.graphs = StepGraphs(state, model=_split(model)[0])
    return hook.graphs


def uniform_plan(model, num_steps: int, method: AttentionMethod | str = "full", *, full_steps: int = 1,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> CompressionPlan:
    """A plan that runs ``method`` on every head of ``model``'s attention after ``full_steps`` full steps. It records
    the model's blocks (all `compute`) when its adapter reports them, so ``plan.transformer_flops`` works and block
    methods can be set on it (``plan.set_block``).

    Example:
        >>> plan = uniform_plan(pipe.transformer, num_steps=28, method="arrow:1/8")   # doctest: +SKIP
    """
    transformer, _ = _split(model)
    adapter = get_adapter(transformer)
    try:
        blocks = adapter.block_specs(transformer)
    except NotImplementedError:  # an adapter without block metadata: a head-only plan
        blocks = []
    return CompressionPlan.uniform(adapter.module_specs(transformer), num_steps, method, full_steps=full_steps,
                                   block_size=block_size, model_class=adapter.model_class, blocks=blocks)
