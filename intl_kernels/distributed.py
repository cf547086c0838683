"""Autograd-aware gathering of embeddings across ranks (INTL whitens the global batch).

Under ``torch.distributed`` INTL all-gathers the embeddings of every rank so that each
rank whitens the same global batch. ``gather_rows`` is that all-gather with a backward
that sums the upstream gradient over ranks (all-reduce) and returns this rank's rows.
With each rank computing the same global loss, the summed gradient is world_size times
the single-process gradient of its rows, and DistributedDataParallel's averaging of
parameter gradients over ranks turns it back into exactly the single-process gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        world = dist.get_world_size(group)
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = x.shape[-2]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad.narrow(-2, start, ctx.rows), None


def gather_rows(x: torch.Tensor, group=None) -> tuple[torch.Tensor, slice]:
    """Concatenate the rows (dim −2) of x from every rank, in rank order.

    Args:
        x: (..., N, D) on every rank, the same shape everywhere (all_gather's rule).
        group: process group; default the world.

    Returns:
        (x_global: (..., world·N, D), rows: the slice of x_global that holds this rank's x).
        Without an initialised multi-rank group: (x, slice(0, N)).
    """
    n = x.shape[-2]
    if not is_distributed():
        return x, slice(0, n)
    rank = dist.get_rank(group)
    return _GatherRows.apply(x, group), slice(rank * n, (rank + 1) * n)
