"""FP8 linear layers: the transformer blocks' linear layers in float8 (e4m3), through torchao.

The scheme is the one torchao recommends for H100-class GPUs (`Float8DynamicActivationFloat8WeightConfig` with
``PerRow`` granularity): each weight in ``float8_e4m3fn`` with one float32 scale per output row, each activation
quantized per row at run time, the product on the FP8 tensor cores (``torch._scaled_mm``). No GEMM is written here;
torchao's ``Float8Tensor`` carries the weight and dispatches the matmul.

Which layers: every ``nn.Linear`` inside the transformer's block lists (the adapter's attention modules live there:
``transformer_blocks``, ``single_transformer_blocks``) whose input and output widths are multiples of 16 (what
``_scaled_mm`` takes), except the adaptive norms' modulation layers (``norm1.linear``, ``norm1_context.linear``,
FLUX's ``norm.linear``): they map the conditioning vector, one row per sample, so FP8 saves nothing there, and on
mini-mmdit keeping them cost 0.8 dB (8 captions, CPU: 31.8 dB with them in FP8, 32.6 dB without). The embedders, the
time and text projections, ``norm_out`` and ``proj_out`` keep the model's dtype: they are a sliver of the FLOPs and
the first and last layers are the most sensitive.

An artifact stores the quantized weights and their scales as plain tensors (`state` / `load`):
``<module>.weight`` (float8_e4m3fn, [out, in]) and ``<module>.weight_scale`` (float32, [out, 1]).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

#: the values of `DiTFastAttnConfig.quantize_linears` (None: the model's dtype)
QUANTIZATIONS = ("fp8",)
#: the scheme recorded in an artifact (``transformer.linears.scheme``)
SCHEME = "float8_e4m3fn weights with per-row scales, activations per row at run time (torchao Float8Tensor)"
MIN_TORCHAO = (0, 18)
#: the block lists whose linear layers are quantized
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


class Fp8Unavailable(ValueError):
    """FP8 linears cannot run here (torchao missing or too old, no GPU with FP8 tensor cores), or on this model."""


def _torchao():
    try:
        import torchao
    except ImportError:
        raise Fp8Unavailable("FP8 linear layers need torchao; install it: pip install 'ditfa-optimum[fp8]' "
                             f"(torchao>={'.'.join(map(str, MIN_TORCHAO))})") from None
    version = tuple(int(p) for p in torchao.__version__.split("+")[0].split(".")[:2] if p.isdigit())
    if version < MIN_TORCHAO:
        raise Fp8Unavailable(f"FP8 linear layers need torchao>={'.'.join(map(str, MIN_TORCHAO))}, found "
                             f"{torchao.__version__}; upgrade it: pip install -U torchao")
    return torchao


def check_available() -> None:
    """Refuse, with the fix, where FP8 linears cannot run: torchao missing or older than `MIN_TORCHAO`, no CUDA GPU
    (the CPU has no FP8 matmul; torchao refuses it), or a GPU below compute capability 8.9 (Ada, Hopper and newer
    have FP8 tensor cores)."""
    _torchao()
    if not torch.cuda.is_available():
        raise Fp8Unavailable("FP8 linear layers run only on a CUDA GPU with FP8 tensor cores (compute capability "
                             "8.9 or newer: L4, L40S, H100, H200, B200), and this machine has none; leave "
                             "quantize_linears unset (--quantize-linears none) to run in the model's dtype")
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        raise Fp8Unavailable(f"FP8 linear layers need a GPU of compute capability 8.9 or newer (FP8 tensor cores); "
                             f"{torch.cuda.get_device_name()} has {capability[0]}.{capability[1]}; leave "
                             "quantize_linears unset (--quantize-linears none)")


def eligible(transformer: torch.nn.Module) -> list[str]:
    """The names of the linear layers `quantize` converts (see the module docstring), in module order."""
    names = []
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[0] in BLOCK_LISTS and ".norm" not in name \
                and module.in_features % 16 == 0 and module.out_features % 16 == 0:
            names.append(name)
    return names


def is_fp8(weight) -> bool:
    return type(weight).__name__ == "Float8Tensor"


def quantized_names(transformer: torch.nn.Module) -> list[str]:
    """The linear layers of ``transformer`` whose weights are FP8 (empty for a model in its own dtype)."""
    return [name for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear) and is_fp8(module.weight)]


def _float8_weight(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """torchao's FP8 weight from its plain tensors, configured as `Float8DynamicActivationFloat8WeightConfig(PerRow)`
    configures it (activations quantized per row, fast accumulation)."""
    _torchao()
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import (
        Float8Tensor,
        QuantizeTensorToFloat8Kwargs,
    )

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    return Float8Tensor(qdata, scale, block_size=[1, qdata.shape[1]], mm_config=config.mm_config,
                        act_quant_kwargs=QuantizeTensorToFloat8Kwargs(torch.float8_e4m3fn, PerRow()),
                        kernel_preference=config.kernel_preference, dtype=dtype)


def _set_weight(module: torch.nn.Linear, weight) -> None:
    module.weight = torch.nn.Parameter(weight, requires_grad=False)


#: name parts of PEFT adapter layers (a LoRA loaded without fusing wraps each linear as ``<name>.base_layer`` beside
#: ``<name>.lora_A.<adapter>`` / ``lora_B``)
ADAPTER_PARTS = frozenset({"base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"})


def _check_model(transformer: torch.nn.Module) -> None:
    adapters = [name for name, _ in transformer.named_modules() if ADAPTER_PARTS.intersection(name.split("."))]
    if adapters:
        raise Fp8Unavailable(f"the transformer carries unfused adapter layers ({adapters[0]!r} and "
                             f"{len(adapters) - 1} more, e.g. a LoRA): FP8 would quantize the adapter too and record "
                             "layer names the base model lacks; fuse and unload it first (pipe.fuse_lora(); "
                             "pipe.unload_lora_weights()): the artifact then stores the fused weights as base+delta")
    dtypes = {module.weight.dtype for name in eligible(transformer)
              for module in [transformer.get_submodule(name)]}
    if dtypes != {torch.bfloat16}:
        seen = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes)) or "no eligible linear layers"
        raise Fp8Unavailable(f"FP8 linear layers need a bfloat16 transformer (the row-wise FP8 matmul returns "
                             f"bfloat16), got {seen}; load the pipeline with torch_dtype=torch.bfloat16")
    if quantized_names(transformer):
        raise Fp8Unavailable("the transformer's linear layers are already FP8; quantize a model once")


def quantize(transformer: torch.nn.Module, *, check: bool = True) -> list[str]:
    """Convert `eligible` linear layers of a bfloat16 ``transformer`` to FP8 in place; returns their names.
    ``check=False`` skips `check_available` (the conversion itself runs anywhere; tests use it on the CPU)."""
    if check:
        check_available()
    _check_model(transformer)
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    # torchao's quantize_ would also switch inductor's coordinate-descent tuning on, process-wide; the inductor config
    # is left to the user (run with it on, compiling SD3-medium 2K with a plan and FP8 linears did not finish in
    # 290 s on an H200)
    names = eligible(transformer)
    for name in names:
        module = transformer.get_submodule(name)
        with torch.no_grad():
            q = Float8Tensor.from_hp(module.weight.detach(), granularity=PerRow())
        _set_weight(module, _float8_weight(q.qdata, q.scale, module.weight.dtype))
    return names


def state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The FP8 linears' plain tensors, on the CPU: ``<module>.weight`` (float8_e4m3fn) and ``<module>.weight_scale``
    (float32)."""
    tensors = {}
    for name in quantized_names(transformer):
        weight = transformer.get_submodule(name).weight
        tensors[f"{name}.weight"] = weight.qdata.detach().cpu().contiguous()
        tensors[f"{name}.weight_scale"] = weight.scale.detach().cpu().contiguous()
    return tensors


def load(transformer: torch.nn.Module, names: list[str], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Put the stored FP8 weights ``tensors`` (`state`) into the linear layers ``names`` of a bfloat16
    ``transformer``: each name must be an eligible layer, each tensor present with the layer's shape and the stored
    dtype, and nothing else in the file. Raises ValueError naming the tensor and the fix."""
    _check_model(transformer)
    allowed = set(eligible(transformer))
    expected = {f"{n}.{suffix}" for n in names for suffix in ("weight", "weight_scale")}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise ValueError(f"{where}: the FP8 weights do not match the recorded layers (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); the file was edited: download or save the artifact again")
    for name in names:
        if name not in allowed:
            raise ValueError(f"{where}: {name!r} is not a linear layer ditfa quantizes in this transformer; the "
                             "artifact belongs to another model: download or save it again")
        module = transformer.get_submodule(name)
        qdata, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
        shape = tuple(module.weight.shape)
        if qdata.dtype != torch.float8_e4m3fn or tuple(qdata.shape) != shape \
                or scale.dtype != torch.float32 or tuple(scale.shape) != (shape[0], 1) \
                or not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ValueError(f"{where}: {name}: expected float8_e4m3fn {list(shape)} weights and positive finite "
                             f"float32 [{shape[0]}, 1] scales, got {str(qdata.dtype).removeprefix('torch.')} "
                             f"{list(qdata.shape)} and {str(scale.dtype).removeprefix('torch.')} {list(scale.shape)}; "
                             "download or save the artifact again")
        device = module.weight.device
        _set_weight(module, _float8_weight(qdata.to(device), scale.to(device), module.weight.dtype))


@contextlib.contextmanager
def differentiable(transformer: torch.nn.Module):
    """While active, the FP8 linear layers run as ``F.linear`` with their dequantized weights (no activation
    rounding), so autograd can pass through them: torchao's FP8 matmul (``_scaled_mm``) has no derivative, and the
    sensitivity sweep (`ditfa_optimum.sensitivity`) needs d output / d input through every layer. The Jacobian is the
    FP8 layer's up to its activation rounding (a straight-through estimate of that step). A no-op without FP8 layers."""
    patched = []
    try:
        for name in quantized_names(transformer):
            module = transformer.get_submodule(name)
            module.forward = lambda x, m=module: F.linear(x, m.weight.dequantize(), m.bias)
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward  # back to nn.Linear.forward (the FP8 matmul)
