"""The contract every block method implements, and the registry that maps names and ids to block methods.

A block method decides, for one transformer block at one denoising step, how much of the block runs:

* ``runs_block``: whether the block's forward executes (its attention modules then follow the head-wise plan);
* ``runs_mlp``: whether its feed-forward submodules execute (else their outputs come from an earlier step);
* which memory from earlier steps it reads (``sources``), given the earlier steps where the block and its MLP ran;
* what the block returns when it does not run (``skip``), as a pure function of its inputs and that memory;
* what it costs (``cost``), from the block's attention FLOPs under the head plan and its linear FLOPs.

A block has two streams, image and text (`Streams`); the text output may be absent (SD3's last block returns None
for it). A block's *residual* at a step is its output minus its input, per stream.

Block methods have their own registry and id space (`register_block_method`), separate from the head methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, Sequence

import torch

_BLOCK_METHODS_BY_NAME: dict[str, type["BlockMethod"]] = {}
_BLOCK_METHODS_BY_ID: dict[int, type["BlockMethod"]] = {}


def register_block_method(cls: type["BlockMethod"]) -> type["BlockMethod"]:
    """Class decorator: make a block method known by its ``name`` and its stable integer ``method_id``."""
    entries = ((cls.name, _BLOCK_METHODS_BY_NAME), (cls.method_id, _BLOCK_METHODS_BY_ID))
    for key, table in entries:  # check both before registering either
        if key in table and table[key] is not cls:
            raise ValueError(f"block method {key!r} is registered twice ({table[key].__name__}, {cls.__name__})")
    for key, table in entries:
        table[key] = cls
    return cls


def block_method_names() -> list[str]:
    return sorted(_BLOCK_METHODS_BY_NAME)


def block_method_class(name_or_id: str | int) -> type["BlockMethod"]:
    table = _BLOCK_METHODS_BY_ID if isinstance(name_or_id, int) else _BLOCK_METHODS_BY_NAME
    if name_or_id not in table:
        known = ", ".join(f"{c.name} (id {c.method_id})"
                          for c in sorted(_BLOCK_METHODS_BY_ID.values(), key=lambda c: c.method_id))
        raise ValueError(f"unknown block method {name_or_id!r}; known block methods: {known}")
    return table[name_or_id]


def make_block_method(name_or_id: "str | int | BlockMethod") -> "BlockMethod":
    """A block method from its name or id (block methods take no parameter).

    Example:
        >>> make_block_method("block_cache")
        BlockCache()
    """
    if isinstance(name_or_id, BlockMethod):
        return name_or_id
    return block_method_class(name_or_id)()


@dataclass(frozen=True)
class Streams:
    """A block's two token streams, ``[B, N, C]`` each; ``text`` is None where the block has no text output."""

    image: torch.Tensor
    text: torch.Tensor | None = None


def residual(output: Streams, inputs: Streams) -> Streams:
    """What the block added to each stream: ``output - input`` (text None when the block returns no text)."""
    text = None if output.text is None or inputs.text is None else output.text - inputs.text
    return Streams(output.image - inputs.image, text)


def add_residual(inputs: Streams, res: Streams, method: str = "block_cache") -> Streams:
    """``inputs + res`` per stream; a stream the residual lacks is absent from the result (as it was from the output
    the residual was taken from)."""
    for stream in ("image", "text"):
        x, r = getattr(inputs, stream), getattr(res, stream)
        if x is not None and r is not None and x.shape != r.shape:
            raise RuntimeError(f"a `{method}` block's stored {stream} residual has shape {tuple(r.shape)} but this "
                               f"step's {stream} input has {tuple(x.shape)}: batch size or resolution changed inside "
                               "one generation (call ditfa_optimum.reset_state(transformer) before a new one)")
    text = None if res.text is None or inputs.text is None else inputs.text + res.text
    return Streams(inputs.image + res.image, text)


class MemoryRef(NamedTuple):
    """One thing a block method reads from an earlier step: ``kind`` "residual" (the block's residual) or "mlp"
    (its MLP submodules' outputs), recorded at ``step``."""

    kind: str
    step: int


@dataclass
class BlockMemory:
    """What one block carries from earlier steps of one generation and CFG branch (only what later steps read)."""

    residuals: dict[int, Streams] = field(default_factory=dict)  # step -> the block's residual at that step
    mlp: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # step -> MLP name -> its output then

    def drop(self, ref: MemoryRef) -> None:
        (self.residuals if ref.kind == "residual" else self.mlp).pop(ref.step, None)

    def nbytes(self) -> int:
        tensors = [t for s in self.residuals.values() for t in (s.image, s.text) if t is not None]
        tensors += [t for outs in self.mlp.values() for t in outs.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class BlockMethod:
    """Base class. Subclasses are frozen dataclasses without fields (block methods take no parameter)."""

    name: ClassVar[str]
    method_id: ClassVar[int]
    #: the block's forward executes (its attention modules run the head-wise plan)
    runs_block: ClassVar[bool] = True
    #: its MLP submodules execute
    runs_mlp: ClassVar[bool] = True
    #: one letter for plan tables
    symbol: ClassVar[str] = "?"

    def __str__(self) -> str:
        return self.name

    def sources(self, step: int, ran: Sequence[int], mlp_ran: Sequence[int],
                mlps: Sequence[str]) -> tuple[MemoryRef, ...]:
        """What this method reads at ``step``; raise ValueError (saying what is missing and the fix) if it is absent.

        Args:
            step: the step it runs at.
            ran: earlier steps (ascending) where the block's forward executed.
            mlp_ran: earlier steps (ascending) where its MLP submodules executed.
            mlps: the block's MLP submodule names (empty: it has no separately callable MLP).
        """
        return ()

    def skip(self, inputs: Streams, step: int, residuals: dict[int, Streams],
             sources: tuple[MemoryRef, ...]) -> Streams:
        """The block's outputs when it does not run (only for methods with ``runs_block = False``)."""
        raise NotImplementedError(f"block method {self.name!r} runs the block; it has no skip output")

    def cost(self, attention: float, projections: float, mlp: float) -> float:
        """FLOPs of the block under this method, for one sample.

        Args:
            attention: its attention modules' FLOPs (QK^T and PV) at this step under the head plan.
            projections: its linear FLOPs outside the MLP (q/k/v/out projections, AdaLN modulation).
            mlp: its MLP's linear FLOPs.
        """
        raise NotImplementedError
