"""Gathering features across processes for contrastive negatives.

`accelerate.gather` does not carry gradients, so contrastive losses use `gather_with_grad`,
whose backward gives each process the gradient of its own slice summed over every process's
loss. Each process then computes only its local rows of the logits (open_clip's `local_loss`):
labels are offset by rank * local batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward: all-reduce (sum) of the gathered gradient, own slice kept.

    Written here rather than taken from torch.distributed.nn.functional.all_gather: that backward
    calls reduce_scatter, or all_to_all when it does not recognise the backend as gloo, and gloo
    has neither (a CPU process group created as "undefined", or "cpu:gloo,cuda:nccl", fails
    there). All-reduce exists on every backend (the SimCLR-family codebases' choice), and the
    gradient is the same: d(sum of all processes' losses) / d(own features)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (world * B, ...)
        rank, size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # contiguous first: gloo sends raw buffers, and an einsum's backward gives strided ones
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every process along dim 0; gradients flow back to each owner."""
    _, size = world()
    if size == 1:
        return x
    return _AllGatherWithGrad.apply(x.contiguous())


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (masks, labels) from every process; no gradient."""
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
