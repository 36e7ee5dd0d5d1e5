"""What the runtime must know about a model family, and the registry keyed by transformer class name.

An adapter is the only place that knows a model family's classes: where its attention modules are, their token order,
how to read the timestep and the text length from a transformer call, and how to project q/k/v around our attention;
for block methods, where its transformer blocks are, what they cost, and how a block's image and text streams enter
and leave its forward.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
from typing import Any, ClassVar

import torch

from ..methods import Streams
from ..plan import BlockSpec, ModuleSpec

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


def linear_flops(module: torch.nn.Module | None) -> int:
    """FLOPs per token (2 per multiply-add) of every ``nn.Linear`` inside ``module`` (0 for None)."""
    if module is None:
        return 0
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def _linears(owner: torch.nn.Module | None, *names: str) -> int:
    """`linear_flops` of the named submodules of ``owner`` that exist (the unfused projections are named, so fused
    copies made by ``fuse_qkv_projections`` are not counted twice)."""
    return 0 if owner is None else sum(linear_flops(getattr(owner, n, None)) for n in names)


def double_stream_block_spec(name: str, block: torch.nn.Module) -> BlockSpec:
    """The `BlockSpec` of an MMDiT block with separate image and text weights (SD3's `JointTransformerBlock`, FLUX's
    `FluxTransformerBlock`): ``attn`` (joint; SD3.5 also ``attn2``, image only), ``ff`` / ``ff_context`` MLPs,
    ``norm1`` / ``norm1_context`` AdaLN modulation."""
    attention = [a for a in ("attn", "attn2") if getattr(block, a, None) is not None]
    mlps = [m for m in ("ff", "ff_context") if getattr(block, m, None) is not None]
    return BlockSpec(
        name, tuple(f"{name}.{a}" for a in attention), tuple(f"{name}.{m}" for m in mlps),
        attn_proj_image=sum(_linears(getattr(block, a), "to_q", "to_k", "to_v", "to_out") for a in attention),
        attn_proj_text=_linears(block.attn, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
        mlp_image=linear_flops(getattr(block, "ff", None)),
        mlp_text=linear_flops(getattr(block, "ff_context", None)),
        modulation=_linears(block, "norm1", "norm1_context"),
    )


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> tuple[str, ...]:
    return tuple(inspect.signature(cls.forward).parameters)[1:]  # without self


def call_argument(module: torch.nn.Module, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
    """The argument ``name`` of a call ``module(*args, **kwargs)`` (None when not given)."""
    if name in kwargs:
        return kwargs[name]
    params = _forward_parameters(type(module))
    if name not in params:
        raise ValueError(f"{type(module).__name__}.forward takes no argument {name!r}; its adapter does not fit this "
                         "diffusers version")
    i = params.index(name)
    return args[i] if i < len(args) else None


class Adapter:
    """Base class of model-family adapters."""

    #: the arguments of a block's forward that carry its image and text streams (diffusers' MMDiT convention)
    block_stream_arguments: ClassVar[tuple[str, str]] = ("hidden_states", "encoder_hidden_states")

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

    def pixels_per_token(self, transformer: torch.nn.Module, vae_scale_factor: int = 8) -> int:
        """Pixels along one side of the image per image token (the inverse of `image_tokens`: SD3 ``vae x patch``,
        FLUX ``vae x 2``)."""
        probe = vae_scale_factor * 64
        return probe // math.isqrt(self.image_tokens(transformer, probe, probe, vae_scale_factor))

    # ------------------------------------------------------------------ blocks
    def blocks(self, transformer: torch.nn.Module) -> list[tuple[BlockSpec, torch.nn.Module]]:
        """Every transformer block, in execution order, with its spec (for block-level methods)."""
        raise NotImplementedError(f"{type(self).__name__} reports no transformer blocks, so plans with block methods "
                                  "cannot run on it; implement Adapter.blocks (see docs/adapters.md)")

    def block_specs(self, transformer: torch.nn.Module) -> list[BlockSpec]:
        return [spec for spec, _ in self.blocks(transformer)]

    def block_inputs(self, spec: BlockSpec, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Streams:
        """The image and text streams entering a block call ``module(*args, **kwargs)``."""
        image, text = (call_argument(module, n, args, kwargs) for n in self.block_stream_arguments)
        return Streams(image, text)

    def block_output_streams(self, spec: BlockSpec, output: Any) -> Streams:
        """The streams a block returned. diffusers' MMDiT blocks return ``(text, image)``; SD3's last block returns
        None for the text."""
        text, image = output
        return Streams(image, text)

    def block_output(self, spec: BlockSpec, streams: Streams) -> Any:
        """What the block's forward returns, built from streams (inverse of `block_output_streams`)."""
        return streams.text, streams.image

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

    def spatial_latents(self, latents: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
        """A pipeline's final latents (``output_type="latent"``) for an image of ``height`` x ``width`` pixels as
        ``[B, C, h, w]`` (SD3's already are)."""
        return latents

    # ------------------------------------------------------------------ processors
    def make_processor(self, spec: ModuleSpec, module_runtime):
        """The planned processor of module ``spec``: computes q, k, v as the stock processor does and hands them to
        ``module_runtime`` (subclass `ditfa_optimum.runtime.processor.PlannedProcessor`)."""
        raise NotImplementedError

    def planned_processor_name(self, name: str) -> str:
        """Class name of the processor `make_processor` installs (the last of `stock_processors` by convention)."""
        return self.stock_processors[-1]

    def processor_check_inputs(self, spec: ModuleSpec, module: torch.nn.Module, image_tokens: int, text_tokens: int,
                               generator: torch.Generator) -> tuple[tuple, dict]:
        """Random ``(args, kwargs)`` of one call of ``module``'s processor (after the ``attn`` argument), for
        `check_processor_equivalence`: the image stream, and the text stream where the module projects one."""
        param = next(module.parameters())

        def rand(n: int, dim: int) -> torch.Tensor:
            return torch.randn(1, n, dim, generator=generator).to(param.device, param.dtype)

        add_q = getattr(module, "add_q_proj", None)
        if add_q is None:  # one stream in: the image tokens (or, in a single-stream block, text + image)
            n = image_tokens + (text_tokens if spec.joint else 0)
            return (rand(n, module.to_q.in_features),), {}
        return (rand(image_tokens, module.to_q.in_features),), {
            "encoder_hidden_states": rand(text_tokens, add_q.in_features)}

    def check_processor(self, name: str, module: torch.nn.Module) -> None:
        current = type(module.processor).__name__
        if current not in self.stock_processors:
            raise ValueError(f"attention module {name!r} uses processor {current}, which ditfa_optimum would "
                             f"replace and lose; supported: {self.stock_processors}. Remove the other attention "
                             "customisation (IP-adapter, PAG, ...) first")


class _DenseRuntime:
    """A module runtime that computes plain attention (what an all-full plan computes), for the equivalence check."""

    def __init__(self, text_tokens: int):
        self.runtime = types.SimpleNamespace(state=types.SimpleNamespace(text_tokens=text_tokens))

    def __call__(self, q, k, v, num_text_tokens: int) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def check_processor_equivalence(adapter: Adapter, modules: list[tuple[ModuleSpec, torch.nn.Module]],
                                image_tokens: int = 32, text_tokens: int = 8) -> None:
    """Refuse a diffusers version whose stock attention processor computes something our planned processor does not.

    For each kind of planned module (stock processor class, joint or not, text stream or not, ``context_pre_only``),
    the first module of that kind runs its stock processor and our processor with full attention on the same small
    random inputs; their outputs must agree to rounding (relative error <= 1e-2 in half precision, 1e-4 in fp32).
    Modules whose weights are not materialised (meta device, offloaded) are not checked, nor modules whose stock output
    is not finite (weights not initialised yet: ``from_pretrained(low_cpu_mem_usage=False)`` builds the model with
    empty weights before loading them); the next module of the same kind is checked instead."""
    seen = set()
    generator = torch.Generator().manual_seed(0)
    for spec, module in modules:
        stock = module.processor
        kind = (type(stock).__name__, spec.joint, hasattr(module, "add_q_proj"), getattr(module, "context_pre_only",
                                                                                          None))
        param = next(module.parameters(), None)
        if kind in seen or param is None or param.device.type == "meta":
            continue
        args, kwargs = adapter.processor_check_inputs(spec, module, image_tokens, text_tokens, generator)
        with torch.no_grad():
            expected = stock(module, *args, **kwargs)
        if not all(x is None or bool(torch.isfinite(x).all()) for x in (expected if isinstance(expected, tuple)
                                                                         else (expected,))):
            continue  # nothing to compare against
        seen.add(kind)
        ours = adapter.make_processor(spec, _DenseRuntime(text_tokens))
        with torch.no_grad():
            got = ours(module, *args, **kwargs)
        pairs = list(zip(*(x if isinstance(x, tuple) else (x,) for x in (expected, got))))
        tolerance = 1e-4 if param.dtype == torch.float32 else 1e-2
        for want, have in pairs:
            if want is None and have is None:
                continue
            err = float((have.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))
            if want.shape != have.shape or not err <= tolerance:
                raise RuntimeError(
                    f"attention module {spec.name!r}: ditfa_optimum's {type(ours).__name__} does not reproduce this "
                    f"diffusers version's {type(stock).__name__} (relative difference {err:.2e} with full attention; "
                    f"allowed {tolerance:.0e}), so a plan would run it wrong. Please report it with your diffusers "
                    "version; until then use a diffusers version from docs/adapters.md")
