"""What the runtime must know about a model family, and the registry keyed by transformer class name.

An adapter is the only place that knows a model family's classes: where its attention modules are, their token order,
how to read the timestep and the text length from a transformer call, and how to project q/k/v around our attention.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch

from ..plan import ModuleSpec

_ADAPTERS: dict[str, "Adapter"] = {}


def register_adapter(cls: type["Adapter"]) -> type["Adapter"]:
    """Class decorator: the adapter serves transformers whose class (or a base class) is named ``cls.model_class``."""
    _ADAPTERS[cls.model_class] = cls()
    return cls


def adapter_names() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(transformer: torch.nn.Module) -> "Adapter":
    """The adapter for ``transformer``'s class (or its nearest registered base class)."""
    for klass in type(transformer).__mro__:
        if klass.__name__ in _ADAPTERS:
            return _ADAPTERS[klass.__name__]
    raise ValueError(f"ditfa_optimum has no adapter for {type(transformer).__name__}; supported transformers: "
                     f"{adapter_names()}. Write one with @register_adapter (see docs/adapters.md)")


class Adapter:
    """Base class of model-family adapters."""

    model_class: ClassVar[str]
    #: processor class names this adapter may replace; anything else (IP-adapter, PAG, custom) is refused
    stock_processors: ClassVar[tuple[str, ...]]

    # ------------------------------------------------------------------ structure
    def attention_modules(self, transformer: torch.nn.Module) -> list[tuple[ModuleSpec, torch.nn.Module]]:
        """Every planned attention module, in execution order, with its spec."""
        raise NotImplementedError

    def module_specs(self, transformer: torch.nn.Module) -> list[ModuleSpec]:
        return [spec for spec, _ in self.attention_modules(transformer)]

    def image_tokens(self, transformer: torch.nn.Module, height: int, width: int, vae_scale_factor: int = 8) -> int:
        """Image tokens of one sample at a pixel resolution."""
        raise NotImplementedError

    # ------------------------------------------------------------------ calls
    def text_tokens_of_call(self, bound: inspect.BoundArguments) -> int | None:
        enc = bound.arguments.get("encoder_hidden_states")
        return None if enc is None else int(enc.shape[1])

    def read_call(self, signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, int | None]:
        """``(timestep, text tokens)`` of one transformer forward call (``signature`` of its ``forward``)."""
        bound = signature.bind_partial(*args, **kwargs)
        return bound.arguments.get("timestep"), self.text_tokens_of_call(bound)

    def batched_cfg(self, pipeline) -> bool | None:
        """Whether ``pipeline``'s current call batches CFG as [uncond, cond] (None: cannot tell)."""
        return getattr(pipeline, "do_classifier_free_guidance", None)

    # ------------------------------------------------------------------ processors
    def make_processor(self, spec: ModuleSpec, module_runtime):
        raise NotImplementedError

    def check_processor(self, name: str, module: torch.nn.Module) -> None:
        current = type(module.processor).__name__
        if current not in self.stock_processors:
            raise ValueError(f"attention module {name!r} uses processor {current}, which ditfa_optimum would "
                             f"replace and lose; supported: {self.stock_processors}. Remove the other attention "
                             "customisation (IP-adapter, PAG, ...) first")
