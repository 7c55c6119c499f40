"""Gathering features across processes for contrastive negatives.

`accelerate.gather` does not carry gradients, so contrastive losses use
`torch.distributed.nn.functional.all_gather`, whose backward sends each process the gradient
of its own slice. Each process then computes only its local rows of the logits (open_clip's
`local_loss`): labels are offset by rank * local batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every process along dim 0; gradients flow back to each owner."""
    _, size = world()
    if size == 1:
        return x
    from torch.distributed.nn.functional import all_gather
    parts = all_gather(x.contiguous())
    for part in parts:
        # gloo sends the incoming gradients as raw buffers: a non-contiguous one (an einsum's
        # backward gives them) would arrive scrambled, so make each contiguous first
        part.register_hook(torch.Tensor.contiguous)
    return torch.cat(parts, dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (masks, labels) from every process; no gradient."""
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
