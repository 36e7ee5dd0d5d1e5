"""The plan's one hook on the transformer, on diffusers' own hook machinery (``"ditfa_transformer"``).

At every transformer call it

1. advances the step state (`StepState.on_transformer_call`) from the pipeline's cache context (the name of the call,
   and its ``step_index`` where the pipeline gives one), the scheduler's ``step_index`` when `apply` got the
   pipeline, else the call's timestep; where the pipeline opens a cache context before the call, it does so already
   when the context opens (`before_call`, eagerly, so that a compiled transformer reads no Python step);
2. runs the guards `apply` gives it (no other step cache, no replaced processor, the pipeline's step count); a call
   of a ``copy.deepcopy`` of the transformer is refused before anything moves (`COPIED`);
3. runs the transformer, or the step handler when the plan skips whole steps (`ditfa_optimum.runtime.steps`), each
   call replayed from a CUDA graph after `ditfa_optimum.use_cuda_graphs` (`ditfa_optimum.runtime.graphs`);
4. resets the step state when the call raised, so the next generation starts clean.

The hook is *stateful* in diffusers' sense: ``transformer.cache_context(name)`` hands it the context through a
`StateManager` attribute (how diffusers reaches every stateful hook), and ``_reset_stateful_cache()`` (which pipelines
call when a generation ends, `DiffusionPipeline.maybe_free_model_hooks`) resets the step state.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable

import torch

from .state import StepState

TRANSFORMER_HOOK = "ditfa_transformer"

COPIED = ("this transformer is a copy (copy.deepcopy) of one that runs a ditfa plan: the copy carries the original's "
          "step hooks, which would advance the original's step state and run the copy at a stale step. Copy the "
          "model before ditfa_optimum.apply (or after ditfa_optimum.remove), then apply the plan to each copy")

#: ``(module, args, kwargs) -> (timestep, text tokens)`` of one transformer call
ReadCall = Callable[[torch.nn.Module, tuple, dict], tuple[Any, int | None]]
StepHandler = Callable[[torch.nn.Module, Callable[..., Any], tuple, dict], Any]


def context_name_and_step(context) -> tuple[str | None, int | None]:
    """(name, step_index) of a diffusers cache context: a `CacheContext` (diffusers >= 0.42) or its name (older)."""
    if context is None:
        return None, None
    if isinstance(context, str):
        return context, None
    return getattr(context, "name", None), getattr(context, "step_index", None)


@functools.lru_cache(maxsize=None)
def _classes():
    from diffusers.hooks import ModelHook
    from diffusers.hooks.hooks import StateManager

    class _Nothing:
        def reset(self, *args, **kwargs):
            pass

    class ContextProbe(StateManager):
        """Where ``transformer.cache_context(...)`` lands: diffusers calls ``set_context`` on every `StateManager`
        of a stateful hook; ``on_context`` runs then (eagerly, before the call the context wraps)."""

        def __init__(self, on_context: Callable[[Any], None] | None = None):
            super().__init__(_Nothing)
            self.current = None
            self.on_context = on_context

        def set_context(self, context) -> None:
            self.current = context
            if context is not None and self.on_context is not None:
                self.on_context(context)

        def reset(self, *args, **kwargs) -> None:
            self.current = None

    class TransformerHook(ModelHook):
        _is_stateful = True

        def __init__(self, owner: torch.nn.Module, state: StepState, read_call: ReadCall, guard: Callable[[], None],
                     scheduler=None):
            super().__init__()
            self.owner = weakref.ref(owner)  # a weak reference survives copy.deepcopy unchanged
            self.state, self.read_call, self.guard, self.scheduler = state, read_call, guard, scheduler
            self.context = ContextProbe(self.before_call)
            self.step_handler: StepHandler | None = None
            self.graphs = None  # `ditfa_optimum.runtime.graphs.StepGraphs` (`ditfa_optimum.use_cuda_graphs`)

        def before_call(self, context) -> None:
            """Advance the step state when the pipeline opens the call's cache context (FLUX's pipelines do, before
            each transformer call), from the context's or the scheduler's ``step_index``: eagerly, outside any
            compiled graph, so that a compiled transformer reads no Python step (`ditfa_optimum.runtime.tables`).
            Without a step index the call advances the state itself, as before."""
            if torch.compiler.is_compiling():
                return
            name, step_index = self.position(context)
            if step_index is None:
                return
            state = self.state
            try:
                state.on_transformer_call(None, state.text_tokens, step_index=step_index, context=name)
                self.guard()
                state.place(_device_of_module(self.owner(), state))
            except BaseException:
                state.reset()
                raise
            state.advanced = True  # the call this context wraps takes it (new_forward)

        def position(self, context) -> tuple[str | None, int | None]:
            """(name, step_index) of a call in ``context``: the context's step index, else the scheduler's (-1 before
            its first step), else None."""
            name, step_index = context_name_and_step(context)
            if step_index is None and self.scheduler is not None:  # (it has a step_index)
                step_index = self.scheduler.step_index
                step_index = -1 if step_index is None else step_index  # None: it has not stepped yet
            return name, step_index

        def pre_forward(self, module, *args, **kwargs):
            # a copy.deepcopy of the transformer calls this (the original's) hook with the copy: diffusers' forward
            # chain keeps pointing at the original's forward and hooks
            if module is not self.owner():
                raise RuntimeError(COPIED)
            return args, kwargs

        def new_forward(self, module, *args, **kwargs):
            state = self.state
            try:
                timestep, text_tokens = self.read_call(module, args, kwargs)
                advanced = state.advanced and self.context.current is not None  # (a context left unused: stale)
                state.advanced = False
                if advanced:  # `before_call` advanced, guarded and placed this call already, eagerly
                    state.text_tokens = text_tokens
                    device = _device_of(timestep, args, kwargs)
                    if not torch.compiler.is_compiling() and state.step_tensor is not None and device is not None \
                            and state.step_tensor.device != device:
                        state.place(device)  # the model moved after its context opened (an offloading hook)
                else:
                    name, step_index = self.position(self.context.current)
                    state.on_transformer_call(timestep, text_tokens, step_index=step_index, context=name)
                    self.guard()
                    state.place(_device_of(timestep, args, kwargs))
                forward = self.fn_ref.original_forward
                if self.graphs is not None:  # replayed from CUDA graphs; this hook stays eager around them
                    forward = self.graphs.wrap(forward)
                if self.step_handler is not None:
                    return self.step_handler(module, forward, args, kwargs)
                return forward(*args, **kwargs)
            except BaseException:
                state.reset()
                raise

        def reset_state(self, module):
            self.state.reset()
            return module

    return ContextProbe, TransformerHook


def _device_of(timestep, args: tuple, kwargs: dict) -> torch.device | None:
    """The device a transformer call computes on: its timestep's, else its first tensor input's."""
    if isinstance(timestep, torch.Tensor):
        return timestep.device
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def _device_of_module(module: torch.nn.Module | None, state: StepState) -> torch.device | None:
    """Where a call of ``module`` will compute, known before the call: where the step tensor is, else the device of
    its first parameter."""
    if state.step_tensor is not None:
        return state.step_tensor.device
    for parameter in (module.parameters() if module is not None else ()):
        return parameter.device
    return None


def transformer_hook(owner: torch.nn.Module, state: StepState, read_call: ReadCall, guard: Callable[[], None],
                     scheduler=None):
    """A new ``ditfa_transformer`` hook for ``owner`` (register it with `ditfa_optimum.runtime.blocks._hook`).

    Args:
        owner: the transformer; a call of any other module (a ``copy.deepcopy`` of it) raises.
        state: the step state to advance.
        read_call: ``(module, args, kwargs) -> (timestep, text tokens)`` of a call.
        guard: run after advancing; raises when the plan cannot run as searched.
        scheduler: the pipeline's scheduler, when it has a ``step_index`` (the sync-free position source).
    """
    return _classes()[1](owner, state, read_call, guard, scheduler)
