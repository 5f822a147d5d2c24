"""Where measured values go: scalars to every Lightning logger, histograms and figures to TensorBoard.

Scalars are written with ``logger.log_metrics(values, step=t)`` for every logger in
``trainer.loggers`` (rank 0 only) rather than through ``LightningModule.log``: ``self.log``
on-step values reach the loggers only on steps where ``(t + 1) % log_every_n_steps == 0``,
which would silently drop most measurements of an ``every_n_steps`` or log-spaced schedule.
The step is ``t``, the same step Lightning uses for the metrics logged in step ``t``'s
``training_step``, so measurements line up with ``train/loss`` in every logger.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from callbacks.distributed import all_reduce_max, all_reduce_min, all_reduce_sum, is_global_zero


def tensorboard_writer(trainer: Any) -> Any | None:
    """The ``SummaryWriter`` of the first TensorBoardLogger of the trainer, or None.

    On ranks other than 0 this may be a dummy; callers write only on rank 0 anyway.
    """
    from pytorch_lightning.loggers import TensorBoardLogger

    for logger in getattr(trainer, "loggers", None) or []:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def write_scalars(trainer: Any, values: Mapping[str, float], step: int) -> None:
    """Write ``values`` to every logger of ``trainer`` at ``step`` (rank 0 only)."""
    if not values or not is_global_zero():
        return
    for logger in getattr(trainer, "loggers", None) or []:
        logger.log_metrics(dict(values), step=step)


def histogram_stats(values: Tensor, bins: int = 64) -> dict[str, Any] | None:
    """Histogram of the finite entries of ``values`` over all DDP ranks (a collective).

    Returns the arguments of ``SummaryWriter.add_histogram_raw`` (min, max, num, sum,
    sum_squares, bucket_limits, bucket_counts), or None if no rank has a finite value.
    Exact over the global batch: ranges and counts are reduced, not sampled on rank 0.
    """
    flat = values.detach().reshape(-1).double()
    flat = flat[torch.isfinite(flat)]
    if flat.numel():
        lo, hi = flat.min(), flat.max()
    else:
        lo, hi = flat.new_tensor(float("inf")), flat.new_tensor(float("-inf"))
    lo, hi = all_reduce_min(lo.reshape(1)), all_reduce_max(hi.reshape(1))
    moments = all_reduce_sum(torch.stack([flat.new_tensor(float(flat.numel())), flat.sum(), (flat * flat).sum()]))
    if moments[0] == 0:
        return None
    low, high = float(lo), float(hi)
    if high <= low:  # all values equal: one narrow bucket around them
        high = low + max(abs(low) * 1e-6, 1e-12)
    counts = all_reduce_sum(torch.histc(flat, bins=bins, min=low, max=high))
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)[1:]
    return {
        "min": low,
        "max": float(hi),
        "num": int(moments[0]),
        "sum": float(moments[1]),
        "sum_squares": float(moments[2]),
        "bucket_limits": edges.tolist(),
        "bucket_counts": counts.tolist(),
    }
