"""Transformer calls replayed from CUDA graphs (`ditfa_optimum.use_cuda_graphs`).

A planned step issues a few hundred kernels from Python; at 1024² their launches take about as long as the GPU takes
to run them (docs/benchmarks.md, "host time"). A CUDA graph records a call's kernels once and replays them with one
launch. `StepGraphs` does that per branch of the step (SD3's batched CFG: one; FLUX's cond / uncond contexts, SD3's
skip-layer call: one each):

1. the first call of a branch with given input shapes runs eagerly (the kernel's autotuning, lazy library set-up) and
   leaves what later steps read (cached head outputs, residuals) in tensors of their own;
2. the second captures the call into a graph, with copies of its inputs as the graph's fixed inputs, then replays it;
3. later calls copy their inputs into the graph's, replay it, and return a copy of its output.

What makes a plan replayable: every planned call runs the plan's step-independent form (`ditfa_optimum.runtime.tables`,
the step a one-element device tensor the transformer hook fills before each call, outside the graph), and writes what
it keeps *into* the tensors it kept before (``state.graphing``), so the replays of one capture read and write the same
memory. The hook itself (step, branch, guards, skipped steps) runs eagerly around the graph at every call.

Calls that cannot be captured run eagerly, with one warning each why: inputs not on a CUDA device, calls that track
gradients, inputs that are neither tensors nor plain values. A call whose shapes or non-tensor inputs differ from the
branch's graph runs eagerly once and is captured again at the next call.

A graph replays the kernels its capture launched, with the Python state of that moment baked in. So is anything that
would change what a call computes without changing its inputs: weights moved since (CPU offloading: a few
parameters' addresses), any module, parameter or buffer registered anywhere since (a LoRA loaded or unloaded,
weights swapped: torch's global registration hooks count them), and the state of the model's adapter layers (PEFT's
LoRA: active adapters, their scales from ``set_adapters``, enabled or not, merged or not). Any change makes the next
call run eagerly and be captured again, never replay a stale graph. Python the call runs that none of these see (a
forward hook added to a block after the capture) runs at the captures only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .log import say
from .state import StepState

#: ``capture(fn) -> replay``: records ``fn()`` (which reads only the graph's fixed inputs) and returns a callable that
#: runs the recording and returns ``fn()``'s output, its tensors updated in place at each replay
Capture = Callable[[Callable[[], Any]], Callable[[], Any]]


def cuda_capture(pool) -> Capture:
    """CUDA graphs sharing the memory pool ``pool`` (replays of one transformer's branches never overlap)."""

    def capture(fn: Callable[[], Any]) -> Callable[[], Any]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()

        def replay():
            graph.replay()
            return out

        return replay

    return capture


#: how many modules, parameters and buffers have been registered on any module since the first `StepGraphs`
#: (torch's global registration hooks, installed then): a LoRA loaded into a captured model changes it
_REGISTRATIONS = [0]
_COUNTING: list = []


def _count_registration(*_args) -> None:
    _REGISTRATIONS[0] += 1


def _count_registrations() -> None:
    if not _COUNTING:
        from torch.nn.modules import module

        _COUNTING.extend(hook(_count_registration) for hook in (module.register_module_module_registration_hook,
                                                                module.register_module_parameter_registration_hook,
                                                                module.register_module_buffer_registration_hook))


def _adapter_layers(model: torch.nn.Module | None) -> list:
    """The model's adapter layers (PEFT's tuner layers: LoRA and its kin), whose Python state a graph bakes in."""
    if model is None:
        return []
    return [m for m in model.modules() if hasattr(m, "merged_adapters") and hasattr(m, "_disable_adapters")]


def _adapter_state(layer) -> tuple:
    active = getattr(layer, "_active_adapter", None)
    scaling = getattr(layer, "scaling", None)
    return (tuple(active) if isinstance(active, list) else active, layer._disable_adapters,
            tuple(layer.merged_adapters), tuple(scaling.items()) if isinstance(scaling, dict) else None)


def _meta(x: torch.Tensor) -> tuple:
    return tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x.requires_grad


@dataclass
class _Graph:
    signature: tuple  # (input tree, non-tensor leaves, tensor metadata): what the capture fixed
    inputs: list  # the flattened call with the graph's fixed input tensors in place of the caller's
    replay: Callable[[], Any]
    step_tensor: torch.Tensor | None  # the step tensor the capture read (a new one, on another device: recapture)

    def __call__(self, leaves: list) -> Any:
        for fixed, given in zip(self.inputs, leaves):
            if isinstance(fixed, torch.Tensor) and fixed.data_ptr() != given.data_ptr():
                fixed.copy_(given)
        out = self.replay()
        # a copy: the next replay overwrites the graph's output (a pipeline or a skipped step may still hold it)
        leaves_out, spec = tree_flatten(out)
        return tree_unflatten([x.clone() if isinstance(x, torch.Tensor) else x for x in leaves_out], spec)


class StepGraphs:
    """The CUDA graphs of one transformer's calls, one per branch (see the module docstring).

    Args:
        state: the plan's step state (its ``branch`` and ``calls_in_step`` name a call's slot; None: one slot).
        capture: how a call is recorded (default: CUDA graphs sharing one memory pool).
        device_type: where the inputs of a captured call live (tests record CPU calls with another ``capture``).
        model: the module whose calls are replayed: a few of its parameters' addresses and its adapter layers'
            state join each graph's signature, so weights moved since the capture (CPU offloading) or adapters
            changed (``set_adapters``, ``disable_lora``) make the call run eagerly and be captured anew, never replay
            a graph that reads memory the weights left or the adapters' old scales.
    """

    def __init__(self, state: StepState | None = None, capture: Capture | None = None, device_type: str = "cuda",
                 model: torch.nn.Module | None = None):
        self.state = state
        self._capture = capture
        self.device_type = device_type
        self.model = model
        _count_registrations()
        self._structure = None  # the registration count `_adapters` was found at
        self._adapters: list = []
        self._watched: list = []
        self.graphs: dict[tuple, _Graph] = {}
        self._warmed: dict[tuple, tuple] = {}  # slot -> signature of its eager first call
        self._warned: set[str] = set()
        self.captures = self.replays = self.eager_calls = 0

    def _model_state(self) -> tuple:
        """What of the model a graph bakes in besides its inputs: the registration count, a few parameters' addresses,
        the adapter layers' state (found again after any registration: a LoRA loaded or unloaded)."""
        structure = _REGISTRATIONS[0]
        if structure != self._structure:
            self._structure = structure
            self._adapters = _adapter_layers(self.model)
            params = [] if self.model is None else list(self.model.parameters())
            self._watched = [params[i] for i in sorted({0, len(params) // 2, len(params) - 1})] if params else []
        return (structure, [p.data_ptr() for p in self._watched], [_adapter_state(m) for m in self._adapters])

    def wrap(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        """``forward`` with its calls replayed from graphs."""
        return lambda *args, **kwargs: self(forward, args, kwargs)

    def _eager(self, forward, args, kwargs, why: str | None = None):
        if why is not None and why not in self._warned:
            self._warned.add(why)
            say(__name__, logging.WARNING, "ditfa: this transformer call runs without a CUDA graph: %s", why)
        self.eager_calls += 1
        return forward(*args, **kwargs)

    def __call__(self, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if not tensors or any(x.device.type != self.device_type for x in tensors):
            return self._eager(forward, args, kwargs, f"its inputs are not all on a {self.device_type} device")
        if torch.is_grad_enabled():
            return self._eager(forward, args, kwargs, "gradients are enabled (graphs replay inference calls: run "
                               "under torch.no_grad() or torch.inference_mode(), as diffusers pipelines do)")
        plain = (type(None), bool, int, float, str, torch.dtype, torch.device)
        odd = [type(x).__name__ for x in leaves if not isinstance(x, (torch.Tensor, *plain))]
        if odd:
            return self._eager(forward, args, kwargs, f"it passes {odd[0]} values, which a graph cannot tell apart")
        signature = (spec, [x for x in leaves if not isinstance(x, torch.Tensor)], [_meta(x) for x in tensors],
                     *self._model_state())
        state = self.state
        slot = (0, False) if state is None else (state.branch, state.calls_in_step > 0)
        step_tensor = None if state is None else state.step_tensor
        graph = self.graphs.get(slot)
        if graph is not None and graph.signature == signature and graph.step_tensor is step_tensor:
            self.replays += 1
            return graph(leaves)
        if self._warmed.get(slot) != signature or graph is not None:
            # first call of this branch with these inputs: eagerly (autotuning, library set-up; what later steps
            # read gets tensors of its own); a changed call drops the branch's graph and starts over
            self.graphs.pop(slot, None)
            self._warmed[slot] = signature
            self.eager_calls += 1
            return forward(*args, **kwargs)
        fixed = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        fixed_args, fixed_kwargs = tree_unflatten(fixed, spec)
        capture = self._capture
        if capture is None:
            capture = self._capture = cuda_capture(torch.cuda.graph_pool_handle())
        try:
            replay = capture(lambda: forward(*fixed_args, **fixed_kwargs))
        except Exception as error:
            self._warmed.pop(slot, None)
            raise RuntimeError(f"capturing a transformer call into a CUDA graph failed ({type(error).__name__}: "
                               f"{error}). Something in the call reads a value on the host or copies from it (a "
                               "hook, a processor, a scheduler); run without graphs: "
                               "ditfa_optimum.use_cuda_graphs(pipe, False)") from error
        graph = self.graphs[slot] = _Graph(signature, fixed, replay, step_tensor)
        self.captures += 1
        self.replays += 1
        return graph(leaves)
