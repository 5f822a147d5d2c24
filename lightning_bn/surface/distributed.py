"""The grid split over ranks through a Lightning strategy (or Fabric): each rank evaluates a
contiguous share of the points, one all-gather puts the whole grid on every rank.

``strategy`` is anything with ``world_size``, ``global_rank`` and ``all_gather(tensor)``
(stacking along a new dim 0): ``trainer.strategy`` inside a fit, or a ``lightning.fabric.Fabric``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def share(total: int, world_size: int, rank: int) -> slice:
    """This rank's contiguous share of ``total`` points (ceil(total / world_size) each, the last
    ones possibly shorter or empty)."""
    per = math.ceil(total / world_size)
    return slice(min(rank * per, total), min((rank + 1) * per, total))


def evaluate_split(evaluate: Callable[[Tensor], Tensor], coords: Tensor, columns: int, strategy: Any = None) -> Tensor:
    """``evaluate(coords)`` (P, columns), computed share by share over the ranks of ``strategy``."""
    world = int(getattr(strategy, "world_size", 1) or 1)
    if strategy is None or world == 1:
        return evaluate(coords)
    total, per = len(coords), math.ceil(len(coords) / world)
    local = evaluate(coords[share(total, world, int(strategy.global_rank))])
    padded = torch.full((per, columns), math.nan, dtype=torch.float64)
    padded[: len(local)] = local
    device = getattr(strategy, "root_device", None) or getattr(strategy, "device", torch.device("cpu"))
    gathered = strategy.all_gather(padded.to(device))  # every rank calls it once, whatever its share
    return gathered.reshape(world * per, columns)[:total].cpu()
