"""The "triton" backend: the fused head-wise kernel (`ditfa_optimum.kernels.headwise_attention`) as a torch custom op.

``torch.ops.ditfa.headwise_attention(q, k, v, widths, table, tune_key, num_image_tokens, num_text_tokens, image_first,
block_size)`` returns ``(out, lse)``; a fake implementation gives `torch.compile` the shapes. Eager calls launch the
kernel directly (`_launch`): the custom op's trip through the dispatcher costs about 13 us of host time per call
(measured on this project's CPU), which only tracing needs. The backend is chosen first by "auto"
on CUDA. It hands work it cannot do to the next backend, saying so once: a step whose heads are all full goes to SDPA
(cuDNN / flash are faster for dense attention), and inputs outside the kernel's limits (head dim, mask block size) go
to FlexAttention (CUDA, head dim >= 16) or the reference.

On CPU the kernel runs only under ``TRITON_INTERPRET=1`` (tests): then the backend is available there by name, never
by "auto".
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..masks import TokenLayout
from .backends import HostCache, Widths, get_backend, register_backend, with_8bit_heads
from .log import say

_MAX_CACHED_WIDTHS = 256


def _kernel():
    from ..kernels import headwise_attention as kernel

    return kernel


@torch.library.custom_op("ditfa::headwise_attention", mutates_args=())
def headwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, widths: torch.Tensor,
                       table: torch.Tensor, tune_key: int, num_image_tokens: int, num_text_tokens: int,
                       image_first: bool, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's mixed plan in one launch; ``widths`` ``[B, H]`` int32 on q's device (0 = skip), ``table`` the
    launch table of the (sample, head) pairs and ``tune_key`` the plan's autotuning key (`launch_table` and
    `tune_key` of `ditfa_optimum.kernels.headwise_attention`)."""
    return _kernel().headwise_attention(q, k, v, widths, num_image_tokens, num_text_tokens, image_first, block_size,
                                        table=table, key=tune_key)


def _launch(q, k, v, widths, table, tune_key, num_image_tokens, num_text_tokens, image_first, block_size):
    """The custom op's function for eager calls (no dispatcher, no LSE stored: the backend reads only the output);
    inside any trace (Dynamo, torch.export, a fake-tensor or other dispatch mode) the custom op itself, which those
    can see."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None:
        return headwise_attention(q, k, v, widths, table, tune_key, num_image_tokens, num_text_tokens, image_first,
                                  block_size)
    return _kernel().headwise_attention(q, k, v, widths, num_image_tokens, num_text_tokens, image_first, block_size,
                                        table=table, key=tune_key, store_lse=False)  # (the backend reads no LSE)


@headwise_attention.register_fake
def _(q, k, v, widths, table, tune_key, num_image_tokens, num_text_tokens, image_first, block_size):
    B, H, S, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, H, S, dtype=torch.float32)


def _quantize(q, k, v, heads: torch.Tensor):
    """The 8-bit heads' pre-pass: the fused Triton one on CUDA, over ``heads`` (``sample * H + head`` indices) only;
    PyTorch's, over every head, under the CPU interpreter (the same INT8 tensors)."""
    if q.device.type == "cuda":
        from ..kernels.quantize_qkv import quantize_qkv_fused

        return quantize_qkv_fused(q, k, v, fp8_pv=False, heads=heads)
    from ..fp8_attention import quantize_qkv

    return quantize_qkv(q, k, v, fp8_pv=False)


@register_backend
class TritonBackend:
    name = "triton"
    differentiable = False  # the custom op registers no backward

    def __init__(self):
        self._widths = HostCache(_MAX_CACHED_WIDTHS)
        self._warned: set[str] = set()

    def available(self, device: torch.device) -> bool:
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        if device.type == "cuda":
            return True
        return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"

    def device_widths(self, widths, device: torch.device, drop_skipped: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``widths`` as int32 on ``device``, its launch table (``drop_skipped``: only the computed pairs' rows) and
        its autotuning key, made on the host from the rows once per `Widths` (`Widths.derive`; equal rows share one
        by value, `HostCache`): no copy, sort or device sync per call."""
        widths = Widths.of(widths, 0)  # (full attention plays no part here)

        def make():
            return (widths.tensor(device, torch.int32),
                    _kernel().launch_table(widths.rows, drop_skipped=drop_skipped).to(device),
                    _kernel().tune_key(widths.rows))

        key = (widths.rows, str(device), drop_skipped)
        return widths.derive(("triton", str(device), drop_skipped), lambda: self._widths.get(key, make))

    def _fallback(self, reason: str, q: torch.Tensor):
        if reason not in self._warned:
            self._warned.add(reason)
            say(__name__, logging.WARNING, "ditfa: the triton backend hands these calls to another backend: %s", reason)
        # compiled FlexAttention needs head dim >= 16 as well
        flex_ok = q.device.type == "cuda" and q.shape[-1] >= 16
        return get_backend("flex" if flex_ok else "reference", q.device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
               widths) -> torch.Tensor:
        widths = Widths.of(widths, layout.num_image_blocks)
        if widths.all_full:
            return F.scaled_dot_product_attention(q, k, v)
        problem = _kernel().check_inputs(q, k, v, layout.block_size)
        if problem:
            return self._fallback(problem, q).attend(q, k, v, layout, widths)
        if widths.quantized:
            return self._attend_8bit(q, k, v, layout, widths)
        out, _ = _launch(q, k, v, *self.device_widths(widths, q.device), layout.num_image_tokens,
                         layout.num_text_tokens, layout.image_first, layout.block_size)
        return out

    def attend_widths(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                      widths: torch.Tensor, key: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The step-independent call (`ditfa_optimum.runtime.tables`): ``widths`` a ``[B, H]`` tensor on q's device
        (no 8-bit heads), ``key`` the autotuning key; the launch table is made on the device, every (sample, head)
        row launched (a skipped one returns at once), so the graph does not depend on the step. ``out`` (eager calls
        only): the kernel writes the computed pairs into it, skipped ones keep its values; returned."""
        from .tables import launch_table

        if _kernel().check_inputs(q, k, v, layout.block_size):
            return get_backend("reference", q.device).attend_widths(q, k, v, layout, widths, key, out=out)
        widths = widths.to(torch.int32)
        common = (layout.num_image_tokens, layout.num_text_tokens, layout.image_first, layout.block_size)
        if out is not None:
            if torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None:
                raise ValueError("attend_widths(out=...) writes into a tensor: eager calls only")
            return _kernel().headwise_attention(q, k, v, widths, *common, out=out, store_lse=False,
                                                table=launch_table(widths), key=key)[0]
        out, _ = _launch(q, k, v, widths, launch_table(widths), key, *common)
        return out

    def _attend_8bit(self, q, k, v, layout: TokenLayout, widths: Widths) -> torch.Tensor:
        """A layer with 8-bit heads: the kernel twice into one output, once on the plain heads' rows and once on the
        8-bit heads' rows with the quantized inputs (fused pre-pass on CUDA, PyTorch's on the CPU interpreter). Traces
        (compile, export) see the custom op for the plain heads and the scheme in PyTorch for the 8-bit ones."""
        from ..kernels.headwise_attention import headwise_attention, quantized_shape_problem

        if torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None:
            return with_8bit_heads(self.attend, q, k, v, layout, widths)
        problem = quantized_shape_problem(q.shape[-1], layout.block_size, q.device)
        if problem:  # before the pre-pass, which would be thrown away
            return self._fallback(problem, q).attend(q, k, v, layout, widths)
        plain, eight = widths.split()
        eight_widths, eight_table, eight_key = self.device_widths(eight, q.device, drop_skipped=True)
        quant = _quantize(q, k, v, eight_table[:, 0])  # only the 8-bit heads (the launch checks its tensors)
        common = (layout.num_image_tokens, layout.num_text_tokens, layout.image_first, layout.block_size)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        if plain.any:
            dev_widths, table, key = self.device_widths(plain, q.device, drop_skipped=True)
            headwise_attention(q, k, v, dev_widths, *common, out=out, store_lse=False, table=table, key=key)
        headwise_attention(q, k, v, eight_widths, *common, out=out, store_lse=False, table=eight_table, key=eight_key,
                           quant=quant)
        return out
