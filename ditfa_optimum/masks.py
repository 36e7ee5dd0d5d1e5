"""The token layout of a joint MMDiT attention call and THE arrow-mask definition.

Every backend (the PyTorch reference, FlexAttention, the Triton kernel) and the FLOP accounting compute exactly the
mask defined here; nothing else in the package decides which (query, key) pairs an arrow head keeps.

Definition (token level, with a block structure whose block size is part of the definition):

* The joint sequence holds ``num_image_tokens`` image tokens and ``num_text_tokens`` text tokens, image first (SD3) or
  text first (FLUX). Image tokens are numbered ``0 .. N_img-1`` *within the image segment*, whatever the order.
* Image tokens are grouped into image blocks of ``block_size`` tokens counted from the first image token:
  ``block(i) = i // block_size``; ``n_blk = ceil(N_img / block_size)`` (the last block may be short).
* An arrow head with window fraction ``f`` keeps ``W = window_blocks(f, n_blk)`` image key blocks per image query
  block: ``W = clamp(ceil(f * n_blk), 1, n_blk)``.
* Image query block ``bq`` keeps image key blocks ``[s, s + W)`` with ``s = clamp(bq - W // 2, 0, n_blk - W)``: a band
  centred on the diagonal, slid inwards at the image borders so every image query row keeps the same number of blocks.
  ``W == n_blk`` is exactly full attention, so ``full`` is ``arrow(1.0)``.
* Text query rows keep every key; every query row keeps every text key.

The "total band width" is therefore ``W * block_size`` tokens, i.e. ``f`` of the image tokens rounded up to whole blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_BLOCK_SIZE = 128


@dataclass(frozen=True)
class TokenLayout:
    """Where the image and text tokens sit in one joint attention call.

    Args:
        num_image_tokens: image (latent patch) tokens, ``>= 1``.
        num_text_tokens: text tokens, ``>= 0`` (0 for image-only attention such as SD3.5's second attention).
        image_first: ``True`` for SD3 (image tokens then text), ``False`` for FLUX (text then image).
        block_size: the mask's block size in tokens (part of the mask definition).

    Example:
        >>> layout = TokenLayout(num_image_tokens=4096, num_text_tokens=333, image_first=True)
        >>> layout.seq_len, layout.num_image_blocks
        (4429, 32)
    """

    num_image_tokens: int
    num_text_tokens: int
    image_first: bool = True
    block_size: int = DEFAULT_BLOCK_SIZE

    # no __post_init__: Dynamo cannot rebuild a frozen dataclass that has one, and the runtime makes layouts inside
    # compiled code; `check` validates, and `ModuleSpec.layout` makes checked ones)
    def check(self) -> "TokenLayout":
        """``self``, after checking the counts (raises ``ValueError``)."""
        if self.num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {self.num_image_tokens}")
        if self.num_text_tokens < 0:
            raise ValueError(f"num_text_tokens must be >= 0, got {self.num_text_tokens}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        return self

    @property
    def seq_len(self) -> int:
        return self.num_image_tokens + self.num_text_tokens

    @property
    def image_start(self) -> int:
        return 0 if self.image_first else self.num_text_tokens

    @property
    def text_start(self) -> int:
        return self.num_image_tokens if self.image_first else 0

    @property
    def num_image_blocks(self) -> int:
        return math.ceil(self.num_image_tokens / self.block_size)

    def image_slice(self) -> slice:
        return slice(self.image_start, self.image_start + self.num_image_tokens)

    def text_slice(self) -> slice:
        return slice(self.text_start, self.text_start + self.num_text_tokens)


def window_blocks(fraction: float, num_image_blocks: int) -> int:
    """Image key blocks kept per image query block by an arrow head of window fraction ``fraction``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"arrow fraction must be in (0, 1], got {fraction}")
    # round first so that 1/8 * 128 = 16.000000000000002 does not become 17
    return min(num_image_blocks, max(1, math.ceil(round(fraction * num_image_blocks, 9))))


def window_start(query_block: torch.Tensor, width: int | torch.Tensor, num_image_blocks: int) -> torch.Tensor:
    """First kept image key block for image query block(s) ``query_block`` (tensor op, works on any shape)."""
    start = query_block - width // 2
    return torch.minimum(torch.clamp(start, min=0), num_image_blocks - torch.as_tensor(width))


def arrow_keep(q_pos: torch.Tensor, k_pos: torch.Tensor, layout: TokenLayout,
               width: int | torch.Tensor) -> torch.Tensor:
    """THE arrow predicate: is (query position, key position) kept by a head whose band is ``width`` image blocks?

    Positions are indices into the joint sequence; all arguments broadcast (tensors of any shape, or the scalars a
    FlexAttention ``mask_mod`` receives). Every backend evaluates exactly this function.
    """
    n_img, bs, n_blk = layout.num_image_tokens, layout.block_size, layout.num_image_blocks
    qi, ki = q_pos - layout.image_start, k_pos - layout.image_start
    q_img = (qi >= 0) & (qi < n_img)
    k_img = (ki >= 0) & (ki < n_img)
    bq = torch.div(qi, bs, rounding_mode="floor")
    bk = torch.div(ki, bs, rounding_mode="floor")
    start = window_start(bq, width, n_blk)
    return ~q_img | ~k_img | ((bk >= start) & (bk < start + width))


def arrow_mask(layout: TokenLayout, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The boolean ``[seq_len, seq_len]`` mask (True = kept) of an arrow head that keeps ``width`` image key blocks.

    ``width == layout.num_image_blocks`` gives an all-True mask (full attention).
    """
    n_blk = layout.num_image_blocks
    if not 1 <= width <= n_blk:
        raise ValueError(f"window width must be in [1, {n_blk}] image blocks, got {width}")
    pos = torch.arange(layout.seq_len, device=device)
    return arrow_keep(pos[:, None], pos[None, :], layout, width)


def constant_runs(layout: TokenLayout, tile: int) -> torch.Tensor:
    """Start positions of the runs of the joint sequence on which `arrow_keep` cannot change, cut at every ``tile``.

    Runs break at image/text boundaries, image block boundaries and multiples of ``tile``; the predicate depends on a
    position only through (is image, image block), so evaluating it at a run's first position is exact for the run.
    """
    cuts = set(range(0, layout.seq_len, tile))
    cuts.update(range(layout.image_start, layout.image_start + layout.num_image_tokens, layout.block_size))
    cuts.update({layout.image_start, layout.image_start + layout.num_image_tokens})
    return torch.tensor(sorted(c for c in cuts if c < layout.seq_len))


def arrow_kept_pairs(layout: TokenLayout, width: int) -> int:
    """Number of (query, key) pairs an arrow head of ``width`` blocks keeps, in closed form (no mask is built)."""
    n_img, n_txt, bs = layout.num_image_tokens, layout.num_text_tokens, layout.block_size
    blocks = torch.arange(layout.num_image_blocks)
    rows = torch.clamp(n_img - blocks * bs, max=bs)  # image query rows per block (the last may be short)
    start = window_start(blocks, width, layout.num_image_blocks)
    keys = torch.clamp((start + width) * bs, max=n_img) - start * bs  # image keys in each block's band
    # text rows keep everything; image rows keep every text key plus their band
    return n_txt * layout.seq_len + n_img * n_txt + int((rows * keys).sum())
