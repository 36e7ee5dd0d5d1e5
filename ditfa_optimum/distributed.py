"""Calibration over several processes (``torchrun``): the prompts' batches shared out, the statistics combined.

Started under ``torchrun --nproc_per_node N`` (``torch.distributed`` initialised, world size > 1), calibration shares
out its prompt batches: rank 0 runs the first batch alone, where the flowing choices of every (module, step) are made,
and hands them to the other ranks; the remaining batches go round-robin. Each batch's statistics are kept apart and
summed in batch order on every rank (the single-process run sums the same way), so every rank ends with the same
numbers as one process would, bit for bit, and searches the same plan. What runs on a couple of prompts (the
sensitivity measurement, the measured check of the search's alternatives) runs on rank 0 and is handed out.

Nothing here starts a process group: call ``torch.distributed.init_process_group`` (or run under ``torchrun``, which
sets the environment) first. Only rank 0 writes files (`from_rank0` around the writing).
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def from_rank0(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0, its result handed to every rank (computed locally without a process group)."""
    rank, size = world()
    if size == 1:
        return compute()
    box: list[Any] = [None]
    error = None
    if rank == 0:
        try:
            box[0] = ("ok", compute())
        except Exception as e:  # the other ranks wait on the broadcast: tell them, then raise here
            error, box[0] = e, ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "error":
        raise RuntimeError(f"rank 0 failed where every rank waited for its result: {value}")
    return value


def my_batches(batches: list[T]) -> list[T]:
    """The batches this rank runs after the first (rank 0's alone): round-robin over the ranks."""
    rank, size = world()
    return batches[1:][rank::size]


def gathered(per_batch: dict[int, T]) -> list[T]:
    """Every rank's ``{batch index: statistics}`` merged, in batch order (the same list on every rank)."""
    rank, size = world()
    if size > 1:
        parts: list[Any] = [None] * size
        dist.all_gather_object(parts, per_batch)
        per_batch = {k: v for part in parts for k, v in part.items()}
    return [per_batch[k] for k in sorted(per_batch)]


def summed(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-key sums of the batches' tensors, added in list order."""
    total = {k: v.clone() for k, v in parts[0].items()}
    for part in parts[1:]:
        for k, v in part.items():
            total[k] += v
    return total
