"""Cross-rank reductions for measurements (DDP), no-ops in a single process.

Every function here is a collective when ``torch.distributed`` is initialized with more than
one process: all ranks must call the same functions, in the same order, at the same steps,
whatever their local values are (never branch on a local nan before a reduction).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Number of processes of the default group (1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_global_zero() -> bool:
    """Whether this process writes files and histograms (rank 0)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _all_reduce(tensor: Tensor, op: dist.ReduceOp) -> Tensor:
    out = tensor.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out, op=op)
    return out


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over ranks (a new tensor; the input is not modified)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Mean over ranks: the global-batch value of a per-rank mean over equal shards."""
    return all_reduce_sum(tensor) / world_size()


def all_reduce_min(tensor: Tensor) -> Tensor:
    return _all_reduce(tensor, dist.ReduceOp.MIN)


def all_reduce_max(tensor: Tensor) -> Tensor:
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def all_reduce_mean_dict(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Mean over ranks of every tensor of a dict in one collective (same keys on every rank)."""
    if world_size() == 1 or not tensors:
        return {name: t.detach().clone() for name, t in tensors.items()}
    names = list(tensors)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors.values()), torch.float32)
    flat = torch.cat([tensors[n].detach().reshape(-1).to(dtype) for n in names])
    flat = all_reduce_mean(flat)
    out, offset = {}, 0
    for n in names:
        t = tensors[n]
        out[n] = flat[offset : offset + t.numel()].view_as(t).to(t.dtype)
        offset += t.numel()
    return out
