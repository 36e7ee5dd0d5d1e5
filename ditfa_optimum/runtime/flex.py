"""The FlexAttention backend: one `flex_attention` call per layer with a per-(sample, head) BlockMask.

The BlockMask is built from `ditfa_optimum.masks.arrow_keep`, the same predicate every backend evaluates:

* its ``mask_mod`` calls `arrow_keep` with each (sample, head)'s band width read from a table, for partial tiles;
* its tile classification (empty / partial / full per (query tile, key tile)) is computed analytically: the predicate
  is constant on the runs of `masks.constant_runs`, so it is evaluated on run starts ([B, H, A, A], A ~ 2 x tiles)
  and reduced to tiles with two small matmuls. That took ~1 ms at 2048^2 on an H100 and compiles nothing, where
  `create_block_mask` took ~30 ms per new width table at 2048^2 on an H100 — a plan has one per module and step.

A step where every head is full skips FlexAttention for plain SDPA (cuDNN / flash on CUDA), which is faster.
On CUDA `flex_attention` is compiled once per shape. On CPU only its eager path runs (slow, materialises scores): fine
for tests, not for speed.
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn.functional as F

from ..masks import TokenLayout, arrow_keep, constant_runs
from .backends import HostCache, Widths, register_backend, with_8bit_heads

_MAX_CACHED_MASKS = 64

FLEX_TILE = 128

#: the smallest head dimension compiled FlexAttention takes on CUDA (torch 2.11: "NYI: embedding dimension of the
#: query, key, and value must be at least 16"); smaller heads are zero-padded to it, which changes nothing but the
#: default softmax scale, passed explicitly
MIN_COMPILED_HEAD_DIM = 16


def arrow_mask_mod(layout: TokenLayout, widths: torch.Tensor):
    """A FlexAttention ``mask_mod`` for per-(b, h) band widths (0 = keep nothing)."""

    def mask_mod(b, h, q_idx, kv_idx):
        w = widths[b, h]
        return (w > 0) & arrow_keep(q_idx, kv_idx, layout, w)

    return mask_mod


def arrow_block_mask(layout: TokenLayout, widths: torch.Tensor, tile: int = FLEX_TILE):
    """The `BlockMask` of per-(b, h) arrow heads (``widths`` ``[B, H]``, 0 = skipped) over ``tile``-sized tiles."""
    from torch.nn.attention.flex_attention import BlockMask

    device, S = widths.device, layout.seq_len
    runs = constant_runs(layout, tile).to(device)
    w = widths[:, :, None, None]
    keep = ((w > 0) & arrow_keep(runs[:, None], runs[None, :], layout, w)).float()  # [B, H, A, A]
    n_tiles = -(-S // tile)
    onehot = F.one_hot(torch.div(runs, tile, rounding_mode="floor"), n_tiles).float()  # [A, T]
    kept = onehot.T @ keep @ onehot  # [B, H, T, T]: kept run pairs per tile pair
    runs_per_tile = onehot.sum(0)
    total = runs_per_tile[:, None] * runs_per_tile[None, :]
    whole = torch.arange(1, n_tiles + 1, device=device) * tile <= S  # a ragged last tile is never "full",
    full = (kept == total) & whole[:, None] & whole[None, :]          # as in create_block_mask
    partial = (kept > 0) & ~full

    def ordered(blocks):
        num = blocks.sum(-1, dtype=torch.int32)
        idx = torch.argsort(blocks.to(torch.int32), dim=-1, descending=True, stable=True).to(torch.int32)
        return num, idx

    kwargs = dict(BLOCK_SIZE=tile, mask_mod=arrow_mask_mod(layout, widths), seq_lengths=(S, S))
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["compute_q_blocks"] = False  # only the backward pass reads them
    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), **kwargs)


@register_backend
class FlexBackend:
    name = "flex"
    differentiable = False  # the BlockMask is built without the query blocks FlexAttention's backward reads

    def __init__(self):
        self._masks = HostCache(_MAX_CACHED_MASKS)
        self._compiled = None

    def available(self, device: torch.device) -> bool:
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError:
            return False
        return device.type in ("cuda", "cpu", "xpu")

    def block_mask(self, layout: TokenLayout, widths: Widths, device: torch.device):
        """The BlockMask of ``widths`` on ``device``, cached by value (`HostCache`: no device read per call)."""
        key = (layout, widths.rows, str(device))
        return widths.derive(("flex", layout, str(device)), lambda: self._masks.get(
            key, lambda: arrow_block_mask(layout, widths.tensor(device, torch.int64))))

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
               widths) -> torch.Tensor:
        widths = Widths.of(widths, layout.num_image_blocks)
        if widths.all_full:
            return F.scaled_dot_product_attention(q, k, v)
        if widths.quantized:  # FlexAttention has no 8-bit path: those heads through the scheme in PyTorch
            return with_8bit_heads(self.attend, q, k, v, layout, widths)
        flex, block_mask = self._flex(q.device), self.block_mask(layout, widths, q.device)
        if q.device.type == "cpu":
            return flex(q, k, v, block_mask=block_mask)
        return padded_call(flex, q, k, v, block_mask, MIN_COMPILED_HEAD_DIM)


def padded_call(flex, q, k, v, block_mask, min_head_dim: int) -> torch.Tensor:
    """``flex(q, k, v, block_mask=...)`` with heads narrower than ``min_head_dim`` zero-padded to it: zero columns add
    nothing to q.k, the padded output columns are sliced off, and the scale stays 1/sqrt(D) of the true D."""
    D = q.shape[-1]
    if D >= min_head_dim:
        return flex(q, k, v, block_mask=block_mask)
    pad = (0, min_head_dim - D)
    return flex(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), block_mask=block_mask, scale=D ** -0.5)[..., :D]
