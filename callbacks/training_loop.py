"""What a measurement reads from the running training loop: which step it is, how many
micro-batches make it, which learning rates it used.

Automatic optimization: step ``t`` is ``trainer.global_step`` (optimizer steps taken); a step
is ``accumulate_grad_batches`` micro-batches (fewer at the end of an epoch, where Lightning
always steps), each of whose losses Lightning divides by ``accumulate_grad_batches``; the
value may change between epochs (``GradientAccumulationScheduler``).

Manual optimization: ``global_step`` counts every optimizer's steps (two per batch for a GAN),
so it cannot say "the batch": the measured step is the batch, ``t`` = batches completed before
it (``trainer.fit_loop.epoch_loop.batch_progress``, checkpointed by Lightning, so a resumed run
counts on).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import GradientAccumulationScheduler


def steps_done(trainer: pl.Trainer) -> int:
    """``t`` of the step that starts now (or the number of steps taken, after one ended)."""
    if trainer.lightning_module.automatic_optimization:
        return trainer.global_step
    return trainer.fit_loop.epoch_loop.batch_progress.total.completed


def accumulating(trainer: pl.Trainer) -> bool:
    """In ``on_train_batch_end``: whether this micro-batch only accumulated gradients (Lightning's
    own rule: the optimizer steps after every k-th batch of an epoch and after its last batch)."""
    loop = trainer.fit_loop.epoch_loop
    should = getattr(loop, "_should_accumulate", None)
    if callable(should):
        return bool(should())
    progress = loop.batch_progress
    return progress.current.ready % trainer.accumulate_grad_batches != 0 and not progress.is_last_batch


def max_accumulation(trainer: pl.Trainer) -> int:
    """The largest number of micro-batches a step of this fit may have (Trainer argument and any
    ``GradientAccumulationScheduler``)."""
    largest = int(trainer.accumulate_grad_batches)
    for cb in trainer.callbacks:
        if isinstance(cb, GradientAccumulationScheduler):
            largest = max([largest, *(int(k) for k in cb.scheduling.values())])
    return largest


def all_lrs(trainer: pl.Trainer) -> list[float]:
    """The learning rate of every param group of every optimizer, in order."""
    return [float(group["lr"]) for optimizer in trainer.optimizers for group in optimizer.param_groups]


def noise_sources(module: Any) -> list[Any]:
    """Submodules implementing the noise replay protocol (a boolean ``replay_noise``)."""
    return [m for m in module.modules() if isinstance(getattr(m, "replay_noise", None), bool)]


def supports_noise_state(module: Any) -> bool:
    """Whether a noise source can hand out and take back its realization, as accumulation needs
    (each micro-batch of a step had its own): ``noise_state()`` and ``load_noise_state(state)``."""
    return callable(getattr(module, "noise_state", None)) and callable(getattr(module, "load_noise_state", None))
