"""Attention backends and the dispatch point that picks one per call.

A backend computes one layer's mixed plan in one call::

    attend(q, k, v, layout, widths) -> out
    q, k, v, out: [B, H, S, D]   (the joint sequence laid out as `layout` says)
    widths:       `Widths` (or a [B, H] int tensor)   0 = skip this (sample, head); W >= 1 = arrow band of W image
                                 blocks; W == layout.num_image_blocks = full attention; W <= -1 = the band of -W
                                 blocks computed in 8 bits (the `quantized` methods: `full_int8`, `arrow_int8`)

8-bit pairs follow `ditfa_optimum.fp8_attention`'s scheme (INT8 Q.K^T, P.V in the inputs' dtype): the triton backend
runs them in the fused kernel (a second launch), the PyTorch backends through the scheme's PyTorch form
(`attend_8bit`: correct, no faster). They are inference-only (rounding has no useful gradient).

Backends decide on `Widths.rows`, plain Python ints known on the host, never on tensor values: no device sync, and
no data-dependent branch for `torch.compile` to trip on.

Skipped entries of ``out`` are left unspecified; the runtime fills them (cache, CFG sharing).

Selection: an explicit name (``apply(..., backend="flex")``), else the ``DITFA_BACKEND`` environment variable, else
"auto": the first available backend in `AUTO_ORDER` for the tensors' device: the fused Triton kernel ("triton") on
CUDA, else FlexAttention, else the blocked PyTorch backend (the CPU default), never the reference (the test oracle).
When the call needs gradients (training), "auto" skips the backends that compute none (``differentiable = False``:
the fused kernel has no backward, and the FlexAttention BlockMask is built without the query blocks its backward
reads), and a named one of them is refused with what to use instead.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from ..masks import TokenLayout
from .log import say


AUTO_ORDER = ("triton", "flex", "blocked")
ENV_VAR = "DITFA_BACKEND"


def remember(memo, key, value):
    """Store ``value`` under ``key`` in ``memo`` (a dict) and return it; nothing is stored while `torch.compile`
    traces: the graph holds the value as a constant, and Dynamo cannot rebuild frozen dataclasses (a `TokenLayout`, a
    `Widths`) made during a trace."""
    if not torch.compiler.is_compiling():
        memo[key] = value
    return value


class HostCache:
    """A bounded LRU of what a backend derives on the host from a call's widths (launch tables, BlockMasks), keyed by
    value, so that equal widths of different modules and steps share one entry (behind `Widths.derive`, which keeps
    what a reused `Widths` needs on itself)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict = OrderedDict()

    def get(self, key, make: Callable[[], object]):
        if key in self._items:
            if not torch.compiler.is_compiling():
                self._items.move_to_end(key)
            return self._items[key]
        value = remember(self._items, key, make())
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return value


@dataclass(frozen=True)
class Widths:
    """The band widths of one attention call, as Python ints (``rows[b][h]``), and what backends read from them.
    The runtime builds one per (module, step, shape) and reuses it."""

    rows: tuple[tuple[int, ...], ...]
    full: int  # layout.num_image_blocks: the width of full attention
    #: derived from the rows once (backends ask on every call)
    any: bool = field(init=False, compare=False, repr=False)  # whether any (sample, head) is computed
    all_full: bool = field(init=False, compare=False, repr=False)
    quantized: bool = field(init=False, compare=False, repr=False)  # any (sample, head) in 8 bits (negative width)
    #: what backends derived from these widths (device tensors, masks), by backend and device (`derive`)
    derived: dict = field(init=False, compare=False, repr=False, default_factory=dict)

    def __post_init__(self):
        flat = [w for row in self.rows for w in row]
        object.__setattr__(self, "any", any(flat))
        object.__setattr__(self, "all_full", all(w == self.full for w in flat))
        object.__setattr__(self, "quantized", any(w < 0 for w in flat))

    @classmethod
    def of(cls, widths, full: int) -> "Widths":
        """From a `Widths` (returned as is), a ``[B, H]`` tensor (read on the host) or nested int sequences."""
        if isinstance(widths, Widths):
            return widths
        rows = widths.tolist() if isinstance(widths, torch.Tensor) else widths
        return cls(tuple(tuple(int(w) for w in row) for row in rows), full)

    def derive(self, key, make: Callable[[], object]):
        """What a backend derives from these widths (``make()``), kept on them under ``key``: the runtime builds one
        `Widths` per (module program, shape) and reuses it, so a generation derives each once, however many distinct
        width tables the plan has (a bounded cache shared by all of them would miss on every call of a long plan)."""
        found = self.derived.get(key)
        return found if found is not None else remember(self.derived, key, make())

    def split(self) -> tuple["Widths", "Widths"]:
        """``(plain, eight)``: the pairs computed in the inputs' dtype, and the 8-bit ones as positive widths (the
        others 0 in each)."""
        plain = tuple(tuple(max(w, 0) for w in row) for row in self.rows)
        eight = tuple(tuple(max(-w, 0) for w in row) for row in self.rows)
        return Widths(plain, self.full), Widths(eight, self.full)

    def groups(self) -> dict[int, tuple[list[int], list[int]]]:
        """Computed width -> (sample indices, head indices) of the pairs with that width."""
        found: dict[int, tuple[list[int], list[int]]] = {}
        for b, row in enumerate(self.rows):
            for h, w in enumerate(row):
                if w:
                    samples, heads = found.setdefault(w, ([], []))
                    samples.append(b)
                    heads.append(h)
        return found

    def tensor(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """``[B, H]`` on ``device``."""
        return torch.tensor(self.rows, dtype=dtype, device=device)


class Backend(Protocol):
    name: str
    #: whether autograd can differentiate through `attend` (a backend without the attribute is taken as able)
    differentiable: bool

    def available(self, device: torch.device) -> bool: ...

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
               widths: "Widths | torch.Tensor") -> torch.Tensor: ...


_BACKENDS: dict[str, Backend] = {}


def register_backend(factory: Callable[[], Backend]) -> Callable[[], Backend]:
    """Class decorator: register an attention backend under its ``name``."""
    backend = factory()
    _BACKENDS[backend.name] = backend
    return factory


def backend_names() -> list[str]:
    return list(_BACKENDS)


def check_backend_name(name: str | None) -> str:
    name = name or os.environ.get(ENV_VAR) or "auto"
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose 'auto' or one of {backend_names()}"
                         f"{f' (set by ${ENV_VAR})' if os.environ.get(ENV_VAR) == name else ''}")
    return name


def get_backend(name: str | None, device: torch.device, grad: bool = False) -> Backend:
    """Resolve a backend name ('auto', None or a registered name) for tensors on ``device``; ``grad``: the call needs
    gradients (see `needs_grad`)."""
    name = check_backend_name(name)
    if name == "auto":
        passed_over = []
        for candidate in AUTO_ORDER:
            backend = _BACKENDS.get(candidate)
            if backend is None or not auto_eligible(backend, device):
                continue
            if grad and not differentiable(backend):
                passed_over.append(backend.name)
                continue
            if passed_over and (device.type, backend.name) not in _warned_grad:
                _warned_grad.add((device.type, backend.name))
                say(__name__, logging.WARNING,
                    "ditfa: these attention calls need gradients, which %s cannot compute, so they run on %r "
                    "(slower); for inference call the transformer under torch.no_grad() (diffusers pipelines do)",
                    " and ".join(passed_over), backend.name)
            return backend
        raise RuntimeError(f"no attention backend can run on {device}{' with gradients' if grad else ''}; "
                           f"registered: {backend_names()}")
    backend = _BACKENDS[name]
    if not backend.available(device):
        raise ValueError(f"attention backend {name!r} cannot run on device {device}; use backend='auto' or one of "
                         f"{[n for n, b in _BACKENDS.items() if b.available(device)]}")
    if grad and not differentiable(backend):
        raise ValueError(f"attention backend {name!r} computes no gradients, and this call needs them (training, "
                         f"or inputs that require grad); apply the plan with backend='auto' (which picks one that "
                         f"does) or one of {[n for n, b in _BACKENDS.items() if differentiable(b)]}, or run under "
                         "torch.no_grad()")
    return backend


_warned_grad: set[tuple[str, str]] = set()


def differentiable(backend: Backend) -> bool:
    return getattr(backend, "differentiable", True)


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will differentiate through a call on ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` always on 4-D tensors: a 3-D ``[G, S, D]`` call gets a leading dimension
    (torch.onnx's dynamo exporter translates only 4-D attention; the result is the same)."""
    import torch.nn.functional as F

    if q.dim() == 3:
        mask = None if attn_mask is None else attn_mask.unsqueeze(0)
        return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def attend_by_width(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, widths,
                    arrow: Callable[..., torch.Tensor]) -> torch.Tensor:
    """The PyTorch backends' loop: an all-full call is one plain SDPA call; otherwise the (sample, head) pairs are
    grouped by band width, full groups run plain SDPA and arrow groups ``arrow(q, k, v, layout, width)`` on ``[G, S,
    D]`` tensors, 8-bit groups `attend_8bit`. Skipped pairs (width 0) are left unwritten."""
    widths = Widths.of(widths, layout.num_image_blocks)
    if widths.all_full:
        return sdpa(q, k, v)
    if widths.quantized:
        return with_8bit_heads(lambda *a: attend_by_width(*a, arrow), q, k, v, layout, widths)
    out = torch.empty_like(q)
    for width, (b, h) in widths.groups().items():
        attend = sdpa if width == widths.full else (
            lambda q_, k_, v_, w=width: arrow(q_, k_, v_, layout, w))
        out[b, h] = attend(q[b, h], k[b, h], v[b, h])
    return out


def attend_8bit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, width: int) -> torch.Tensor:
    """Attention of ``[B, H, S, D]`` tensors with a band of ``width`` image blocks (``layout.num_image_blocks``:
    full) in `ditfa_optimum.fp8_attention`'s 8-bit scheme, in PyTorch (INT8 Q.K^T, P.V in q's dtype); q's dtype."""
    from ..fp8_attention import quantize_qkv, quantized_attention
    from ..masks import arrow_mask

    keep = None if width >= layout.num_image_blocks else arrow_mask(layout, width, device=q.device)
    return quantized_attention(quantize_qkv(q, k, v, fp8_pv=False), keep, dtype=q.dtype)


def with_8bit_heads(attend: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    layout: TokenLayout, widths: Widths) -> torch.Tensor:
    """``attend(q, k, v, layout, plain)`` for the pairs in the inputs' dtype, then `attend_8bit` for the 8-bit ones,
    written into the same output (a backend whose own path computes no 8-bit heads)."""
    plain, eight = widths.split()
    out = attend(q, k, v, layout, plain) if plain.any else torch.empty_like(q)
    if out is q or out is k or out is v:  # never write into an input
        out = out.clone()
    for width, (b, h) in eight.groups().items():
        out[b, h] = attend_8bit(q[b, h][None], k[b, h][None], v[b, h][None], layout, width)[0]
    return out


def auto_eligible(backend: Backend, device: torch.device) -> bool:
    # on CPU FlexAttention runs only through its slow eager path and Triton only in its interpreter: "auto" keeps
    # both for accelerators
    if backend.name in ("flex", "triton") and device.type == "cpu":
        return False
    return backend.available(device)
