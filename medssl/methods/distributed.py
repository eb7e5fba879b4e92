"""Collective helpers for the SSL losses: an all_gather that carries gradients, and reductions.

Every helper is a no-op (identity) when ``torch.distributed`` is not initialised or the world has one
process, so the losses run unchanged on a single device. Works under ``torchrun`` and under
``ignite.distributed`` (which initialises ``torch.distributed`` itself).

Gradient convention of :func:`all_gather_with_grad`: in backward, the gradients that every rank computed for
the gathered tensor are summed (``all_reduce``) and each rank keeps the rows it contributed. Combined with
DistributedDataParallel's averaging of parameter gradients over ranks, the parameters then receive exactly the
gradient of the mean of the per-rank losses, i.e. of the loss a single process would compute on the union of
all ranks' batches (when the per-rank losses are means over equally sized local batches).

The rank and world size come from ``ignite.distributed`` (medssl's one distributed API; it also sees a process
group that ``torchrun`` user code initialised itself); the collectives that carry or reduce tensors use
``torch.distributed`` directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import ignite.distributed as idist
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialised with more than one process."""
    return idist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return idist.get_world_size()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return idist.get_rank()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (no gradient); returns it. Identity when not distributed."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all ranks in place (no gradient); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def gather_sizes(local_size: int, device: torch.device | None = None) -> list[int]:
    """First-dimension sizes of every rank's tensor, in rank order (``[local_size]`` when not distributed)."""
    if not is_distributed():
        return [int(local_size)]
    size = torch.tensor([int(local_size)], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather_padded(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """all_gather of tensors whose first dimensions differ by rank: pad to the maximum, gather, trim."""
    max_n = max(sizes)
    if x.shape[0] < max_n:
        pad = x.new_zeros((max_n - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's rows; backward sums the gradients over ranks and returns this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes = sizes
        ctx.rank = rank()
        return _gather_padded(x.detach(), sizes)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` (n_r, ...) from all ranks along dim 0, in rank order, keeping gradients.

    Args:
        x: this rank's rows, shape (n, ...). Ranks may hold different n.
        sizes: every rank's n (from :func:`gather_sizes`); gathered here when omitted.

    Returns:
        (sum_r n_r, ...). Identity when not distributed. See the module docstring for the gradient rule.
    """
    if not is_distributed():
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], device=x.device)
    return _AllGatherWithGrad.apply(x, tuple(int(s) for s in sizes))
