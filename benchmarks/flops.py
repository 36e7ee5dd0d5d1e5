"""One FLOP counter for every strategy: the FLOPs a diffusers transformer actually executes while the counter is active.

Whatever skips work -- a block cache that reuses a residual, TaylorSeer predicting a module's output, a plan of ours
that replaces attention by a window or a cached head -- is measured by the same rule, so strategies compare at the
same share of whole-transformer FLOPs skipped:

* every ``nn.Linear`` call: ``2 * in_features * out_features`` per row (rows = input elements / in_features), counted
  by a forward hook on the module, so a Linear that a cache does not call is not counted;
* every call of a diffusers attention module (``Attention`` / ``AttentionModuleMixin``): dense
  ``4 * S_q * S_k * head_dim * heads * batch`` (QK^T and PV, two FLOPs per multiply-add). A forward pre-hook reads the
  shapes of the call's inputs; the call is counted (by a forward hook) only if the module's own computation ran, i.e.
  one of its Linear projections was called during the call: a cache hook that replaces the module's forward by a
  prediction (diffusers' TaylorSeer hooks the attention modules themselves) still triggers the module's hooks, but
  computes nothing and is not counted. SD3 and FLUX double blocks attend over the joint sequence, so
  ``S_q = S_k = image tokens + text tokens`` (``hidden_states`` plus ``encoder_hidden_states``); a call without
  ``encoder_hidden_states`` (FLUX single blocks, SD3.5's second attention) has ``S = hidden_states tokens`` and
  ``text_tokens = 0``. ``attention_flops(module_name, batch, image_tokens, text_tokens, heads, head_dim)`` may
  override that count per call (None keeps the dense count): our runtime plugs in its plan's per-step method costs;
* convolutions (the patch embedding): ``2 * in_channels / groups * kernel elements * out_channels`` per output
  position.

Not counted: normalisations, activations, softmax, additions, and the peers' own bookkeeping (residual differences,
Taylor extrapolation): elementwise work, small next to the matmuls. Only modules under ``transformer`` are counted
(the text encoder is not).

Per image. With CFG batched as [uncond, cond], each transformer call carries two rows per image, so the totals are
divided by the number of IMAGES generated while counting (the captions of a `generate` run), never by the
transformer's batch: a dense 20-step image with CFG counts 20 calls of batch 2.

Example:
    >>> with count_flops(pipe.transformer) as counter:                         # doctest: +SKIP
    ...     images = generate(pipe, captions, seeds, 20, 4.0, batch=8)
    >>> counter.per_image(len(captions))                                       # doctest: +SKIP
    >>> skipped_share(cached.total, dense.total)                               # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

AttentionFlops = Callable[[str, int, int, int, int, int], Optional[float]]


def _attention_classes() -> tuple[type, ...]:
    from diffusers.models.attention_processor import Attention

    classes: tuple[type, ...] = (Attention,)
    try:
        from diffusers.models.attention import AttentionModuleMixin

        classes += (AttentionModuleMixin,)
    except ImportError:  # older diffusers: every attention module is an `Attention`
        pass
    return classes


def _heads_and_dim(module: nn.Module) -> tuple[int, int]:
    heads = int(module.heads)
    inner = getattr(module, "inner_dim", None)
    head_dim = getattr(module, "head_dim", None)
    if head_dim is None:
        head_dim = (inner // heads) if inner else module.to_q.out_features // heads
    return heads, int(head_dim)


@dataclass
class FlopCounter:
    """Running totals of a `count_flops` context (FLOPs, summed over every transformer call while active).

    Attributes:
        linear / attention / conv: FLOPs by kind; ``total`` is their sum.
        calls: transformer forward calls seen; ``attention_calls``: attention module calls.
        by_module: FLOPs per module name (Linear, Conv and attention calls).
    """

    linear: float = 0.0
    attention: float = 0.0
    conv: float = 0.0
    calls: int = 0
    attention_calls: int = 0
    by_module: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.conv

    def per_image(self, images: int) -> float:
        """Total FLOPs per generated image; ``images`` = images generated while counting (not the CFG batch)."""
        if images <= 0:
            raise ValueError(f"images must be > 0, got {images}")
        return self.total / images

    def as_dict(self, images: int | None = None) -> dict:
        out = dict(total=self.total, linear=self.linear, attention=self.attention, conv=self.conv, calls=self.calls,
                   attention_calls=self.attention_calls)
        if images is not None:
            out["per_image"] = self.per_image(images)
        return out

    def _add(self, kind: str, name: str, flops: float) -> None:
        setattr(self, kind, getattr(self, kind) + flops)
        self.by_module[name] = self.by_module.get(name, 0.0) + flops


class count_flops:  # noqa: N801 -- used as a context manager, like torch.no_grad
    """Count the FLOPs ``transformer`` executes while active (see the module docstring for what counts).

    Args:
        transformer: a diffusers transformer (any ``nn.Module``; its Linear, Conv and diffusers attention submodules
            are hooked).
        attention_flops: optional ``(module_name, batch, image_tokens, text_tokens, heads, head_dim) -> float | None``
            giving the FLOPs of one attention call; ``None`` (or a ``None`` result) counts it dense.

    Returns (on ``__enter__``) a `FlopCounter`; the hooks are removed on ``__exit__`` (also after an exception).

    Example:
        >>> with count_flops(model) as c:                                      # doctest: +SKIP
        ...     model(**inputs)
        >>> c.total, c.attention                                               # doctest: +SKIP
    """

    def __init__(self, transformer: nn.Module, attention_flops: AttentionFlops | None = None):
        if not isinstance(transformer, nn.Module):
            raise TypeError(f"transformer must be a torch.nn.Module, got {type(transformer).__name__}")
        if attention_flops is not None and not callable(attention_flops):
            raise TypeError(f"attention_flops must be callable or None, got {type(attention_flops).__name__}")
        self.transformer = transformer
        self.attention_flops = attention_flops
        self.counter = FlopCounter()
        self._handles: list = []
        self._pending: dict = {}

    def __enter__(self) -> FlopCounter:
        if self._handles:
            raise RuntimeError("this count_flops is already active")
        attention_classes = _attention_classes()
        modules = dict(self.transformer.named_modules())
        attention_names = [name for name, m in modules.items() if isinstance(m, attention_classes)]
        self._pending = {}  # attention module name -> [call shapes, whether one of its projections ran]
        self._handles.append(self.transformer.register_forward_pre_hook(self._on_call))
        for name, module in modules.items():
            if isinstance(module, nn.Linear):
                owner = next((a for a in attention_names if name.startswith(a + ".")), None)
                self._handles.append(module.register_forward_hook(self._linear_hook(name, owner)))
            elif isinstance(module, nn.modules.conv._ConvNd):
                self._handles.append(module.register_forward_hook(self._conv_hook(name)))
            elif name in attention_names:
                self._handles.append(module.register_forward_pre_hook(self._attention_pre_hook(name),
                                                                      with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._attention_hook(name)))
        return self.counter

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on_call(self, module, args) -> None:
        self.counter.calls += 1

    def _linear_hook(self, name: str, owner: str | None):
        def hook(module: nn.Linear, args, output) -> None:
            rows = args[0].numel() // module.in_features
            self.counter._add("linear", name, 2.0 * rows * module.in_features * module.out_features)
            if owner in self._pending:
                self._pending[owner][1] = True

        return hook

    def _conv_hook(self, name: str):
        def hook(module, args, output) -> None:
            kernel = 1
            for k in module.kernel_size:
                kernel *= k
            positions = output.numel() // module.out_channels
            flops = 2.0 * positions * (module.in_channels // module.groups) * kernel * module.out_channels
            self.counter._add("conv", name, flops)

        return hook

    def _attention_pre_hook(self, name: str):
        def hook(module, args, kwargs) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            if not isinstance(hidden, torch.Tensor):
                return
            text_tokens = context.shape[1] if isinstance(context, torch.Tensor) else 0
            self._pending[name] = [(hidden.shape[0], hidden.shape[1], text_tokens), False]

        return hook

    def _attention_hook(self, name: str):
        def hook(module, args, output) -> None:
            pending = self._pending.pop(name, None)
            if pending is None or not pending[1]:  # no input shapes, or the module's own computation did not run
                return
            batch, image_tokens, text_tokens = pending[0]
            heads, head_dim = _heads_and_dim(module)
            flops = None
            if self.attention_flops is not None:
                flops = self.attention_flops(name, batch, image_tokens, text_tokens, heads, head_dim)
            if flops is None:
                flops = dense_attention_flops(batch, image_tokens + text_tokens, heads, head_dim)
            self.counter.attention_calls += 1
            self.counter._add("attention", name, float(flops))

        return hook


def dense_attention_flops(batch: int, tokens: int, heads: int, head_dim: int) -> float:
    """FLOPs of one dense self-attention call over ``tokens`` (QK^T and PV): ``4 * S^2 * head_dim * heads * batch``."""
    return 4.0 * tokens * tokens * head_dim * heads * batch


def skipped_share(counted: float, dense: float) -> float:
    """Share of the dense FLOPs that a run skipped: ``1 - counted / dense`` (0 = nothing skipped)."""
    if dense <= 0:
        raise ValueError(f"dense FLOPs must be > 0, got {dense}")
    return 1.0 - counted / dense


__all__ = ["FlopCounter", "count_flops", "dense_attention_flops", "skipped_share"]
