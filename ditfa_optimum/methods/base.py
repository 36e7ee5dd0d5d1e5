"""The contract every attention method implements, and the registry that maps names and ids to methods.

A method decides, for one head at one (module, step):

* which attention the backend computes for each batch element (``kernel_widths``: 0 = skip, ``W`` image key blocks of
  the arrow band, ``num_image_blocks`` = full attention), so that one backend call covers a whole layer's mixed plan;
* how the computed head output is finished from what earlier steps left behind (``finalize``);
* what it costs (``flops``), for the FLOP accounting and the search's cost model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..masks import TokenLayout

_METHODS_BY_NAME: dict[str, type["AttentionMethod"]] = {}
_METHODS_BY_ID: dict[int, type["AttentionMethod"]] = {}


def register_method(cls: type["AttentionMethod"]) -> type["AttentionMethod"]:
    """Class decorator: make a method known by its ``name`` and its stable integer ``method_id``."""
    for key, table in ((cls.name, _METHODS_BY_NAME), (cls.method_id, _METHODS_BY_ID)):
        if key in table and table[key] is not cls:
            raise ValueError(f"attention method {key!r} is registered twice ({table[key].__name__}, {cls.__name__})")
        table[key] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_METHODS_BY_NAME)


def method_class(name_or_id: str | int) -> type["AttentionMethod"]:
    table = _METHODS_BY_ID if isinstance(name_or_id, int) else _METHODS_BY_NAME
    if name_or_id not in table:
        known = ", ".join(f"{c.name} (id {c.method_id})" for c in sorted(_METHODS_BY_ID.values(), key=lambda c: c.method_id))
        raise ValueError(f"unknown attention method {name_or_id!r}; known methods: {known}")
    return table[name_or_id]


def make_method(name_or_id: str | int, param: float | None = None) -> "AttentionMethod":
    """Build a method from its name (or id) and its parameter.

    Example:
        >>> make_method("arrow", 0.125)
        Arrow(fraction=0.125)
        >>> make_method("arrow:0.125") == make_method("arrow", 0.125)
        True
    """
    if isinstance(name_or_id, str) and ":" in name_or_id:
        if param is not None:
            raise ValueError(f"give the parameter once, either in {name_or_id!r} or as param={param}")
        name_or_id, text = name_or_id.split(":", 1)
        try:
            param = float(parse_fraction(text))
        except ValueError:
            raise ValueError(f"method parameter must be a number like 0.125 or 1/8, got {text!r}") from None
    cls = method_class(name_or_id)
    return cls.from_param(param)


def parse_fraction(text: str) -> float:
    """Parse ``"0.125"`` or ``"1/8"`` without eval."""
    if "/" in text:
        num, den = (float(part) for part in text.split("/", 1))
        if den == 0:  # a ValueError like every other unreadable fraction, not a ZeroDivisionError
            raise ValueError(f"{text!r} divides by zero")
        return num / den
    return float(text)


@dataclass
class HeadMemory:
    """What one head carries from earlier steps of the same generation (only what later steps need)."""

    previous_output: torch.Tensor | None = None  # [B, S, D], for `cache`
    residual: torch.Tensor | None = None  # [B, S, D], full - arrow, for `arrow_residual`
    residual_width: int | None = None


@dataclass(frozen=True)
class AttentionMethod:
    """Base class. Subclasses are frozen dataclasses whose fields are the method's parameters."""

    name: ClassVar[str]
    method_id: ClassVar[int]
    #: reads the head's output of the previous step (`HeadMemory.previous_output`)
    needs_previous_output: ClassVar[bool] = False
    #: reads a residual recorded at the last full step (`HeadMemory.residual`)
    needs_residual: ClassVar[bool] = False
    #: computed in 8 bits: `kernel_widths` are negative (`ditfa_optimum.runtime.backends.Widths`)
    quantized: ClassVar[bool] = False

    @classmethod
    def from_param(cls, param: float | None) -> "AttentionMethod":
        if param not in (None, 0, 0.0):
            raise ValueError(f"method {cls.name!r} takes no parameter, got {param}")
        return cls()

    @property
    def param(self) -> float:
        """The method's one number as stored in a plan (0.0 when it has none)."""
        return 0.0

    def __str__(self) -> str:
        return self.name

    def kernel_widths(self, layout: TokenLayout, batch_size: int, cfg: bool) -> list[int]:
        """Per batch element: 0 = not computed, else the arrow band width in image blocks (n_blk = full); negative
        for a band computed in 8 bits (`quantized` methods)."""
        raise NotImplementedError

    def finalize(self, out: torch.Tensor, memory: HeadMemory, cfg: bool) -> torch.Tensor:
        """Turn what the backend computed for this head (``[B, S, D]``) into the head's output."""
        return out

    def finalize_heads(self, out: torch.Tensor, heads: tuple[int, ...], index: torch.Tensor,
                       memories: list[HeadMemory], cfg: bool) -> None:
        """`finalize` the heads ``heads`` of ``out`` (``[B, H, S, D]``) in place; ``index``: the same heads as a
        tensor on ``out``'s device, ``memories``: theirs, in order. Methods override it to finish all their heads
        in one or two tensor operations instead of one per head (host time per call)."""
        for h, memory in zip(heads, memories):
            out[:, h] = self.finalize(out[:, h], memory, cfg)

    def finish_masked(self, out: torch.Tensor, mask: torch.Tensor, memory: dict[str, torch.Tensor],
                      cfg: bool) -> torch.Tensor:
        """The step-independent form of `finalize_heads`, for compiled blocks (`ditfa_optimum.runtime.tables`):
        ``out`` with the heads where ``mask`` (``[1, H, 1, 1]`` bool on out's device) is True finished, as a new tensor
        (``torch.where``: which heads is known only on the device). ``memory``: the module's kept tensors for this
        branch, ``"previous"`` (its whole output at the step before, ``[B, H, S, D]``) and ``"residual"`` (``full -
        arrow`` at the last recording step), absent before they are first stored. A method that overrides `finalize`
        must override this too, or plans that use it run their step programs when compiled (a graph per step)."""
        raise NotImplementedError(f"method {self.name!r} has no step-independent finish")

    def flops(self, layout: TokenLayout, head_dim: int, cfg: bool) -> float:
        """Attention FLOPs (QK^T and PV, 2 per multiply-add) of this head for one sample."""
        raise NotImplementedError


def dense_flops(layout: TokenLayout, head_dim: int) -> float:
    return 4.0 * head_dim * layout.seq_len * layout.seq_len


def sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense attention, ``[..., S, D]`` layout, optional boolean keep-mask broadcast over the leading dims."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

