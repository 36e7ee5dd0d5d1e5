"""The FlexAttention backend: one `flex_attention` call per layer with a per-(sample, head) BlockMask.

The BlockMask's ``mask_mod`` evaluates the same definition as `ditfa_optimum.masks.arrow_mask` (it calls the same
`window_start`), reading each (sample, head)'s band width from a table, so one call serves a whole mixed plan. Block
masks are cached per (layout, widths); on CUDA `flex_attention` is compiled once (recompiling per new shape).
On CPU only the eager path runs (slow, materialises scores): fine for tests, not for speed.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch

from ..masks import TokenLayout, window_start
from .backends import register_backend

_MAX_CACHED_MASKS = 256


def arrow_mask_mod(layout: TokenLayout, widths: torch.Tensor):
    """A FlexAttention ``mask_mod`` for per-(b, h) band widths (0 = keep nothing)."""
    n_img, bs, n_blk, img0 = layout.num_image_tokens, layout.block_size, layout.num_image_blocks, layout.image_start

    def mask_mod(b, h, q_idx, kv_idx):
        w = widths[b, h]
        qi, ki = q_idx - img0, kv_idx - img0
        q_img = (qi >= 0) & (qi < n_img)
        k_img = (ki >= 0) & (ki < n_img)
        bq = torch.div(qi, bs, rounding_mode="floor")
        bk = torch.div(ki, bs, rounding_mode="floor")
        start = window_start(bq, w, n_blk)
        band = (bk >= start) & (bk < start + w)
        return (w > 0) & (~q_img | ~k_img | band)

    return mask_mod


@register_backend
class FlexBackend:
    name = "flex"

    def __init__(self):
        self._masks: OrderedDict = OrderedDict()
        self._compiled = None

    def available(self, device: torch.device) -> bool:
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError:
            return False
        return device.type in ("cuda", "cpu", "xpu")

    def block_mask(self, layout: TokenLayout, widths: torch.Tensor):
        from torch.nn.attention.flex_attention import create_block_mask

        key = (layout, tuple(widths.shape), widths.cpu().numpy().tobytes(), str(widths.device))
        if key not in self._masks:
            B, H = widths.shape
            S = layout.seq_len
            # compiled mask evaluation on accelerators: the eager path materialises B x H x S x S booleans
            self._masks[key] = create_block_mask(arrow_mask_mod(layout, widths), B, H, S, S, device=widths.device,
                                                 _compile=widths.device.type != "cpu")
            if len(self._masks) > _MAX_CACHED_MASKS:
                self._masks.popitem(last=False)
        self._masks.move_to_end(key)
        return self._masks[key]

    def _flex(self, device: torch.device):
        from torch.nn.attention.flex_attention import flex_attention

        if device.type == "cpu":
            def eager(*args, **kwargs):  # the eager path is the point on CPU (tests); silence its advice to compile
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                    return flex_attention(*args, **kwargs)
            return eager
        if self._compiled is None:
            self._compiled = torch.compile(flex_attention, dynamic=False)
        return self._compiled

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
               widths: torch.Tensor) -> torch.Tensor:
        widths = widths.to(device=q.device, dtype=torch.int64)
        return self._flex(q.device)(q, k, v, block_mask=self.block_mask(layout, widths))
