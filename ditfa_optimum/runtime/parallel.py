"""A plan under diffusers' context parallelism (Ulysses): each rank runs its share of the heads.

`transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))` splits the text and image tokens of a
call into N contiguous chunks, one per rank. diffusers' stock processors then hand q, k, v to `dispatch_attention_fn`,
which exchanges them all-to-all so that each rank holds H / N heads over the whole sequence, attends, and exchanges
back. A planned processor computes attention itself, so it does the same exchange (`ulysses_attention`) and runs the
plan for exactly its heads (`ModuleRuntime(..., heads=(lo, hi))`), with the fused kernel where it applies; cached head
outputs stay on the rank that computes those heads.

After the exchange the sequence arrives as the ranks' chunks one after the other, each chunk its own text then image
tokens (text first in FLUX). The arrow mask needs the model's order (all text, then the image row by row), so the
tokens are put back in that order before the plan's attention and returned to the chunk order after it: two gathers
of q, k, v and one of the output, against two all-to-alls of the same size.

Ring attention (``ring_degree > 1``) is refused: an arrow band crosses the ring's key chunks, which would need the
plan's blocks per ring step. So are ``ulysses_anything`` (uneven chunks) and gradients (the exchange here has no
backward; inference only).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def context_parallel(processor) -> object | None:
    """The diffusers `ContextParallelConfig` a processor runs under (``processor._parallel_config``, which
    ``enable_parallelism`` sets on every attention processor that has the attribute), or None."""
    config = getattr(processor, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None:
        return None
    if getattr(cp, "ring_degree", 1) > 1:
        raise ValueError(f"a ditfa plan does not run under ring attention (ring_degree={cp.ring_degree}): an arrow "
                         "band crosses the ring's key chunks; use ContextParallelConfig(ulysses_degree=N) instead, or "
                         "remove the plan (ditfa_optimum.remove(pipe))")
    if getattr(cp, "ulysses_anything", False):
        raise ValueError("a ditfa plan needs equal chunks per rank under Ulysses attention; use "
                         "ContextParallelConfig(ulysses_degree=N) without ulysses_anything, with token counts that "
                         "the degree divides")
    return cp if getattr(cp, "ulysses_degree", 1) > 1 else None


def ulysses_group(cp):
    """The process group of the Ulysses degree (diffusers' mesh when it recorded one, else the default group)."""
    mesh = getattr(cp, "_ulysses_mesh", None)
    if mesh is not None:
        return mesh.get_group()
    if cp.ulysses_degree != dist.get_world_size():
        raise ValueError(f"ulysses_degree {cp.ulysses_degree} is not the world size {dist.get_world_size()} and the "
                         "config has no Ulysses mesh: call transformer.enable_parallelism(config=...) first")
    return None


def _exchange(x: torch.Tensor, group) -> torch.Tensor:
    """``all_to_all_single`` over dim 0 of a contiguous ``[N, ...]`` tensor: chunk j goes to rank j, and chunk j of the
    result came from rank j."""
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def heads_to_sequence(x: torch.Tensor, n: int, group) -> torch.Tensor:
    """``[B, H, S_local, D]`` (all heads, this rank's tokens) -> ``[B, H / n, n * S_local, D]`` (this rank's heads,
    every rank's tokens, in rank order)."""
    B, H, S, D = x.shape
    parts = _exchange(x.reshape(B, n, H // n, S, D).transpose(0, 1).contiguous(), group)  # [n (rank), B, H/n, S, D]
    return parts.permute(1, 2, 0, 3, 4).reshape(B, H // n, n * S, D)


def sequence_to_heads(x: torch.Tensor, n: int, group) -> torch.Tensor:
    """The inverse of `heads_to_sequence`."""
    B, H, S, D = x.shape
    S //= n
    parts = _exchange(x.reshape(B, H, n, S, D).permute(2, 0, 1, 3, 4).contiguous(), group)  # [n (heads), B, H, S, D]
    return parts.transpose(0, 1).reshape(B, n * H, S, D)


def chunks_to_model_order(x: torch.Tensor, n: int, first: int) -> torch.Tensor:
    """``[B, H, n * S_c, D]``: n chunks, each ``first`` tokens of one segment (text, or image when image comes first)
    then the other's -> all of the first segment (chunk by chunk), then all of the second."""
    B, H, S, D = x.shape
    chunks = x.reshape(B, H, n, S // n, D)
    return torch.cat([chunks[:, :, :, :first].reshape(B, H, -1, D), chunks[:, :, :, first:].reshape(B, H, -1, D)], 2)


def model_order_to_chunks(x: torch.Tensor, n: int, first: int) -> torch.Tensor:
    """The inverse of `chunks_to_model_order`."""
    B, H, S, D = x.shape
    a, b = x[:, :, :n * first].reshape(B, H, n, first, D), x[:, :, n * first:].reshape(B, H, n, -1, D)
    return torch.cat([a, b], dim=3).reshape(B, H, S, D)


def ulysses_attention(attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp, local_text: int,
                      image_first: bool) -> torch.Tensor:
    """The plan's attention of a joint sequence split over the Ulysses ranks.

    ``q, k, v``: ``[B, H, S_local, D]``, this rank's chunk (``local_text`` text tokens and the image tokens, in the
    family's order); ``attend(q, k, v, num_text_tokens, heads)`` is the module's plan (`ModuleRuntime`). Returns the
    attention of this rank's chunk, every head."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("a ditfa plan under context parallelism is inference-only (its all-to-all has no backward); "
                         "run under torch.no_grad()")
    n, group = cp.ulysses_degree, ulysses_group(cp)
    B, H, S, D = q.shape
    if H % n:
        raise ValueError(f"Ulysses attention needs the ulysses_degree ({n}) to divide the heads ({H})")
    rank = dist.get_rank(group)
    first = S - local_text if image_first else local_text
    q, k, v = (chunks_to_model_order(heads_to_sequence(t, n, group), n, first) for t in (q, k, v))
    h = H // n
    out = attend(q, k, v, n * local_text, (rank * h, rank * h + h))
    return sequence_to_heads(model_order_to_chunks(out.contiguous(), n, first), n, group)
