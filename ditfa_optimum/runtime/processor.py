"""The base of the families' planned attention processors (`ditfa_optimum.adapters`).

A family's processor computes q, k, v as diffusers' stock processor of that family does (projections, qk-norms,
rotary embeddings), hands them to the plan's module runtime as ``[B, H, S, D]`` (`PlannedProcessor.attend`), and
applies the output projections. `ditfa_optimum.adapters.base.check_processor_equivalence` runs it and the stock
processor it replaces on the same random inputs at `apply`, so a diffusers release whose stock processor computes
something else is refused instead of running silently wrong.

Why not call the stock processor and intercept only its SDPA call (a ``torch.overrides.TorchFunctionMode``): measured
2026-12-01 (torch 2.13, diffusers 0.42.1), the mode costs ~3.5 us of host time per torch call inside the processor on
this CPU (74 calls in FLUX's: +250 us per attention call in eager mode), and Dynamo cannot trace FLUX's processor under
it (``Tensor.unflatten``'s ``super()`` call), so ``torch.compile(fullgraph=True)`` fails.
"""

from __future__ import annotations

import torch

from .parallel import context_parallel, ulysses_attention


class PlannedProcessor:
    """Base of the families' planned processors (see the module docstring).

    Args:
        module_runtime: the plan's callable for this module, ``(q, k, v, num_text_tokens) -> out`` (`ModuleRuntime`
            of `ditfa_optimum.runtime.headwise`, or a calibration's).
        spec: the module's `ModuleSpec` (its name and whether its sequence is joint).

    diffusers' IP-adapter and LoRA loaders re-create the current processor class with no arguments: that must not crash
    inside diffusers; such a processor refuses to run, and the plan's guard reports the replaced processor.
    """

    #: set by diffusers' ``transformer.enable_parallelism(config=...)`` (as on its stock processors); under context
    #: parallelism (Ulysses) the plan runs this rank's heads over the whole sequence (`ditfa_optimum.runtime.parallel`)
    _parallel_config = None

    def __init__(self, module_runtime=None, spec=None):
        self.runtime, self.spec = module_runtime, spec
        self.name = f"attention module {spec.name!r}" if spec is not None else "attention"

    def text_tokens(self, encoder_hidden_states: torch.Tensor | None) -> int:
        """Text tokens in the joint sequence of this call: those of ``encoder_hidden_states`` where the module gets
        them; none in an image-only module (SD3.5's ``attn2``); otherwise (FLUX's single-stream blocks, which get the
        concatenated sequence) the text length the transformer call reported."""
        if encoder_hidden_states is not None:
            return int(encoder_hidden_states.shape[1])
        if not self.spec.joint:
            return 0
        text = self.runtime.runtime.state.text_tokens
        if text is None:
            raise RuntimeError(f"{self.name} ran before the transformer reported its text length; call the "
                               "transformer, not its blocks")
        return text

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
        """The plan's attention of the joint ``q, k, v`` (``[B, H, S, D]``) of a call that got
        ``encoder_hidden_states``."""
        if self.runtime is None or self.spec is None:
            raise ValueError(f"this {type(self).__name__} runs a ditfa plan but was created without one (diffusers "
                             "re-creates the current processor class while loading an IP-adapter or LoRA); remove "
                             "the plan first (ditfa_optimum.remove(pipe)), load, then apply the plan again")
        q, k, v = autocast_inputs(q, k, v)
        cp = context_parallel(self)
        if cp is not None:
            from .headwise import ModuleRuntime

            if not isinstance(self.runtime, ModuleRuntime):
                raise ValueError("calibration does not run under context parallelism: calibrate on whole sequences "
                                 "and shard the prompts over the ranks instead (torchrun, docs/parallel.md)")
            return ulysses_attention(self.runtime, q, k, v, cp, self.local_text_tokens(encoder_hidden_states),
                                     self.spec.image_first)
        return self.runtime(q, k, v, num_text_tokens=self.text_tokens(encoder_hidden_states))

    def local_text_tokens(self, encoder_hidden_states: torch.Tensor | None) -> int:
        """Under context parallelism: the text tokens in this rank's chunk of the call's sequence. Modules that get
        ``encoder_hidden_states`` see their chunk and record its length; FLUX's single-stream blocks, which get the
        concatenated chunk, take the length the double-stream blocks of the same call recorded (whether the
        transformer hook saw the call before or after diffusers split it depends on the order of installation)."""
        state = self.runtime.runtime.state
        if encoder_hidden_states is not None:
            state.local_text_tokens = int(encoder_hidden_states.shape[1])
            return state.local_text_tokens
        if not self.spec.joint:
            return 0
        if state.local_text_tokens is None:
            raise RuntimeError(f"{self.name} ran under context parallelism before any module that receives the text "
                               "tokens: its share of the text is unknown")
        return state.local_text_tokens


def autocast_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What ``torch.autocast`` does to the stock processor's ``scaled_dot_product_attention`` inputs: all three in
    autocast's dtype. Without it, SD3.5's qk-norm (float32 weights) hands the plan float32 q and k beside a
    half-precision v, which the backends' output buffers and the fused kernel cannot mix (found by diffusers' own
    mixed-precision training test with a plan applied). Outside autocast the inputs pass unchanged."""
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return q.to(dtype), k.to(dtype), v.to(dtype)
